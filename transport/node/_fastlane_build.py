"""Build the memory node's C fault lane ``transport.node._fastlane_cffi`` (cffi API mode).

The C lives in ``fastlane.c``/``fastlane.h`` beside this file and takes every wire number from
``transport/wire/ssip_wire.h``; the cdef is ``fastlane.h`` itself, minus its preprocessor guard
lines, so the declarations exist once. Named in setup.py's ``cffi_modules``; by hand
``python transport/node/_fastlane_build.py`` compiles it in place.
"""

import os
import sys

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.normpath(os.path.join(_HERE, "..", ".."))
_NODE = os.path.join("transport", "node")  # paths relative to the checkout (setup.py's cwd)
_WIRE = os.path.join("transport", "wire")
# warnings on; the lane must build clean
CFLAGS = ["-O2", "-Wall", "-Wextra", "-std=gnu11"]


def _cdef(header: str) -> str:
    """The header's declarations, without what cffi's cdef does not parse."""
    keep = []
    for line in header.splitlines():
        s = line.strip()
        if s.startswith(("#ifndef", "#endif", "#include")) or s == "#define SSI_FASTLANE_H":
            continue
        keep.append(line)
    return "\n".join(keep)


ffi = FFI()
with open(os.path.join(_HERE, "fastlane.h")) as f:
    ffi.cdef(_cdef(f.read()))
ffi.set_source("transport.node._fastlane_cffi", '#include "fastlane.h"\n',
               sources=[os.path.join(_NODE, "fastlane.c"), os.path.join(_NODE, "crc32c.c")],
               include_dirs=[_NODE, _WIRE],
               depends=[os.path.join(_NODE, "fastlane.h"), os.path.join(_NODE, "crc32c.h"),
                        os.path.join(_WIRE, "ssip_wire.h"),
                        os.path.join(_WIRE, "ssip_io.h"), os.path.join(_WIRE, "ssip_poll.h")],
               define_macros=[("_GNU_SOURCE", None)],
               # page checksums: crc32c.c (crc32c stores), zlib's crc32 (stores written before);
               # OpenSSL for TLS lanes
               libraries=["z", "ssl", "crypto"],
               extra_compile_args=CFLAGS)

if __name__ == "__main__":
    os.chdir(_ROOT)
    sys.exit(ffi.compile(tmpdir=_ROOT, verbose=True) and 0)
