"""The asyncio TCP client (`TcpTransport`) against a real memory node process."""

from __future__ import annotations

import asyncio
import os

import pytest

from transport.base import SyncTransport, TransportTier
from transport.errors import AuthError, ConnectError
from transport.tcp import TcpTransport, run
from transport.wire import MAX_DATA

PAGE = 4096


def test_pipelined_concurrent_fetches_content_checked(memnode):
    async def main() -> None:
        async with TcpTransport(memnode.token, "vmA") as t:
            await t.connect_peer("n1", memnode.endpoint)
            data = os.urandom(4 << 20)
            await t.send_pages(0, data, "n1")
            # 200 concurrent fetches of mixed sizes on all lanes, every byte checked
            sizes = [1, 16, 3, 32, 64, 7]
            jobs = []
            for i in range(200):
                n = sizes[i % len(sizes)]
                first = (i * 37) % (1024 - n)
                jobs.append((first, n, t.fetch_pages(first * PAGE, n, "n1",
                                                     urgent=bool(i % 2))))
            results = await asyncio.gather(*(j[2] for j in jobs))
            for (first, n, _), pages in zip(jobs, results, strict=True):
                assert pages.zero_mask == 0
                assert bytes(pages.data) == data[first * PAGE:(first + n) * PAGE]
            # beyond what was written: zero pages, zero-filled, flagged
            buf = bytearray(b"\x55" * 8 * PAGE)
            pages = await t.fetch_pages((1024 - 4) * PAGE, 8, "n1", into=buf)
            assert pages.zero_mask == 0b11110000
            assert bytes(buf[4 * PAGE:]) == bytes(4 * PAGE)
            assert bytes(buf[:4 * PAGE]) == data[-4 * PAGE:]
            assert await t.fetch_page(5 * PAGE, "n1") == data[5 * PAGE:6 * PAGE]
            await t.send_page(8 << 20, b"\x01" * PAGE, "n1")
            assert await t.fetch_page(8 << 20, "n1") == b"\x01" * PAGE

    run(main())


def test_urgent_lane_does_not_queue_behind_bulk(memnode):
    """A page fetched on the urgent lane arrives while a 32 MiB bulk fetch is still streaming;
    on the bulk's own lane it arrives only after the whole stream (replies in order)."""
    bulk_pages = 8192

    async def small_fetch_during_bulk(t: TcpTransport, urgent: bool) -> bool:
        """Whether the bulk fetch was still unfinished when the small fetch returned."""
        lane = t.peers["n1"].lanes[1]
        assert lane is not None and not lane.pending
        bulk = asyncio.ensure_future(t.fetch_pages(0, bulk_pages, "n1", urgent=False))
        while len(lane.pending) < bulk_pages * PAGE // MAX_DATA:  # every bulk request sent
            await asyncio.sleep(0)
        page = await t.fetch_pages(0, 1, "n1", urgent=urgent)
        bulk_running = not bulk.done()
        assert (await bulk).zero_mask == 0
        assert len(page.data) == PAGE
        return bulk_running

    async def main() -> tuple[list[bool], list[bool]]:
        async with TcpTransport(memnode.token, "vmB", bulk_connections=1) as t:
            await t.connect_peer("n1", memnode.endpoint)
            await t.send_pages(0, os.urandom(32 << 20), "n1")
            urgent = [await small_fetch_during_bulk(t, True) for _ in range(5)]
            same_lane = [await small_fetch_during_bulk(t, False) for _ in range(5)]
            return urgent, same_lane

    urgent, same_lane = run(main())
    assert same_lane == [False] * 5  # the case the urgent lane exists for: queued behind bulk
    assert urgent == [True] * 5, urgent


def test_reconnects_after_node_restart(node_factory, tmp_path):
    node = node_factory()
    port = node.endpoint.rsplit(":", 1)[1]

    async def main() -> None:
        async with TcpTransport(node.token, "vmC", retry_for=15) as t:
            await t.connect_peer("n1", node.endpoint)
            await t.send_pages(0, b"r" * 2 * PAGE, "n1")
            node.kill9()
            # restart on the same port; the client reconnects with backoff by itself
            again = node_factory("--listen", f"127.0.0.1:{port}")
            assert again.endpoint == node.endpoint
            assert await t.fetch_page(PAGE, "n1") == b"r" * PAGE

    run(main())


def test_auth_and_connect_failures_are_clear(memnode):
    async def main() -> None:
        t = TcpTransport(b"wrong-token-wrong-token", "vmD")
        with pytest.raises(AuthError):
            await t.connect_peer("n1", memnode.endpoint)
        t2 = TcpTransport(memnode.token, "vmD", retry_for=0.2)
        with pytest.raises(ConnectError, match="memnode"):
            await t2.connect_peer("n2", "127.0.0.1:1")

    run(main())


def test_sync_wrappers(memnode):
    with SyncTransport(TcpTransport(memnode.token, "vmE")) as t:
        t.connect_peer("n1", memnode.endpoint)
        t.send_pages(0, b"s" * 3 * PAGE, "n1")
        assert t.fetch_page(2 * PAGE, "n1") == b"s" * PAGE
        pages = t.fetch_pages(0, 4, "n1")
        assert pages.zero_mask == 0b1000
        rtt = t.measure_latency("n1")
        assert rtt > 0
        assert t.performance_tier("n1") is TransportTier.from_latency(rtt)


def test_tier_boundaries():
    assert TransportTier.from_latency(40e-6) is TransportTier.HighPerformance
    assert TransportTier.from_latency(100e-6) is TransportTier.MediumPerformance
    assert TransportTier.from_latency(250e-6) is TransportTier.Standard
    assert TransportTier.from_latency(0.002) is TransportTier.Basic


def test_a_failed_batch_store_leaves_no_unretrieved_future(node_factory, caplog):
    """Every frame of a batched store refused (beyond the node's space limit): the caller gets
    the node's error once, and no future of the batch is left with an unread exception (asyncio
    would log "Future exception was never retrieved" for each one when it is collected)."""
    import gc

    from transport.errors import RemoteError

    node = node_factory("--max-space-gib", "1")

    async def main() -> None:
        async with TcpTransport(node.token, "vmA") as t:
            await t.connect_peer("n1", node.endpoint)
            with pytest.raises(RemoteError, match="OUT_OF_RANGE"):
                await t.send_pages(1 << 30, bytes(32 * MAX_DATA), "n1")

    with caplog.at_level("ERROR", logger="asyncio"):
        run(main())
        gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
