"""The user-facing commands, run as a user would: `ssi-pager demo` and `ssi-pager bench faults`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from enginekit import ROOT

from pager.tools.child import killed_after
from transport.node.checksum import page_sums, store_checksum

# the cases `bench faults --only remote-4k-rand` runs: readahead on/off, polling off, CPU burners
RAND_CASES = sorted(f"pager-remote-4k-rand{s}" for s in (
    "", "-nora", "-nora-nopoll", "-nora-busy", "-nora-nopoll-busy"))


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pager.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_demo_runs_checks_and_summarises():
    r = _run("demo", "--mib", "16")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "demo: OK: 16 MiB" in r.stdout and "0 wrong pages" in r.stdout
    assert "zero pages" in r.stdout and "p50" in r.stdout and "GB/s" in r.stdout
    # the SSI-HV status lines and the progress bar
    assert "tier=" in r.stderr and "expected latency" in r.stderr
    assert "100.0%" in r.stderr


@pytest.mark.slow
def test_bench_faults_json_lines_and_ratios(refpager_dir):
    r = _run("bench", "faults", "--mib", "4", "--rss-gib", "0", "--only", "remote-4k-rand",
             "--repeat", "1", "--refpager", str(refpager_dir))
    assert r.returncode == 0, r.stderr[-2000:]
    lines = {x["name"]: x for x in map(json.loads, r.stdout.splitlines())}
    ours = {n: x for n, x in lines.items() if n.startswith("pager-remote-")}
    assert sorted(ours) == RAND_CASES
    for x in ours.values():
        assert x["bad_pages"] == 0 and x["p50_us"] > 0 and x["gbps"] > 0, x
        assert x["faults"] == 1024
        # what the faults cost: CPU per million faults of pager and node, idle pager CPU
        assert x["pager_cpu_s_per_mfault"] >= 0 and x["node_cpu_s_per_mfault"] >= 0
        assert 0 <= x["pager_idle_cpu_pct"] < 10, x
    assert 0 < lines["pager-remote-4k-rand-nora-busy"]["busy_cpu_share"] <= 1.05
    assert all(x["bad_pages"] == 0 for n, x in lines.items() if n.startswith("refpager-"))
    ratios = [x for n, x in lines.items() if n.startswith("ratio-")]
    assert "ratio-pager-remote-4k-rand-vs-refpager-remote-4k-rand" in lines
    assert len(ratios) >= 6
    for x in ratios:  # each ratio from both sides of this run, as the lines above print them
        a, b = x["name"].removeprefix("ratio-").split("-vs-")
        field = "p50_us" if x["metric"] == "p50" else "gbps"
        assert (x["ours"], x["reference"]) == (lines[a][field], lines[b][field]), x
        assert x["ratio"] == pytest.approx(x["ours"] / x["reference"], abs=0.0006), x


def test_bench_faults_refuses_a_missing_reference(tmp_path):
    r = _run("bench", "faults", "--mib", "4", "--rss-gib", "0", "--refpager", str(tmp_path))
    assert r.returncode == 1 and "refpager-remote" in r.stderr, r.stderr[-2000:]
    assert r.stdout == ""  # refused before any case ran
    r = _run("bench", "faults", "--mib", "4", "--rss-gib", "0", "--only", "remote-4k-rand",
             "--no-ref")
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(json.loads(x)["name"] for x in r.stdout.splitlines()) == RAND_CASES


def test_demo_exits_non_zero_on_a_wrong_byte():
    """One byte of the memory node's store file changed (a real file edit, after the demo
    seeded it and before its workload runs, its checksum rewritten to match): the demo must
    say FAILED and exit 3. (A wrong byte under its old checksum is the node's to refuse:
    tests/engine/test_trust_identity.py.)"""
    from pager.tools.workload import DataSet
    mib = 16
    data = DataSet(mib << 20)  # what the demo seeds (same default seed and holes)
    last = max(e for _s, e in data.data_ranges()) - 4096  # touched last by the seq workload
    p = subprocess.Popen([sys.executable, "-m", "pager.cli", "demo", "--mib", str(mib)],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with killed_after(p, 300):  # a hang guard on every wait below
            store = None
            assert p.stderr is not None
            for line in p.stderr:
                if m := re.search(r"store and token in (\S+)\)", line):
                    store = Path(m.group(1)) / "store" / "demo.pages"
                if line.startswith("demo: seeded"):
                    os.kill(p.pid, signal.SIGSTOP)  # hold the demo while its store is edited
                    try:
                        assert store is not None, "the demo did not say where its store is"
                        with open(store, "r+b") as f:
                            f.seek(last + 100)
                            byte = f.read(1)
                            f.seek(last + 100)
                            f.write(bytes([byte[0] ^ 0xFF]))
                            f.seek(last)
                            page = f.read(4096)
                        # and its checksum to match: a wrong byte the node cannot tell from a
                        # right one, which only the demo's own check of every byte can catch
                        with open(store.with_suffix(".sums"), "r+b") as f:
                            f.seek(last // 4096 * 4)
                            kind = store_checksum(store.parent, fresh=False)
                            f.write(page_sums(kind, page).tobytes())
                    finally:
                        os.kill(p.pid, signal.SIGCONT)
                    break
            out, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 3, (p.returncode, err[-2000:])
    assert f"demo: FAILED: {mib} MiB" in out and ", 1 wrong pages" in out, out


@pytest.mark.slow
def test_pager_rss_stays_small_while_a_4_gib_client_is_served():
    """The README's claim: the pager's own memory does not grow with its clients' (a 4 GiB
    client, every 64 KiB chunk faulted in from a sparse snapshot file)."""
    r = _run("bench", "faults", "--mib", "4", "--rss-gib", "4", "--only", "no-such-case",
             "--no-ref", timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    (line,) = [x for x in map(json.loads, r.stdout.splitlines())
               if x["name"] == "pager-rss-4g-client"]
    assert line["gbps"] > 0  # the whole client was faulted in through the pager
    # both below the goal: the sampled peak, and VmHWM (the kernel updates its high-water mark
    # lazily, so a sample may exceed it by a few pages; neither bounds the other)
    assert 0 < line["rss_peak_mib"] < 150 and 0 < line["hwm_mib"] < 150, line
