"""`ssi-pager put` / `get` against real memory nodes: zero pages skipped, R copies stored,
the image read back byte for byte."""

from __future__ import annotations

import os
import subprocess
import sys

from clusterkit import nodes
from enginekit import ROOT

from pager.source import MemnodeSource
from transport.tcp import TcpTransport, run
from transport.token import load_token

PAGE = 4096


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pager.cli", *args], cwd=ROOT, timeout=120,
                          capture_output=True, text=True)


def image(path, pages=1024):
    """Every third page zero, the rest random."""
    data = bytearray(os.urandom(pages * PAGE))
    for i in range(0, pages, 3):
        data[i * PAGE:(i + 1) * PAGE] = bytes(PAGE)
    path.write_bytes(data)
    return bytes(data), pages - len(range(0, pages, 3))


def _count(lane):
    n = 0
    for gpa in range(0, 4 << 20, 128 << 10):
        buf = bytearray(128 << 10)
        mask = lane.fetch_into(gpa, buf)
        n += 32 - (mask & 0xFFFFFFFF).bit_count()
    return n


def test_put_skips_zero_pages_and_reaches_two_nodes_get_reads_back(tmp_path):
    ns = nodes(tmp_path, 3)
    try:
        data, nonzero = image(tmp_path / "mem.img")
        common = [a for n in ns for a in ("--memnode", n.endpoint)] + [
            "--token-file", str(ns[0].token_file), "--space", "fc1"]
        r = cli("put", str(tmp_path / "mem.img"), *common, "--replicas", "2")
        assert r.returncode == 0, r.stderr
        assert f"{nonzero} pages stored" in r.stderr
        # a new space: put's check for pages of an earlier image brought no page back
        assert [_pages_sent(n, "fc1") for n in ns] == [0, 0, 0]
        assert sum(_count_on(n) for n in ns) == 2 * nonzero  # each page on exactly 2 nodes
        # the nodes named in another order: placement goes by node id, not position
        again = [a for n in reversed(ns) for a in ("--memnode", n.endpoint)] + common[6:]
        r = cli("get", str(tmp_path / "back.img"), *again, "--size", str(len(data)))
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "back.img").read_bytes() == data
    finally:
        for n in ns:
            n.proc.stop()


def test_put_over_an_earlier_image_leaves_none_of_it(tmp_path):
    """A second image into the same space: where it has zero pages and the first had data,
    the space reads back zeros (a restore must never see the older snapshot's pages)."""
    ns = nodes(tmp_path, 2)
    try:
        common = [a for n in ns for a in ("--memnode", n.endpoint)] + [
            "--token-file", str(ns[0].token_file), "--space", "fc1", "--replicas", "2"]
        first = os.urandom(1024 * PAGE)
        (tmp_path / "a.img").write_bytes(first)
        second, nonzero = image(tmp_path / "b.img")  # every third page zero
        assert cli("put", str(tmp_path / "a.img"), *common).returncode == 0
        r = cli("put", str(tmp_path / "b.img"), *common)
        assert r.returncode == 0, r.stderr
        assert f"{nonzero} pages stored" in r.stderr
        assert f"{1024 - nonzero} pages of an earlier image zeroed" in r.stderr
        r = cli("get", str(tmp_path / "back.img"), *common[:-2], "--size", str(len(second)))
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "back.img").read_bytes() == second
        # the same image again: nothing left to zero, and still byte for byte
        r = cli("put", str(tmp_path / "b.img"), *common)
        assert r.returncode == 0 and "zeroed" not in r.stderr, r.stderr
        r = cli("get", str(tmp_path / "back.img"), *common[:-2], "--size", str(len(second)))
        assert r.returncode == 0 and (tmp_path / "back.img").read_bytes() == second
    finally:
        for n in ns:
            n.proc.stop()


def _pages_sent(node, space):
    """Pages with data ``node`` has sent of ``space`` (FETCHed pages that were written)."""
    async def get() -> dict:
        tr = TcpTransport(load_token(node.token_file), "stats")
        try:
            await tr.connect_peer("n", node.endpoint)
            return await tr.stats("n")
        finally:
            await tr.close()

    st = run(get())["spaces"][space]
    return st["fetched_pages"] - st["zero_pages"]


