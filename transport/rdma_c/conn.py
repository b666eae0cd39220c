"""`RdmaConn`: one RDMA connection of the C data path (`ssip_rdma.h`), for both sides.

Loading: `load()` imports the verbs extension ``transport.rdma_c._rdma_cffi`` (linked to
libibverbs.so.1 and librdmacm.so.1, so it imports only where rdma-core's libraries are), or,
when ``SSI_PAGER_RDMA_LOOPBACK=1``, the TEST DOUBLE ``_rdma_loopback_cffi`` (TCP sockets in
place of verbs, for the logic tests on a machine without RDMA; it warns when chosen). Any
failure is `RdmaUnavailable` saying why and what to install.

Every method that waits calls one C function with a deadline; cffi releases the GIL around
it, so a thread waiting on RDMA never stalls the event loop or other threads.
"""

from __future__ import annotations

import errno as E
import logging
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

from transport.errors import ConnectError, ConnectionLost, RdmaUnavailable, TransportError

log = logging.getLogger(__name__)

LOOPBACK_ENV = "SSI_PAGER_RDMA_LOOPBACK"  # "1": the test double, never for real use
_ERRLEN = 512
_modules: dict[str, ModuleType] = {}  # backend name -> loaded module (chosen per call)
_CONNECT_ERRNOS = (E.ECONNREFUSED, E.EHOSTUNREACH, E.ENODEV, E.ENETUNREACH, E.EADDRNOTAVAIL,
                   E.ENOSYS, E.EBUSY)


def loopback_requested() -> bool:
    return os.environ.get(LOOPBACK_ENV) == "1"


def load() -> ModuleType:
    """The cffi module of the chosen backend; RdmaUnavailable if it does not import."""
    key = "loopback" if loopback_requested() else "verbs"
    if key in _modules:
        return _modules[key]
    if key == "loopback":
        try:
            from transport.rdma_c import _rdma_loopback_cffi as mod
        except ImportError as exc:
            raise RdmaUnavailable(f"the RDMA loopback double is not built ({exc}): run "
                                  f"python3 setup.py build_ext --inplace") from exc
        log.warning("%s=1: RDMA runs over the loopback TEST DOUBLE (TCP sockets), not verbs",
                    LOOPBACK_ENV)
    else:
        try:
            from transport.rdma_c import _rdma_cffi as mod
        except ImportError as exc:
            raise RdmaUnavailable(
                f"the RDMA extension does not load ({exc}); it needs rdma-core's libraries "
                f"(apt install libibverbs1 librdmacm1 ibverbs-providers) and, to build it, "
                f"libibverbs-dev librdmacm-dev then python3 setup.py build_ext --inplace"
            ) from exc
    _modules[key] = mod
    return mod


def backend() -> str:
    """"verbs" or "loopback" (the test double)."""
    mod = load()
    return mod.ffi.string(mod.lib.ssip_r_backend()).decode()


def rdma_devices() -> list[str]:
    """Names of RDMA devices; RdmaUnavailable when there are none or the query fails."""
    mod = load()
    ffi, lib = mod.ffi, mod.lib
    names, err = ffi.new("char[1024]"), ffi.new(f"char[{_ERRLEN}]")
    n = lib.ssip_r_devices(names, 1024, err, _ERRLEN)
    if n < 0:
        raise RdmaUnavailable(f"no RDMA device ({ffi.string(err).decode()}); an RDMA NIC "
                              f"(InfiniBand/RoCE/iWARP) with its driver, or soft-RoCE, is "
                              f"needed", errno=-n)
    if n == 0:
        raise RdmaUnavailable("no RDMA device found (an RDMA NIC with its driver, or "
                              "soft-RoCE `rdma link add rxe0 type rxe netdev ETH`, is needed)")
    return ffi.string(names).decode().split()


def rdma_error(rc: int, message: str, *, connecting: bool = False) -> TransportError:
    """The transport error for a C call's -errno ``rc``."""
    code = -rc
    if code == E.ECONNRESET:
        return ConnectionLost(message, errno=code)
    if connecting or code in _CONNECT_ERRNOS:
        return ConnectError(message, errno=code)
    return TransportError(message, errno=code)


