"""Stage 2: temporal heads and the averaging classifier trained from the cache; sweeps; end-to-end finetuning."""
