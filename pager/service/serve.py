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
from typing import TYPE_CHECKING

from pager.engine import DEFAULT_CHUNK, DEFAULT_READAHEAD, ClientPager, FaultEngine
from pager.errors import ConfigError, PagerError
from pager.service.access import AccessPolicy, SpaceRule, resolve_gid, resolve_uid
from pager.service.handoff import HandoffServer, Handshake
from pager.service.lifecycle import (
    HANDOVER_EXIT,
    drain,
    dup_or_none,
    poison_unserved,
    say,
)
from pager.source import MemnodeSource, PageSource, add_cluster_arguments, source_from_args
from pager.uffd.faultloop import enabled_by_env
from transport.polling import DEFAULT_POLL_US, add_poll_argument

if TYPE_CHECKING:
    from pager.service.supervisor import Held

log = logging.getLogger(__name__)

DEFAULT_SPACE = "default"


def parse_size(text: str) -> int:
    """'65536', '64K', '64KiB', '2M', '1.5G', '1T' -> bytes (a whole number of them)."""
    from decimal import Decimal, InvalidOperation

    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = 1
    for suffix, m in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("T", 1 << 40)):
        if t.endswith(suffix):
            t, mult = t[:-1], m
            break
    try:
        exact = Decimal(t) * mult
    except InvalidOperation:
        exact = None
    if exact is None or not exact.is_finite() or exact != int(exact):
        raise ConfigError(f"cannot read size {text!r}; write a whole number of bytes or of K, "
                          f"M, G or T, e.g. 65536, 64K, 2M or 1.5G")
    if exact < 0:
        raise ConfigError(f"size {text!r} is negative")
    return int(exact)


