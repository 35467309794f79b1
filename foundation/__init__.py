"""The ground floor, below both stages and the store: configs, file formats and content hashes, atomic
writes, devices, file hashing, the dask cluster, and the stage 1 -> stage 2 features contract. Imports
no other amflow package.
"""
