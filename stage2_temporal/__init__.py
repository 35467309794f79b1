"""Stage 2: temporal heads trained from the cache, sweeps, evaluation, end-to-end finetuning, demo."""

# Stage 1's package import runs the torchvision compat shim, which must precede the first torchvision
# import (augment.py's transforms; timm's).
import stage1_extract  # noqa: F401
