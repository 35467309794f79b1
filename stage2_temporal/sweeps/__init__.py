"""Sweeps: many training configs from one cache, in parallel on dask."""