def size_arg(text: str) -> int:
    """argparse type of a size option: `parse_size`, its errors as usage errors."""
    try:
        return parse_size(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """Source and engine options shared by serve, bench and demo."""
    parser.add_argument("--memnode", metavar="HOST:PORT", action="append", default=None,
                        help="memory node to fetch pages from (repeat for a cluster)")
    add_cluster_arguments(parser)
    parser.add_argument("--source", metavar="file:PATH",
                        help="snapshot file (a region's offset is its file position)")
    parser.add_argument("--space", default=DEFAULT_SPACE,
                        help="memory-node address space of clients that do not name one "
                             "(default %(default)s)")
    parser.add_argument("--token-file", metavar="F", default=None,
                        help="cluster token (default $XDG_DATA_HOME/ssi-pager/token)")
    parser.add_argument("--insecure-no-auth", action="store_true",
                        help="talk to a memory node that runs without authentication")
    parser.add_argument("--tls", action="store_true",
                        help="TLS 1.3 to the memory nodes (started with --tls), with a "
                             "certificate of the cluster CA from --tls-dir")
    parser.add_argument("--tls-dir", metavar="DIR", default=None,
                        help="TLS material (ca.pem, cert.pem, key.pem; with ca.key the "
                             "pager's certificate is made there); default "
                             "$XDG_DATA_HOME/ssi-pager/tls")
    parser.add_argument("--chunk", type=size_arg, default=DEFAULT_CHUNK,
                        help="bytes fetched per fault, a power of two (default 64K)")
    parser.add_argument("--readahead", type=size_arg, default=DEFAULT_READAHEAD,
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
    parser.add_argument("--prefetch-rate", type=size_arg, default=0, metavar="BYTES",
                        help="most bytes per second a replay fetches, e.g. 256M (0 = no limit)")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", required=True, metavar="PATH",
                        help="Unix socket clients hand their uffd over on (created 0600, "
                             "or 0660 with --socket-group)")
    parser.add_argument("--socket-group", metavar="GROUP", default=None,
                        help="group owning the socket (mode 0660); its members may connect")
    add_source_arguments(parser)
    parser.add_argument("--metrics", metavar="HOST:PORT",
                        help="serve Prometheus metrics on this address")
    parser.add_argument("--allow-uid", metavar="USER", action="append", default=[],
                        help="peer user (name or uid) allowed to connect (repeatable; always "
                             "allowed: ours and root)")
    parser.add_argument("--allow-gid", metavar="GROUP", action="append", default=[],
                        help="peers in this group (primary or supplementary, name or gid) may "
                             "connect (repeatable)")
    parser.add_argument("--allow-space", metavar="WHO:SPACES", action="append", default=[],
                        help="spaces a peer may use: uid=N|user=NAME|gid=N|group=NAME|any, "
                             "then a comma list of names or globs ({uid} = the peer's uid); "
                             "repeatable. Without it every client gets --space only")
    parser.add_argument("--handshake-timeout", type=float, default=5.0,
                        help="seconds a client has to send its handshake (default %(default)s)")
    parser.add_argument("--max-resident", type=size_arg, default=None, metavar="SIZE",
                        help="far memory: keep each guest's resident RAM under SIZE (e.g. "
                             "128M), evicting to the memory node; needs guests on a shared "
                             "memfd (QEMU through `ssi-pager vm`)")
    parser.add_argument("--pager-max-resident", type=size_arg, default=None, metavar="SIZE",
                        help="far memory: all guests of this pager together under SIZE "
                             "(an even share each, capped by --max-resident)")
    parser.add_argument("--evict-policy", choices=("clock", "fifo"), default="clock",
                        help="far memory: replacement policy (default clock: CLOCK fed by "
                             "write faults, re-fault history and sampled re-protection; fifo "
                             "for comparison)")
    parser.add_argument("--supervise", action="store_true",
                        help="run under a supervisor that keeps the clients' uffds and "
                             "restarts a pager that dies (SIGHUP: restart it on purpose)")
    parser.add_argument("--stop-timeout", type=float, default=60.0, metavar="S",
                        help="on SIGTERM, serve attached clients until they exit for at most "
                             "S seconds, then poison what they were not served (SIGBUS there) "
                             "(default %(default)s)")
    parser.add_argument("--listen-fd", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--keeper-fd", type=int, default=None, help=argparse.SUPPRESS)


def policy_from_args(args: argparse.Namespace) -> tuple[AccessPolicy, int | None]:
    """The access policy of ``serve``'s options and the socket's group (None: mode 0600)."""
    gid = resolve_gid(args.socket_group) if args.socket_group else None
    policy = AccessPolicy(
        default_space=args.space,
        allowed_uids={0, os.getuid(), *(resolve_uid(u) for u in args.allow_uid)},
        allowed_gids={resolve_gid(g) for g in args.allow_gid} | ({gid} if gid is not None
                                                                 else set()),
        rules=[SpaceRule.parse(r) for r in args.allow_space])
    return policy, gid


def engine_from_args(args: argparse.Namespace, source: PageSource) -> FaultEngine:
    return FaultEngine(source, chunk_size=args.chunk, readahead=args.readahead,
                       fetch_timeout=args.fetch_timeout,
                       c_loop=getattr(args, "c_loop", None),
                       max_resident=getattr(args, "max_resident", None),
                       pager_max_resident=getattr(args, "pager_max_resident", None),
                       evict_policy=getattr(args, "evict_policy", "clock"),
                       poll_us=getattr(args, "poll_us", DEFAULT_POLL_US),
                       ws_window=getattr(args, "ws_window", 0.0),
                       prefetch=getattr(args, "prefetch", True),
                       prefetch_rate=getattr(args, "prefetch_rate", 0))


@dataclass(eq=False)
class _Held:
    """A served client: closed when its socket hangs up."""

    service: PagerService
    client: ClientPager
    key: int

    def close(self) -> None:
        self.service.live.discard(self)
        self.client.close(timeout=0)
        if self.service.keeper is not None:
            self.service.keeper.drop(self.key)


def _poison_refused(hs: Handshake | Held, why: BaseException) -> None:
    """A client refused after its handshake, or kept by the supervisor and refused by the
    pager taking over (its memory is registered, and no one will serve it): poison its
    regions, so a client that does not watch the socket (a VMM) gets SIGBUS on its first
    touch instead of waiting forever. The refusal said here is marked ``reported`` on ``why``
    (the handoff server then does not say it again)."""
    try:
        n = poison_unserved(os.dup(hs.uffd), hs.regions, f"pid {hs.pid}")
    except (OSError, PagerError) as exc:
        log.debug("poisoning a refused client failed: %s", exc)
        return
    say(f"client pid {hs.pid} refused ({why}); its {n >> 10} KiB poisoned: it gets SIGBUS "
        f"where it touches them")
    with contextlib.suppress(AttributeError):
        why.reported = True  # type: ignore[attr-defined]


class PagerService:
    """The engine plus its handoff server (and optionally a supervisor's keeper)."""

    def __init__(self, engine: FaultEngine, socket_path: str, *,
                 allowed_uids: set[int] | None = None, handshake_timeout: float = 5.0,
                 listen_fd: int | None = None, keeper_fd: int | None = None,
                 policy: AccessPolicy | None = None, socket_gid: int | None = None) -> None:
        self.engine = engine
        self.server = HandoffServer(socket_path, self._on_client, allowed_uids=allowed_uids,
                                    policy=policy, timeout=handshake_timeout,
                                    listen_fd=listen_fd, socket_gid=socket_gid)
        self.keeper = None
        self.live: set[_Held] = set()  # clients attached now
        self._keeper_fd = keeper_fd
        self._adopted: list[asyncio.Task] = []
        # keys name clients to the supervisor: unique across pager restarts (pid + counter)
        self._keys = itertools.count((os.getpid() << 20) + 1)

    async def start(self) -> None:
        if self._keeper_fd is not None:
            from pager.service.supervisor import KeeperLink
            self.keeper = KeeperLink(self._keeper_fd)
            for held in self.keeper.take_over():  # in the order they first came
                try:
                    self._adopt(held)
                except Exception as exc:  # this client alone (its space is an earlier one's)
                    self.keeper.drop(held.key)
                    _poison_refused(held, exc)
                    held.close()
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
        except Exception as exc:
            if self.keeper is not None:
                self.keeper.drop(key)
            _poison_refused(hs, exc)
            raise
        log.info("serving %s: pid %d, %d regions, %d MiB, %s KiB pages", client.name, hs.pid,
                 len(hs.regions), sum(r.size for r in hs.regions) >> 20,
                 "/".join(sorted({str(r.page_size >> 10) for r in hs.regions})))
        handle = _Held(self, client, key)
        self.live.add(handle)
        return handle

    def _recorder(self, key: int):
        keeper = self.keeper
        if keeper is None:
            return None
        return lambda kind, *args: keeper.layout(key, kind, *args)

    def _adopt(self, held: Held) -> None:
        """A client kept by the supervisor while the previous pager died: wake and serve."""
        client = self.engine.add_client(held.uffd, held.regions, memfd=held.memfd,
                                        pid=held.pid, wake=True, layout=held.layout,
                                        on_layout=self._recorder(held.key))
        log.warning("took over client pid %d from the previous pager", held.pid)
        handle = _Held(self, client, held.key)
        self.live.add(handle)
        task = asyncio.get_running_loop().create_task(self._watch(held.conn, handle))
        self._adopted.append(task)

    async def _watch(self, conn, handle: _Held) -> None:
        try:
            conn.setblocking(False)
            await self.server._wait_hangup(conn)
        finally:
            handle.close()
            conn.close()

    def describe_live(self) -> str:
        pids = ", ".join(str(h.client.pid) for h in self.live)
        return f"{len(self.live)} clients attached (pids {pids})"

    async def stop(self, timeout: float, force: asyncio.Event) -> None:
        """SIGTERM: no new clients; serve the attached ones until they exit, at most
        ``timeout`` s (or until ``force``), then poison what they have not been served."""
        await self.server.stop_accepting()
        if self.live:
            say(f"stopping: {self.describe_live()}: no new clients; serving these until they "
                f"exit, at most {timeout:g} s (--stop-timeout; SIGTERM again: stop now)")
        left = await drain(lambda: self.live, timeout, force)
        if left:
            say(f"stopping with {self.describe_live()}: poisoning their pages not served yet: "
                "each gets SIGBUS at its next access to one (restart it)")
            await asyncio.get_running_loop().run_in_executor(None, self._poison, left)
        await self.close()

    def _poison(self, handles: list[_Held]) -> None:
        for h in handles:
            fd = dup_or_none(h.client.uffd.fileno())
            h.client.close()
            if fd is None:
                continue
            n = poison_unserved(fd, h.client.state.regions, h.client.name)
            say(f"client pid {h.client.pid}: {n >> 10} KiB not served yet poisoned")

    async def handover(self) -> None:
        """SIGHUP under a supervisor: stop serving without dropping any client, so the next
        pager takes every one over (events not read yet stay queued on the uffds)."""
        await self.server.stop_accepting()
        say(f"restarting: handing {self.describe_live()} to the next pager")
        loop = asyncio.get_running_loop()
        for h in list(self.live):  # no layout event can arrive once the threads stopped
            await loop.run_in_executor(None, h.client.close)
        if self.keeper is not None:
            self.keeper.detach()
        await self.close()

    async def close(self) -> None:
        for t in self._adopted:
            t.cancel()
        await self.server.close()
        await asyncio.get_running_loop().run_in_executor(None, self.engine.close)


def run(args: argparse.Namespace) -> int:
    if args.supervise:
        from pager.service.supervisor import run_supervised
        return run_supervised(sys.argv[1:])
    policy, gid = policy_from_args(args)
    source = source_from_args(args)
    engine = engine_from_args(args, source)
    service = PagerService(engine, args.socket, policy=policy, socket_gid=gid,
                           handshake_timeout=args.handshake_timeout,
                           listen_fd=args.listen_fd, keeper_fd=args.keeper_fd)
    from transport.tcp import run as run_loop
    return run_loop(_serve(service, args, source))


async def _serve(service: PagerService, args: argparse.Namespace, source: PageSource) -> int:
    stop, force = asyncio.Event(), asyncio.Event()
    why: list[str] = []
    loop = asyncio.get_running_loop()

    def on_signal(name: str) -> None:
        if stop.is_set():
            if name == "orphan":
                return  # delivered again as each supervisor thread exits
            force.set()
        why.append(name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, "stop")
    if args.keeper_fd is not None:
        loop.add_signal_handler(signal.SIGHUP, on_signal, "handover")
        loop.add_signal_handler(ORPHAN_SIGNAL, on_signal, "orphan")
        watch_supervisor()
    else:  # the default action would end the pager and strand every client
        loop.add_signal_handler(signal.SIGHUP, say, "SIGHUP ignored: restarting the pager "
                                "under running clients needs --supervise")
    if getattr(args, "insecure_no_auth", False) and args.memnode:
        print("pager: WARNING: --insecure-no-auth: the memory node is not authenticated; "
              "anyone who can answer on its address can feed guests wrong memory. Drop the "
              "flag and give both sides the cluster token", file=sys.stderr)
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
    if why[0] == "orphan":
        say("the supervisor died: this pager is not supervised any more and stops")
    print(f"pager: stopping ({why[0]})", file=sys.stderr, flush=True)
    if metrics is not None:
        with contextlib.suppress(Exception):
            await metrics.close()
    if why[0] == "handover":
        await service.handover()
        return HANDOVER_EXIT
    await service.stop(args.stop_timeout, force)
    return 0


ORPHAN_SIGNAL = signal.SIGUSR2


def watch_supervisor() -> None:
    """A supervised pager gets ORPHAN_SIGNAL when its supervisor dies (PR_SET_PDEATHSIG): it
    then stops as on ``systemctl stop`` instead of serving on unsupervised. (Its own signal,
    not SIGTERM: the kernel sends it again as each of the supervisor's threads exits, which
    must not count as a second SIGTERM.)"""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, ORPHAN_SIGNAL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if str(os.getppid()) != os.environ.get("SSI_PAGER_SUPERVISOR_PID", str(os.getppid())):
        os.kill(os.getpid(), ORPHAN_SIGNAL)  # it died before prctl took effect


async def announce_source(source: PageSource) -> None:
    """Select each memory node's transport (the one whose lanes carry the faults) and print
    the SSI-HV status lines (transport, tier, expected latency) through the transport
    manager; a node that cannot be reached yet is a warning, not an error (its transport is
    selected when the first fault needs it; faults wait and retry until it is up). An
    authentication failure is permanent: raised, so `serve` fails at start instead of letting
    faults wait for a node that never accepts."""
    from pager.source.cluster import ClusterSource

    if isinstance(source, ClusterSource):
        await source.connect()
        return
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
