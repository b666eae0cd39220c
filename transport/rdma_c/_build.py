"""Build the RDMA data path: ``transport.rdma_c._rdma_cffi`` (verbs_setup.c + verbs_data.c +
lane.c, linked to libibverbs and librdmacm) and ``transport.rdma_c._rdma_loopback_cffi``
(loopback.c + lane.c, the test double; no RDMA libraries needed).

The verbs extension needs rdma-core's headers (Debian: ``apt install libibverbs-dev
librdmacm-dev``): `have_verbs_headers` says whether they are there, and setup.py leaves the
extension out with a message when they are not. The cdef is ``ssip_rdma.h`` without its
preprocessor lines. By hand: ``python transport/rdma_c/_build.py`` builds both in place.
"""

from __future__ import annotations

import os
import sys

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.normpath(os.path.join(_HERE, "..", ".."))
_DIR = os.path.join("transport", "rdma_c")  # relative to the checkout (setup.py's cwd)
_WIRE = os.path.join("transport", "wire")
CFLAGS = ["-O2", "-Wall", "-Wextra", "-std=gnu11"]
VERBS_HEADERS = ("infiniband/verbs.h", "rdma/rdma_cma.h")
INCLUDE_DIRS = ("/usr/include", "/usr/local/include")


def have_verbs_headers() -> str | None:
    """None when rdma-core's development headers are installed, else what is missing."""
    for header in VERBS_HEADERS:
        if not any(os.path.exists(os.path.join(d, header)) for d in INCLUDE_DIRS):
            return (f"{header} not found: the RDMA extension is not built (install "
                    f"libibverbs-dev and librdmacm-dev, then rebuild)")
    return None


def _make(module: str, backend: list[str], libraries: list[str]) -> FFI:
    ffi = FFI()
    with open(os.path.join(_HERE, "ssip_rdma.h")) as f:
        ffi.cdef("\n".join(line for line in f.read().splitlines()
                           if not line.lstrip().startswith("#")))
    deps = ["ssip_rdma.h", "rdma_util.h", "lane.c", *backend]
    ffi.set_source(module, '#include "ssip_rdma.h"\n',
                   sources=[os.path.join(_DIR, c) for c in ("lane.c", *backend)
                            if c.endswith(".c")],
                   include_dirs=[_DIR, _WIRE], libraries=libraries,
                   depends=[os.path.join(_DIR, d) for d in deps]
                   + [os.path.join(_WIRE, "ssip_wire.h")],
                   define_macros=[("_GNU_SOURCE", None)], extra_compile_args=CFLAGS)
    return ffi


# the verbs backend: connection setup and the data path, and the header they share
VERBS = ["verbs_setup.c", "verbs_data.c", "verbs_conn.h"]
ffi = _make("transport.rdma_c._rdma_cffi", VERBS, ["ibverbs", "rdmacm"])
ffi_loopback = _make("transport.rdma_c._rdma_loopback_cffi", ["loopback.c"], [])

if __name__ == "__main__":
    os.chdir(_ROOT)
    missing = have_verbs_headers()
    if missing:
        print(f"transport/rdma_c: {missing}", file=sys.stderr)
    else:
        ffi.compile(tmpdir=_ROOT, verbose=True)
    ffi_loopback.compile(tmpdir=_ROOT, verbose=True)
