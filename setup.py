"""Build hooks setuptools cannot express in pyproject.toml: the cffi extension."""

import sys

from setuptools import Extension, setup

sys.path.insert(0, "transport/rdma_c")
from _build import have_verbs_headers

# The QEMU preload library: a plain shared object for LD_PRELOAD (no PyInit; never imported),
# built like an extension so `pip install .` and `pip install -e .` both place it in pager/shim/.
SHIM = Extension("pager.shim._ssi_shim", sources=["pager/shim/ssi_shim.c"],
                 libraries=["dl", "pthread"], extra_compile_args=["-O2", "-Wall"])

CFFI = ["pager/uffd/_build.py:ffi", "transport/node/_fastlane_build.py:ffi",
        "transport/node/_crc32c_build.py:ffi",
        "transport/tlsc/_build.py:ffi",  # the lanes' TLS (OpenSSL)
        "transport/rdma_c/_build.py:ffi_loopback"]  # the RDMA test double: builds anywhere
_missing = have_verbs_headers()
if _missing:  # the RDMA data path needs rdma-core's headers; without them TCP only
    print(f"setup.py: {_missing}", file=sys.stderr)
else:
    CFFI.append("transport/rdma_c/_build.py:ffi")

setup(cffi_modules=CFFI, ext_modules=[SHIM])
