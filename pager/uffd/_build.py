"""Build the binding's cffi extension ``pager.uffd._uffd_cffi`` (API mode, out of line).

Named in setup.py's ``cffi_modules``; setuptools runs it at install. It can also be run by hand:
``python pager/uffd/_build.py`` compiles the extension in place.

The C lives in ``csrc/`` (``ssi_uffd.h`` is the preamble, the ``.c`` files are compiled beside
the generated module); the cdef declarations stay in ``_cffi_src/*.py``. The fault loop and the
installer include ``transport/wire/ssip_wire.h`` (generated from the wire module) for the wire.
"""

import os
import sys

# setuptools executes this file outside the package: import the header modules from its folder
# (importing ``pager.uffd`` here would need the extension that is being built).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _cffi_src import faultloop, fmbase, install, mman, rmw, toucher, userfaultfd
from _cffi_src.utils import build_ffi

sys.path.pop(0)

_HERE = os.path.dirname(os.path.abspath(__file__))
_CSRC = os.path.join(_HERE, "csrc")
_WIRE = os.path.normpath(os.path.join(_HERE, "..", "..", "transport", "wire"))
_SOURCES = ["uffd.c", "mman.c", "toucher.c", "install.c", "faultloop.c", "farmem.c", "rmw.c",
            "fmbase.c"]


def _path(p: str) -> str:
    """Relative to the working directory when below it (what setuptools prefers)."""
    rel = os.path.relpath(p)
    return p if rel.startswith("..") else rel


ffi = build_ffi(
    "pager.uffd._uffd_cffi",
    [userfaultfd, mman, toucher, install, faultloop, rmw, fmbase],
    preamble='#include "ssi_uffd.h"',
    sources=[_path(os.path.join(_CSRC, s)) for s in _SOURCES],
    include_dirs=[_path(_CSRC), _path(_WIRE)],
    libraries=["pthread", "ssl", "crypto"],  # TLS lanes: transport/wire/ssip_io.h
    extra_compile_args=["-O2", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    ffi.compile(tmpdir=os.path.join(_HERE, "..", ".."), verbose=True)
