"""Build ``transport.node._crc32c_cffi`` (cffi API mode): the page checksum of the memory
node's store, CRC32C with the CPU's crc32 instruction (``crc32c.c``, the same C the fault lane
links), for the Python store through ``transport/node/checksum.py``.

The cdef is ``crc32c.h`` without its preprocessor lines. Named in setup.py's
``cffi_modules``; by hand ``python transport/node/_crc32c_build.py`` compiles it in place.
"""

import os
import sys

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.normpath(os.path.join(_HERE, "..", ".."))
_NODE = os.path.join("transport", "node")  # paths relative to the checkout (setup.py's cwd)

ffi = FFI()
with open(os.path.join(_HERE, "crc32c.h")) as f:
    ffi.cdef("\n".join(line for line in f.read().splitlines()
                       if not line.lstrip().startswith("#")))
ffi.set_source("transport.node._crc32c_cffi", '#include "crc32c.h"\n',
               sources=[os.path.join(_NODE, "crc32c.c")],
               include_dirs=[_NODE],
               depends=[os.path.join(_NODE, "crc32c.h")],
               extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"])

if __name__ == "__main__":
    os.chdir(_ROOT)
    sys.exit(ffi.compile(tmpdir=_ROOT, verbose=True) and 0)
