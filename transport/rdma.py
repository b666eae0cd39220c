"""RDMA transport over pyverbs (rdma-core's Python binding), imported lazily.

Connection setup with rdma_cm (`pyverbs.cmid.CMID`, RDMA_PS_TCP, RC queue pair). The same
protocol frames as TCP travel as SEND/RECV control messages; page bytes move one-sided:

* fetch: the client SENDs a FETCH frame; the node reads the written pages (packed, as on
  TCP) into its registered staging window and SENDs back a DATA header (``arg`` = zero
  mask, no payload); the client RDMA READs the packed pages into its registered buffer and
  scatters them into the caller's buffer.
* store: the client RDMA WRITEs the pages into the node's inbox, then SENDs a STORE header
  with flag `STAGED` and ``arg`` = byte count; the node pwrites them and SENDs STORED.

The node registers two windows per connection, one the client may RDMA READ (staged
fetches) and one it may RDMA WRITE (stores); their addresses and rkeys come in the WELCOME
message (``"rdma": {"read_addr", "read_rkey", "write_addr", "write_rkey", "size"}``).
The RDMA service listens on the memory node's TCP port + `RDMA_PORT_OFFSET`.

Installing pyverbs on Debian/Ubuntu: ``apt install python3-pyverbs rdma-core`` (plus the NIC's
provider, e.g. ``ibverbs-providers``). The package installs into the system Python's
``/usr/lib/python3/dist-packages``; when ssi-pager runs on another interpreter of the same
minor version (a venv or pyenv 3.11 on Debian 12), `import_pyverbs` loads that one package
from there (only ``pyverbs``, the rest of dist-packages stays invisible). Set
``SSI_PAGER_PYVERBS_PATH`` to the directory holding ``pyverbs/`` to use another build.
PyPI's pyverbs needs a matching rdma-core at run time (59.x needs libibverbs 59), so the
distribution's package is the one to use.

What runs here: the import, the device probe and the fallback are tested for real (pyverbs
installed, no RDMA device: ``get_device_list()`` raises PyverbsRDMAError). The data path
needs an RDMA NIC (or rxe/siw soft-RoCE in a kernel with RDMA support) and was not run on
this project's test machine, whose kernel has no RDMA support.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import logging
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from transport.base import Pages, PageTransport, check_pages, lookup_peer, page_view
from transport.errors import ConnectError, RdmaUnavailable, TransportError
from transport.wire import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_CONTROL,
    MAX_DATA,
    NONCE_SIZE,
    PAGE_SHIFT,
    PAGE_SIZE,
    VERSION,
    ClientHandshake,
    FrameReader,
    Reply,
    T,
    data_length,
    reply_from_frame,
    zero_mask_runs,
)

log = logging.getLogger(__name__)

RDMA_PORT_OFFSET = 1000
STAGED = 0x8000  # header flag on RDMA: the STORE's pages are in the node's window
DISTRO_PATHS = ("/usr/lib/python3/dist-packages",)
INSTALL_HINT = ("for RDMA install rdma-core's Python binding: apt install python3-pyverbs "
                "rdma-core ibverbs-providers (see transport/README.md)")
_MSG = HEADER_SIZE + MAX_CONTROL

_pyverbs: ModuleType | None = None


@contextlib.contextmanager
def _keep_root_logging() -> Iterator[None]:
    """pyverbs.base calls logging.basicConfig(level=INFO) at import: undo that."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for h in root.handlers[:]:
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)


def import_pyverbs() -> ModuleType:
    """Import pyverbs, from sys.path or from the distribution's package; RdmaUnavailable
    (saying why and what to install) otherwise."""
    global _pyverbs
    if _pyverbs is not None:
        return _pyverbs
    with _keep_root_logging():
        return _import_pyverbs()


