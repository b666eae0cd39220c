"""Fencing on a real memory node: OPEN under an owner's epoch raises the space's fence; OPENs,
STOREs and FETCHes under an older epoch are refused with STALE_EPOCH (fetches served by the C
fault lane too), also after a restart; other spaces, and handles without an epoch, are not
fenced."""

from __future__ import annotations

import os

import pytest

from transport.errors import RemoteError, StaleEpochError
from transport.tcp import BlockingChannel
from transport.wire import ErrorCode

PAGE = 4096


def channel(node, epoch, space="vm1"):
    return BlockingChannel.connect(node.endpoint, node.token, space, epoch=epoch,
                                   retry_for=0.0)


def test_newer_owner_fences_the_older_one(node_factory):
    node = node_factory()
    old, page = channel(node, 1), os.urandom(PAGE)
    old.store(0, page)  # the first owner writes
    buf = bytearray(PAGE)
    assert old.fetch_into(0, buf) == 0 and buf == page  # (its fault lane is served in C now)
    other = channel(node, 1, "vm2")  # the same pager's handle on another space
    new = channel(node, 2)  # a second pager takes the guest over
    # the older owner neither writes nor reads the space any more, in Python or in C
    for attempt in (lambda: old.fetch_into(0, buf), lambda: old.store(0, os.urandom(PAGE))):
        with pytest.raises(StaleEpochError) as refused:
            attempt()
        assert refused.value.code == ErrorCode.STALE_EPOCH and "stale" in str(refused.value)
    assert new.fetch_into(0, buf) == 0 and buf == page  # the refused store wrote nothing
    new.store(0, b"n" * PAGE)
    with pytest.raises(StaleEpochError):
        old.fetch_into(0, buf)
    with pytest.raises(RemoteError) as refused:
        channel(node, 1)  # nor can it open the space again
    assert refused.value.code == ErrorCode.STALE_EPOCH
    # other spaces are not fenced, nor handles opened without an epoch
    other.store(0, page)
    assert other.fetch_into(0, buf) == 0 and buf == page
    plain = BlockingChannel.connect(node.endpoint, node.token, "vm1", retry_for=0.0)
    assert plain.fetch_into(0, buf) == 0 and buf == b"n" * PAGE
    for c in (old, new, other, plain):
        c.close()
    log = node.stop()
    assert "space vm1 opened under epoch 1 is refused from now on: a newer owner holds it " \
           "(epoch 2)" in log, log[-2000:]


def test_stale_open_refused_and_fence_survives_restart(node_factory, tmp_path):
    node = node_factory()
    channel(node, 5).close()
    with pytest.raises(RemoteError) as refused:
        channel(node, 4)
    assert refused.value.code == ErrorCode.STALE_EPOCH
    node.stop()
    node.start()
    with pytest.raises(RemoteError) as refused:
        channel(node, 3)
    assert refused.value.code == ErrorCode.STALE_EPOCH
    same = channel(node, 5)  # the owner itself reconnects
    same.store(0, bytes(PAGE))
    same.close()
    # a handle opened without an epoch is not fenced (tools, single-node pagers)
    plain = BlockingChannel.connect(node.endpoint, node.token, "vm1", retry_for=0.0)
    plain.store(PAGE, bytes(PAGE))
    plain.close()


def test_bad_epoch_is_a_clear_error(node_factory):
    node = node_factory()
    with pytest.raises(RemoteError) as bad:
        channel(node, -1)
    assert "epoch" in str(bad.value)
