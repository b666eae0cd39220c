"""The Pythonic userfaultfd: open, negotiate features, register ranges, resolve faults.

This is the only module that calls the extension's uffd ioctls (``pager.uffd._uffd_cffi.lib``).
Each operation is one cffi call into a small C helper that puts the ioctl struct on the C stack
and returns bytes done or ``-errno``; errors become ``UffdError`` subclasses only on failure, so
the success path allocates nothing but the result int.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import select
from collections.abc import Iterable

from pager.uffd._uffd_cffi import ffi, lib
from pager.uffd.buffers import pin
from pager.uffd.errors import (
    ADVICE,
    UffdError,
    UffdExists,
    UffdInvalid,
    UffdRetry,
    UffdUnsupported,
    uffd_error,
)
from pager.uffd.events import Event, decode
from pager.uffd.opener import open_raw_fd, supported_features

log = logging.getLogger(__name__)

PAGE_SIZE: int = os.sysconf("SC_PAGE_SIZE")
READ_MAX: int = lib.SSI_READ_MAX          # most events one read can return
EVENT_WORDS: int = lib.SSI_EVENT_WORDS    # words per event in a RawEvents buffer


def _flag_enum(name: str, prefix: str, *, bit: bool = False) -> type[enum.IntFlag]:
    members = {}
    for attr in dir(lib):
        if attr.startswith(prefix) and not attr.startswith("SSI_"):
            value = getattr(lib, attr)
            members[attr[len(prefix):]] = (1 << value) if bit else value
    ordered = dict(sorted(members.items(), key=lambda kv: kv[1]))
    return enum.IntFlag(name, ordered, module=__name__)


#: UFFD_FEATURE_* bits, values from the build header (or the UAPI fallback), e.g. Feature.THREAD_ID
Feature = _flag_enum("Feature", "UFFD_FEATURE_")
#: ioctl mask bits (1 << _UFFDIO_*), as returned by UFFDIO_API / UFFDIO_REGISTER
Ioctl = _flag_enum("Ioctl", "_UFFDIO_", bit=True)

_COPY_WP = lib.UFFDIO_COPY_MODE_WP
_COPY_DONTWAKE = lib.UFFDIO_COPY_MODE_DONTWAKE
_ZERO_DONTWAKE = lib.UFFDIO_ZEROPAGE_MODE_DONTWAKE
_WP_WP = lib.UFFDIO_WRITEPROTECT_MODE_WP
_WP_DONTWAKE = lib.UFFDIO_WRITEPROTECT_MODE_DONTWAKE
_CONT_DONTWAKE = lib.UFFDIO_CONTINUE_MODE_DONTWAKE
_CONT_WP = lib.UFFDIO_CONTINUE_MODE_WP
_POISON_DONTWAKE = lib.UFFDIO_POISON_MODE_DONTWAKE
_MOVE_DONTWAKE = lib.UFFDIO_MOVE_MODE_DONTWAKE
_MOVE_HOLES = lib.UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES
_INITIALIZED = 1 << 31
_NOT_RANGE_IOCTLS = Ioctl.REGISTER | Ioctl.UNREGISTER | Ioctl.API
_NEG_EEXIST = -errno.EEXIST
_NEG_EAGAIN = -errno.EAGAIN
_EXISTS_ADVICE = ADVICE[errno.EEXIST]
_RETRY_ADVICE = ADVICE[errno.EAGAIN]  # kernel-internal UFFD_FEATURE_INITIALIZED, shown in fdinfo

# which feature each optional ioctl needs from the kernel (for clear "unsupported" messages)
_NEEDS_FEATURE = {"UFFDIO_POISON": Feature.POISON, "UFFDIO_MOVE": Feature.MOVE}


def feature_mask(features: int | str | Iterable[str | int] | None) -> int:
    """Features as a bit mask from an int, a Feature, a name ("thread_id") or names."""
    if features is None:
        return 0
    if isinstance(features, int):
        return int(features)
    if isinstance(features, str):
        features = [features]
    mask = 0
    for f in features:
        if isinstance(f, int):
            mask |= int(f)
            continue
        key = f.upper().removeprefix("UFFD_FEATURE_")
        try:
            mask |= Feature[key]
        except KeyError:
            known = ", ".join(m.name.lower() for m in Feature)
            raise uffd_error(errno.EINVAL, "UFFDIO_API",
                             f"unknown userfaultfd feature {f!r}; known: {known}") from None
    return mask


def names(flags: enum.IntFlag | int, kind: type[enum.IntFlag]) -> list[str]:
    """Lower-case names of the bits set in ``flags`` (for tables and messages)."""
    value = int(flags)
    out = [m.name.lower() for m in kind if m.value and (value & m.value) == m.value]
    known = 0
    for m in kind:
        known |= m.value
    out += [f"bit{i}" for i in range(64) if value & ~known & (1 << i)]
    return out


class RawEvents:
    """A preallocated event buffer for ``Userfaultfd.read_raw`` (no per-event objects).

    After ``n = u.read_raw(raw)``, event ``i`` is ``raw.words[4*i : 4*i+4]``:
    ``[kind, flags, address, thread_id]`` for a page fault (kind == events.EVENT_PAGEFAULT),
    ``[kind, ufd, 0, 0]`` fork, ``[kind, old, new, length]`` remap,
    ``[kind, start, end, 0]`` remove / unmap. ``raw.events(n)`` decodes them when needed.
    """

    __slots__ = ("array", "max_events", "words")

    def __init__(self, max_events: int = 64) -> None:
        self.max_events = max(1, min(int(max_events), READ_MAX))
        self.array = ffi.new("uint64_t[]", EVENT_WORDS * self.max_events)
        self.words = memoryview(ffi.buffer(self.array)).cast("Q")

    def events(self, n: int) -> list[Event]:
        return decode(self.words[:EVENT_WORDS * n].tolist(), n)

    def addresses(self, n: int) -> list[int]:
        """The third word of each event: the address of page faults."""
        return self.words[2:EVENT_WORDS * n:EVENT_WORDS].tolist()


class Userfaultfd:
    """One userfaultfd: ``with Userfaultfd(features=...) as u: u.register(...); ...``.

    ``features``: Feature bits or names to enable ("thread_id", "event_remove", ...). The kernel
    refuses unsupported ones: ``UffdUnsupported`` names them. ``available`` lists what the
    kernel offers, ``features`` what is enabled, ``ioctls`` the API-level ioctl mask.
    ``access``: "auto" (syscall, then /dev/userfaultfd on EPERM), "syscall" or "dev";
    ``opened_by`` says which one worked.

    Methods on one object may be called from several threads, except ``read_events`` (one
    shared buffer): concurrent readers each use ``read_raw`` with their own ``RawEvents``.
    """

    def __init__(self, features: int | str | Iterable[str | int] | None = 0, *,
                 nonblocking: bool = True, user_mode_only: bool = False,
                 access: str = "auto") -> None:
        self._fd = -1
        self._poller: select.poll | None = None
        # (start, end, page size, allowed ioctls) of the ranges registered through this object
        self._ranges: list[tuple[int, int, int, int]] = []
        self._events = RawEvents(READ_MAX)
        want = feature_mask(features)
        flags = os.O_CLOEXEC | (os.O_NONBLOCK if nonblocking else 0)
        if user_mode_only:
            flags |= lib.UFFD_USER_MODE_ONLY
        fd, self.opened_by = open_raw_fd(flags, access)
        api = ffi.new("struct uffdio_api *")
        rc = lib.ssi_uffd_api(fd, want, api)
        if rc < 0:
            os.close(fd)
            raise self._api_error(-rc, want, access)
        self._fd = fd
        self.nonblocking = nonblocking
        self.available = Feature(int(api.features) & ~_INITIALIZED)
        self.features = Feature(want | (Feature.WP_UNPOPULATED if want & Feature.WP_ASYNC
                                        else 0))
        self.ioctls = Ioctl(int(api.ioctls))

    @staticmethod
    def _api_error(err: int, want: int, access: str) -> UffdError:
        if err == errno.EINVAL:
            try:
                have = supported_features(access)
            except UffdError:
                have = None
            if have is not None and want & ~have:
                missing = names(want & ~have, Feature)
                return uffd_error(err, "UFFDIO_API",
                                  f"this kernel ({os.uname().release}) does not support "
                                  f"feature(s) {', '.join(missing)}; drop them or upgrade",
                                  cls=UffdUnsupported)
        if err == errno.EPERM and want & Feature.EVENT_FORK:
            return uffd_error(err, "UFFDIO_API",
                              "feature event_fork needs CAP_SYS_PTRACE (run as root)")
        return uffd_error(err, "UFFDIO_API", f"features {names(want, Feature)}")

    @classmethod
    def adopt(cls, fd: int, *, nonblocking: bool | None = True) -> Userfaultfd:
        """Wrap a userfaultfd received from elsewhere (SCM_RIGHTS, a Fork event).

        UFFDIO_API must already have been done (by the sender); enabled features are read from
        /proc/self/fdinfo. Takes ownership of ``fd``. ``nonblocking`` sets (True) or clears
        (False) O_NONBLOCK on the shared file description; None leaves it alone.
        """
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError as exc:
            raise uffd_error(errno.EBADF, "adopt", f"fd {fd} is not open ({exc.strerror})")\
                from None
        if "userfaultfd" not in target:
            raise uffd_error(errno.EINVAL, "adopt", f"fd {fd} is {target}, not a userfaultfd")
        features = 0
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("API:"):
                    parts = line.split()[1].split(":")
                    features = int(parts[1], 16) & ~_INITIALIZED
        self = cls.__new__(cls)
        self._fd = fd
        self._poller = None
        self._ranges = []
        self._events = RawEvents(READ_MAX)
        self.opened_by = "adopted"
        self.features = Feature(features)
        self.available = Feature(features)
        self.ioctls = Ioctl(Ioctl.REGISTER | Ioctl.UNREGISTER | Ioctl.API)
        if nonblocking is not None:
            os.set_blocking(fd, not nonblocking)
        self.nonblocking = not os.get_blocking(fd)
        return self

    # --- lifetime ---------------------------------------------------------------------------
    def fileno(self) -> int:
        if self._fd < 0:
            raise uffd_error(errno.EBADF, "fileno")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Close the fd: the kernel wakes every blocked faulting thread (they retry the access)."""
        fd, self._fd = self._fd, -1
        self._poller = None
        if fd >= 0:
            os.close(fd)

    def detach(self) -> int:
        """Give up ownership of the fd (e.g. after sending it) and return it."""
        fd, self._fd = self._fd, -1
        return fd

    def __enter__(self) -> Userfaultfd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self._fd < 0 else f"fd={self._fd}"
        return f"<Userfaultfd {state} features={names(self.features, Feature)}>"

    # --- registration -----------------------------------------------------------------------
    def register(self, addr: int, length: int, missing: bool = True, wp: bool = False,
                 minor: bool = False, *, page_size: int = PAGE_SIZE) -> Ioctl:
        """Register [addr, addr+length); returns the ioctls allowed on it (Ioctl mask)."""
        mode = ((lib.UFFDIO_REGISTER_MODE_MISSING if missing else 0)
                | (lib.UFFDIO_REGISTER_MODE_WP if wp else 0)
                | (lib.UFFDIO_REGISTER_MODE_MINOR if minor else 0))
        out = ffi.new("uint64_t *")
        rc = lib.ssi_uffd_register(self._fd, addr, length, mode, out)
        if rc < 0:
            raise self._error(-rc, "UFFDIO_REGISTER", addr, length, page_size=page_size,
                              modes={"missing": missing, "wp": wp, "minor": minor})
        self._ranges.append((addr, addr + length, page_size, int(out[0])))
        return Ioctl(int(out[0]))

    def unregister(self, addr: int, length: int) -> None:
        rc = lib.ssi_uffd_range(self._fd, lib.UFFDIO_UNREGISTER, addr, length)
        if rc < 0:
            raise self._error(-rc, "UFFDIO_UNREGISTER", addr, length)
        end = addr + length
        self._ranges = [r for r in self._ranges if r[1] <= addr or r[0] >= end]

    # --- resolving faults (hot path) ----------------------------------------------------------
    def copy(self, dst: int, src, length: int | None = None, *, wp: bool = False,
             dontwake: bool = False) -> int:
        """UFFDIO_COPY ``src`` (any buffer, or an int address) to ``dst``; returns bytes copied.

        A result below ``length`` is a partial copy: the kernel stopped early (a page in the
        range already existed, or the mapping started changing); the caller handles the rest.
        Nothing copied raises: ``UffdExists`` (already there), ``UffdRetry`` (read events first).
        """
        mode = (_COPY_WP if wp else 0) | (_COPY_DONTWAKE if dontwake else 0)
        if type(src) is int:
            if length is None:
                raise TypeError("copy from an address needs a length")
            r = lib.ssi_uffd_copy(self._fd, dst, src, length, mode)
        elif type(src) is bytes:
            if length is None:
                length = len(src)
            elif length > len(src):
                raise self._too_long(length, len(src))
            r = lib.ssi_uffd_copy_buf(self._fd, dst, src, length, mode)
        else:
            keep, addr, nbytes = pin(src)  # see pin(): no exported memoryview in this frame
            if length is None:
                length = nbytes
            elif length > nbytes:
                raise self._too_long(length, nbytes)
            r = lib.ssi_uffd_copy(self._fd, dst, addr, length, mode)
            del keep
        if r == length:
            return r
        return self._short(r, "UFFDIO_COPY", dst, length, src=src)

    def zeropage(self, addr: int, length: int, *, dontwake: bool = False) -> int:
        """Map the zero page over [addr, addr+length); returns bytes done."""
        r = lib.ssi_uffd_zeropage(self._fd, addr, length, _ZERO_DONTWAKE if dontwake else 0)
        if r == length:
            return r
        return self._short(r, "UFFDIO_ZEROPAGE", addr, length)

    def wake(self, addr: int, length: int) -> None:
        """Wake threads blocked on faults in the range (after DONTWAKE resolutions)."""
        rc = lib.ssi_uffd_range(self._fd, lib.UFFDIO_WAKE, addr, length)
        if rc < 0:
            raise self._error(-rc, "UFFDIO_WAKE", addr, length)

    def writeprotect(self, addr: int, length: int, protect: bool = True, *,
                     dontwake: bool = False) -> None:
        """Set (protect=True) or clear write protection; clearing wakes the faulting threads."""
        mode = (_WP_WP if protect else 0) | (_WP_DONTWAKE if dontwake else 0)
        rc = lib.ssi_uffd_writeprotect(self._fd, addr, length, mode)
        if rc < 0:
            raise self._error(-rc, "UFFDIO_WRITEPROTECT", addr, length)

    def continue_(self, addr: int, length: int, *, wp: bool = False,
                  dontwake: bool = False) -> int:
        """Resolve MINOR faults: map the page-cache pages already there; returns bytes mapped."""
        mode = (_CONT_WP if wp else 0) | (_CONT_DONTWAKE if dontwake else 0)
        r = lib.ssi_uffd_continue(self._fd, addr, length, mode)
        if r == length:
            return r
        return self._short(r, "UFFDIO_CONTINUE", addr, length)

    def poison(self, addr: int, length: int, *, dontwake: bool = False) -> int:
        """Mark the range poisoned: later accesses get SIGBUS (like a hardware memory error)."""
        r = lib.ssi_uffd_poison(self._fd, addr, length, _POISON_DONTWAKE if dontwake else 0)
        if r == length:
            return r
        return self._short(r, "UFFDIO_POISON", addr, length)

    def move(self, dst: int, src: int, length: int, *, allow_src_holes: bool = False,
             dontwake: bool = False) -> int:
        """Move pages (no copy) from ``src`` (anonymous, this process) to ``dst``; bytes moved."""
        mode = (_MOVE_HOLES if allow_src_holes else 0) | (_MOVE_DONTWAKE if dontwake else 0)
        r = lib.ssi_uffd_move(self._fd, dst, src, length, mode)
        if r == length:
            return r
        return self._short(r, "UFFDIO_MOVE", dst, length, src=src)

    # --- events -----------------------------------------------------------------------------
    def read_events(self, max_events: int = 64, timeout: float | None = 0) -> list[Event]:
        """Pending events, many per read(); [] when none arrived.

        ``timeout``: 0 (default) returns at once; seconds to wait (poll, GIL released) for the
        first event; None waits forever. (A blocking fd always waits in read().)
        """
        raw = self._events
        n = self._read(raw.array, min(max_events, READ_MAX), timeout)
        if n > 0:
            return decode(raw.words[:EVENT_WORDS * n].tolist(), n)
        if n == 0:
            return []
        raise uffd_error(-n, "read(userfaultfd)")

    def read_raw(self, raw: RawEvents, max_events: int | None = None,
                 timeout: float | None = 0) -> int:
        """Fast path: read events into ``raw`` without building objects; returns the count.

        ``timeout`` as for ``read_events``: poll and read happen in one C call.
        """
        n = self._read(raw.array, raw.max_events if max_events is None
                       else min(max_events, raw.max_events), timeout)
        if n < 0:
            raise uffd_error(-n, "read(userfaultfd)")
        return n

    def _read(self, array, count: int, timeout: float | None) -> int:
        if timeout == 0:
            return lib.ssi_uffd_read(self._fd, array, count)
        ms = -1 if timeout is None else max(1, int(timeout * 1000))
        return lib.ssi_uffd_wait_read(self._fd, array, count, ms)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until events are pending (True) or ``timeout`` seconds pass (False)."""
        p = self._poller
        if p is None or self._fd < 0:
            p = self._poller = select.poll()
            p.register(self.fileno(), select.POLLIN)
        return bool(p.poll(None if timeout is None else int(timeout * 1000)))

    # --- errors -----------------------------------------------------------------------------
    def _short(self, r: int, op: str, addr: int, length: int, *, src=None) -> int:
        if r >= 0:
            log.debug("%s partial: %d of %d bytes at %#x", op, r, length, addr)
            return r
        # the two results a fault handler meets in normal operation: raised cheaply
        if r == _NEG_EEXIST:
            exc: UffdError | None = UffdExists(errno.EEXIST,
                                               f"{op} at {addr:#x}: {_EXISTS_ADVICE}")
        elif r == _NEG_EAGAIN:
            exc = UffdRetry(errno.EAGAIN, f"{op} at {addr:#x}: {_RETRY_ADVICE}")
        else:
            raise self._error(-r, op, addr, length, src=src)
        exc.op = op  # type: ignore[union-attr]
        try:
            raise exc  # type: ignore[misc]
        finally:
            # no reference from this frame to the exception, whose traceback holds this frame
            # and (f_back) every caller's: such a cycle keeps the callers' buffers alive until
            # a garbage collection, and makes every EEXIST on the fault path cyclic garbage
            exc = None

    @staticmethod
    def _too_long(length: int, nbytes: int) -> UffdError:
        return uffd_error(errno.EINVAL, "UFFDIO_COPY",
                          f"length {length} exceeds the {nbytes}-byte source buffer")

    def _page_size(self, addr: int) -> int:
        for start, end, size, _ in self._ranges:
            if start <= addr < end:
                return size
        return PAGE_SIZE

    def _allowed(self, addr: int) -> int | None:
        for start, end, _, ioctls in self._ranges:
            if start <= addr < end:
                return ioctls
        return None

    def _error(self, err: int, op: str, addr: int, length: int, *, src=None,
               page_size: int | None = None, modes: dict[str, bool] | None = None) -> UffdError:
        """A typed error whose message names the faulty argument (page size included)."""
        if self._fd < 0:
            return uffd_error(errno.EBADF, op, "this Userfaultfd was closed")
        size = page_size or self._page_size(addr)
        detail = ""
        if err == errno.ENOENT and (why := self._not_allowed(op, addr)):
            return uffd_error(err, op, why, cls=UffdInvalid)
        if err == errno.EINVAL:
            detail = self._explain_einval(op, addr, length, size, src, modes)
        elif err == errno.ENOENT and self._allowed(addr) is None:
            detail = f"address {addr:#x} is not in a range registered with this userfaultfd"
        elif op in _NEEDS_FEATURE and err in (errno.ENOTTY, errno.EINVAL) \
                and not self.available & _NEEDS_FEATURE[op]:
            return uffd_error(err, op, f"this kernel lacks {op}", cls=UffdUnsupported)
        return uffd_error(err, op, detail)

    def _not_allowed(self, op: str, addr: int) -> str:
        """Why ``op`` cannot work on the registered range holding ``addr`` ('' if it can)."""
        allowed = self._allowed(addr)
        bit = Ioctl.__members__.get(op.removeprefix("UFFDIO_"))
        if allowed is None or bit is None or allowed & bit or bit & _NOT_RANGE_IOCTLS:
            return ""
        return (f"{op} is not allowed on this range (allowed: {', '.join(names(allowed, Ioctl))});"
                f" register it with the mode and memory kind it needs (continue: minor on "
                f"shmem/hugetlbfs; writeprotect: wp)")

    def _explain_einval(self, op: str, addr: int, length: int, size: int, src,
                        modes: dict[str, bool] | None) -> str:
        if addr % size:
            return (f"address {addr:#x} is not aligned to the page size {size} "
                    f"(off by {addr % size})")
        if length <= 0 or length % size:
            return f"length {length} is not a positive multiple of the page size {size}"
        if isinstance(src, int) and src % size:
            return f"source address {src:#x} is not aligned to the page size {size}"
        if why := self._not_allowed(op, addr):
            return why
        if op == "UFFDIO_REGISTER" and modes:
            chosen = [m for m, on in modes.items() if on]
            if not chosen:
                return "no register mode chosen (missing, wp or minor)"
            return (f"modes {chosen} are not supported on this memory kind (minor needs shmem "
                    f"or hugetlbfs, wp on shmem needs wp_hugetlbfs_shmem) or the range is not "
                    f"one mapping; page size {size}")
        if op == "UFFDIO_MOVE":
            return (f"move needs both ranges anonymous, private, registered by this userfaultfd "
                    f"and not overlapping (page size {size})")
        return f"range [{addr:#x}, +{length}) or mode rejected (page size {size})"

    def registered(self) -> list[tuple[int, int, int]]:
        """(start, end, page_size) of the ranges registered through this object."""
        return [r[:3] for r in self._ranges]
