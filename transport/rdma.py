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
The RDMA service (`transport.node.rdma.RdmaServer`) listens on the memory node's TCP port +
`RDMA_PORT_OFFSET`.

Client side: `RdmaLane` is the blocking lane (`transport.lane.BlockingLane`) a pager thread
uses; `RdmaTransport` (the asyncio `PageTransport`) runs one per peer in worker threads.
`RdmaTransport.open_lane` hands out a lane only after a lane of this kind stored a page into
`transport.lane.PROOF_SPACE` and read it back unchanged; `create_transport` and
`transport.lane.open_lane_or_tcp` turn any failure into TCP with one warning.

Installing pyverbs on Debian/Ubuntu: ``apt install python3-pyverbs rdma-core`` (plus the NIC's
provider, e.g. ``ibverbs-providers``). The package installs into the system Python's
``/usr/lib/python3/dist-packages``; when ssi-pager runs on another interpreter of the same
minor version (a venv or pyenv 3.11 on Debian 12), `import_pyverbs` loads that one package
from there (only ``pyverbs``, the rest of dist-packages stays invisible). Set
``SSI_PAGER_PYVERBS_PATH`` to the directory holding ``pyverbs/`` to use another build.
PyPI's pyverbs needs a matching rdma-core at run time (59.x needs libibverbs 59), so the
distribution's package is the one to use.

What runs here: the import, the device probe and the fallbacks are tested for real (pyverbs
installed, no RDMA device: ``get_device_list()`` raises PyverbsRDMAError; a lane kind whose
proof fails, or whose connect raises a non-transport error, in tests/transport/test_lanes.py).
The data path needs an RDMA NIC (or rxe/siw soft-RoCE in a kernel with RDMA support) and was
not run on this project's test machine, whose kernel has no RDMA support.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from transport.base import Pages, PageTransport, check_pages, lookup_peer, page_view
from transport.errors import ConnectError, RdmaUnavailable, TransportError
from transport.lane import PROOF_SPACE, BlockingLane, prove_lane
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


def verbs() -> tuple[Any, Any, Any, Any]:
    import_pyverbs()
    return (importlib.import_module("pyverbs.cmid"), importlib.import_module("pyverbs.qp"),
            importlib.import_module("pyverbs.cm_enums"), importlib.import_module("pyverbs.enums"))


def qp_init(qp: Any) -> Any:
    cap = qp.QPCap(max_send_wr=16, max_recv_wr=16, max_send_sge=1, max_recv_sge=1)
    return qp.QPInitAttr(cap=cap, sq_sig_all=1)


WINDOW_KEYS = ("read_addr", "read_rkey", "write_addr", "write_rkey", "size")


class RdmaLink:
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
        for mr in (self.send_mr, self.recv_mr):  # before the CMID, whose PD they hold
            with contextlib.suppress(Exception):
                mr.close()
        self.cmid.close()


