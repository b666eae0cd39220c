"""The client handoff: Firecracker's UFFD handshake on a Unix stream socket.

A client (Firecracker, the QEMU shim, our workload) connects and sends ONE ``sendmsg``: a JSON
array of regions ``{"base_host_virt_addr", "size", "offset", "page_size", "page_size_kib"}``
with its userfaultfd as SCM_RIGHTS data. Firecracker never closes its end after sending, so the
array is parsed as soon as it is complete, and the socket's hang-up is the client's exit.

Extensions, ignored by Firecracker-style parsers of unknown keys: a region may carry
``"space": "NAME"`` (the memory-node address space; default the pager's) and ``"memfd": true``
(then a second fd, the memfd backing guest RAM, follows the uffd in the same SCM_RIGHTS).

``parse_regions`` and ``check_fds`` are pure; ``HandoffServer`` is the asyncio shell: socket
mode 0600 (0660 for a ``--socket-group``), the peer and the spaces it names checked by an
``AccessPolicy`` (pager/service/access.py), the fds checked to be what they claim, a timeout
for silent or truncated sends, one state per client, a bad client logged in one line and
closed without disturbing the others.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pager.core.region import PAGE_SIZE, Region, RegionTable
from pager.errors import ConfigError, HandoffError, PagerError
from pager.service.access import AccessPolicy, Peer

log = logging.getLogger(__name__)

MAX_MESSAGE = 64 * 1024  # Firecracker sends a few hundred bytes; a QEMU guest a few KiB
MAX_REGIONS = 1024
MAX_FDS = 8  # room to receive (and then reject) a few too many
HANDSHAKE_TIMEOUT = 5.0


def parse_regions(body: bytes) -> list[Region]:
    """Parse the handshake's JSON array of regions (complete message, no trailing garbage).

    Page size: ``page_size``, else ``page_size_kib`` (bytes, despite its name, as Firecracker
    fills it), else 4096 (older Firecracker sends only base, size and offset). Unknown keys are
    ignored. Raises HandoffError for anything that cannot be served.
    """
    if len(body) > MAX_MESSAGE:
        raise HandoffError(f"handshake of {len(body)} bytes exceeds {MAX_MESSAGE}; "
                           "send one JSON array of regions")
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HandoffError(f"handshake is not valid JSON ({exc}); send a JSON array of "
                           "regions") from None
    if not isinstance(doc, list) or not doc:
        raise HandoffError("handshake must be a non-empty JSON array of region objects")
    if len(doc) > MAX_REGIONS:
        raise HandoffError(f"handshake has {len(doc)} regions, more than {MAX_REGIONS}")
    regions = [_region(i, item) for i, item in enumerate(doc)]
    RegionTable(regions)  # validates each region and rejects overlaps
    return regions


def _region(i: int, item: object) -> Region:
    if not isinstance(item, dict):
        raise HandoffError(f"region {i} is not a JSON object")

    def num(key: str, required: bool = True) -> int | None:
        v = item.get(key)
        if v is None:
            if required:
                raise HandoffError(f"region {i} lacks {key!r}; send base_host_virt_addr, "
                                   "size and offset")
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise HandoffError(f"region {i}: {key!r} must be a non-negative integer, got {v!r}")
        return v

    base, size, offset = num("base_host_virt_addr"), num("size"), num("offset")
    page_size = num("page_size", False) or num("page_size_kib", False) or PAGE_SIZE
    space = item.get("space")
    if space is not None and (not isinstance(space, str) or not space or len(space) > 255):
        raise HandoffError(f"region {i}: 'space' must be a non-empty string")
    memfd = item.get("memfd", False)
    if not isinstance(memfd, bool):
        raise HandoffError(f"region {i}: 'memfd' must be true or false")
    r = Region(base=base, size=size, offset=offset, page_size=page_size,  # type: ignore[arg-type]
               space=space, memfd=memfd)
    r.validate()
    return r


def check_fds(regions: list[Region], fds: list[int]) -> None:
    """Exactly one fd (the uffd), or two when a region declares ``memfd`` (uffd, memfd)."""
    want = 2 if any(r.memfd for r in regions) else 1
    if len(fds) != want:
        what = "the uffd and the memfd" if want == 2 else "exactly one fd (the uffd)"
        raise HandoffError(f"handshake carried {len(fds)} fds; send {what} as SCM_RIGHTS "
                           "in the same sendmsg as the JSON")


UFFD_FEATURE_INITIALIZED = 1 << 31  # set by the kernel once UFFDIO_API succeeded


def check_fd_kinds(fds: list[int]) -> None:
    """The first fd must be a userfaultfd on which UFFDIO_API was done, a second guest RAM's
    file (a memfd, or a hugetlbfs/tmpfs file)."""
    for i, fd in enumerate(fds):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError as exc:
            raise HandoffError(f"fd {i} of the handshake cannot be inspected ({exc})") from None
        if i == 0:
            if target != "anon_inode:[userfaultfd]":
                raise HandoffError(f"the handshake's first fd is {target!r}, not a userfaultfd; "
                                   "send the uffd first")
            if not _uffd_api_done(fd):
                raise HandoffError("the handshake's userfaultfd was never initialised; call "
                                   "UFFDIO_API (and UFFDIO_REGISTER) on it before sending it")
        elif not stat.S_ISREG(os.fstat(fd).st_mode):
            # guest RAM's file: a memfd, or a file on hugetlbfs/tmpfs (QEMU's -mem-path)
            raise HandoffError(f"the handshake's second fd is {target!r}, not a memfd; send "
                               "the memfd (or hugetlbfs/tmpfs file) backing guest RAM")


def _uffd_api_done(fd: int) -> bool:
    """Whether UFFDIO_API was done on ``fd``: the kernel's INITIALIZED feature bit in fdinfo,
    or, on kernels without that bit, a probe (a second UFFDIO_API fails with EINVAL; on a fresh
    uffd it succeeds, and the client is refused anyway)."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("API:") and \
                        int(line.split(":")[2], 16) & UFFD_FEATURE_INITIALIZED:
                    return True
    except (OSError, ValueError, IndexError):
        pass
    from pager.uffd._uffd_cffi import ffi, lib
    return lib.ssi_uffd_api(fd, 0, ffi.new("struct uffdio_api *")) < 0