def _count_on(node):
    src = MemnodeSource(node.endpoint, load_token(node.token_file), "fc1", prefer="tcp")
    with src.open_node_lane("memnode") as lane:
        return _count(lane)


def test_put_names_what_is_wrong(tmp_path):
    (tmp_path / "odd.img").write_bytes(b"x" * 100)
    r = cli("put", str(tmp_path / "odd.img"), "--space", "s", "--memnode", "127.0.0.1:1")
    assert r.returncode == 1 and "not a whole number of 4 KiB pages" in r.stderr
    r = cli("put", str(tmp_path / "missing.img"), "--space", "s", "--memnode", "127.0.0.1:1")
    assert r.returncode == 1 and "cannot read memory image" in r.stderr
    (tmp_path / "ok.img").write_bytes(bytes(4096))
    r = cli("get", str(tmp_path / "back.img"), "--space", "s", "--size", "4M", "--memnode",
            "127.0.0.1:1", "--memnode", "127.0.0.1:2", "--insecure-no-auth")
    assert r.returncode == 1 and "no live replica" in r.stderr
    assert not list(tmp_path.glob("back.img*"))  # no image that looks whole, no .part
    (tmp_path / "n").mkdir()
    ns = nodes(tmp_path / "n", 2)
    try:  # a space nothing was put into: refused, not an image of zeros
        r = cli("get", str(tmp_path / "back.img"), "--space", "never", "--size", "1M",
                *[a for n in ns for a in ("--memnode", n.endpoint)],
                "--token-file", str(ns[0].token_file))
        assert r.returncode == 1 and "'never' holds no page" in r.stderr, r.stderr
        assert not list(tmp_path.glob("back.img*"))
    finally:
        for n in ns:
            n.proc.stop()
    for bad in ("a/b", "x" * 65, ".hidden", ""):
        r = cli("put", str(tmp_path / "ok.img"), "--space", bad, "--memnode", "127.0.0.1:1",
                "--memnode", "127.0.0.1:2", "--insecure-no-auth")
        assert r.returncode == 1 and f"--space {bad!r}: an address space name" in r.stderr
        assert "Traceback" not in r.stderr


def test_bench_cluster_prints_its_five_figures(tmp_path):
    import json
    import struct

    image = tmp_path / "ram.img"  # a small memory image, for the link figure: 2 MiB of
    with open(image, "wb") as f:  # pages, 1 MiB of zero pages written out, a 1 MiB hole
        f.write(b"".join(struct.pack("<QQ", i, i * 7) + bytes(16) for i in range(1 << 16)))
        f.write(bytes(1 << 20))
        f.truncate(4 << 20)
    r = cli("bench", "cluster", "--mib", "2", "--count", "20", "--guests", "2",
            "--fault-runs", "1", "--image", str(image))
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["name"] for x in lines] == ["store_gbps", "fetch_p50_us", "fault_p50_us",
                                          "aggregate_gbps", "compression_gbps"]
    assert all(x["ratio"] > 0 for x in lines[:4])
    faults = lines[2]  # guest faults through two pagers, every byte checked
    assert faults["bad_pages"] == 0 and faults["goal"] == "<=1.1"
    assert len(faults["runs_r2"]) == len(faults["runs_one_node"]) == 1
    shares = faults["r2_reads_per_node"]  # every R=2 fault read counted on some node
    assert len(shares) == 3 and abs(sum(shares) - 1) < 0.01, shares
    agg = lines[3]  # two guests at once through each pager, every byte checked
    assert agg["bad_pages"] == 0 and agg["guests"] == 2
    assert len(agg["rounds_three_nodes"]) == len(agg["rounds_one_node"]) == agg["rounds"]
    link = lines[4]
    if "skipped" not in link:  # network namespaces available (root)
        assert link["page_bytes"] == 2 << 20  # what put would send: no zero page
        assert link["raw_store_gbps"] > 0 and link["lz4_fetch_ratio"] > 0


def test_bench_cluster_passes_node_arguments_and_names_a_node_that_failed():
    r = cli("bench", "cluster", "--mib", "1", "--no-link", "--node-arg=--bogus-option")
    assert r.returncode == 1, r.stderr
    assert "ssi-pager: error: memnode.log" in r.stderr  # one line, no traceback
    assert "unrecognized arguments: --bogus-option" in r.stderr
    assert "Traceback" not in r.stderr
