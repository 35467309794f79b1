"""Stage 2: temporal heads trained from the cache, sweeps, evaluation, end-to-end finetuning, demo."""
