"""`ssi-pager serve`: serve the page faults of VMM clients handed over on a Unix socket.

    ssi-pager serve --socket PATH (--memnode HOST:PORT | --source file:PATH)
                    [--chunk SIZE] [--token-file F] [--space NAME] [--metrics HOST:PORT]

Any client speaking the Firecracker UFFD handshake is served: Firecracker itself, the QEMU shim
(pager/shim), the demo workload. ``--supervise`` runs the pager under a small supervisor that
keeps every client's uffd, so a pager that crashes is restarted and takes its clients over.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import os
import signal
import sys
from dataclasses import dataclass

from pager.engine import DEFAULT_CHUNK, DEFAULT_READAHEAD, ClientPager, FaultEngine
from pager.errors import ConfigError
from pager.service.handoff import HandoffServer, Handshake
from pager.source import MemnodeSource, PageSource, parse_source
from pager.uffd.faultloop import enabled_by_env
from transport.polling import DEFAULT_POLL_US, add_poll_argument

log = logging.getLogger(__name__)

DEFAULT_SPACE = "default"


def parse_size(text: str) -> int:
    """'65536', '64K', '64KiB', '2M', '1G' -> bytes."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = 1
    for suffix, m in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30)):
        if t.endswith(suffix):
            t, mult = t[:-1], m
            break
    try:
        value = int(t) * mult
    except ValueError:
        raise ConfigError(f"cannot read size {text!r}; write e.g. 65536, 64K or 2M") from None
    if value < 0:
        raise ConfigError(f"size {text!r} is negative")
    return value


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """Source and engine options shared by serve, bench and demo."""
    parser.add_argument("--memnode", metavar="HOST:PORT", help="memory node to fetch pages from")
    parser.add_argument("--source", metavar="file:PATH",
                        help="snapshot file (a region's offset is its file position)")
    parser.add_argument("--space", default=DEFAULT_SPACE,
                        help="memory-node address space of clients that do not name one "
                             "(default %(default)s)")
    parser.add_argument("--token-file", metavar="F", default=None,
                        help="cluster token (default $XDG_DATA_HOME/ssi-pager/token)")
    parser.add_argument("--insecure-no-auth", action="store_true",
                        help="talk to a memory node that runs without authentication")
    parser.add_argument("--chunk", type=parse_size, default=DEFAULT_CHUNK,
                        help="bytes fetched per fault, a power of two (default 64K)")
    parser.add_argument("--readahead", type=parse_size, default=DEFAULT_READAHEAD,
                        help="largest readahead window for sequential streams, 0 = off "
                             "(default 2M)")
    parser.add_argument("--fetch-timeout", type=float, default=60.0,
                        help="seconds a fault's fetch is retried before the client gets "
                             "SIGBUS there (default %(default)s)")
    parser.add_argument("--no-c-loop", dest="c_loop", action="store_false",
                        default=enabled_by_env(),
                        help="serve every fault with the Python loop, not the C fault loop "
                             "(also SSI_PAGER_C_LOOP=0)")
    add_poll_argument(parser, "the C fault loop")
    parser.add_argument("--ws-window", type=float, default=0.0, metavar="S",
                        help="record each client's working set over its first S seconds and "
                             "store it with its space on the memory node; replay it ahead of "
                             "faults when the space starts again (0 = off, the default)")
    parser.add_argument("--no-prefetch", dest="prefetch", action="store_false",
                        help="with --ws-window: record working sets but do not replay them")
    parser.add_argument("--prefetch-rate", type=parse_size, default=0, metavar="BYTES",
                        help="most bytes per second a replay fetches, e.g. 256M (0 = no limit)")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", required=True, metavar="PATH",
                        help="Unix socket clients hand their uffd over on (created 0600)")
    add_source_arguments(parser)
    parser.add_argument("--metrics", metavar="HOST:PORT",
                        help="serve Prometheus metrics on this address")
    parser.add_argument("--allow-uid", type=int, action="append", default=None,
                        help="peer uid allowed to connect (repeatable; default: ours and root)")
    parser.add_argument("--handshake-timeout", type=float, default=5.0,
                        help="seconds a client has to send its handshake (default %(default)s)")
    parser.add_argument("--supervise", action="store_true",
                        help="run under a supervisor that keeps the clients' uffds and "
                             "restarts a pager that dies")
    parser.add_argument("--listen-fd", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--keeper-fd", type=int, default=None, help=argparse.SUPPRESS)


def source_from_args(args: argparse.Namespace) -> PageSource:
    token = None
    if args.memnode and not args.insecure_no_auth:
        from transport.token import load_token
        token = load_token(args.token_file)
    return parse_source(args.memnode, args.source, token=token, space=args.space)


def engine_from_args(args: argparse.Namespace, source: PageSource) -> FaultEngine:
    return FaultEngine(source, chunk_size=args.chunk, readahead=args.readahead,
                       fetch_timeout=args.fetch_timeout,
                       c_loop=getattr(args, "c_loop", None),
                       poll_us=getattr(args, "poll_us", DEFAULT_POLL_US),
                       ws_window=getattr(args, "ws_window", 0.0),
                       prefetch=getattr(args, "prefetch", True),
                       prefetch_rate=getattr(args, "prefetch_rate", 0))


@dataclass
class _Held:
    """A served client: closed when its socket hangs up."""

    service: PagerService
    client: ClientPager
    key: int

    def close(self) -> None:
        self.client.close(timeout=0)
        if self.service.keeper is not None:
            self.service.keeper.drop(self.key)


class PagerService:
    """The engine plus its handoff server (and optionally a supervisor's keeper)."""

    def __init__(self, engine: FaultEngine, socket_path: str, *,
                 allowed_uids: set[int] | None = None, handshake_timeout: float = 5.0,
                 listen_fd: int | None = None, keeper_fd: int | None = None) -> None:
        self.engine = engine
        self.server = HandoffServer(socket_path, self._on_client, allowed_uids=allowed_uids,
                                    timeout=handshake_timeout, listen_fd=listen_fd)
        self.keeper = None
        self._keeper_fd = keeper_fd
        self._adopted: list[asyncio.Task] = []
        # keys name clients to the supervisor: unique across pager restarts (pid + counter)
        self._keys = itertools.count((os.getpid() << 20) + 1)

    async def start(self) -> None:
        if self._keeper_fd is not None:
            from pager.service.supervisor import KeeperLink
            self.keeper = KeeperLink(self._keeper_fd)
            for held in self.keeper.take_over():
                self._adopt(held)
        await self.server.start()

    async def _on_client(self, hs: Handshake) -> _Held:
        key = next(self._keys)
        if self.keeper is not None:  # held before any layout event can be recorded
            self.keeper.hold(key, hs)
        try:
            # wake=True: a client re-sending a uffd another pager served (the QEMU shim
            # reconnecting after a pager restart) may have faults whose events were read and
            # lost; waking raises them again, and costs nothing where nothing waits
            client = self.engine.add_client(hs.uffd, hs.regions, memfd=hs.memfd, pid=hs.pid,
                                            wake=True, on_layout=self._recorder(key))
        except Exception:
            if self.keeper is not None:
                self.keeper.drop(key)
            raise
        log.info("serving %s: pid %d, %d regions, %d MiB, %s KiB pages", client.name, hs.pid,
                 len(hs.regions), sum(r.size for r in hs.regions) >> 20,
                 "/".join(sorted({str(r.page_size >> 10) for r in hs.regions})))
        return _Held(self, client, key)

    def _recorder(self, key: int):
        keeper = self.keeper
        if keeper is None:
            return None
        return lambda kind, *args: keeper.layout(key, kind, *args)

    def _adopt(self, held) -> None:
        """A client kept by the supervisor while the previous pager died: wake and serve."""
        client = self.engine.add_client(held.uffd, held.regions, memfd=held.memfd,
                                        pid=held.pid, wake=True, layout=held.layout,
                                        on_layout=self._recorder(held.key))
        log.warning("took over client pid %d from the previous pager", held.pid)
        handle = _Held(self, client, held.key)
        task = asyncio.get_running_loop().create_task(self._watch(held.conn, handle))
        self._adopted.append(task)

    async def _watch(self, conn, handle: _Held) -> None:
        try:
            conn.setblocking(False)
            await self.server._wait_hangup(conn)
        finally:
            handle.close()
            conn.close()

    async def close(self) -> None:
        for t in self._adopted:
            t.cancel()
        await self.server.close()
        await asyncio.get_running_loop().run_in_executor(None, self.engine.close)


def run(args: argparse.Namespace) -> int:
    if args.supervise:
        from pager.service.supervisor import run_supervised
        return run_supervised(sys.argv[1:])
    source = source_from_args(args)
    engine = engine_from_args(args, source)
    allowed = set(args.allow_uid) | {0, os.getuid()} if args.allow_uid else None
    service = PagerService(engine, args.socket, allowed_uids=allowed,
                           handshake_timeout=args.handshake_timeout,
                           listen_fd=args.listen_fd, keeper_fd=args.keeper_fd)
    from transport.tcp import run as run_loop
    return run_loop(_serve(service, args, source))


async def _serve(service: PagerService, args: argparse.Namespace, source: PageSource) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await announce_source(source)
    await service.start()
    metrics = None
    if args.metrics:
        metrics = await _start_metrics(args.metrics, service)
    ra = (f"readahead up to {args.readahead >> 10} KiB" if service.engine.readahead_active
          else "no readahead")
    print(f"pager: serving {args.socket} from {source.describe()}, chunk "
          f"{args.chunk >> 10} KiB, {ra}", file=sys.stderr, flush=True)
    await stop.wait()
    print("pager: stopping", file=sys.stderr)
    if metrics is not None:
        with contextlib.suppress(Exception):
            await metrics.close()
    await service.close()
    return 0


async def announce_source(source: PageSource) -> None:
    """Select each memory node's transport (the one whose lanes carry the faults) and print
    the SSI-HV status lines (transport, tier, expected latency) through the transport
    manager; a node that cannot be reached yet is a warning, not an error (its transport is
    selected when the first fault needs it; faults wait and retry until it is up). An
    authentication failure is permanent: raised, so `serve` fails at start instead of letting
    faults wait for a node that never accepts."""
    if not isinstance(source, MemnodeSource):
        return
    from transport.errors import AuthError, TransportError
    from transport.manager import TransportManager
    manager = TransportManager("pager", source.token, space=source.space,
                               prefer=source.prefer)
    try:
        await source.connect(manager)
    except AuthError:
        raise
    except (TransportError, OSError) as exc:
        print(f"pager: warning: memory node {source.endpoint} not reachable yet ({exc}); "
              "faults will wait for it", file=sys.stderr)
    finally:
        await manager.close()  # its lanes own their connections: they stay


async def _start_metrics(hostport: str, service: PagerService):
    """Prometheus endpoint from pager.metrics (exported at scrape time from engine stats)."""
    try:
        from pager import metrics
    except ImportError:
        log.warning("pager.metrics is not available; --metrics ignored")
        return None
    start = getattr(metrics, "start_pager_metrics", None)
    if start is None:
        log.warning("pager.metrics has no start_pager_metrics(); --metrics ignored")
        return None
    return await start(hostport, service.engine,
                       extra_errors=lambda: {"handoff": service.server.rejected})
