"""Every Prometheus metric of ssi-pager, declared in one place, exported at scrape time.

The fault path never touches prometheus-client: fault threads bump plain integers in the
engine's ``EngineStats`` (and the memory node its ``Counter``s); the collectors below read those
when Prometheus scrapes and turn them into metric families, on their own `CollectorRegistry`
(not the global one, so tests and two services in one process never clash).

Names follow the Prometheus naming guide and node_exporter: ``ssi_<component>_<name>_<unit>``,
base units (seconds, bytes), ``_total`` on counters, no per-address or per-page labels.

Hooking a service up (``--metrics HOST:PORT``, off by default, a bare port binds 127.0.0.1):

    from pager import metrics
    metrics.add_metrics_argument(parser)                          # in configure()
    handle = await metrics.start_pager_metrics(args.metrics, engine)    # ssi-pager serve
    handle = await metrics.start_memnode_metrics(args.metrics, node)    # ssi-pager memnode
    ...
    await handle.close()

Both print ``metrics: http://HOST:PORT/metrics`` on stderr once listening (port 0 picks one).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import make_wsgi_app
from prometheus_client.registry import Collector, CollectorRegistry

from pager import __version__
from pager.core.region import PAGE_SIZE
from pager.errors import ConfigError

log = logging.getLogger(__name__)

NS = "ssi"

# name -> (type, help, labels). The single declaration of every metric ssi-pager exports.
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "ssi_pager_faults": ("counter", "Page faults resolved, by uffd fault kind and outcome "
                         "(fetched, zero, readahead, present, unknown, error)",
                         ("kind", "outcome")),
    "ssi_pager_fault_duration_seconds": ("histogram", "Time from reading a fault event to the "
                                         "page being installed", ()),
    "ssi_pager_fetched_bytes": ("counter", "Bytes fetched from page sources (faults and "
                                "readahead)", ()),
    "ssi_pager_installed_bytes": ("counter", "Bytes installed into guests (UFFDIO_COPY and "
                                  "UFFDIO_ZEROPAGE)", ()),
    "ssi_pager_written_back_bytes": ("counter", "Bytes of dirty pages written back to memory "
                                     "nodes by the evictor (far memory)", ()),
    "ssi_pager_resident_bytes": ("gauge", "Guest memory resident now (installed by the pager "
                                 "and not evicted or removed since), by client", ("client",)),
    "ssi_pager_resident_limit_bytes": ("gauge", "Resident limit of a client under far memory "
                                       "(--max-resident / share of --pager-max-resident)",
                                       ("client",)),
    "ssi_pager_evictions": ("counter", "Units evicted to memory nodes, by whether they were "
                            "written back (dirty) or dropped without a transfer (clean)",
                            ("result",)),
    "ssi_pager_eviction_seconds": ("counter", "Time spent evicting (write-protect to wake), "
                                   "summed over batches; divide by evictions", ()),
    "ssi_pager_prefetched_bytes": ("counter", "Bytes a working-set replay installed ahead of "
                                              "faults", ()),
    "ssi_pager_zero_filled_pages": ("counter", "Pages installed with UFFDIO_ZEROPAGE (never "
                                    "written or removed)", ()),
    "ssi_pager_pages_in_flight": ("gauge", "Pages being fetched right now", ()),
    "ssi_pager_readahead_pages": ("counter", "Pages fetched ahead of faults, by whether they "
                                  "were installed (hit) or dropped unused (waste)", ("result",)),
    "ssi_pager_clients": ("gauge", "VMM clients (userfaultfds) being served", ()),
    "ssi_pager_client": ("info", "A VMM client being served: its process (empty: a forked "
                         "child's) and the address spaces its regions are in (empty: a "
                         "snapshot file)", ("client", "pid", "space")),
    "ssi_pager_regions": ("gauge", "Guest memory regions being served", ()),
    "ssi_pager_errors": ("counter", "Errors by kind (fetch attempts that failed, faults that "
                         "could not be served, faults outside every region)", ("kind",)),
    "ssi_pager_transport_rtt_seconds": ("gauge", "Last measured round-trip time to a memory "
                                        "node", ("node",)),
    "ssi_pager_transport_tier": ("gauge", "1 for the latency tier a memory node's transport is "
                                 "in", ("node", "tier")),
    "ssi_pager_peer": ("info", "A memory node the pager fetches from, and its transport",
                       ("node", "transport")),
    "ssi_pager_build": ("info", "ssi-pager version and userfaultfd binding", ("version",
                                                                              "binding")),
    "ssi_memnode_requests": ("counter", "Memory node requests by operation and result",
                             ("op", "result")),
    "ssi_memnode_stored_pages": ("gauge", "Pages held by the memory node's store", ()),
    "ssi_memnode_stored_bytes": ("gauge", "Bytes held by the memory node's store", ()),
    "ssi_memnode_connections": ("gauge", "Open connections to the memory node", ()),
}

def _latency_buckets() -> tuple[float, ...]:
    """The engine's ``LATENCY_BUCKETS_US`` as the histogram's upper bounds in seconds."""
    from pager.engine import LATENCY_BUCKETS_US
    return tuple(us / 1e6 for us in LATENCY_BUCKETS_US)


def family(name: str, **kwargs: Any) -> Metric:
    """An empty metric family of a declared metric."""
    kind, help_, labels = METRICS[name]
    if "value" in kwargs:
        labels = None  # an unlabelled sample given at once
    if kind == "counter":
        return CounterMetricFamily(name, help_, labels=labels, **kwargs)
    if kind == "gauge":
        return GaugeMetricFamily(name, help_, labels=labels, **kwargs)
    if kind == "info":
        return InfoMetricFamily(name, help_, labels=(), **kwargs)
    return HistogramMetricFamily(name, help_, labels=labels, **kwargs)


def build_info(binding: str = "cffi") -> Metric:
    info = family("ssi_pager_build")
    info.add_metric([], {"version": __version__, "binding": binding})
    return info


# ------------------------------------------------------------------ pager (engine) collector

@dataclass
class Peer:
    """One memory node as the pager sees it; ``transport`` is the kind of lane that carries
    its faults ("tcp" or "rdma"; "?" before the node's transport is selected)."""

    node: str
    transport: str = "?"
    rtt_seconds: float | None = None
    tier: str | None = None


def tier_for(rtt_seconds: float) -> str:
    """The transport's latency tier name for a round trip (transport.base.TransportTier)."""
    from transport.base import TransportTier
    return TransportTier.from_latency(rtt_seconds).value


class PeerProbe:
    """Measures the round trip to each node of a memory-node source at scrape time (control
    plane only: its own lane per node, of the kind that carries the node's faults, a few
    PINGs per scrape, never the fault threads' lanes). A node whose transport is not selected
    yet (unreachable when the pager started, no fault since) counts as a probe failure.
    Scrapes may arrive on several HTTP threads at once: one probe at a time uses the lanes."""

    PINGS = 3

    def __init__(self, source: Any) -> None:
        self.source = source
        self.lanes: dict[str, Any] = {}
        self.failures = 0
        self._lock = threading.Lock()

    def peers(self) -> list[Peer]:
        with self._lock:
            return [self._probe(node_id, endpoint)
                    for node_id, endpoint in self.source.nodes.items()]

    def _probe(self, node_id: str, endpoint: str) -> Peer:
        peer = Peer(node=str(endpoint))
        try:
            lane = self.lanes.get(node_id)
            if lane is None:
                if self.source.lane_kind(node_id) is None:  # the pager never reached it
                    raise ConnectionError("no transport selected yet")
                lane = self.lanes[node_id] = self.source.open_node_lane(node_id)
            peer.rtt_seconds = min(lane.ping() for _ in range(self.PINGS))
            peer.tier = tier_for(peer.rtt_seconds)
        except Exception as exc:  # a down node must not break the scrape: report, retry later
            self.failures += 1
            log.debug("probing %s failed: %s", endpoint, exc)
            self._drop(node_id)
        peer.transport = self.source.lane_kind(node_id) or "?"
        return peer

    def _drop(self, node_id: str) -> None:
        lane = self.lanes.pop(node_id, None)
        if lane is not None:
            lane.close()

    def close(self) -> None:
        for node_id in list(self.lanes):
            self._drop(node_id)


class PagerCollector(Collector):
    """Metrics of a running `FaultEngine`, computed from ``engine.stats()`` at scrape time."""

    def __init__(self, engine: Any, *, extra_errors: Callable[[], dict[str, int]] | None = None,
                 binding: str = "cffi") -> None:
        self.engine = engine
        self.extra_errors = extra_errors
        self.binding = binding
        self.buckets = _latency_buckets()
        source = getattr(engine, "source", None)
        self.probe = PeerProbe(source) if hasattr(source, "open_node_lane") else None

    def collect(self) -> Iterator[Metric]:
        st = self.engine.stats()
        chunk_pages = max(1, getattr(self.engine, "chunk_size", PAGE_SIZE) // PAGE_SIZE)

        # The engine registers MISSING faults; WP and MINOR faults appear under their kind once
        # it serves them (their outcomes are counted with the missing ones until then).
        faults = family("ssi_pager_faults")
        for outcome, n in (("fetched", st.served_fetch), ("zero", st.served_zero),
                           ("readahead", st.served_wait), ("present", st.served_dup),
                           ("unknown", st.unknown_faults), ("error", st.failed_faults)):
            faults.add_metric(["missing", outcome], n)
        if st.wp_dirty:
            faults.add_metric(["wp", "dirty"], st.wp_dirty)
        for kind, n in (("wp", st.faults_wp - st.wp_dirty), ("minor", st.faults_minor)):
            if n:
                faults.add_metric([kind, "seen"], n)
        yield faults

        hist = family("ssi_pager_fault_duration_seconds")
        cumulative, acc = [], 0
        for le, n in zip((*self.buckets, float("inf")), st.latency_buckets, strict=True):
            acc += n
            cumulative.append(("+Inf" if le == float("inf") else repr(le), acc))
        hist.add_metric([], cumulative, st.latency_sum_us / 1e6)
        yield hist

        for name, value in (
                ("ssi_pager_fetched_bytes", st.fetched_bytes),
                ("ssi_pager_installed_bytes", st.copied_bytes + st.zero_pages * PAGE_SIZE),
                ("ssi_pager_written_back_bytes", st.written_back_bytes),
                ("ssi_pager_prefetched_bytes", st.prefetch_bytes),
                ("ssi_pager_zero_filled_pages", st.zero_pages)):
            yield family(name, value=value)
        yield family("ssi_pager_pages_in_flight", value=max(0, st.inflight) * chunk_pages)

        ra = family("ssi_pager_readahead_pages")
        ra.add_metric(["hit"], st.readahead_installed * chunk_pages)
        ra.add_metric(["waste"], st.readahead_wasted * chunk_pages)
        yield ra

        ev = family("ssi_pager_evictions")
        ev.add_metric(["written_back"], st.evictions - st.clean_drops)
        ev.add_metric(["clean"], st.clean_drops)
        yield ev
        yield family("ssi_pager_eviction_seconds", value=st.evict_latency_sum_us / 1e6)

        clients = list(getattr(self.engine, "clients", []))
        resident = family("ssi_pager_resident_bytes")
        limit = family("ssi_pager_resident_limit_bytes")
        who = family("ssi_pager_client")
        spaces_of = getattr(self.engine, "spaces_of", None)
        for c in clients:
            spaces = spaces_of(c.state.regions) if spaces_of is not None else set()
            who.add_metric([], {"client": c.name, "pid": str(c.pid) if c.pid else "",
                                "space": ",".join(sorted(x for x in spaces if x))})
            resident.add_metric([c.name], c.resident_bytes)
            fm = c.state.farmem
            if fm is not None:
                limit.add_metric([c.name], fm.limit)
        yield resident
        yield limit
        yield who
        yield family("ssi_pager_clients", value=len(clients))
        yield family("ssi_pager_regions", value=sum(len(c.state.regions) for c in clients))

        errors = family("ssi_pager_errors")
        peers = self.probe.peers() if self.probe is not None else []
        counts = {"fetch": st.fetch_errors, "fault": st.failed_faults,
                  "unknown_address": st.unknown_faults,
                  "probe": self.probe.failures if self.probe is not None else 0}
        if self.extra_errors is not None:
            for k, v in self.extra_errors().items():
                counts[k] = counts.get(k, 0) + v
        for kind, n in sorted(counts.items()):
            errors.add_metric([kind], n)
        yield errors

        rtt = family("ssi_pager_transport_rtt_seconds")
        tier = family("ssi_pager_transport_tier")
        info = family("ssi_pager_peer")
        for p in peers:
            info.add_metric([], {"node": p.node, "transport": p.transport})
            if p.rtt_seconds is not None:
                rtt.add_metric([p.node], p.rtt_seconds)
            if p.tier is not None:
                tier.add_metric([p.node, p.tier], 1)
        yield rtt
        yield tier
        yield info
        yield build_info(self.binding)


# ------------------------------------------------------------------ memory node collector

class MemnodeCollector(Collector):
    """Metrics of a `transport.node.server.MemoryNode`, from ``node.stats()`` at scrape time."""

    def __init__(self, node: Any) -> None:
        self.node = node

    def _stats(self) -> dict[str, Any]:
        # stats() runs on the HTTP thread while the event loop mutates the counters: a dict
        # resized mid-iteration raises RuntimeError; the next attempt sees a settled dict.
        for _ in range(5):
            try:
                return self.node.stats()
            except RuntimeError:
                continue
        return self.node.stats()

    def collect(self) -> Iterator[Metric]:
        st = self._stats()
        req = family("ssi_memnode_requests")
        for op, results in sorted(st.get("requests", {}).items()):
            for result, n in sorted(results.items()):
                req.add_metric([op, result], n)
        yield req
        yield family("ssi_memnode_stored_pages", value=st.get("stored_pages", 0))
        yield family("ssi_memnode_stored_bytes", value=st.get("stored_bytes", 0))
        yield family("ssi_memnode_connections", value=st.get("connections_open", 0))
        yield build_info()


def pager_registry(engine: Any, **kwargs: Any) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(PagerCollector(engine, **kwargs))
    source = getattr(engine, "source", None)
    if hasattr(source, "state"):  # a cluster of memory nodes
        from pager.source.cluster_metrics import ClusterCollector
        reg.register(ClusterCollector(source))
    return reg


def memnode_registry(node: Any) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(MemnodeCollector(node))
    return reg


# ------------------------------------------------------------------ HTTP endpoint

def parse_hostport(text: str, option: str = "--metrics") -> tuple[str, int]:
    """'9850' -> ('127.0.0.1', 9850); 'HOST:PORT' and '[v6]:PORT' as given (``option``:
    what an error names)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        value = int(port)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise ConfigError(f"{option} {text!r}: expected PORT or HOST:PORT (e.g. 9850 or "
                          f"127.0.0.1:9850)")
    return host, value


def add_metrics_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics", metavar="HOST:PORT", default=None,
                        help="serve Prometheus /metrics here (off by default; a bare port "
                             "binds 127.0.0.1)")


METRICS_MAX_CONNECTIONS = 16  # connections served at once; more wait in the listen backlog
METRICS_IDLE_TIMEOUT = 5.0  # seconds a connection may stay silent before it is closed


class _Handler(WSGIRequestHandler):
    timeout = METRICS_IDLE_TIMEOUT  # an idle or slow client's thread ends after this

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics: %s", format % args)


class _BoundedServer(ThreadingMixIn, WSGIServer):
    """A thread per connection, at most METRICS_MAX_CONNECTIONS of them: the accept loop
    waits for a free slot, so idle connections cannot pile up threads."""

    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(METRICS_MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        self._slots.acquire()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("metrics: connection from %s dropped: %s", client_address,
                  sys.exc_info()[1])

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def _bounded_http_server(host: str, port: int, registry: CollectorRegistry
                         ) -> tuple[WSGIServer, threading.Thread]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class Server(_BoundedServer):
        address_family = family

    httpd = make_server(host, port, make_wsgi_app(registry), Server, handler_class=_Handler)
    t = threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True)
    t.start()
    return httpd, t


class MetricsServer:
    """A running /metrics endpoint (a bounded WSGI server on a daemon thread)."""

    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        host, port = server.server_address[:2]
        self.endpoint = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}/metrics"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.stop)


def serve_metrics(hostport: str, registry: CollectorRegistry) -> MetricsServer:
    """Start serving ``registry`` on ``hostport``; prints the URL on stderr."""
    host, port = parse_hostport(hostport)
    try:
        server, thread = _bounded_http_server(host, port, registry)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc.strerror}; choose "
                          f"another --metrics port") from exc
    handle = MetricsServer(server, thread)
    print(f"metrics: {handle.url}", file=sys.stderr, flush=True)
    return handle


async def start_pager_metrics(hostport: str, engine: Any, **kwargs: Any) -> MetricsServer:
    """`ssi-pager serve --metrics`: the engine's metrics endpoint."""
    return serve_metrics(hostport, pager_registry(engine, **kwargs))


async def start_memnode_metrics(hostport: str, node: Any) -> MetricsServer:
    """`ssi-pager memnode --metrics`: the memory node's metrics endpoint."""
    return serve_metrics(hostport, memnode_registry(node))
