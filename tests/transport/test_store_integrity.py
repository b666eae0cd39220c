"""A node never serves a damaged page (issue 14, item 6): every written page has a checksum
(CRC32C; crc32 in stores written before) beside the written-page bitmap, checked on every read
by the Python path and by the C fault lane; a flipped byte or a truncated page file is answered
CORRUPT (`CorruptPageError`), never with the bytes or with zeros. Real memory-node processes,
real files."""

from __future__ import annotations

import os
import socket
import struct
import threading
import zlib

import pytest

from transport.errors import CorruptPageError, StoreIdentityError
from transport.node import fastlane
from transport.node.checksum import crc32c_table
from transport.node.store import PageStore
from transport.tcp import BlockingChannel
from transport.wire import DEFAULT_MAX_SPACE_BYTES, HEADER, HEADER_SIZE, IDENTITIES, T, pack_header

PAGE = 4096
LANES = ["fastlane", "--no-fastlane"]


def _args(lane: str) -> tuple[str, ...]:
    return () if lane == "fastlane" else (lane,)


def _flip(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


@pytest.mark.parametrize("lane", LANES)
def test_a_flipped_byte_is_answered_corrupt_not_served(node_factory, tmp_path, lane):
    node = node_factory(*_args(lane))
    with BlockingChannel.connect(node.endpoint, node.token, "vm") as ch:
        ch.store(0, bytes(range(256)) * 16 * 8)  # 8 pages
        _flip(tmp_path / "store" / "vm.pages", 5 * PAGE + 17)
        buf = bytearray(8 * PAGE)
        with pytest.raises(CorruptPageError, match=r"page 5 .*space vm fails its checksum"):
            ch.fetch_into(0, buf)
        one = bytearray(PAGE)  # the good pages around it are still served
        assert ch.fetch_into(4 * PAGE, one) == 0 and one == bytes(range(256)) * 16
        with pytest.raises(CorruptPageError):
            ch.fetch_into(5 * PAGE, one)
    stats = node.stop()
    assert "fails its checksum" in stats + "".join(node.stderr_lines)


@pytest.mark.parametrize("lane", LANES)
def test_a_truncated_page_file_is_answered_corrupt_not_zeros(node_factory, tmp_path, lane):
    node = node_factory(*_args(lane))
    with BlockingChannel.connect(node.endpoint, node.token, "vm") as ch:
        ch.store(0, b"x" * (4 * PAGE))
        os.truncate(tmp_path / "store" / "vm.pages", 2 * PAGE + 100)
        one = bytearray(PAGE)
        assert ch.fetch_into(PAGE, one) == 0 and one == b"x" * PAGE
        for gpa in (2 * PAGE, 3 * PAGE):
            with pytest.raises(CorruptPageError, match=r"truncated"):
                ch.fetch_into(gpa, one)


def test_checksums_survive_a_restart_and_rewrites(node_factory, tmp_path):
    node = node_factory()
    with BlockingChannel.connect(node.endpoint, node.token, "vm") as ch:
        ch.store(0, b"a" * (2 * PAGE))
        ch.store(PAGE, b"b" * PAGE)  # rewritten: its checksum follows
    node.stop()
    node = node_factory()
    with BlockingChannel.connect(node.endpoint, node.token, "vm") as ch:
        buf = bytearray(2 * PAGE)
        assert ch.fetch_into(0, buf) == 0 and buf == b"a" * PAGE + b"b" * PAGE
        _flip(tmp_path / "store" / "vm.pages", 10)
        with pytest.raises(CorruptPageError):
            ch.fetch_into(0, buf)


# --- store identity ---------------------------------------------------------------------------

def _restart_on(node, store, endpoint: str) -> None:
    node.stop()
    node.store = store
    node.args = [*node.args, "--listen", endpoint]
    node.start()


@pytest.mark.parametrize("how", ["empty", "other", "space-deleted"])
def test_a_node_restarted_on_another_store_is_refused_loudly(node_factory, tmp_path, how):
    node = node_factory()
    first = node.endpoint
    with BlockingChannel.connect(first, node.token, "vm") as ch:
        ch.store(0, b"w" * PAGE)
    other = tmp_path / "other"
    if how == "other":  # a store that holds a space of the same name, other bytes
        elsewhere = node_factory(store=other)
        with BlockingChannel.connect(elsewhere.endpoint, node.token, "vm") as ch:
            ch.store(0, b"o" * PAGE)
        elsewhere.stop()
    if how == "space-deleted":
        node.stop()
        for suffix in ("pages", "written", "sums", "gen"):
            (tmp_path / "store" / f"vm.{suffix}").unlink()
        other = tmp_path / "store"
    _restart_on(node, other, first)
    with pytest.raises(StoreIdentityError) as err:
        BlockingChannel.connect(first, node.token, "vm", retry_for=5)
    text = str(err.value)
    assert first in text and "space vm" in text and "restarted on an empty or another store" \
        in text
    seen = IDENTITIES.get(first, "vm")
    assert seen is not None and seen[0] in text  # names the store it expected
    assert not isinstance(err.value, CorruptPageError)


def test_the_same_store_after_a_restart_is_accepted(node_factory, tmp_path):
    node = node_factory()
    first = node.endpoint
    with BlockingChannel.connect(first, node.token, "vm") as ch:
        ch.store(0, b"s" * PAGE)
    _restart_on(node, tmp_path / "store", first)
    with BlockingChannel.connect(first, node.token, "vm", retry_for=5) as ch:
        buf = bytearray(PAGE)
        assert ch.fetch_into(0, buf) == 0 and buf == b"s" * PAGE
    assert (tmp_path / "store" / "store.id").read_text().strip() == IDENTITIES.get(first,
                                                                                   "vm")[0]


def test_a_store_from_before_checksums_gets_them_on_start(node_factory, tmp_path):
    node = node_factory()
    with BlockingChannel.connect(node.endpoint, node.token, "vm") as ch:
        ch.store(0, b"p" * PAGE)
        ch.store(1 << 30, b"q" * (2 * PAGE))  # far apart: two data extents
    node.stop()
    (tmp_path / "store" / "vm.sums").unlink()
    node = node_factory()
    with BlockingChannel.connect(node.endpoint, node.token, "vm") as ch:
        buf = bytearray(2 * PAGE)
        assert ch.fetch_into(1 << 30, buf) == 0 and buf == b"q" * (2 * PAGE)
        assert ch.fetch_into(0, buf) == 0b10 and buf[:PAGE] == b"p" * PAGE
        _flip(tmp_path / "store" / "vm.pages", (1 << 30) + PAGE)
        with pytest.raises(CorruptPageError):
            ch.fetch_into(1 << 30, buf)


# --- checksum kinds ---------------------------------------------------------------------------

def _sums_of(store, space: str, pages: list[int]) -> list[int]:
    with open(store / f"{space}.sums", "rb") as f:
        out = []
        for p in pages:
            f.seek(p * 4)
            out.append(struct.unpack("=I", f.read(4))[0])
    return out


def _write_crc32_store(store, pages: dict[int, bytes]) -> None:
    """A store as nodes wrote it before CRC32C, byte for byte: store.id, and per space the
    sparse page file, the written-page bitmap and the crc32 sums (both sized for the default
    space limit, sparse), the generation; no store.checksum."""
    store.mkdir(mode=0o700)
    (store / "store.id").write_text(os.urandom(16).hex() + "\n")
    capacity = DEFAULT_MAX_SPACE_BYTES // PAGE
    with open(store / "vm.pages", "wb") as f:
        for p, data in pages.items():
            f.seek(p * PAGE)
            f.write(data)
    bits: dict[int, int] = {}
    for p in pages:
        bits[p >> 3] = bits.get(p >> 3, 0) | 1 << (p & 7)
    with open(store / "vm.written", "wb") as f:
        f.truncate((capacity + 7) >> 3)
        for i, byte in bits.items():
            f.seek(i)
            f.write(bytes([byte]))
    with open(store / "vm.sums", "wb") as f:
        f.truncate(capacity * 4)
        for p, data in pages.items():
            f.seek(p * 4)
            f.write(struct.pack("=I", zlib.crc32(data)))
    (store / "vm.gen").write_text(os.urandom(8).hex() + "\n")
    for name in ("store.id", "vm.pages", "vm.written", "vm.sums", "vm.gen"):
        os.chmod(store / name, 0o600)


@pytest.mark.parametrize("lane", LANES)
def test_a_store_written_with_crc32_reads_right_and_stays_crc32(node_factory, tmp_path, lane):
    store = tmp_path / "store"
    pages = {p: os.urandom(PAGE) for p in (0, 2, 3, 8, 9, 10, 11, 1 << 18)}  # 8 apart: bytes
    _write_crc32_store(store, pages)
    node = node_factory(*_args(lane))
    with BlockingChannel.connect(node.endpoint, node.token, "vm") as ch:
        buf = bytearray(16 * PAGE)
        assert ch.fetch_into(0, buf) == 0b1111_0000_1111_0010  # 1, 4..7, 12..15: zero
        for p in (0, 2, 3, 8, 9, 10, 11):  # a zero page's bytes are the caller's to zero
            assert buf[p * PAGE:(p + 1) * PAGE] == pages[p], p
        one = bytearray(PAGE)
        assert ch.fetch_into((1 << 18) * PAGE, one) == 0 and one == pages[1 << 18]
        ch.store(5 * PAGE, b"n" * PAGE)  # a new page of the old store: crc32 as the others
        assert ch.fetch_into(5 * PAGE, one) == 0 and one == b"n" * PAGE
        assert _sums_of(store, "vm", [5]) == [zlib.crc32(b"n" * PAGE)]
        _flip(store / "vm.pages", 9 * PAGE + 4000)
        with pytest.raises(CorruptPageError, match=r"page 9 .*space vm fails its checksum"):
            ch.fetch_into(8 * PAGE, buf[:4 * PAGE])
        assert ch.fetch_into(8 * PAGE, one) == 0 and one == pages[8]
    assert not (store / "store.checksum").exists()


@pytest.mark.parametrize("lane", LANES)
def test_a_new_store_is_crc32c(node_factory, tmp_path, lane):
    store = tmp_path / "store"
    node = node_factory(*_args(lane))
    data = os.urandom(3 * PAGE)
    with BlockingChannel.connect(node.endpoint, node.token, "vm") as ch:
        ch.store(PAGE, data)
        buf = bytearray(4 * PAGE)
        assert ch.fetch_into(0, buf) == 0b0001 and buf[PAGE:] == data
    assert (store / "store.checksum").read_text() == "crc32c\n"
    assert _sums_of(store, "vm", [1, 2, 3]) == [
        crc32c_table(data[i:i + PAGE]) for i in range(0, len(data), PAGE)]


def test_a_damaged_checksum_kind_stops_the_node_naming_the_file(node_factory, tmp_path):
    node_factory().stop()
    (tmp_path / "store" / "store.checksum").write_text("md5\n")
    with pytest.raises(AssertionError, match=r"store\.checksum says 'md5\\n', not a checksum "
                       r"kind this node knows \(crc32, crc32c\)"):
        node_factory()


def _c_lane_fetch(space, gpa: int, npages: int) -> tuple[int, bytes | None]:
    """One FETCH through the C fault lane alone (in this process, over a socketpair): (its
    return code, the DATA reply's header and payload, or None if it handed the frame back)."""
    ours, theirs = socket.socketpair()
    lane = fastlane.FastLane(DEFAULT_MAX_SPACE_BYTES)
    ended = threading.Event()
    rc: list[int] = []

    def done(r: int) -> None:  # the lane returned: our end reads EOF unless it answered
        rc.append(r)
        theirs.shutdown(socket.SHUT_RDWR)
        ended.set()

    with ours, theirs:
        ours.settimeout(10)
        lane.start(theirs.fileno(), ["vm"], [space], done)
        ours.sendall(pack_header(T.FETCH, 7, space=1, gpa=gpa, arg=npages * PAGE))
        reply = None
        if ours.recv(HEADER_SIZE, socket.MSG_PEEK):  # a DATA reply (b"": the lane gave up)
            hdr = HEADER.unpack(ours.recv(HEADER_SIZE, socket.MSG_WAITALL))
            payload = ours.recv(hdr[7], socket.MSG_WAITALL) if hdr[7] else b""
            reply = bytes([hdr[2]]) + payload
            lane.stop()
        assert ended.wait(10), "the C lane did not return"
        lane.finish()
        return rc[0], reply


@pytest.mark.parametrize("kind", ["crc32", "crc32c"])
def test_the_c_lane_verifies_with_the_stores_kind(tmp_path, kind):
    """The C lane serves pages whose sums match in the store's kind, and hands back (to the
    Python path, which answers CORRUPT) a page that fails them: in both kinds."""
    if fastlane.lib is None:
        pytest.fail(f"the C fault lane did not load ({fastlane.MISSING}): run `python3 "
                    "setup.py build_ext --inplace`")
    store = tmp_path / "store"
    pages = {p: os.urandom(PAGE) for p in range(4)}
    if kind == "crc32":
        _write_crc32_store(store, pages)
    ps = PageStore(store)
    try:
        assert ps.checksum == kind
        space = ps.open("vm")
        if kind == "crc32c":
            space.write(0, b"".join(pages.values()))
        rc, reply = _c_lane_fetch(space, 0, 4)
        assert reply is not None, f"the C lane refused good {kind} pages (rc {rc})"
        assert reply[0] == T.DATA and reply[1:] == b"".join(pages.values())
        _flip(store / "vm.pages", 2 * PAGE + 9)
        rc, reply = _c_lane_fetch(space, 0, 4)
        assert reply is None and rc == fastlane.HANDBACK
    finally:
        ps.close()


@pytest.mark.parametrize("lane", LANES)
def test_a_store_cut_short_by_a_kill_is_checksummed_again_not_corrupt(node_factory, tmp_path,
                                                                     lane):
    """A node killed between a store's pwrite and its checksums: the next start finds the
    store's range in ``<space>.intent`` and serves those pages (new bytes, never acknowledged;
    the sender stores them again) instead of failing them as corrupt."""
    node = node_factory(*_args(lane))
    old, new = bytes(range(256)) * 16, bytes(reversed(range(256))) * 16
    with BlockingChannel.connect(node.endpoint, node.token, "vm") as ch:
        ch.store(0, old * 8)
    node.stop()
    store = tmp_path / "store"
    assert struct.unpack("=QQ", (store / "vm.intent").read_bytes()[:16])[1] == 0  # none open
    # what a kill between the two writes leaves: the range recorded, pages 5-6 rewritten,
    # their checksums still the old bytes'
    (store / "vm.intent").write_bytes(struct.pack("=QQ", 5, 2))
    with open(store / "vm.pages", "r+b") as f:
        f.seek(5 * PAGE)
        f.write(new * 2)
    node2 = node_factory(*_args(lane))
    assert any("pages 5-6 was cut short" in line for line in node2.stderr_lines)
    with BlockingChannel.connect(node2.endpoint, node2.token, "vm") as ch:
        buf = bytearray(8 * PAGE)
        assert ch.fetch_into(0, buf) == 0
        assert buf == old * 5 + new * 2 + old
    node2.stop()
    assert struct.unpack("=QQ", (store / "vm.intent").read_bytes()[:16])[1] == 0
    # without the record the same bytes are damage: answered corrupt
    with open(store / "vm.pages", "r+b") as f:
        f.seek(6 * PAGE)
        f.write(old)
    node3 = node_factory(*_args(lane))
    with (BlockingChannel.connect(node3.endpoint, node3.token, "vm") as ch,
          pytest.raises(CorruptPageError, match=r"page 6 .*fails its checksum")):
        ch.fetch_into(6 * PAGE, bytearray(PAGE))
    node3.stop()
