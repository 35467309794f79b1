"""Training heads from the cache: data (in memory or streamed), the loop, checks, metrics, evaluation, run
directories, plots.
"""
