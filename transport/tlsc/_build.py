"""Build the lanes' C TLS layer ``transport.tlsc._tlsc_cffi`` (cffi API mode, OpenSSL).

The C lives in ``tlsc.c``/``tlsc.h`` beside this file; the cdef is ``tlsc.h`` itself, minus
its preprocessor guard lines. Named in setup.py's ``cffi_modules``; by hand
``python transport/tlsc/_build.py`` compiles it in place.
"""

import os
import sys

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.normpath(os.path.join(_HERE, "..", ".."))
_DIR = os.path.join("transport", "tlsc")  # relative to the checkout (setup.py's cwd)
LIBS = ["ssl", "crypto"]  # libssl-dev 3.x (deploy/setup-host.sh)


def _cdef(header: str) -> str:
    """The header's declarations: no guard, no include (cffi's cdef does not parse them)."""
    return "\n".join(line.replace("(-11)", "-11") for line in header.splitlines()
                     if not line.startswith(("#if", "#endif", "#include", "#define SSI_TLSC_H")))


ffi = FFI()
with open(os.path.join(_HERE, "tlsc.h")) as f:
    ffi.cdef(_cdef(f.read()))
ffi.set_source("transport.tlsc._tlsc_cffi", '#include "tlsc.h"\n',
               sources=[os.path.join(_DIR, "tlsc.c")], include_dirs=[_DIR],
               depends=[os.path.join(_DIR, "tlsc.h")], define_macros=[("_GNU_SOURCE", None)],
               libraries=LIBS, extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"])

if __name__ == "__main__":
    os.chdir(_ROOT)
    sys.exit(ffi.compile(tmpdir=_ROOT, verbose=True) and 0)
