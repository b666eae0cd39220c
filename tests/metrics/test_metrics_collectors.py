"""pager.metrics: declared names, the engine-stats collector, and a real memory node's
metrics scraped over HTTP while a real client stores and fetches pages."""

from __future__ import annotations

import asyncio
import os
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import REGISTRY

from pager import metrics
from pager.engine import LATENCY_BUCKETS_US, EngineStats
from pager.errors import ConfigError

PAGE = 4096


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def sample(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def test_parse_hostport() -> None:
    assert metrics.parse_hostport("9850") == ("127.0.0.1", 9850)
    assert metrics.parse_hostport("0.0.0.0:9850") == ("0.0.0.0", 9850)
    assert metrics.parse_hostport("[::1]:0") == ("::1", 0)
    for bad in ("", "host:", "host:99999", "x"):
        with pytest.raises(ConfigError, match="PORT or HOST:PORT"):
            metrics.parse_hostport(bad)


def test_names_follow_the_naming_guide() -> None:
    for name, (kind, help_, labels) in metrics.METRICS.items():
        assert name.startswith(("ssi_pager_", "ssi_memnode_")), name
        assert not name.endswith("_total"), "counters get _total from the client library"
        assert help_ and "address" not in labels and "page" not in labels
        if kind == "histogram":
            assert name.endswith("_seconds")


@pytest.fixture
def engine_stats() -> EngineStats:
    st = EngineStats()
    st.faults = 10
    st.served_fetch, st.served_zero, st.served_wait, st.failed_faults = 6, 2, 1, 1
    st.fetched_bytes = 7 * 65536
    st.copied_bytes, st.zero_pages = 6 * 65536, 33
    st.readahead_installed, st.readahead_wasted = 3, 1
    st.fetch_errors = 4
    st.inflight = 2
    st.evictions, st.clean_drops, st.written_back_bytes = 5, 2, 3 * 65536
    st.faults_wp, st.wp_dirty = 4, 3
    st.observe_evict_us(5 * 20, 5)  # a batch of 5 units in 100 µs
    for us in (3, 30, 30, 400, 2_000_000):
        st.observe_us(us)
    return st


def test_pager_collector_exports_engine_stats(engine_stats: EngineStats) -> None:
    from pager.core.farmem import FarMemory
    client = SimpleNamespace(name="vm1", pid=4242, resident_bytes=3 << 20,
                             state=SimpleNamespace(regions=[1, 2],
                                                   farmem=FarMemory(4 << 20, 65536)))
    engine = SimpleNamespace(stats=lambda: engine_stats, chunk_size=65536, clients=[client],
                             source=SimpleNamespace(endpoint="10.0.0.2:50051"),
                             spaces_of=lambda regions: {"b", "a"})
    reg = metrics.pager_registry(engine)
    assert REGISTRY.get_sample_value("ssi_pager_clients") is None   # not the global registry
    assert reg.get_sample_value("ssi_pager_faults_total",
                                {"kind": "missing", "outcome": "fetched"}) == 6
    total = sum(reg.get_sample_value("ssi_pager_faults_total",
                                     {"kind": "missing", "outcome": o}) or 0
                for o in ("fetched", "zero", "readahead", "present", "unknown", "error"))
    assert total == 10
    assert reg.get_sample_value("ssi_pager_fault_duration_seconds_count") == 5
    assert reg.get_sample_value("ssi_pager_fault_duration_seconds_bucket", {"le": "5e-06"}) == 1
    assert reg.get_sample_value("ssi_pager_fault_duration_seconds_bucket",
                                {"le": "0.0005"}) == 4
    assert reg.get_sample_value("ssi_pager_fault_duration_seconds_bucket", {"le": "+Inf"}) == 5
    assert reg.get_sample_value("ssi_pager_fault_duration_seconds_sum") == pytest.approx(
        (3 + 30 + 30 + 400 + 2_000_000) / 1e6)
    assert reg.get_sample_value("ssi_pager_fetched_bytes_total") == 7 * 65536
    assert reg.get_sample_value("ssi_pager_zero_filled_pages_total") == 33
    assert reg.get_sample_value("ssi_pager_pages_in_flight") == 2 * 16
    assert reg.get_sample_value("ssi_pager_readahead_pages_total", {"result": "hit"}) == 48
    assert reg.get_sample_value("ssi_pager_readahead_pages_total", {"result": "waste"}) == 16
    assert reg.get_sample_value("ssi_pager_errors_total", {"kind": "fetch"}) == 4
    assert reg.get_sample_value("ssi_pager_clients") == 1
    assert reg.get_sample_value("ssi_pager_regions") == 2
    assert reg.get_sample_value("ssi_pager_resident_bytes", {"client": "vm1"}) == 3 << 20
    assert reg.get_sample_value("ssi_pager_resident_limit_bytes", {"client": "vm1"}) == 4 << 20
    assert reg.get_sample_value("ssi_pager_client_info",
                                {"client": "vm1", "pid": "4242", "space": "a,b"}) == 1
    assert reg.get_sample_value("ssi_pager_written_back_bytes_total") == 3 * 65536
    assert reg.get_sample_value("ssi_pager_evictions_total", {"result": "written_back"}) == 3
    assert reg.get_sample_value("ssi_pager_evictions_total", {"result": "clean"}) == 2
    assert reg.get_sample_value("ssi_pager_eviction_seconds_total") == pytest.approx(5 * 20e-6)
    assert reg.get_sample_value("ssi_pager_faults_total", {"kind": "wp", "outcome": "dirty"}) == 3
    assert reg.get_sample_value("ssi_pager_build_info",
                                {"version": metrics.__version__, "binding": "cffi"}) == 1
    assert len(LATENCY_BUCKETS_US) + 1 == len(engine_stats.latency_buckets)


def test_pager_collector_exports_the_fault_lanes_transport(engine_stats, memnode) -> None:
    """The peer's transport label and round trip come from a lane of the kind that carries
    the faults, probed on a real memory node."""
    from pager.source import MemnodeSource

    node, _server = memnode
    source = MemnodeSource(node.endpoint, node.token, "vm1", prefer="tcp")
    engine = SimpleNamespace(stats=lambda: engine_stats, chunk_size=4096, clients=[],
                             source=source)
    reg = metrics.pager_registry(engine)
    assert reg.get_sample_value("ssi_pager_errors_total", {"kind": "probe"}) == 1  # no lane yet
    with source.open_lane() as lane:  # a fault thread's lane selects the node's transport
        assert lane.fetch_into(None, 0, memoryview(bytearray(PAGE))) == 1
    assert source.lane_kind("memnode") == "tcp"
    reg = metrics.pager_registry(engine)
    assert reg.get_sample_value("ssi_pager_peer_info",
                                {"node": node.endpoint, "transport": "tcp"}) == 1
    # one scrape (each get_sample_value probes again, and the round trip differs every time):
    # the tier exported is the one of the round trip exported beside it
    samples = {(x.name, tuple(sorted(x.labels.items()))): x.value
               for fam in reg.collect() for x in fam.samples}
    rtt = samples[("ssi_pager_transport_rtt_seconds", (("node", node.endpoint),))]
    assert rtt > 0
    assert samples[("ssi_pager_transport_tier",
                    (("node", node.endpoint), ("tier", metrics.tier_for(rtt))))] == 1
    assert reg.get_sample_value("ssi_pager_errors_total", {"kind": "probe"}) == 0


@pytest.fixture
def memnode(tmp_path: Path) -> Iterator[tuple[object, metrics.MetricsServer]]:
    """A real MemoryNode on loopback (its own event loop thread) with its metrics endpoint."""
    from transport.node.server import MemoryNode
    from transport.node.store import PageStore

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    store = PageStore(tmp_path / "store")
    node = MemoryNode(store, token=os.urandom(32), port=0)

    async def start() -> metrics.MetricsServer:
        await node.start()
        return await metrics.start_memnode_metrics("0", node)

    server = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    yield node, server
    server.stop()
    asyncio.run_coroutine_threadsafe(node.close(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()
    store.close()


def test_memnode_metrics_count_real_requests(memnode) -> None:
    from transport.tcp import BlockingChannel

    node, server = memnode
    assert server.endpoint.startswith("127.0.0.1:")
    before = scrape(server.url)
    assert sample(before, "ssi_memnode_stored_pages") == 0
    with BlockingChannel.connect(node.endpoint, node.token, "vm1") as ch:
        ch.store(0, os.urandom(8 * PAGE))
        buf = bytearray(16 * PAGE)
        for _ in range(3):
            ch.fetch_into(0, buf)
        after = scrape(server.url)
    assert sample(after, "ssi_memnode_stored_pages") == 8
    assert sample(after, "ssi_memnode_stored_bytes") == 8 * PAGE
    assert sample(after, "ssi_memnode_requests_total", op="fetch", result="ok") == 3
    assert sample(after, "ssi_memnode_requests_total", op="store", result="ok") >= 1
    assert sample(after, "ssi_memnode_connections") == 1
    assert sample(after, "ssi_pager_build_info", version=metrics.__version__,
                  binding="cffi") == 1


def test_status_quantile_matches_prometheus_histogram_quantile() -> None:
    """Same numbers as deploy/prometheus/rules_test.yml's p99 case, computed by Prometheus."""
    from pager.tools.status import histogram_quantile
    inf = float("inf")
    assert histogram_quantile(0.99, [(0.001, 0), (0.01, 600), (inf, 600)]) == \
        pytest.approx(0.00991)
    assert histogram_quantile(0.5, [(0.0001, 100), (inf, 100)]) == pytest.approx(0.00005)
    assert histogram_quantile(0.99, [(0.001, 0), (inf, 0)]) is None
    assert histogram_quantile(0.99, [(0.001, 1), (inf, 10)]) == 0.001   # in +Inf: last bound


def test_a_down_memory_node_is_an_error_count_not_a_failed_scrape(engine_stats) -> None:
    from pager.source import MemnodeSource
    from tests.metrics.promserver import refused_port
    with refused_port() as port:
        source = MemnodeSource(f"127.0.0.1:{port}", os.urandom(32), "vm1", prefer="tcp")
        engine = SimpleNamespace(stats=lambda: engine_stats, chunk_size=4096, clients=[],
                                 source=source)
        reg = metrics.pager_registry(engine)
        for n in (1, 2):
            assert reg.get_sample_value("ssi_pager_errors_total", {"kind": "probe"}) == n
        assert reg.get_sample_value("ssi_pager_transport_rtt_seconds",
                                    {"node": source.endpoint}) is None
        assert reg.get_sample_value("ssi_pager_peer_info",
                                    {"node": source.endpoint, "transport": "?"}) == 1
