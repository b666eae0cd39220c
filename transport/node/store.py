"""The memory node's page store: one sparse file per address space.

``<store>/<space>.pages`` holds the space's bytes at their gpa. Only written pages occupy disk.
Which pages were written is the bitmap in ``<store>/<space>.written`` (one bit per page, a
sparse file mapped shared), so a never-written page is answered as "zero" without reading or
sending 4 KiB of zeros. A store is all or nothing: its bits are set only after the ``pwrite``
of its whole range returned, so a store that failed half-way (disk full) leaves its new pages
unwritten, also after a restart. Both are in the kernel's page cache before the store is
acknowledged: a killed node (even ``kill -9``) loses no acknowledged page; ``sync=True`` adds
``fdatasync`` of the data, then ``msync`` of the bits, per write for power loss. (A failed store
over pages written before leaves them written, with old or new bytes.) A store from before the
bitmap file existed gets one built from the page file's extents (``SEEK_DATA``/``SEEK_HOLE``).

A store's pages and their checksums are two writes. Before the first, the range of pages the
store changes goes into ``<store>/<space>.intent`` (mapped shared, so a ``kill -9`` keeps it;
synced first with ``sync=True``), and it is cleared after the second. A node killed between the
two finds the range there at its next start and checksums those pages again from the bytes on
disk (each page is whole, old or new: the store was never acknowledged, and its sender sends it
again), instead of failing them as corrupt.

The bitmap mapping has a fixed capacity (one bit per page up to the node's address space limit;
untouched parts cost no memory or disk), so its address never changes: the memory node's C fault
lane (`transport.node.fastlane`) reads it from its own thread while stores set bits here, under the
space's lock and only after their pwrite returned.

Entries of the store that are not regular page files (a symlink, directory or FIFO named
``*.pages``, or a file larger than the node's space limit) are skipped with a warning naming
them; the node serves the others.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from transport.errors import StoreCorruptError, StoreError
from transport.node.checksum import page_sums, store_checksum
from transport.token import private_dir
from transport.wire import (
    DEFAULT_MAX_SPACE_BYTES,
    PAGE_SHIFT,
    PAGE_SIZE,
    valid_space_name,
)

log = logging.getLogger(__name__)

BITMAP_SUFFIX = ".written"
SUMS_SUFFIX = ".sums"  # checksum of each written page, 4 bytes per page (native order)
GEN_SUFFIX = ".gen"  # the space's generation: random, made with its page file
INTENT_SUFFIX = ".intent"  # the store under way: (first page, pages), u64 each; 0 pages: none
STORE_ID_FILE = "store.id"  # the store's identity: random, made with the store
DEFAULT_MAX_SPACES = 1024  # two fds each (pages and bitmap)


def _identity_file(path: Path, nbytes: int, what: str) -> int:
    """The random number in ``path`` (hex), made there first if the file does not exist."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600)
    except FileExistsError:
        pass
    except OSError as exc:
        raise StoreError(f"cannot create {path} ({what}): {exc.strerror}; check the store "
                         "directory's permissions and free space", errno=exc.errno) from exc
    else:
        value = int.from_bytes(os.urandom(nbytes), "little") or 1
        try:
            os.write(fd, f"{value:0{nbytes * 2}x}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return value
    try:
        text = path.read_text().strip()
        value = int(text, 16)
        if len(text) != nbytes * 2 or not value:
            raise ValueError(text)
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path} ({what}) is unreadable or not {nbytes * 2} hex digits: "
                         f"{exc}; the store was damaged: restore it, or move the store "
                         "directory away to start empty") from None
    return value


def _extents(fd: int) -> Iterator[tuple[int, int]]:
    """The data extents ``(start, end)`` of a sparse file (SEEK_DATA/SEEK_HOLE)."""
    off = 0
    while True:
        try:
            data = os.lseek(fd, off, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return  # no data after off
            raise
        off = os.lseek(fd, data, os.SEEK_HOLE)
        yield data, off


def _map_sparse(path: Path, nbytes: int, what: str) -> tuple[int, mmap.mmap, bool]:
    """Open (or create) ``path`` at least ``nbytes`` long, sparse, and map it shared.
    Returns (fd, mapping, whether the file is new)."""
    fd = -1
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        have = os.fstat(fd).st_size
        if have < nbytes:
            os.ftruncate(fd, nbytes)
        return fd, mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED), have == 0
    except OSError as exc:
        if fd >= 0:
            os.close(fd)
        raise StoreError(f"cannot open {what} {path}: {exc.strerror}; check the store "
                         "directory's permissions and free space", errno=exc.errno) from exc


