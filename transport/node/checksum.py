"""Page checksums of the memory node's store: one u32 per written page, in ``<space>.sums``.

Two kinds, recorded per store in ``<store>/store.checksum`` (one word and a newline):

- ``crc32c`` (CRC32C, Castagnoli): every store made since it exists. Computed by ``crc32c.c``
  with the CPU's crc32 instruction (a portable table where the CPU has none), the same C the
  fault lane links, reached here through ``transport.node._crc32c_cffi``.
- ``crc32`` (zlib's): stores written before; a store with a ``store.id`` or ``.sums`` files but
  no ``store.checksum`` is one of them, read and written with crc32 for good.

A page is always verified with the kind its store was written with.
"""

from __future__ import annotations

import logging
import os
import zlib
from array import array
from pathlib import Path

from transport.errors import StoreError
from transport.wire import PAGE_SIZE

log = logging.getLogger(__name__)

try:
    from transport.node._crc32c_cffi import ffi, lib
except ImportError as _exc:  # not built: said when a crc32c store is opened
    ffi = lib = None
    MISSING = f"{type(_exc).__name__}: {_exc}"
else:
    MISSING = ""

CRC32 = "crc32"
CRC32C = "crc32c"
KINDS = (CRC32, CRC32C)
DEFAULT = CRC32C  # new stores
CHECKSUM_FILE = "store.checksum"


def _need_lib() -> None:
    if lib is None:
        raise StoreError("the CRC32C extension transport.node._crc32c_cffi did not load "
                         f"({MISSING}); build it with `pip install -e .` (or `python3 setup.py "
                         "build_ext --inplace`) in the checkout")


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC32C of ``data``, continuing ``crc`` (zlib.crc32's convention)."""
    _need_lib()
    return lib.ssi_crc32c(crc, ffi.from_buffer(data), len(data))


def crc32c_table(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """The same from the portable tables (the fallback without SSE4.2; a test reference)."""
    _need_lib()
    return lib.ssi_crc32c_table(crc, ffi.from_buffer(data), len(data))


def hardware() -> bool:
    """Whether CRC32C runs on the CPU's crc32 instruction here."""
    _need_lib()
    return bool(lib.ssi_crc32c_hardware())


def page_sums(kind: str, data: bytes | bytearray | memoryview) -> array:
    """The ``kind`` checksum of each whole page of ``data`` (u32 each, in order)."""
    view = memoryview(data)
    npages = len(view) // PAGE_SIZE
    if kind == CRC32C:
        _need_lib()
        out = array("I", bytes(4 * npages))
        if npages:
            lib.ssi_crc32c_pages(ffi.from_buffer(view), npages, PAGE_SIZE,
                                 ffi.from_buffer("uint32_t[]", out, require_writable=True))
        return out
    return array("I", [zlib.crc32(view[i:i + PAGE_SIZE])
                       for i in range(0, npages * PAGE_SIZE, PAGE_SIZE)])


def store_checksum(root: Path, fresh: bool) -> str:
    """The checksum kind of the store in ``root``: a ``fresh`` store (no identity or checksum
    file yet) is made ``DEFAULT`` and says so in its ``store.checksum``; an older store without
    that file is crc32."""
    path = root / CHECKSUM_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        if not fresh:
            log.info("store %s: page checksums crc32 (written before crc32c; kept)", root)
            return CRC32
        return _record(path, DEFAULT)
    except OSError as exc:
        raise StoreError(f"cannot read {path} (the store's checksum kind): {exc.strerror}; "
                         "check the store directory's permissions", errno=exc.errno) from exc
    kind = text.strip()
    if kind not in KINDS or text != kind + "\n":
        raise StoreError(f"{path} says {text[:40]!r}, not a checksum kind this node knows "
                         f"({', '.join(KINDS)}): the store was damaged or written by a newer "
                         "node; restore the file or run that node")
    if kind == CRC32C:
        _need_lib()
    return kind


def _record(path: Path, kind: str) -> str:
    if kind == CRC32C:
        _need_lib()  # before the store says crc32c, not after
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600)
        try:
            os.write(fd, f"{kind}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise StoreError(f"cannot create {path} (the store's checksum kind): {exc.strerror}; "
                         "check the store directory's permissions and free space",
                         errno=exc.errno) from exc
    log.info("store: new store, page checksums %s", kind)
    return kind


def bench_lines(seconds: float = 0.5, label: str = "") -> list[dict[str, object]]:
    """The cost per 4 KiB page of each kind, as the store pays it (`page_sums` of 64 KiB, a
    fault lane's fetch), in this process: JSON lines for ``ssi-pager bench transport``, and
    the ratio crc32c / crc32 (below 1: crc32c is cheaper)."""
    import time

    data = os.urandom(16 * PAGE_SIZE)
    lines: list[dict[str, object]] = []
    cost: dict[str, float] = {}
    for kind in KINDS:
        n, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds:
            for _ in range(64):
                page_sums(kind, data)
            n += 64 * 16
        cost[kind] = elapsed / n * 1e9
        line: dict[str, object] = {"name": f"checksum-{kind}-4k", "ns_per_page":
                                   round(cost[kind], 1), "gbps": round(
                                       PAGE_SIZE * 8 / cost[kind], 2), "pages": n}
        if kind == CRC32C:
            line["hardware"] = hardware()
        if label:
            line["label"] = label
        lines.append(line)
    lines.append({"name": "ratio-checksum-crc32c-crc32-4k",
                  "ratio": round(cost[CRC32C] / cost[CRC32], 3),
                  **({"label": label} if label else {})})
    return lines