def _import_pyverbs() -> ModuleType:
    global _pyverbs
    try:
        _pyverbs = importlib.import_module("pyverbs")
        importlib.import_module("pyverbs.device")
        return _pyverbs
    except ImportError as exc:
        first = exc
        sys.modules.pop("pyverbs", None)
    extra = os.environ.get("SSI_PAGER_PYVERBS_PATH")
    for base in ([extra] if extra else []) + list(DISTRO_PATHS):
        init = Path(base) / "pyverbs" / "__init__.py"
        if not init.exists():
            continue
        tag = f"cpython-{sys.version_info.major}{sys.version_info.minor}"
        built = [p.name for p in init.parent.glob("*.so")]
        if built and not any(tag in name for name in built):
            raise RdmaUnavailable(f"pyverbs in {base} is built for another Python than "
                                  f"{sys.version_info.major}.{sys.version_info.minor}; run "
                                  f"ssi-pager with the system python3 or build pyverbs for it")
        spec = importlib.util.spec_from_file_location(
            "pyverbs", init, submodule_search_locations=[str(init.parent)])
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["pyverbs"] = module
        try:
            spec.loader.exec_module(module)
            importlib.import_module("pyverbs.device")
        except ImportError as exc:
            for name in [m for m in sys.modules if m == "pyverbs" or m.startswith("pyverbs.")]:
                del sys.modules[name]
            raise RdmaUnavailable(f"pyverbs from {base} does not load ({exc}); "
                                  f"{INSTALL_HINT}") from exc
        _pyverbs = module
        return module
    raise RdmaUnavailable(f"pyverbs is not installed ({first}); {INSTALL_HINT}")


def rdma_devices() -> list[str]:
    """Names of RDMA devices; RdmaUnavailable when there are none or the query fails."""
    import_pyverbs()
    device = importlib.import_module("pyverbs.device")
    errors = importlib.import_module("pyverbs.pyverbs_error")
    try:
        devices = device.get_device_list()
    except errors.PyverbsError as exc:  # PyverbsRDMAError: no RDMA support in the kernel
        raise RdmaUnavailable(f"no RDMA device (get_device_list failed: {exc}); an RDMA NIC "
                              f"(InfiniBand/RoCE/iWARP) with its driver is needed") from exc
    if not devices:
        raise RdmaUnavailable("no RDMA device found (an RDMA NIC with its driver, or "
                              "soft-RoCE `rdma link add rxe0 type rxe netdev ETH`, is needed)")
    return [d.name.decode() if isinstance(d.name, bytes) else str(d.name) for d in devices]


def _verbs() -> tuple[Any, Any, Any, Any]:
    import_pyverbs()
    return (importlib.import_module("pyverbs.cmid"), importlib.import_module("pyverbs.qp"),
            importlib.import_module("pyverbs.cm_enums"), importlib.import_module("pyverbs.enums"))


def _qp_init(qp: Any) -> Any:
    cap = qp.QPCap(max_send_wr=16, max_recv_wr=16, max_send_sge=1, max_recv_sge=1)
    return qp.QPInitAttr(cap=cap, sq_sig_all=1)


_WINDOW_KEYS = ("read_addr", "read_rkey", "write_addr", "write_rkey", "size")


class _RdmaLink:
    """One connected CMID with its message buffers; blocking calls (run them in a thread)."""

    def __init__(self, cmid: Any) -> None:
        self.cmid = cmid
        self.send_mr = cmid.reg_msgs(_MSG)
        self.recv_mr = cmid.reg_msgs(_MSG)
        self.reader = FrameReader()
        self.space = 0
        # every work request we post is waited for with get_send_comp, so each must produce
        # a completion: pyverbs' post_read/post_write default to unsignaled
        self.signaled = importlib.import_module("pyverbs.enums").IBV_SEND_SIGNALED

    def post_recv(self) -> None:
        self.cmid.post_recv(self.recv_mr, _MSG)

    def send(self, frame: bytes) -> None:
        self.send_mr.write(frame, len(frame), 0)
        self.cmid.post_send(self.send_mr, self.signaled, len(frame))
        self._complete(self.cmid.get_send_comp, "send")

    def recv(self) -> Reply:
        wc = self._complete(self.cmid.get_recv_comp, "receive")
        self.reader.receive_data(self.recv_mr.read(wc.byte_len, 0))
        self.post_recv()  # keep one receive posted
        frame = self.reader.next_frame()
        if frame is None:
            raise TransportError("RDMA peer sent a partial frame")
        return reply_from_frame(frame)

    @staticmethod
    def _complete(poll: Any, what: str) -> Any:
        wc = None
        while wc is None:
            wc = poll()
        if wc.status != 0:  # IBV_WC_SUCCESS
            raise TransportError(f"RDMA {what} completion failed with status {wc.status}")
        return wc

    def close(self) -> None:
        try:
            self.cmid.disconnect()
        except Exception as exc:  # already gone
            log.debug("rdma disconnect: %s", exc)
        self.cmid.close()