class Space:
    """One address space: a sparse file plus the bitmap of written pages and their checksums
    of kind ``checksum`` (`transport.node.checksum`: the store's kind)."""

    def __init__(self, name: str, path: Path, *, checksum: str, sync: bool = False,
                 max_bytes: int = DEFAULT_MAX_SPACE_BYTES) -> None:
        self.name = name
        self.path = path
        self.sync = sync
        self.checksum = checksum
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                              0o600)
        except OSError as exc:
            raise StoreError(f"cannot open page file {path}: {exc.strerror}; check the store "
                             f"directory's permissions and free space", errno=exc.errno) from exc
        try:
            size = os.fstat(self.fd).st_size
        except OSError as exc:
            os.close(self.fd)
            raise StoreError(f"cannot stat page file {path}: {exc.strerror}",
                             errno=exc.errno) from exc
        # one bit per page up to the limit (or the file's end, if a larger limit wrote it)
        self.capacity_pages = (max(max_bytes, size) + PAGE_SIZE - 1) >> PAGE_SHIFT
        self.pages = 0
        # served since start (the memory node's stats)
        self.fetched_pages = 0
        self.zero_pages = 0
        self.stored_pages = 0
        self._lock = threading.Lock()  # the RDMA server's threads share the store
        self._bits_fd = -1
        self._sums_fd = -1
        try:
            fresh = self._map_bitmap(path.with_name(path.stem + BITMAP_SUFFIX))
            if fresh:
                self._scan()
            else:
                self._count()
            if self._map_sums(path.with_name(path.stem + SUMS_SUFFIX)) and self.pages:
                self._sum_existing()
            self._map_intent(path.with_name(path.stem + INTENT_SUFFIX))
            self.generation = _identity_file(path.with_name(path.stem + GEN_SUFFIX), 8,
                                             f"generation of space {name}")
        except BaseException:
            self.close()
            raise

    def _map_bitmap(self, bpath: Path) -> bool:
        """Map the written-page bitmap file (created sparse); True if it is new."""
        self._bits_fd, self._bits, fresh = _map_sparse(
            bpath, max((self.capacity_pages + 7) >> 3, 1), "the written-page bitmap")
        return fresh

    def _map_sums(self, spath: Path) -> bool:
        """Map the per-page checksum file (created sparse); True if it is new."""
        self._sums_fd, self._sums_map, fresh = _map_sparse(
            spath, max(self.capacity_pages * 4, 4), "the page checksums")
        self._sums = memoryview(self._sums_map).cast("I")
        return fresh

    def _map_intent(self, ipath: Path) -> None:
        """Map the store-under-way slot (no fd kept), and finish a store a kill cut short."""
        fd, self._intent_map, _fresh = _map_sparse(ipath, 16, "the store-in-progress record")
        os.close(fd)
        self._intent = memoryview(self._intent_map).cast("Q")
        first, count = self._intent[0], self._intent[1]
        if not count:
            return
        log.warning("space %s: a store of pages %d-%d was cut short (the node was stopped in "
                    "it); checksumming them again from the page file", self.name, first,
                    first + count - 1)
        self._resum(first, first + count)
        self._intent[1] = 0

    def _resum(self, first: int, end: int) -> None:
        """Checksum the written pages in ``[first, end)`` from the bytes in the page file."""
        buf = bytearray(PAGE_SIZE)
        for p in range(first, min(end, len(self._bits) * 8)):
            if self._bits[p >> 3] >> (p & 7) & 1:
                n = os.preadv(self.fd, [buf], p << PAGE_SHIFT)
                if n < PAGE_SIZE:
                    buf[n:] = bytes(PAGE_SIZE - n)
                self._sums[p] = page_sums(self.checksum, buf)[0]

    def _sum_existing(self) -> None:
        """Checksum the written pages of a store made before checksums existed (only the page
        file's data extents are read)."""
        log.info("space %s: computing checksums of %d written pages", self.name, self.pages)
        for data, hole in _extents(self.fd):
            self._resum(data >> PAGE_SHIFT, (hole + PAGE_SIZE - 1) >> PAGE_SHIFT)

    @property
    def sums(self) -> mmap.mmap:
        """The checksum of each written page (u32 p = page p, of kind ``checksum``), native
        order; fixed address."""
        return self._sums_map

    def _count(self) -> None:
        """Count the written pages of an existing bitmap (only its data extents are read) and
        check the page file still holds the last of them."""
        off, n, size, last = 0, 0, len(self._bits), -1
        while off < size:
            try:
                data = os.lseek(self._bits_fd, off, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            hole = min(os.lseek(self._bits_fd, data, os.SEEK_HOLE), size)
            for pos in range(data, hole, 1 << 20):
                block = self._bits[pos:min(pos + (1 << 20), hole)]
                n += int.from_bytes(block, "little").bit_count()
                used = len(block.rstrip(b"\0"))
                if used:
                    last = (pos + used - 1) * 8 + block[used - 1].bit_length() - 1
            off = hole
        self.pages = n
        size = os.fstat(self.fd).st_size
        if last >= 0 and (last + 1) << PAGE_SHIFT > size:
            raise StoreError(f"page file {self.path} is truncated: page {last} was written but "
                             f"the file ends at {size} bytes. Restore it from a backup, or "
                             f"delete it and {self.path.stem}{BITMAP_SUFFIX} to start space "
                             f"{self.name} empty; its pages are not served meanwhile")
        log.info("space %s: %d written pages in %s", self.name, self.pages, self.path)

    def close(self) -> None:
        intent = getattr(self, "_intent", None)
        if intent is not None:
            intent.release()
            self._intent_map.close()
            self._intent = None
        sums = getattr(self, "_sums", None)
        if sums is not None:
            sums.release()
            with contextlib.suppress(BufferError):
                self._sums_map.close()
        if self._sums_fd >= 0:
            os.close(self._sums_fd)
            self._sums_fd = -1
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        bits = getattr(self, "_bits", None)
        if bits is not None:
            with contextlib.suppress(BufferError):  # a fault lane still points at it: unmapped
                bits.close()                         # when that lets go
        if self._bits_fd >= 0:
            os.close(self._bits_fd)
            self._bits_fd = -1

    @property
    def bitmap(self) -> mmap.mmap:
        """The written-page bitmap (bit p of byte p >> 3 = page p written); fixed address."""
        return self._bits

    def _scan(self) -> None:
        for data, hole in _extents(self.fd):
            first = data >> PAGE_SHIFT
            self._mark(first, ((hole + PAGE_SIZE - 1) >> PAGE_SHIFT) - first)
        log.info("space %s: %d written pages in %s", self.name, self.pages, self.path)

    def _mark(self, first: int, count: int) -> None:
        if first + count > self.capacity_pages:
            raise StoreError(f"pages {first}+{count} of space {self.name} beyond its "
                             f"{self.capacity_pages}-page bitmap")
        before = self._written_bits(first, count)
        self.pages += count - before.bit_count()
        # set the bits byte-wise: whole bytes at once, the partial ends bit by bit
        lo, hi = first, first + count
        while lo < hi and lo & 7:
            self._bits[lo >> 3] |= 1 << (lo & 7)
            lo += 1
        while hi > lo and hi & 7:
            hi -= 1
            self._bits[hi >> 3] |= 1 << (hi & 7)
        if hi > lo:
            self._bits[lo >> 3:hi >> 3] = b"\xff" * ((hi - lo) >> 3)

    def _written_bits(self, first: int, count: int) -> int:
        """Bit i set = page first+i was written."""
        lo = first >> 3
        chunk = self._bits[lo:((first + count) >> 3) + 1]
        return (int.from_bytes(chunk, "little") >> (first & 7)) & ((1 << count) - 1)

    def zero_mask(self, gpa: int, npages: int) -> int:
        """Bit i set = page at gpa + i*4096 was never written."""
        return ~self._written_bits(gpa >> PAGE_SHIFT, npages) & ((1 << npages) - 1)

    def read_compact(self, gpa: int, npages: int, out: memoryview) -> tuple[int, int]:
        """Read the written pages of ``npages`` from ``gpa`` into ``out``, packed in order.

        Returns ``(zero_mask, nbytes)``; ``out`` needs room for ``npages`` pages.
        """
        # no lock: under the GIL a read sees the bitmap before or after a concurrent _mark,
        # and a page whose store is not acknowledged yet may read either way
        first = gpa >> PAGE_SHIFT
        if npages == 1:
            bits = self._bits
            i = first >> 3
            written = bits[i] >> (first & 7) & 1 if i < len(bits) else 0
        else:
            written = self._written_bits(first, npages)
        full = (1 << npages) - 1
        if written == full:  # the common case: one read
            self._read(gpa, out[:npages << PAGE_SHIFT])
            self._verify(first, written, npages, out)
            return 0, npages << PAGE_SHIFT
        pos = 0
        i = 0
        while i < npages:
            if not written >> i & 1:
                i += 1
                continue
            j = i
            while j < npages and written >> j & 1:
                j += 1
            want = (j - i) << PAGE_SHIFT
            self._read(gpa + (i << PAGE_SHIFT), out[pos:pos + want])
            pos += want
            i = j
        self._verify(first, written, npages, out)
        return ~written & full, pos

    def _read(self, gpa: int, into: memoryview) -> None:
        """Read written pages: a page file that ends before them is truncated, an error."""
        n = os.preadv(self.fd, [into], gpa)
        if n < len(into):
            raise StoreCorruptError(
                f"page file {self.path} is truncated: page {(gpa + n) >> PAGE_SHIFT} of space "
                f"{self.name} was written but the file ends at {os.fstat(self.fd).st_size} "
                f"bytes; restore it from a backup or a replica")

    def _verify(self, first: int, written: int, npages: int, out: memoryview,
                again: bool = True) -> None:
        """Check the checksum of each written page read (packed in ``out``)."""
        sums = self._sums
        got = page_sums(self.checksum, out[:written.bit_count() << PAGE_SHIFT])
        pos = 0
        for i in range(npages):
            if not written >> i & 1:
                continue
            if got[pos] != sums[first + i]:
                if again:  # a store of that page may be under way: read it again under its lock
                    with self._lock:
                        self._reread(first, written, npages, out)
                        self._verify(first, written, npages, out, again=False)
                    return
                raise StoreCorruptError(
                    f"page {first + i} (gpa {(first + i) << PAGE_SHIFT:#x}) of space "
                    f"{self.name} fails its checksum: {self.path} was changed outside the "
                    f"node or the disk corrupted it; restore it from a backup or a replica")
            pos += 1

    def _reread(self, first: int, written: int, npages: int, out: memoryview) -> None:
        pos = 0
        for i in range(npages):
            if written >> i & 1:
                self._read((first + i) << PAGE_SHIFT, out[pos:pos + PAGE_SIZE])
                pos += PAGE_SIZE

    def write(self, gpa: int, data: memoryview | bytes) -> None:
        """pwrite every byte (and fdatasync if ``sync``) before returning."""
        view = memoryview(data)
        first = gpa >> PAGE_SHIFT
        crcs = page_sums(self.checksum, view)
        done = 0
        # under the lock: a reader whose checksum failed reads again under it, and so never
        # takes a store under way for corruption
        with self._lock:
            intent = self._intent
            intent[0], intent[1] = first, len(crcs)  # (the count last: it makes the record)
            if self.sync:
                self._sync_intent()
            try:
                while done < len(view):
                    done += os.pwrite(self.fd, view[done:], gpa + done)
                if self.sync:
                    os.fdatasync(self.fd)
            except OSError as exc:
                # pages written before hold old or new bytes now: checksummed as they are
                with contextlib.suppress(OSError):
                    self._resum(first, first + len(crcs))
                    intent[1] = 0
                raise StoreError(f"writing {len(view)} bytes at {gpa:#x} of space {self.name} "
                                 f"failed: {exc.strerror}; free space in {self.path.parent}",
                                 errno=exc.errno) from exc
            if first + len(crcs) > self.capacity_pages:
                self._mark(first, len(crcs))  # raises, naming the limit
            self._sums[first:first + len(crcs)] = crcs
            # only now: a store that failed half-way marks nothing
            self._mark(first, len(view) >> PAGE_SHIFT)
            intent[1] = 0
        if self.sync:
            self._flush_bits(first, len(crcs))

    def _sync_intent(self) -> None:
        try:
            self._intent_map.flush()
        except OSError as exc:
            raise StoreError(f"syncing the store-in-progress record of space {self.name} "
                             f"failed: {exc.strerror}", errno=exc.errno) from exc

    def _flush_bits(self, first: int, count: int) -> None:
        lo = (first >> 3) & ~(mmap.PAGESIZE - 1)
        hi = min(((first + count) >> 3) + 1, len(self._bits))
        slo = (first * 4) & ~(mmap.PAGESIZE - 1)
        shi = min((first + count) * 4, len(self._sums_map))
        try:
            self._sums_map.flush(slo, shi - slo)
            self._bits.flush(lo, hi - lo)
        except OSError as exc:
            raise StoreError(f"syncing the written-page bitmap of space {self.name} failed: "
                             f"{exc.strerror}", errno=exc.errno) from exc

    def stats(self) -> dict[str, int]:
        try:
            allocated = os.fstat(self.fd).st_blocks * 512
        except OSError:
            allocated = -1
        return {"pages": self.pages, "bytes": self.pages * PAGE_SIZE,
                "allocated_bytes": allocated, "fetched_pages": self.fetched_pages,
                "zero_pages": self.zero_pages, "stored_pages": self.stored_pages}


class PageStore:
    """All address spaces of one memory node, under one 0700 directory."""

    def __init__(self, root: str | os.PathLike[str], *, sync: bool = False,
                 max_space_bytes: int = DEFAULT_MAX_SPACE_BYTES,
                 max_spaces: int = DEFAULT_MAX_SPACES) -> None:
        self.root = Path(root)
        self.sync = sync
        self.max_space_bytes = max_space_bytes
        self.max_spaces = max_spaces
        try:
            private_dir(self.root)
        except OSError as exc:
            raise StoreError(f"cannot create store directory {self.root}: {exc.strerror}; "
                             f"pass --store DIR somewhere writable", errno=exc.errno) from exc
        # how its pages are checksummed: crc32c, or crc32 for a store written before
        self.checksum = store_checksum(self.root, fresh=not (self.root / STORE_ID_FILE).exists()
                                       and next(self.root.glob("*" + SUMS_SUFFIX), None) is None)
        # who this store is: pagers refuse a node whose store is not the one they wrote
        self.store_id = f"{_identity_file(self.root / STORE_ID_FILE, 16, 'the store id'):032x}"
        self.spaces: dict[str, Space] = {}
        for p in sorted(self.root.glob("*.pages")):
            if valid_space_name(p.stem) and self._usable(p):
                try:
                    self.open(p.stem)
                except StoreError as exc:
                    log.warning("store: skipping %s: %s", p, exc)

    def _usable(self, p: Path) -> bool:
        """A regular page file within the space limit; anything else is skipped, named."""
        import stat
        try:
            st = p.lstat()
        except OSError as exc:
            log.warning("store: skipping %s: %s", p, exc.strerror)
            return False
        if not stat.S_ISREG(st.st_mode):
            kind = ("a symlink" if stat.S_ISLNK(st.st_mode) else "a directory"
                    if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                    else "not a regular file")
            log.warning("store: skipping %s: %s, not a page file; move it out of %s", p, kind,
                        self.root)
            return False
        if st.st_size > self.max_space_bytes:
            log.warning("store: skipping %s: %d bytes, larger than this node's space limit of "
                        "%d bytes; start the node with a larger --max-space-gib to serve it, or "
                        "move it out of %s", p, st.st_size, self.max_space_bytes, self.root)
            return False
        return True

    def open(self, name: str) -> Space:
        space = self.spaces.get(name)
        if space is None:
            if not valid_space_name(name):
                raise StoreError(f"bad address space name {name!r}")
            if len(self.spaces) >= self.max_spaces:
                raise StoreError(f"cannot open space {name!r}: this node already holds "
                                 f"{len(self.spaces)} spaces, its limit (--max-spaces); remove "
                                 "unused spaces from the store or raise the limit")
            space = self.spaces[name] = Space(name, self.root / f"{name}.pages",
                                              checksum=self.checksum, sync=self.sync,
                                              max_bytes=self.max_space_bytes)
        return space

    def close(self) -> None:
        for space in self.spaces.values():
            space.close()
        self.spaces.clear()

    def stats(self) -> dict[str, dict[str, int]]:
        return {name: space.stats() for name, space in self.spaces.items()}