class RdmaConn:
    """One established connection: registered buffers, messages, one-sided READ/WRITE.

    Used by one thread at a time. ``timeout`` (seconds) bounds every wait."""

    def __init__(self, mod: ModuleType, ptr: Any, timeout: float) -> None:
        self.ffi, self.lib = mod.ffi, mod.lib
        self.ptr = ptr
        self.timeout_ms = max(1, int(timeout * 1000))
        self.window = int(self.lib.ssip_r_window(ptr))
        self._err = self.ffi.new(f"char[{_ERRLEN}]")
        self._msg = self.ffi.new(f"uint8_t[{self.lib.SSIP_R_MSG}]")

    @classmethod
    def connect(cls, host: str, port: int, *, window: int, timeout: float) -> RdmaConn:
        mod = load()
        out, err = mod.ffi.new("struct ssip_rconn **"), mod.ffi.new(f"char[{_ERRLEN}]")
        rc = mod.lib.ssip_r_connect(host.encode(), port, max(1, int(timeout * 1000)), window,
                                    out, err, _ERRLEN)
        if rc < 0:
            raise rdma_error(rc, f"RDMA connect to {host}:{port} failed: "
                                 f"{mod.ffi.string(err).decode()}", connecting=True)
        return cls(mod, out[0], timeout)

    def _check(self, rc: int, what: str = "") -> int:
        if rc < 0:
            text = self.ffi.string(self._err).decode()
            raise rdma_error(rc, f"{what}{text}")
        return rc

    def buffer(self, which: int) -> memoryview:
        """Registered buffer 0 or 1 (``window`` bytes), without a copy."""
        self._live()
        return memoryview(self.ffi.buffer(self.lib.ssip_r_buffer(self.ptr, which),
                                          self.window))

    def keys(self) -> dict[str, int]:
        """What a peer needs to reach this side's buffers (sent only after authentication)."""
        self._live()
        ra, rr = self.ffi.new("uint64_t *"), self.ffi.new("uint32_t *")
        wa, wr = self.ffi.new("uint64_t *"), self.ffi.new("uint32_t *")
        self.lib.ssip_r_keys(self.ptr, ra, rr, wa, wr)
        return {"read_addr": ra[0], "read_rkey": rr[0], "write_addr": wa[0],
                "write_rkey": wr[0], "size": self.window}

    def send(self, msg: bytes) -> None:
        self._live()
        self._check(self.lib.ssip_r_send(self.ptr, msg, len(msg), self.timeout_ms, self._err,
                                         _ERRLEN))

    def recv(self, timeout: float | None = None) -> bytes:
        """The next message; `ConnectionLost` when the peer left, TransportError (errno
        ETIMEDOUT) at the deadline."""
        self._live()
        ms = self.timeout_ms if timeout is None else max(1, int(timeout * 1000))
        n = self._check(self.lib.ssip_r_recv(self.ptr, self._msg, self.lib.SSIP_R_MSG, ms,
                                             self._err, _ERRLEN))
        return bytes(self.ffi.buffer(self._msg, n))

    def fetch(self, request_id: int, space: int, gpa: int, dst: memoryview,
              raddr: int, rkey: int) -> tuple[int, bytes | None]:
        """(zero mask, None), or (0, the reply frame) when the node answered otherwise."""
        self._live()
        mask = self.ffi.new("uint32_t *")
        rc = self._check(self.lib.ssip_r_fetch(
            self.ptr, request_id, space, gpa, len(dst), raddr, rkey, self.ffi.from_buffer(dst),
            mask, self._msg, self.lib.SSIP_R_MSG, self.timeout_ms, self._err, _ERRLEN))
        return (0, bytes(self.ffi.buffer(self._msg, rc))) if rc else (mask[0], None)

    def store(self, request_id: int, space: int, gpa: int, src: memoryview,
              raddr: int, rkey: int) -> bytes | None:
        """None when stored, or the reply frame when the node answered otherwise."""
        self._live()
        rc = self._check(self.lib.ssip_r_store(
            self.ptr, request_id, space, gpa, self.ffi.from_buffer(src), len(src), raddr, rkey,
            self._msg, self.lib.SSIP_R_MSG, self.timeout_ms, self._err, _ERRLEN))
        return bytes(self.ffi.buffer(self._msg, rc)) if rc else None

    def read(self, nbytes: int, raddr: int, rkey: int) -> None:
        """RDMA READ ``nbytes`` from the peer into buffer 0 (tests reach past the lane)."""
        self._live()
        self._check(self.lib.ssip_r_read(self.ptr, nbytes, raddr, rkey, self.timeout_ms,
                                         self._err, _ERRLEN), "")

    def _live(self) -> None:
        if self.ptr is None:
            raise ConnectionLost("the RDMA connection is closed")

    def close(self) -> None:
        """Disconnect and free the QP, CQ, channels, MRs and PD (idempotent)."""
        ptr, self.ptr = self.ptr, None
        if ptr is not None:
            self.lib.ssip_r_close(ptr)

    def __enter__(self) -> RdmaConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RdmaListener:
    """The memory node's listening rdma_cm id."""

    def __init__(self, host: str, port: int, backlog: int = 16) -> None:
        mod = load()
        self.ffi, self.lib, self._mod = mod.ffi, mod.lib, mod
        out, self._err = self.ffi.new("struct ssip_rlisten **"), self.ffi.new(f"char[{_ERRLEN}]")
        rc = self.lib.ssip_r_listen(host.encode(), port, backlog, out, self._err, _ERRLEN)
        if rc < 0:
            raise RdmaUnavailable(f"RDMA listen on {host}:{port} failed: "
                                  f"{self.ffi.string(self._err).decode()}", errno=-rc)
        self.ptr = out[0]

    def accept(self, timeout: float, window: int, admit: Callable[[], bool],
               conn_timeout: float, establish_timeout: float) -> RdmaConn | None:
        """The next connection, None when no request came within ``timeout``. ``admit()`` is
        asked when a request arrives; False rejects it (TransportError, errno EBUSY). The
        connection must be established within ``establish_timeout``; its waits are then
        bounded by ``conn_timeout``."""
        req = self.ffi.new("struct ssip_rreq **")
        rc = self.lib.ssip_r_get_request(self.ptr, max(1, int(timeout * 1000)), req,
                                         self._err, _ERRLEN)
        if rc == -E.ETIMEDOUT:
            return None
        if rc < 0:
            raise rdma_error(rc, self.ffi.string(self._err).decode())
        out = self.ffi.new("struct ssip_rconn **")
        rc = self.lib.ssip_r_accept(req[0], max(1, int(establish_timeout * 1000)), window,
                                    int(admit()), out, self._err, _ERRLEN)
        if rc < 0:
            raise rdma_error(rc, self.ffi.string(self._err).decode())
        return RdmaConn(self._mod, out[0], conn_timeout)

    def close(self) -> None:
        ptr, self.ptr = self.ptr, None
        if ptr is not None:
            self.lib.ssip_r_listen_close(ptr)
