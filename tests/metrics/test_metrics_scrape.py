"""A real Prometheus scrapes a running pager and memory node while the checked workload runs;
its HTTP API must show the series, agreeing with the workload's and the pager's own counts."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pager.tools.workload import PAGE, DataSet
from tests.metrics.promserver import PromServer, stop_process
from tests.procs import line_within

ROOT = Path(__file__).resolve().parents[2]
MIB = 1 << 20
WORKLOAD_MIB = 16

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("prometheus") is None,
                                 reason="prometheus missing: deploy/setup-host.sh installs it")]


class Proc:
    """A child with stderr in a file; `wait_for` a regex in it."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        self.f = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=self.f)

    def wait_for(self, pattern: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.log.read_text(errors="replace"))
            if m:
                return m.group(1)
            assert self.p.poll() is None, f"exited {self.p.returncode}: {self.log.read_text()}"
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in {self.log.read_text()}")

    def stop(self) -> None:
        stop_process(self.p)
        if self.p.stdout:
            self.p.stdout.close()
        self.f.close()


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pager.cli", *args]


def memnode_command(store: Path, token: Path) -> list[str]:
    return cli("memnode", "--listen", "127.0.0.1:0", "--store", str(store),
               "--token-file", str(token), "--metrics", "127.0.0.1:0")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """memory node (seeded) + pager with --metrics + Prometheus scraping both every second."""
    tmp = tmp_path_factory.mktemp("stack")
    procs: list[Proc] = []
    prom = None
    try:
        node = Proc(memnode_command(tmp / "store", tmp / "token"), tmp / "memnode.log")
        procs.append(node)
        endpoint = node.wait_for(r"listening on (\S+)")
        node_metrics = node.wait_for(r"metrics: http://(\S+)/metrics")

        from pager.source import MemnodeSource
        from transport.token import load_token
        data = DataSet(WORKLOAD_MIB * MIB)
        lane = MemnodeSource(endpoint, load_token(tmp / "token"), "vm1").open_lane()
        for off, buf in data.chunks():
            lane.store_from(None, off, buf)
        lane.reset()

        sock = tmp / "pager.sock"
        pager = Proc(cli("serve", "--socket", str(sock), "--memnode", endpoint,
                         "--token-file", str(tmp / "token"), "--space", "vm1",
                         "--chunk", "4K", "--readahead", "0", "--metrics", "127.0.0.1:0"),
                     tmp / "pager.log")
        procs.append(pager)
        pager_metrics = pager.wait_for(r"metrics: http://(\S+)/metrics")
        pager.wait_for(r"(pager: serving)")

        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "rule_files": ["rules.yml"],
            "scrape_configs": [
                {"job_name": "ssi-pager", "static_configs": [{"targets": [pager_metrics]}]},
                {"job_name": "ssi-memnode", "static_configs": [{"targets": [node_metrics]}]}],
        }
        prom = PromServer(tmp / "prom", json.dumps(config),
                          {"rules.yml": (ROOT / "deploy/prometheus/rules.yml").read_text()})
        prom.start()
        yield {"prom": prom, "socket": sock, "data": data, "pager_metrics": pager_metrics,
               "node_metrics": node_metrics, "tmp": tmp}
    finally:
        if prom is not None:
            prom.stop()
        for p in reversed(procs):
            p.stop()


