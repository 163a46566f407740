"""Import torchvision on a CPU-only torch.

PyPI's torchvision 0.28.0 wheel is a CUDA build. With the CPU wheel of torch 2.13.0 its C++
extension does not load, and ``import torchvision`` then fails in ``_meta_registrations`` on
``torchvision::nms`` / ``torchvision::qnms``, which it registers fake kernels for. Defining those two
operator schemas with :mod:`torch.library` before the import lets torchvision import; only its C++
ops (nms, roi_align, the image decoders) stay unavailable, and stealrange uses none of them.

Always import torchvision through this module::

    from common.compat import torchvision
"""

from __future__ import annotations

import importlib
import types

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library: torch.library.Library | None = None


def _op_exists(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
    except RuntimeError:
        return False
    return True


def import_torchvision() -> types.ModuleType:
    """Return the torchvision module, defining the missing op schemas first if needed."""
    global _library
    missing = [name for name in _SCHEMAS if not _op_exists(name)]
    if missing:
        try:
            # Loading the extension succeeds on a matching (CUDA) torch; then nothing is missing.
            importlib.import_module("torchvision")
            return importlib.import_module("torchvision")
        except (RuntimeError, OSError, ImportError):
            pass
        missing = [name for name in _SCHEMAS if not _op_exists(name)]
        if missing and _library is None:
            _library = torch.library.Library("torchvision", "FRAGMENT")
            for name in missing:
                _library.define(_SCHEMAS[name])
    return importlib.import_module("torchvision")


torchvision = import_torchvision()
