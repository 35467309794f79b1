"""Videos and datasets: decoding (decord), frame sampling and views, the datasets' annotation files,
generated videos.
"""
