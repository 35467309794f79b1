"""The methods on a frozen backbone: AM flow with its scaled parallel adapters (paper 000), STDHA and
linear adapters (ZeroI2V, paper 002), and the model configs that build them.
"""