@dataclass
class _RdmaPeer:
    link: _RdmaLink
    data_mr: Any  # local buffer: RDMA READ target, RDMA WRITE source
    read_addr: int  # the node's staging window for fetched pages (we READ it)
    read_rkey: int
    write_addr: int  # the node's inbox for stored pages (we WRITE it)
    write_rkey: int
    size: int
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class RdmaTransport(PageTransport):
    """`PageTransport` over RDMA (one RC connection per peer, requests serialised on it)."""

    name = "rdma"

    def __init__(self, token: bytes | None, space: str = "default", *,
                 node: str = "pager") -> None:
        super().__init__()
        rdma_devices()  # fail early with the reason
        self.token = token
        self.space = space
        self.node = node
        self._peers: dict[str, _RdmaPeer] = {}

    def _connect(self, endpoint: str) -> _RdmaPeer:
        from transport.tcp import parse_endpoint

        cmid_mod, qp, ce, _e = _verbs()
        host, port = parse_endpoint(endpoint)
        if port is None:
            raise TransportError(f"endpoint {endpoint!r} has no port")
        try:
            ai = cmid_mod.AddrInfo(dst=host, dst_service=str(port + RDMA_PORT_OFFSET),
                                   port_space=ce.RDMA_PS_TCP)
            cmid = cmid_mod.CMID(creator=ai, qp_init_attr=_qp_init(qp))
            link = _RdmaLink(cmid)
            data_mr = cmid.reg_msgs(MAX_DATA)  # local RDMA READ target / WRITE source
            link.post_recv()
            cmid.connect(cmid_mod.ConnParam(resources=4, depth=4))
        except Exception as exc:
            raise ConnectError(f"RDMA connect to {host}:{port + RDMA_PORT_OFFSET} failed: "
                               f"{exc}") from exc
        hs = ClientHandshake(self.token, self.space, node=self.node,
                             nonce=os.urandom(NONCE_SIZE))
        link.send(hs.start())
        window: dict[str, int] = {}
        while not hs.done:
            reply = link.recv()
            if reply.type == T.WELCOME and reply.obj:
                window = reply.obj.get("rdma") or {}
            out = hs.receive(reply)
            if out:
                link.send(out)
        if not set(_WINDOW_KEYS) <= window.keys():
            link.close()
            raise TransportError("memory node offered no RDMA window: it runs without --rdma")
        link.space = hs.space
        return _RdmaPeer(link, data_mr, *(int(window[k]) for k in _WINDOW_KEYS))

    async def connect_peer(self, node_id: str, endpoint: str) -> None:
        self._peers[node_id] = await asyncio.to_thread(self._connect, endpoint)
        self.endpoints[node_id] = endpoint

    def _peer(self, node_id: str) -> _RdmaPeer:
        return lookup_peer(self._peers, node_id)

    def _fetch(self, node_id: str, gpa: int, view: memoryview) -> int:
        peer = self._peer(node_id)
        link, mr = peer.link, peer.data_mr
        mask = 0
        for off in range(0, len(view), MAX_DATA):
            part = view[off:off + MAX_DATA]
            link.send(HEADER.pack(MAGIC, VERSION, T.FETCH, 0, 1, link.space, gpa + off, 0,
                                  len(part)))
            reply = link.recv()
            if reply.error is not None:
                raise reply.error
            # a DATA header only: the written pages wait, packed, in the node's window
            staged = data_length(len(part) >> PAGE_SHIFT, reply.arg)
            if staged:
                link.cmid.post_read(mr, staged, peer.read_addr, peer.read_rkey, link.signaled)
                link._complete(link.cmid.get_send_comp, "RDMA READ")
                data = mr.read(staged, 0)
                pos = 0
                for first, count in zero_mask_runs(len(part) >> PAGE_SHIFT, reply.arg):
                    n = count << PAGE_SHIFT
                    part[first << PAGE_SHIFT:(first << PAGE_SHIFT) + n] = data[pos:pos + n]
                    pos += n
            mask |= reply.arg << (off >> PAGE_SHIFT)
        return mask

    async def fetch_pages(self, gpa: int, count: int, node_id: str, into: Any = None, *,
                          urgent: bool | None = None) -> Pages:
        check_pages(gpa, count * PAGE_SIZE)
        view = memoryview(into if into is not None else bytearray(count * PAGE_SIZE)).cast("B")
        view = view[:count * PAGE_SIZE]
        async with self._peer(node_id).lock:
            mask = await asyncio.to_thread(self._fetch, node_id, gpa, view)
        for i in range(count):
            if mask >> i & 1:
                view[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] = bytes(PAGE_SIZE)
        return Pages(view, mask)

    def _store(self, node_id: str, gpa: int, view: memoryview) -> None:
        peer = self._peer(node_id)
        link, mr = peer.link, peer.data_mr
        for off in range(0, len(view), MAX_DATA):
            part = bytes(view[off:off + MAX_DATA])
            mr.write(part, len(part), 0)
            link.cmid.post_write(mr, len(part), peer.write_addr, peer.write_rkey,
                                 link.signaled)
            link._complete(link.cmid.get_send_comp, "RDMA WRITE")
            link.send(HEADER.pack(MAGIC, VERSION, T.STORE, STAGED, 1, link.space, gpa + off, 0,
                                  len(part)))
            reply = link.recv()
            if reply.error is not None:
                raise reply.error

    async def send_pages(self, gpa: int, data: Any, node_id: str) -> None:
        view = page_view(data, gpa, "send_pages")
        async with self._peer(node_id).lock:
            await asyncio.to_thread(self._store, node_id, gpa, view)

    async def ping(self, node_id: str) -> float:
        import time

        peer = self._peer(node_id)
        link, lock = peer.link, peer.lock

        def op() -> float:
            t0 = time.perf_counter()
            link.send(HEADER.pack(MAGIC, VERSION, T.PING, 0, 1, 0, 0, 0, 0))
            link.recv()
            return time.perf_counter() - t0

        async with lock:
            return await asyncio.to_thread(op)

    async def measure_bandwidth(self, node_id: str, nbytes: int = 16 << 20) -> float:
        import time

        buf = bytearray(MAX_DATA)
        t0 = time.perf_counter()
        for _ in range(max(1, nbytes // MAX_DATA)):
            await self.fetch_pages(0, MAX_DATA // PAGE_SIZE, node_id, buf)
        return max(1, nbytes // MAX_DATA) * MAX_DATA / (time.perf_counter() - t0)

    async def close(self) -> None:
        for peer in self._peers.values():
            peer.link.close()
        self._peers.clear()


class RdmaServer:
    """The memory node's RDMA listener: one thread per connection (pyverbs' synchronous
    rdma_cm API), sharing the node's `PageStore`; started by ``ssi-pager memnode --rdma``."""

    def __init__(self, store: Any, token: bytes | None, host: str, tcp_port: int,
                 window: int = MAX_DATA) -> None:
        rdma_devices()
        self.store = store
        self.token = token
        self.host = host
        self.port = tcp_port + RDMA_PORT_OFFSET
        self.window = window
        self._stop = threading.Event()

    def start(self) -> threading.Thread:
        cmid_mod, qp, ce, _e = _verbs()
        try:
            ai = cmid_mod.AddrInfo(src=self.host, src_service=str(self.port),
                                   port_space=ce.RDMA_PS_TCP, flags=ce.RAI_PASSIVE)
            self._listen = cmid_mod.CMID(creator=ai, qp_init_attr=_qp_init(qp))
            self._listen.listen(backlog=16)
        except Exception as exc:  # PyverbsRDMAError and friends
            raise RdmaUnavailable(f"RDMA listen on {self.host}:{self.port} failed: {exc}; "
                                  f"check that {self.host} is an address of the RDMA NIC"
                                  ) from exc
        t = threading.Thread(target=self._accept_loop, daemon=True, name="rdma-accept")
        t.start()
        return t

    def _accept_loop(self) -> None:
        cmid_mod, _qp, _ce, enums = _verbs()
        while not self._stop.is_set():
            cmid = self._listen.get_request()
            threading.Thread(target=self._serve, args=(cmid, cmid_mod, enums), daemon=True,
                             name="rdma-conn").start()

    def _serve(self, cmid: Any, cmid_mod: Any, _enums: Any) -> None:
        from transport.errors import ProtocolError
        from transport.wire import ServerSession, Store, encode_error

        link = _RdmaLink(cmid)
        # rdma_reg_read / rdma_reg_write: the peer may RDMA READ the first, WRITE the second
        window = cmid.reg_read(self.window)
        inbox = cmid.reg_write(self.window)
        link.post_recv()
        cmid.accept(cmid_mod.ConnParam(resources=4, depth=4))
        session = ServerSession(token=self.token, challenge=os.urandom(NONCE_SIZE),
                                node="memnode-rdma")
        rdma_info = dict(zip(_WINDOW_KEYS, (window.buf, window.rkey, inbox.buf, inbox.rkey,
                                            self.window), strict=True))
        try:
            while True:
                wc = link._complete(cmid.get_recv_comp, "receive")
                raw = bytearray(link.recv_mr.read(wc.byte_len, 0))
                link.post_recv()
                fields = HEADER.unpack_from(raw) if len(raw) >= HEADER_SIZE else None
                if fields and fields[2] == T.STORE and fields[3] & STAGED:
                    n = fields[8]  # arg = staged byte count: rebuild a plain STORE frame
                    raw = bytearray(HEADER.pack(MAGIC, VERSION, T.STORE, 0, fields[4],
                                                fields[5], fields[6], n, 0))
                    raw += inbox.read(min(n, self.window), 0)
                session.receive_data(bytes(raw))
                try:
                    ev = session.next_event()
                except ProtocolError as exc:
                    link.send(encode_error(exc.request_id, exc.code, str(exc)))
                    if exc.fatal:
                        return
                    continue
                if ev is None:
                    continue
                link.send(self._answer(session, ev, window, rdma_info, Store))
        except Exception as exc:
            log.info("rdma connection ended: %s", exc)
        finally:
            link.close()

    def _answer(self, session: Any, ev: Any, window: Any, rdma_info: dict[str, int],
                store_type: type) -> bytes:
        from transport.wire import Fetch, Hello, Open, Ping, pack_header

        if isinstance(ev, Fetch):
            out = bytearray(ev.length)
            mask, n = self.store.open(ev.space).read_compact(ev.gpa, ev.length >> PAGE_SHIFT,
                                                             memoryview(out))
            if n:
                window.write(bytes(out[:n]), n, 0)
            return pack_header(T.DATA, ev.request_id, gpa=ev.gpa, arg=mask)
        if isinstance(ev, store_type):
            self.store.open(ev.space).write(ev.gpa, ev.data)
            return pack_header(T.STORED, ev.request_id, gpa=ev.gpa)
        if isinstance(ev, Hello):
            return session.welcome(ev.request_id, rdma=rdma_info)
        if isinstance(ev, Open):
            self.store.open(ev.space)
            return session.opened(ev.request_id, ev.space)
        if isinstance(ev, Ping):
            return pack_header(T.PONG, ev.request_id)
        return session.auth_ok(ev.request_id)

    def stop(self) -> None:
        self._stop.set()
        try:
            self._listen.close()
        except Exception as exc:
            log.debug("rdma listener close: %s", exc)
