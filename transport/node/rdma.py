"""The memory node's RDMA listener (`RdmaServer`, ``ssi-pager memnode --rdma``), over the
pyverbs connection code of `transport.rdma` (see there for the data path and what ran here)."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Any

from transport.errors import RdmaUnavailable
from transport.rdma import (
    RDMA_PORT_OFFSET,
    STAGED,
    WINDOW_KEYS,
    RdmaLink,
    qp_init,
    rdma_devices,
    verbs,
)
from transport.wire import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_DATA,
    NONCE_SIZE,
    PAGE_SHIFT,
    VERSION,
    T,
)

log = logging.getLogger(__name__)


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
        cmid_mod, qp, ce, _e = verbs()
        try:
            ai = cmid_mod.AddrInfo(src=self.host, src_service=str(self.port),
                                   port_space=ce.RDMA_PS_TCP, flags=ce.RAI_PASSIVE)
            self._listen = cmid_mod.CMID(creator=ai, qp_init_attr=qp_init(qp))
            self._listen.listen(backlog=16)
        except Exception as exc:  # PyverbsRDMAError and friends
            raise RdmaUnavailable(f"RDMA listen on {self.host}:{self.port} failed: {exc}; "
                                  f"check that {self.host} is an address of the RDMA NIC"
                                  ) from exc
        t = threading.Thread(target=self._accept_loop, daemon=True, name="rdma-accept")
        t.start()
        return t

    def _accept_loop(self) -> None:
        cmid_mod, _qp, _ce, enums = verbs()
        while not self._stop.is_set():
            cmid = self._listen.get_request()
            threading.Thread(target=self._serve, args=(cmid, cmid_mod, enums), daemon=True,
                             name="rdma-conn").start()

    def _serve(self, cmid: Any, cmid_mod: Any, _enums: Any) -> None:
        from transport.errors import ProtocolError
        from transport.wire import ServerSession, Store, encode_error

        link = RdmaLink(cmid)
        # rdma_reg_read / rdma_reg_write: the peer may RDMA READ the first, WRITE the second
        window = cmid.reg_read(self.window)
        inbox = cmid.reg_write(self.window)
        link.post_recv()
        cmid.accept(cmid_mod.ConnParam(resources=4, depth=4))
        session = ServerSession(token=self.token, challenge=os.urandom(NONCE_SIZE),
                                node="memnode-rdma")
        rdma_info = dict(zip(WINDOW_KEYS, (window.buf, window.rkey, inbox.buf, inbox.rkey,
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
            for mr in (window, inbox):  # before the CMID, whose PD they hold
                with contextlib.suppress(Exception):
                    mr.close()
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