@pytest.fixture(scope="module")
def workload(stack: dict[str, object]) -> Iterator[dict[str, object]]:
    """The checked workload, run once; its socket held open while the tests look."""
    prom: PromServer = stack["prom"]  # type: ignore[assignment]
    # start once Prometheus holds a sample from before the faults, so rate() sees them
    assert prom.wait_for('up{job="ssi-pager"}', lambda v: v == 1) == 1
    assert prom.wait_for("sum(ssi_pager_faults_total)", lambda v: v == 0) == 0
    w = subprocess.Popen([sys.executable, "-m", "pager.tools.workload",
                          "--socket", str(stack["socket"]),
                          "--mib", str(WORKLOAD_MIB), "--threads", "2", "--hold", "30"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = line_within(w)
    assert line, w.stderr.read() if w.stderr else ""
    result = json.loads(line)
    yield result
    w.terminate()
    w.communicate(timeout=10)


def test_workload_is_correct(workload: dict[str, object]) -> None:
    assert workload["bad_pages"] == 0
    assert workload["faults"] == WORKLOAD_MIB * MIB // PAGE


def test_prometheus_sees_both_targets_up(stack: dict[str, object]) -> None:
    prom: PromServer = stack["prom"]  # type: ignore[assignment]
    assert prom.wait_for('up{job="ssi-pager"}', lambda v: v == 1) == 1
    assert prom.wait_for('up{job="ssi-memnode"}', lambda v: v == 1) == 1


def test_fault_counts_in_prometheus_match_the_workload(stack, workload) -> None:
    prom: PromServer = stack["prom"]
    faults = workload["faults"]   # chunk 4 KiB, no readahead: one fault per page touched
    got = prom.wait_for("sum(ssi_pager_faults_total)", lambda v: v == faults)
    assert got == faults
    assert prom.value('sum(ssi_pager_faults_total{outcome="error"})') == 0
    assert prom.value("ssi_pager_fault_duration_seconds_count") == faults
    assert prom.value("ssi_pager_fetched_bytes_total") == WORKLOAD_MIB * MIB
    data: DataSet = stack["data"]
    holes = sum(e - s for s, e in data.hole_ranges()) // PAGE
    assert holes > 0
    assert prom.value("ssi_pager_zero_filled_pages_total") == holes
    assert prom.value("ssi_pager_clients") == 1
    assert prom.value("ssi_pager_regions") == 1
    assert prom.value(
        'histogram_quantile(0.99, sum by (le) (ssi_pager_fault_duration_seconds_bucket))') > 0
    assert prom.value("count(ssi_pager_build_info)") == 2   # pager and memory node


def test_memnode_counts_in_prometheus_match(stack, workload) -> None:
    prom: PromServer = stack["prom"]
    faults = workload["faults"]
    fetches = prom.wait_for('sum(ssi_memnode_requests_total{op="fetch",result="ok"})',
                            lambda v: v is not None and v >= faults)
    assert fetches is not None and fetches >= faults   # + the pager's probe, nothing lost
    assert prom.value("ssi_memnode_stored_bytes") == WORKLOAD_MIB * MIB - \
        sum(e - s for s, e in stack["data"].hole_ranges())
    assert prom.value("ssi_memnode_stored_pages") * PAGE == prom.value("ssi_memnode_stored_bytes")


def test_peer_tier_is_measured(stack, workload) -> None:
    prom: PromServer = stack["prom"]
    rtt = prom.wait_for("max(ssi_pager_transport_rtt_seconds)", lambda v: v is not None and v > 0)
    assert rtt is not None and 0 < rtt < 0.5
    assert prom.wait_for("sum(ssi_pager_transport_tier)", lambda v: v == 1) == 1


def test_status_agrees_with_prometheus(stack, workload) -> None:
    prom: PromServer = stack["prom"]
    faults = workload["faults"]
    prom.wait_for("sum(ssi_pager_faults_total)", lambda v: v == faults)
    r = subprocess.run(cli("status", "--json", "--pager", stack["pager_metrics"],
                           "--memnode", stack["node_metrics"], "--interval", "0.2"),
                       capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    p = st["pager"]
    assert p["faults"] == faults
    assert (p["clients"], p["regions"]) == (1, 1)
    assert p["resident_bytes"] == WORKLOAD_MIB * MIB
    assert p["p99_us"] is not None and p["p99_us"] > 0
    if p["p99_window"] == "since start":   # the workload is done: same data as Prometheus'
        prom_p99 = prom.value("histogram_quantile(0.99, ssi_pager_fault_duration_seconds_bucket)")
        assert p["p99_us"] == pytest.approx(prom_p99 * 1e6, abs=0.1)
    assert p["peers"] and p["peers"][0]["transport"] == "tcp"
    assert st["memnodes"][0]["stored_bytes"] == prom.value("ssi_memnode_stored_bytes")
    human = subprocess.run(cli("status", "--pager", stack["pager_metrics"], "--interval", "0"),
                           capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert "clients 1" in human.stdout and "p99" in human.stdout
    # the URL the pager prints ("metrics: http://HOST:PORT/metrics") is taken as it is
    url = subprocess.run(cli("status", "--pager", f"http://{stack['pager_metrics']}/metrics",
                             "--interval", "0"),
                         capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert url.returncode == 0 and "clients 1" in url.stdout, url.stderr
    # a memory node that does not answer is named; the pager's figures are still shown
    from tests.metrics.promserver import refused_port
    with refused_port() as port:
        both = subprocess.run(cli("status", "--pager", stack["pager_metrics"], "--memnode",
                                  f"127.0.0.1:{port}", "--memnode", stack["node_metrics"],
                                  "--interval", "0"),
                              capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert both.returncode == 0, both.stderr
    assert "clients 1" in both.stdout and f"memnode 127.0.0.1:{port}: not reachable" in both.stdout
    assert f"memnode {stack['node_metrics']}: stored" in both.stdout


def test_status_without_a_pager_says_what_to_do() -> None:
    from tests.metrics.promserver import refused_port
    with refused_port() as port:
        r = subprocess.run(cli("status", "--pager", f"127.0.0.1:{port}"),
                           capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert r.returncode == 1
    assert "is it running with --metrics" in r.stderr


def test_recording_rules_work_on_the_real_series(stack, workload) -> None:
    """deploy/prometheus/rules.yml evaluated by the server over the pager's real series."""
    prom: PromServer = stack["prom"]
    rate = prom.wait_for("sum(instance:ssi_pager_faults:rate1m)", lambda v: v is not None and v > 0)
    assert rate is not None and rate > 0
    p99 = prom.wait_for("max(instance:ssi_pager_fault_duration_seconds:p99_5m)",
                        lambda v: v is not None and v > 0)
    assert p99 is not None and 0 < p99 <= 1.0
    fetched = prom.wait_for("sum(instance:ssi_pager_fetched_bytes:rate1m)",
                            lambda v: v is not None and v > 0)
    assert fetched is not None and fetched > 0
