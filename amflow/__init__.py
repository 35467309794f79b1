"""The ``amflow`` command line: parses arguments and calls stage1_extract, store and stage2_temporal."""

__version__ = "0.1.0"
