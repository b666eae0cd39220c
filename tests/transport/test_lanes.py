"""Blocking lanes (`transport.lane`): the TCP lane on a real memory node, the lane proof, and
every fallback that can run on this machine (no RDMA hardware here).

A lane kind whose proof fails is made with real subclasses of the TCP transport and lane,
named for what they do wrong (`CorruptingLane` flips a byte of every page it reads,
`TransportWithCorruptLanes` hands out such lanes, `TransportWithBrokenLanes` raises a
ValueError as a malformed WELCOME does); no mock library.
"""

from __future__ import annotations

import os

import pytest

from transport.errors import ConnectError
from transport.lane import (
    PROOF_SPACE,
    LaneProofError,
    TcpLane,
    open_lane_or_tcp,
    prove_lane,
)
from transport.tcp import TcpTransport, run

PAGE = 4096


class CorruptingLane(TcpLane):
    """A TCP lane that flips the first byte of every page it fetches."""

    kind = "corrupt"

    def fetch_into(self, gpa, buf):
        mask = super().fetch_into(gpa, buf)
        view = memoryview(buf).cast("B")
        for off in range(0, len(view), PAGE):
            view[off] ^= 0xFF
        return mask


class TransportWithCorruptLanes(TcpTransport):
    """A transport of a kind that must prove its lanes, whose lanes corrupt what they read."""

    name = "corrupt"

    def open_lane(self, node_id, space):
        endpoint = self.endpoints[node_id]
        with CorruptingLane.connect(endpoint, self.token, PROOF_SPACE) as probe:
            prove_lane(probe)
        return CorruptingLane.connect(endpoint, self.token, space)


class TransportWithBrokenLanes(TcpTransport):
    """A transport whose lanes fail to open with a ValueError (as a malformed WELCOME)."""

    name = "broken"

    def open_lane(self, node_id, space):
        raise ValueError("WELCOME window field 'size' is not a number (under test)")


def connected(cls: type[TcpTransport], memnode) -> TcpTransport:
    """A transport of ``cls`` connected to node "n1", its own connections closed (lanes
    need only what connect_peer recorded)."""
    async def connect() -> TcpTransport:
        t = cls(memnode.token, "lanes")
        await t.connect_peer("n1", memnode.endpoint)
        await t.close()
        return t

    return run(connect())


def test_tcp_lane_stores_fetches_and_hands_c_its_socket(memnode):
    data = os.urandom(4 * PAGE)
    with TcpLane.connect(memnode.endpoint, memnode.token, "lanes") as lane:
        lane.store_from(PAGE, data)
        buf = bytearray(6 * PAGE)
        mask = lane.fetch_into(0, buf)
        assert mask == 0b100001  # pages 0 and 5 never written
        assert buf[PAGE:5 * PAGE] == data
        fd, wire, space = lane.c_endpoint()
        assert fd == lane.channel.fileno() and wire == "ssip" and space > 0
        assert lane.ping() > 0
        lane.reset()
        assert lane.c_endpoint() is None  # dropped; the next call reconnects
        assert lane.fetch_into(PAGE, bytearray(PAGE)) == 0


def test_tcp_transport_opens_tcp_lanes(memnode):
    t = connected(TcpTransport, memnode)
    with t.open_lane("n1", "lanes") as lane:
        assert lane.kind == "tcp"
        prove_lane(lane)  # a sound lane passes its proof
    with pytest.raises(Exception, match="unknown memory node 'n2'"):
        t.open_lane("n2", "lanes")


def test_prove_lane_catches_a_lane_that_reads_back_other_bytes(memnode):
    lane = CorruptingLane.connect(memnode.endpoint, memnode.token, PROOF_SPACE)
    try:
        with pytest.raises(LaneProofError, match="reads back different from byte 0"):
            prove_lane(lane)
    finally:
        lane.close()


def test_create_transport_falls_back_when_the_lane_proof_fails(memnode, capsys):
    from transport.factory import create_transport

    async def main():
        t = await create_transport(memnode.endpoint, memnode.token, space="lanes",
                                   node_id="n1",
                                   upgrade=lambda: TransportWithCorruptLanes(memnode.token))
        name = t.name
        await t.send_page(0, b"p" * PAGE, "n1")
        page = await t.fetch_page(0, "n1")
        await t.close()
        return name, page

    name, page = run(main())
    assert name == "tcp" and page == b"p" * PAGE
    lines = [line for line in capsys.readouterr().err.splitlines() if "not RDMA" in line]
    assert len(lines) == 1 and "LaneProofError" in lines[0], lines


def test_create_transport_falls_back_on_any_exception(memnode, capsys):
    from transport.factory import create_transport

    async def main(prefer: str):
        t = await create_transport(memnode.endpoint, memnode.token, space="lanes",
                                   node_id="n1", prefer=prefer,
                                   upgrade=lambda: TransportWithBrokenLanes(memnode.token))
        await t.close()
        return t.name

    assert run(main("auto")) == "tcp"
    lines = [line for line in capsys.readouterr().err.splitlines() if "not RDMA" in line]
    assert len(lines) == 1 and "ValueError" in lines[0] and "WELCOME" in lines[0], lines
    with pytest.raises(ConnectError, match="ValueError"):  # prefer=rdma: no silent TCP
        run(main("rdma"))


def test_a_lane_failing_after_selection_falls_back_to_tcp(memnode, capsys):
    t = connected(TransportWithCorruptLanes, memnode)
    for _ in range(2):
        with open_lane_or_tcp(t, "n1", "lanes") as lane:
            assert lane.kind == "tcp"
            lane.store_from(0, b"q" * PAGE)
            buf = bytearray(PAGE)
            assert lane.fetch_into(0, buf) == 0 and buf == b"q" * PAGE
    lines = [line for line in capsys.readouterr().err.splitlines() if "not CORRUPT" in line]
    assert len(lines) == 1 and "LaneProofError" in lines[0], lines


def test_tcp_lane_errors_are_not_hidden(memnode):
    port = memnode.endpoint.rsplit(":", 1)[1]
    memnode.stop()
    with pytest.raises(ConnectError, match=port):
        TcpLane.connect(memnode.endpoint, memnode.token, "lanes")


class TransportWhosePingFails(TcpTransport):
    """A transport that connects and opens lanes but fails its latency probe."""

    name = "flaky"

    async def ping(self, node_id, reply_bytes=0, *, urgent=True):
        raise ValueError("no PONG (under test)")


def test_manager_falls_back_when_the_probe_fails_after_connect(memnode, capsys):
    from transport.manager import TransportManager

    async def main():
        mgr = TransportManager("pager1", memnode.token, space="lanes",
                               upgrade=lambda: TransportWhosePingFails(memnode.token, "lanes"))
        info = await mgr.connect_peer("n1", memnode.endpoint)
        name = mgr.transport("n1").name
        await mgr.close()
        return info, name

    info, name = run(main())
    assert info.transport == name == "tcp"
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "not FLAKY" in line]
    assert len(lines) == 1 and "ValueError: no PONG" in lines[0], err
    assert err.count("transport: tcp to n1 (") == 1, err
