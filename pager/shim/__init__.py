"""The QEMU preload library (ssi_shim.c), built at install as ``pager/shim/_ssi_shim*.so``.

It is an ordinary shared object for LD_PRELOAD, not a Python module: never import it.
"""

from __future__ import annotations

import importlib.machinery
from pathlib import Path

from pager.errors import VmError

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "ssi_shim.c"


def library() -> Path:
    """Path of the built preload library; VmError if the package was installed without it."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = HERE / f"_ssi_shim{suffix}"
        if candidate.is_file():
            return candidate
    raise VmError(f"the QEMU preload library is not built (no _ssi_shim*.so in {HERE}); "
                  f"reinstall with `pip install -e .` from the source checkout (needs gcc)")
