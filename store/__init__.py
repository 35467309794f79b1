"""The Zarr feature store between stage 1 and stage 2 (imports neither stage)."""
