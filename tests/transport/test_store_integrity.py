"""A node never serves a damaged page (issue 14, item 6): every written page has a crc32
beside the written-page bitmap, checked on every read by the Python path and by the C fault
lane; a flipped byte or a truncated page file is answered CORRUPT (`CorruptPageError`), never
with the bytes or with zeros. Real memory-node processes, real files."""

from __future__ import annotations

import os

import pytest

from transport.errors import CorruptPageError, StoreIdentityError
from transport.tcp import BlockingChannel
from transport.wire import IDENTITIES

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
