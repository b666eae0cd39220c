"""`MemnodeSource`: pages named by (space, gpa), placed on nodes by a placement function,
carried by the lanes of the transport selected once per node; real memory nodes."""

from __future__ import annotations

import os
import shutil

import pytest
from enginekit import Memnode

from pager.errors import ConfigError
from pager.source import MemnodeSource
from transport.tcp import TcpTransport, run
from transport.token import load_token

PAGE = 4096
EXTENT = 16 * PAGE


class TransportWithCorruptLanes(TcpTransport):
    """A lane kind that must prove itself and cannot: its lanes fail the proof (raising
    LaneProofError, as `prove_lane` does for a lane that reads back other bytes)."""

    name = "corrupt"

    def open_lane(self, node_id, space):
        from transport.lane import LaneProofError
        raise LaneProofError("corrupt lane proof: page read back different (under test)")


@pytest.fixture
def two_nodes(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = Memnode(tmp_path / "a")
    shutil.copy(a.token_file, tmp_path / "b" / "token")  # one cluster token
    os.chmod(tmp_path / "b" / "token", 0o600)
    b = Memnode(tmp_path / "b")
    yield a, b
    b.proc.stop()
    a.proc.stop()


def by_extent(space: str, gpa: int) -> str:
    return ("a", "b")[gpa // EXTENT % 2]


def test_placement_spreads_pages_over_nodes(two_nodes):
    a, b = two_nodes
    token = load_token(a.token_file)
    src = MemnodeSource({"a": a.endpoint, "b": b.endpoint}, token, "vm1", prefer="tcp",
                        placement=by_extent)
    data = os.urandom(4 * EXTENT)
    with src.open_lane() as lane:
        lane.store_from(None, 0, data)
        buf = bytearray(4 * EXTENT + PAGE)  # one page more: never written anywhere
        mask = lane.fetch_into(None, 0, memoryview(buf))
        assert mask == 1 << (4 * EXTENT // PAGE)
        assert buf[:4 * EXTENT] == data
        assert lane.c_endpoint("vm1") is None  # pages of one region on two nodes: Python
    assert src.lane_kind("a") == src.lane_kind("b") == "tcp"
    # each node holds exactly its extents
    for node_id, first in (("a", 0), ("b", 1)):
        with src.open_node_lane(node_id) as node_lane:
            got = bytearray(4 * EXTENT)
            mask = node_lane.fetch_into(0, got)
            for e in range(4):
                pages = (mask >> (e * EXTENT // PAGE)) & ((1 << EXTENT // PAGE) - 1)
                if e % 2 == first:
                    assert pages == 0 and got[e * EXTENT:(e + 1) * EXTENT] == \
                        data[e * EXTENT:(e + 1) * EXTENT]
                else:
                    assert pages == (1 << EXTENT // PAGE) - 1


def test_one_node_lanes_hand_c_their_socket_and_name_spaces(memnode):
    src = memnode.source("vm1")
    with src.open_lane() as lane:
        lane.store_from("other", 0, b"o" * PAGE)  # (space, gpa): another address space
        fd, wire, handle = lane.c_endpoint(None)
        assert fd >= 0 and wire == "ssip" and handle > 0
        buf = bytearray(PAGE)
        assert lane.fetch_into(None, 0, memoryview(buf)) == 1  # vm1 page 0: never written
        assert lane.fetch_into("other", 0, memoryview(buf)) == 0 and buf == b"o" * PAGE
    assert src.lane_kind("memnode") == src.transports["memnode"].name


def test_a_failed_lane_kind_falls_back_to_tcp_for_good(memnode, monkeypatch, capsys):
    src = MemnodeSource(memnode.endpoint, load_token(memnode.token_file), "vm1")

    async def select() -> TcpTransport:
        t = TransportWithCorruptLanes(src.token, "vm1")
        await t.connect_peer("memnode", memnode.endpoint)
        await t.close()
        return t

    failed = src.transports["memnode"] = run(select())  # as if selected at start
    with src.open_lane() as lane:
        lane.store_from(None, 0, b"f" * PAGE)
    assert src.lane_kind("memnode") == "tcp"
    assert src.transports["memnode"] is not failed and src.transports["memnode"].name == "tcp"
    with src.open_lane() as lane:
        buf = bytearray(PAGE)
        assert lane.fetch_into(None, 0, memoryview(buf)) == 0 and buf == b"f" * PAGE
    lines = [line for line in capsys.readouterr().err.splitlines() if "not CORRUPT" in line]
    assert len(lines) == 1 and "LaneProofError" in lines[0], lines


def test_connect_selects_through_the_manager(memnode, capsys):
    from transport.manager import TransportManager

    src = MemnodeSource(memnode.endpoint, load_token(memnode.token_file), "vm1", prefer="tcp")

    async def connect():
        manager = TransportManager("pager", src.token, space="vm1", prefer="tcp")
        infos = await src.connect(manager)
        await manager.close()
        return infos

    infos = run(connect())
    assert infos["memnode"].transport == "tcp" == src.lane_kind("memnode")
    assert capsys.readouterr().err.count("transport: tcp to memnode") == 1
    with src.open_lane() as lane:  # lanes outlive the manager's own connections
        assert lane.fetch_into(None, 0, memoryview(bytearray(PAGE))) == 1


def test_bad_placement_is_a_clear_error(two_nodes):
    a, b = two_nodes
    nodes = {"a": a.endpoint, "b": b.endpoint}
    with pytest.raises(ConfigError, match="2 memory nodes need a placement function"):
        MemnodeSource(nodes, None, "vm1")
    src = MemnodeSource(nodes, load_token(a.token_file), "vm1", placement=lambda s, g: "c")
    with pytest.raises(ConfigError, match="placement named memory node 'c'"), \
            src.open_lane() as lane:
        lane.fetch_into(None, 0, memoryview(bytearray(PAGE)))
