"""Compression negotiated per connection, against a real memory node: pages stored or fetched
compressed (lz4, zstd) are the same bytes as raw ones, pages that do not compress travel raw
(counted on the socket by the kernel: TCP_INFO), and a fault lane never compresses."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from transport.lane import TcpLane
from transport.tcp import BlockingChannel
from transport.wire import FAULT_LANE, MAX_DATA, ClientSession, pack_store
from transport.wire.codec import CODECS

TCPI_BYTES_ACKED, TCPI_BYTES_RECEIVED = 120, 128  # u64 fields of struct tcp_info


def wire_bytes(ch: BlockingChannel) -> tuple[int, int]:
    """(bytes sent and acked, bytes received) on the channel's socket, as the kernel counts."""
    assert ch.sock is not None
    info = ch.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return struct.unpack_from("<QQ", info, TCPI_BYTES_ACKED)


def guest_like(n: int) -> bytes:
    """Pages that compress as guest memory does: structures with counters and padding."""
    rec = b"".join(struct.pack("<QQ", i, i * 2654435761 & 0xFFFFFFFF) + b"\0" * 16
                   for i in range(n // 32))
    return rec[:n]


def channel(node, **kw) -> BlockingChannel:
    return BlockingChannel.connect(node.endpoint, node.token, "vm1", **kw)


@pytest.mark.parametrize("codec", CODECS)
def test_compressed_and_raw_give_the_same_bytes(memnode, codec):
    data = guest_like(1 << 20)
    with channel(memnode, compress=(codec,)) as packed, channel(memnode) as raw:
        assert packed.codec == codec and raw.codec is None
        sent0, _ = wire_bytes(packed)
        packed.store(0, data)
        sent = wire_bytes(packed)[0] - sent0
        assert sent < len(data) // 2, f"{sent} bytes on the wire for {len(data)} stored"
        back = bytearray(len(data))
        assert raw.fetch_into(0, back) == 0 and back == data
        raw.store(2 << 20, data[::-1])
        _, got0 = wire_bytes(packed)
        back = bytearray(len(data))
        assert packed.fetch_into(2 << 20, back) == 0 and back == data[::-1]
        assert wire_bytes(packed)[1] - got0 < len(data) // 2
        # never-written pages among compressed ones: zero mask as for a raw fetch
        hole = bytearray(MAX_DATA)
        mask = packed.fetch_into((1 << 20) - MAX_DATA // 2, hole)
        assert mask == (1 << 32) - (1 << 16)
        assert hole[:MAX_DATA // 2] == data[-MAX_DATA // 2:]


@pytest.mark.parametrize("codec", CODECS)
def test_incompressible_pages_travel_raw(memnode, codec):
    noise = os.urandom(MAX_DATA)
    assert pack_store(codec, memoryview(noise)) == (0, 0, memoryview(noise))
    with channel(memnode, compress=(codec,)) as ch:
        sent0, got0 = wire_bytes(ch)
        ch.store(0, noise)
        assert wire_bytes(ch)[0] - sent0 >= len(noise)
        back = bytearray(len(noise))
        assert ch.fetch_into(0, back) == 0 and back == noise
        assert wire_bytes(ch)[1] - got0 >= len(noise)


def test_fault_lanes_never_compress(memnode):
    with pytest.raises(ValueError, match="fault lane never compresses"):
        ClientSession(None, "vm1", nonce=bytes(32), lane=FAULT_LANE, compress=("lz4",))
    fault = TcpLane(channel(memnode))
    bulk = TcpLane(channel(memnode, compress=CODECS))
    try:
        assert fault.channel.codec is None and fault.c_endpoint() is not None
        assert bulk.channel.codec == CODECS[0] and bulk.c_endpoint() is None
    finally:
        fault.close()
        bulk.close()


def test_an_unknown_codec_is_a_clear_error(memnode):
    with pytest.raises(ValueError, match="unknown compression 'gzip': use lz4 or zstd"):
        BlockingChannel(memnode.endpoint, memnode.token, "vm1", compress=("gzip",))


def test_async_client_bulk_lanes_compress(memnode):
    """The asyncio TCP client: stores and non-urgent fetches on its bulk connections go
    compressed, its urgent connection stays raw; the bytes are the same."""
    import asyncio

    from transport.tcp import TcpTransport

    async def run() -> None:
        t = TcpTransport(memnode.token, "vm1")
        t.compress = CODECS[:1]
        await t.connect_peer("n", memnode.endpoint)
        try:
            data = guest_like(1 << 20)
            await t.send_pages(0, data, "n")
            bulk = await t.fetch_pages(0, 256, "n", urgent=False)
            urgent = await t.fetch_pages(0, 32, "n", urgent=True)
            assert bytes(bulk.data) == data and bytes(urgent.data) == data[:MAX_DATA]
            peer = t.peers["n"]
            assert peer.lanes[0].session.codec is None
            assert any(c is not None and c.session.codec == CODECS[0] for c in peer.lanes[1:])
        finally:
            await t.close()

    asyncio.run(run())
