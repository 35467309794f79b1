"""Lets timm import when torchvision's compiled ops cannot load beside the installed torch.

timm imports torchvision. A torchvision wheel built for another torch (e.g. the registry's CUDA build
beside a CPU-only torch) fails to load its ``_C`` extension, and its import then dies registering fake
kernels for ops that were never defined ("operator torchvision::nms does not exist"). Only in that case
this module defines the missing op schemas (no kernels: calling them still raises torchvision's own
"Couldn't load custom C++ ops" error) and imports torchvision again. On a working install it does
nothing but import torchvision.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import re
import sys

import torch

# Schemas of the ops torchvision registers fake kernels for unconditionally (torchvision/csrc/ops).
_KNOWN_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_MISSING_OP = re.compile(r"operator torchvision::(\w+) does not exist")


def _purge(package: str) -> None:
    for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        del sys.modules[name]


def ensure_torchvision_importable(package: str = "torchvision", max_ops: int = 16) -> list[str]:
    """Imports ``package`` (torchvision), defining missing op schemas only if its import fails.

    Returns the names of the ops it had to define: empty on a working install (or when torchvision is
    absent), so callers and tests can tell whether it acted.
    """
    if package in sys.modules or importlib.util.find_spec(package) is None:
        return []
    defined: list[str] = []
    library = None
    for _ in range(max_ops + 1):
        try:
            importlib.import_module(package)
            break
        except RuntimeError as e:
            match = _MISSING_OP.search(str(e))
            if match is None or match.group(1) in defined or len(defined) >= max_ops:
                raise
            _purge(package)
            if library is None:
                # Kept alive by the torch dispatcher for the life of the process.
                library = torch.library.Library("torchvision", "FRAGMENT")  # noqa: TOR901
                _LIBRARIES.append(library)
            op = match.group(1)
            library.define(_KNOWN_SCHEMAS.get(op, f"{op}(Tensor[] args) -> Tensor"))
            defined.append(op)
    if defined:
        logging.getLogger(__name__).debug(
            "%s's compiled ops failed to load (a build for another torch?); defined placeholder schemas "
            "for %s so that timm can import; %s.ops raises if called.",
            package,
            ", ".join(defined),
            package,
        )
    return defined


# torch.library.Library objects deregister their definitions when garbage collected.
_LIBRARIES: list[torch.library.Library] = []