class RdmaLane(BlockingLane):
    """One RC connection to one address space of a memory node (blocking; one thread).

    `connect` wraps every failure (pyverbs errors, a malformed WELCOME) in `ConnectError`.
    A lane proves itself before it carries a fault: `RdmaTransport.open_lane` runs
    `transport.lane.prove_lane` through a lane of this kind first.
    """

    kind = "rdma"

    def __init__(self, link: RdmaLink, data_mr: Any, window: dict[str, int]) -> None:
        self.link = link
        self.data_mr = data_mr  # local buffer: RDMA READ target, RDMA WRITE source
        # the node's staging window for fetched pages (we READ it) and its inbox for stored
        # pages (we WRITE it)
        self.read_addr, self.read_rkey, self.write_addr, self.write_rkey, self.size = (
            window[k] for k in WINDOW_KEYS)
        if self.size < MAX_DATA:
            raise ValueError(f"RDMA window of {self.size} bytes is below one frame "
                             f"({MAX_DATA})")

    @classmethod
    def connect(cls, endpoint: str, token: bytes | None, space: str, *,
                node: str = "pager") -> RdmaLane:
        from transport.tcp import parse_endpoint

        host, port = parse_endpoint(endpoint)
        if port is None:
            raise TransportError(f"endpoint {endpoint!r} has no port: use HOST:PORT")
        where = f"{host}:{port + RDMA_PORT_OFFSET}"
        link = None
        try:
            cmid_mod, qp, ce, _e = verbs()
            ai = cmid_mod.AddrInfo(dst=host, dst_service=str(port + RDMA_PORT_OFFSET),
                                   port_space=ce.RDMA_PS_TCP)
            cmid = cmid_mod.CMID(creator=ai, qp_init_attr=qp_init(qp))
            link = RdmaLink(cmid)
            data_mr = cmid.reg_msgs(MAX_DATA)
            link.post_recv()
            cmid.connect(cmid_mod.ConnParam(resources=4, depth=4))
            window = cls._handshake(link, token, space, node)
            return cls(link, data_mr, window)
        except RdmaUnavailable:
            raise
        except Exception as exc:  # PyverbsRDMAError, ValueError/KeyError from a bad WELCOME
            if link is not None:
                link.close()
            if isinstance(exc, TransportError) and not isinstance(exc, ConnectError):
                raise
            raise ConnectError(f"RDMA connect to {where} failed: {type(exc).__name__}: "
                               f"{exc}") from exc

    @staticmethod
    def _handshake(link: RdmaLink, token: bytes | None, space: str,
                   node: str) -> dict[str, int]:
        hs = ClientHandshake(token, space, node=node, nonce=os.urandom(NONCE_SIZE))
        link.send(hs.start())
        window: dict[str, Any] = {}
        while not hs.done:
            reply = link.recv()
            if reply.type == T.WELCOME and reply.obj:
                window = reply.obj.get("rdma") or {}
            out = hs.receive(reply)
            if out:
                link.send(out)
        if not isinstance(window, dict) or not set(WINDOW_KEYS) <= window.keys():
            raise TransportError("memory node offered no RDMA window: it runs without --rdma")
        link.space = hs.space
        return {k: int(window[k]) for k in WINDOW_KEYS}

    def fetch_into(self, gpa: int, buf: Any) -> int:
        view = page_view(buf, gpa, "fetch")
        link, mr = self.link, self.data_mr
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
                link.cmid.post_read(mr, staged, self.read_addr, self.read_rkey, link.signaled)
                link._complete(link.cmid.get_send_comp, "RDMA READ")
                data = mr.read(staged, 0)
                pos = 0
                for first, count in zero_mask_runs(len(part) >> PAGE_SHIFT, reply.arg):
                    n = count << PAGE_SHIFT
                    part[first << PAGE_SHIFT:(first << PAGE_SHIFT) + n] = data[pos:pos + n]
                    pos += n
            mask |= reply.arg << (off >> PAGE_SHIFT)
        return mask

    def store_from(self, gpa: int, buf: Any) -> None:
        view = page_view(buf, gpa, "store")
        link, mr = self.link, self.data_mr
        for off in range(0, len(view), MAX_DATA):
            part = bytes(view[off:off + MAX_DATA])
            mr.write(part, len(part), 0)
            link.cmid.post_write(mr, len(part), self.write_addr, self.write_rkey,
                                 link.signaled)
            link._complete(link.cmid.get_send_comp, "RDMA WRITE")
            link.send(HEADER.pack(MAGIC, VERSION, T.STORE, STAGED, 1, link.space, gpa + off, 0,
                                  len(part)))
            reply = link.recv()
            if reply.error is not None:
                raise reply.error

    def ping(self) -> float:
        t0 = time.perf_counter()
        self.link.send(HEADER.pack(MAGIC, VERSION, T.PING, 0, 1, 0, 0, 0, 0))
        reply = self.link.recv()
        if reply.error is not None:
            raise reply.error
        return time.perf_counter() - t0

    def close(self) -> None:
        # the memory region before the connection: closing the CMID first leaks its PD
        with contextlib.suppress(Exception):
            self.data_mr.close()
        self.link.close()


@dataclass
class _RdmaPeer:
    lane: RdmaLane
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

    async def connect_peer(self, node_id: str, endpoint: str) -> None:
        lane = await asyncio.to_thread(RdmaLane.connect, endpoint, self.token, self.space,
                                       node=self.node)
        old = self._peers.pop(node_id, None)
        if old is not None:
            old.lane.close()
        self._peers[node_id] = _RdmaPeer(lane)
        self.endpoints[node_id] = endpoint

    def open_lane(self, node_id: str, space: str) -> RdmaLane:
        """A proven lane: a page stored into `PROOF_SPACE` and read back through a lane of
        this kind, byte for byte, before the lane to ``space`` is handed out."""
        endpoint = lookup_peer(self.endpoints, node_id)
        with RdmaLane.connect(endpoint, self.token, PROOF_SPACE, node=self.node) as probe:
            prove_lane(probe)
        return RdmaLane.connect(endpoint, self.token, space, node=self.node)

    def _peer(self, node_id: str) -> _RdmaPeer:
        return lookup_peer(self._peers, node_id)

    async def fetch_pages(self, gpa: int, count: int, node_id: str, into: Any = None, *,
                          urgent: bool | None = None) -> Pages:
        check_pages(gpa, count * PAGE_SIZE)
        view = memoryview(into if into is not None else bytearray(count * PAGE_SIZE)).cast("B")
        view = view[:count * PAGE_SIZE]
        peer = self._peer(node_id)
        async with peer.lock:
            mask = await asyncio.to_thread(peer.lane.fetch_into, gpa, view)
        for i in range(count):
            if mask >> i & 1:
                view[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] = bytes(PAGE_SIZE)
        return Pages(view, mask)

    async def send_pages(self, gpa: int, data: Any, node_id: str) -> None:
        view = page_view(data, gpa, "send_pages")
        peer = self._peer(node_id)
        async with peer.lock:
            await asyncio.to_thread(peer.lane.store_from, gpa, view)

    async def ping(self, node_id: str) -> float:
        peer = self._peer(node_id)
        async with peer.lock:
            return await asyncio.to_thread(peer.lane.ping)

    async def measure_bandwidth(self, node_id: str, nbytes: int = 16 << 20) -> float:
        buf = bytearray(MAX_DATA)
        t0 = time.perf_counter()
        for _ in range(max(1, nbytes // MAX_DATA)):
            await self.fetch_pages(0, MAX_DATA // PAGE_SIZE, node_id, buf)
        return max(1, nbytes // MAX_DATA) * MAX_DATA / (time.perf_counter() - t0)

    async def close(self) -> None:
        for peer in self._peers.values():
            await asyncio.to_thread(peer.lane.close)
        self._peers.clear()
