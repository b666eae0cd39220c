"""The page store trusts nothing it finds and marks nothing it did not write completely
(issue 14, item 8): stray entries are skipped by name; a store that failed half-way leaves its
pages unwritten, also after a restart. Real memory-node processes, real files."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from nodekit import LISTENING

from transport.errors import TransportError
from transport.tcp import BlockingChannel

PAGE = 4096
MIB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]


def _node(store: Path, token: Path, log: Path, *extra: str, fsize: int | None = None
          ) -> tuple[subprocess.Popen, str]:
    def limit() -> None:  # Python ignores SIGXFSZ, so a write past the limit fails EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    f = open(log, "ab")  # noqa: SIM115 - the child keeps it
    p = subprocess.Popen([sys.executable, "-m", "pager.cli", "memnode", "--listen",
                          "127.0.0.1:0", "--store", str(store), "--token-file", str(token),
                          *extra], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=f,
                         preexec_fn=limit if fsize else None)
    f.close()
    import time
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = LISTENING.search(log.read_text())
        if m:
            return p, m.group(1)
        if p.poll() is not None:
            break
        time.sleep(0.05)
    p.kill()
    p.wait()
    raise AssertionError(f"memnode did not start: {log.read_text()[-2000:]}")


def _stop(p: subprocess.Popen) -> None:
    p.terminate()
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def test_stray_entries_are_skipped_by_name(tmp_path):
    store, token = tmp_path / "store", tmp_path / "token"
    p, ep = _node(store, token, tmp_path / "n1.log")
    with BlockingChannel.connect(ep, token.read_bytes().strip(), "good") as ch:
        ch.store(0, b"g" * PAGE)
    _stop(p)
    (store / "link.pages").symlink_to("/etc/passwd")
    (store / "dir.pages").mkdir()
    os.mkfifo(store / "fifo.pages")
    with open(store / "huge.pages", "wb") as f:
        for size in (1 << 62, 1 << 50, 1 << 43, 1 << 40, 1 << 32):  # as large as the fs allows
            try:
                f.truncate(size)
                break
            except OSError:
                continue
    assert (store / "huge.pages").stat().st_size > 1 << 30
    log = tmp_path / "n2.log"
    p, ep = _node(store, token, log, "--max-space-gib", "1")
    try:
        text = log.read_text()
        for name, what in (("link", "a symlink"), ("dir", "a directory"), ("fifo", "a FIFO"),
                           ("huge", "bytes, larger than this node's space limit")):
            line = next((x for x in text.splitlines() if f"skipping {store / name}.pages" in x),
                        "")
            assert what in line, text
        assert "Traceback" not in text
        with BlockingChannel.connect(ep, token.read_bytes().strip(), "good") as ch:
            buf = bytearray(PAGE)
            assert ch.fetch_into(0, buf) == 0 and buf == b"g" * PAGE
    finally:
        _stop(p)


@pytest.mark.parametrize("sync", [False, True])
def test_a_store_that_failed_half_way_stays_unwritten_after_restart(tmp_path, sync):
    store, token = tmp_path / "store", tmp_path / "token"
    extra = ("--max-space-gib", "1") + (("--fsync",) if sync else ())
    # files may not grow past 1 MiB + 32 KiB: a 64 KiB store at 1 MiB writes half, then fails
    p, ep = _node(store, token, tmp_path / "n1.log", *extra, fsize=MIB + 32 * 1024)
    key = token.read_bytes().strip()
    try:
        with BlockingChannel.connect(ep, key, "vm") as ch:
            ch.store(0, b"a" * (64 * 1024))
            with pytest.raises(TransportError):
                ch.store(MIB, b"b" * (64 * 1024))
    finally:
        _stop(p)
    assert (store / "vm.pages").stat().st_size > MIB  # half of it did reach the file
    p, ep = _node(store, token, tmp_path / "n2.log", *extra)
    try:
        with BlockingChannel.connect(ep, key, "vm", retry_for=5) as ch:
            buf = bytearray(16 * PAGE)
            assert ch.fetch_into(MIB, buf) == 0xFFFF  # all of the failed store: never written
            assert ch.fetch_into(0, buf) == 0 and buf == b"a" * (16 * PAGE)
    finally:
        _stop(p)


def test_the_number_of_spaces_is_capped_with_a_clear_error(tmp_path):
    store, token = tmp_path / "store", tmp_path / "token"
    p, ep = _node(store, token, tmp_path / "n.log", "--max-spaces", "3")
    key = token.read_bytes().strip()
    try:
        for i in range(3):
            with BlockingChannel.connect(ep, key, f"s{i}") as ch:
                ch.store(0, bytes([i + 1]) * PAGE)
        with (pytest.raises(TransportError, match=r"already holds 3 spaces.*--max-spaces"),
              BlockingChannel.connect(ep, key, "s3", retry_for=0) as ch):
            ch.fetch_into(0, bytearray(PAGE))
        assert not (store / "s3.pages").exists()
        with BlockingChannel.connect(ep, key, "s1") as ch:  # the others are still served
            buf = bytearray(PAGE)
            assert ch.fetch_into(0, buf) == 0 and buf == b"\x02" * PAGE
    finally:
        _stop(p)


def test_a_truncated_page_file_is_refused_not_served_as_zeros(tmp_path):
    store, token = tmp_path / "store", tmp_path / "token"
    p, ep = _node(store, token, tmp_path / "n1.log")
    key = token.read_bytes().strip()
    try:
        with BlockingChannel.connect(ep, key, "vm") as ch:
            ch.store(0, b"v" * (64 * PAGE))
        with BlockingChannel.connect(ep, key, "other") as ch:
            ch.store(0, b"o" * PAGE)
    finally:
        _stop(p)
    os.truncate(store / "vm.pages", 16 * PAGE)
    log = tmp_path / "n2.log"
    p, ep = _node(store, token, log)
    try:
        assert f"skipping {store / 'vm.pages'}: page file {store / 'vm.pages'} is truncated" in \
            log.read_text()
        with (pytest.raises(TransportError, match="is truncated"),
              BlockingChannel.connect(ep, key, "vm", retry_for=0) as ch):
            ch.fetch_into(32 * PAGE, bytearray(PAGE))
        with BlockingChannel.connect(ep, key, "other") as ch:
            buf = bytearray(PAGE)
            assert ch.fetch_into(0, buf) == 0 and buf == b"o" * PAGE
    finally:
        _stop(p)
