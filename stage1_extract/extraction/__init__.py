"""Stage 1's job: decoding a split, running the feature model, writing the store; augmented training views;
pictures.
"""