def message_complete(buf: bytes) -> bool:
    """True once ``buf`` holds a whole JSON array (or is certainly not going to be one).

    Scans brackets outside strings, so a truncated send waits for more data while garbage is
    reported at once by parse_regions.
    """
    text = buf.lstrip()
    if not text:
        return False
    if text[:1] != b"[":
        return True  # not an array: let the parser say so
    depth, in_str, esc = 0, False, False
    for c in text:
        if in_str:
            if esc:
                esc = False
            elif c == 0x5C:  # backslash
                esc = True
            elif c == 0x22:
                in_str = False
        elif c == 0x22:
            in_str = True
        elif c in (0x5B, 0x7B):
            depth += 1
        elif c in (0x5D, 0x7D):
            depth -= 1
            if depth == 0:
                return True
    return False


def recv_handshake_part(sock: socket.socket, fds: list[int]) -> bytes:
    """One recvmsg: returns the bytes, appends any SCM_RIGHTS fds (closed later by the caller)."""
    fdsize = array.array("i").itemsize
    data, ancdata, flags, _ = sock.recvmsg(MAX_MESSAGE + 1, socket.CMSG_SPACE(MAX_FDS * fdsize))
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(cdata[: len(cdata) - len(cdata) % fdsize])
            fds.extend(a)
    if flags & socket.MSG_CTRUNC:
        raise HandoffError(f"handshake carried more than {MAX_FDS} fds; send one uffd "
                           "(and the memfd when declared)")
    return data


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the connected peer."""
    p = Peer.of(sock)
    return p.pid, p.uid, p.gid


@dataclass
class Handshake:
    """A completed, validated handshake; the fds are owned by whoever takes it."""

    regions: list[Region]
    uffd: int
    memfd: int | None
    pid: int
    uid: int
    body: bytes
    conn: socket.socket = field(repr=False)


# what the server's owner returns for an accepted client: its close() is called on hang-up
# (None: nothing to close)
OnClient = Callable[[Handshake], Awaitable[Any]]


def _refused(exc: BaseException, text: str) -> None:
    """Log a refused handshake, once: one the pager said already (``reported``: the client
    poisoned, on stderr) goes to the debug log only."""
    log.log(logging.DEBUG if getattr(exc, "reported", False) else logging.WARNING,
            "handoff refused: %s", text)


class HandoffServer:
    """Accepts clients on a Unix socket and hands each validated handshake to ``on_client``."""

    def __init__(self, path: str, on_client: OnClient, *,
                 allowed_uids: set[int] | None = None,
                 policy: AccessPolicy | None = None,
                 timeout: float = HANDSHAKE_TIMEOUT,
                 listen_fd: int | None = None, socket_gid: int | None = None) -> None:
        self.path = path
        self.on_client = on_client
        self.policy = policy or AccessPolicy()
        if allowed_uids is not None:
            self.policy.allowed_uids = set(allowed_uids)
        self.socket_gid = socket_gid
        self.timeout = timeout
        self.rejected = 0  # handshakes refused (counted for metrics)
        self.accepted = 0
        self._listen_fd = listen_fd
        self._sock: socket.socket | None = None
        self._tasks: set[asyncio.Task] = set()
        self._serve_task: asyncio.Task | None = None

    @staticmethod
    def bind(path: str, group: int | None = None) -> socket.socket:
        """Create the listening socket, mode 0600, or 0660 owned by ``group`` (a stale socket
        file is replaced). Errors name the path and what to do (ConfigError)."""
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise ConfigError(f"--socket {path}: directory {parent} does not exist; create it "
                              "(systemd: RuntimeDirectory=) or choose another path")
        if len(os.fsencode(path)) > 107:
            raise ConfigError(f"--socket {path}: longer than the 107 bytes a Unix socket path "
                              "may have; choose a shorter path")
        with contextlib.suppress(FileNotFoundError):
            if os.path.exists(path) and not _is_socket(path):
                raise ConfigError(f"--socket {path} exists and is not a socket; remove it or "
                                  "choose another path")
            if _listening(path):
                raise ConfigError(f"--socket {path}: another process is listening on it (a "
                                  "pager already running?); stop it or choose another path")
            os.unlink(path)  # stale: left by a pager that is gone
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            raise ConfigError(f"--socket {path}: cannot create the socket ({exc.strerror}); "
                              "check the directory's permissions") from None
        finally:
            os.umask(old)
        mode = 0o600
        if group is not None:
            try:
                os.chown(path, -1, group)
            except OSError as exc:
                sock.close()
                os.unlink(path)
                raise ConfigError(f"--socket-group {group}: cannot give {path} to that group "
                                  f"({exc.strerror}); the pager's user must be a member of it"
                                  ) from None
            mode = 0o660
        os.chmod(path, mode)
        sock.listen(64)
        return sock

    async def start(self) -> None:
        if self._listen_fd is not None:
            self._sock = socket.socket(fileno=self._listen_fd)
        else:
            self._sock = self.bind(self.path, self.socket_gid)
        self._sock.setblocking(False)
        self._serve_task = asyncio.get_running_loop().create_task(self._accept_loop())

    async def stop_accepting(self) -> None:
        """No new clients (the socket file goes away unless a supervisor owns it); the ones
        connected keep their state."""
        if self._serve_task:
            self._serve_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._serve_task
            self._serve_task = None
        if self._sock:
            self._sock.close()
            self._sock = None
            if self._listen_fd is None:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)

    async def close(self) -> None:
        await self.stop_accepting()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            conn, _ = await loop.sock_accept(self._sock)
            conn.setblocking(False)
            t = loop.create_task(self._client(conn))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _client(self, conn: socket.socket) -> None:
        handle: Any = None
        fds: list[int] = []
        try:
            try:
                peer = Peer.of(conn)
                self.policy.admit(peer)
                hs = await asyncio.wait_for(self._read_handshake(conn, fds, peer),
                                            self.timeout)
            except TimeoutError:
                raise HandoffError(f"no complete handshake within {self.timeout:g} s; send the "
                                   "regions JSON and the uffd in one sendmsg") from None
            fds = []  # owned by the handshake now
            try:
                handle = await self.on_client(hs)
            except Exception:
                for fd in (hs.uffd, hs.memfd):
                    if fd is not None:
                        with contextlib.suppress(OSError):
                            os.close(fd)
                raise
            self.accepted += 1
            await self._wait_hangup(conn)
            log.info("client pid %d hung up", hs.pid)
        except HandoffError as exc:
            self.rejected += 1
            _refused(exc, str(exc))
        except asyncio.CancelledError:
            pass
        except (PagerError, OSError) as exc:  # the uffd binding's errors are OSErrors
            self.rejected += 1
            _refused(exc, f"{type(exc).__name__}: {exc}")
        except Exception:
            self.rejected += 1
            log.exception("handoff failed")
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            if handle is not None:
                try:
                    handle.close()
                except Exception:
                    log.exception("closing a client failed")
            conn.close()

    async def _read_handshake(self, conn: socket.socket, fds: list[int],
                              peer: Peer) -> Handshake:
        pid = peer.pid
        loop = asyncio.get_running_loop()
        buf = b""
        while True:
            await _wait_readable(loop, conn)
            try:
                part = recv_handshake_part(conn, fds)
            except BlockingIOError:
                continue
            if not part:
                raise HandoffError(f"peer pid {pid} closed the socket before a complete "
                                   f"handshake ({len(buf)} bytes received)")
            buf += part
            if len(buf) > MAX_MESSAGE:
                raise HandoffError(f"handshake longer than {MAX_MESSAGE} bytes; send one JSON "
                                   "array of regions")
            if message_complete(buf):
                break
        regions = parse_regions(buf)
        check_fds(regions, fds)
        check_fd_kinds(fds)
        self.policy.check_spaces(peer, regions)
        return Handshake(regions=regions, uffd=fds[0], memfd=fds[1] if len(fds) > 1 else None,
                         pid=pid, uid=peer.uid, body=buf, conn=conn)

    async def _wait_hangup(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await _wait_readable(loop, conn)
            extra: list[int] = []
            try:
                data = recv_handshake_part(conn, extra)
            except BlockingIOError:
                continue
            except (ConnectionResetError, HandoffError):
                data = b""
            finally:
                for fd in extra:
                    os.close(fd)
            if not data:
                return
            log.warning("ignoring %d bytes sent after the handshake", len(data))


def _listening(path: str) -> bool:
    """Whether a process accepts connections on the Unix socket ``path`` (a refused connect:
    the file is stale)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True  # it exists and did not refuse (a full backlog): someone is there
    finally:
        probe.close()
    return True


def _is_socket(path: str) -> bool:
    import stat
    return stat.S_ISSOCK(os.stat(path).st_mode)


async def _wait_readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    fut = loop.create_future()
    fd = sock.fileno()
    loop.add_reader(fd, lambda: fut.done() or fut.set_result(None))
    try:
        await fut
    finally:
        loop.remove_reader(fd)


def send_handshake(sock: socket.socket, regions: list[dict], fds: list[int]) -> None:
    """Client side (tests, workload, supervisor): one sendmsg with the JSON and the fds."""
    body = json.dumps(regions).encode()
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sock.sendmsg([body], anc)
