"""deploy/prometheus and deploy/grafana: promtool checks and tests, and every PromQL expression
of the dashboard and the rules run through a real Prometheus server's HTTP API."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.metrics.promserver import PromServer

REPO = Path(__file__).resolve().parents[2]
PROM = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "ssi-pager.json"

pytestmark = pytest.mark.skipif(shutil.which("promtool") is None,
                                reason="promtool missing: deploy/setup-host.sh installs it")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, cwd=PROM,
                          timeout=120)


def test_promtool_check_rules_and_config() -> None:
    r = promtool("check", "rules", "rules.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    r = promtool("check", "config", "prometheus.yml")
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_test_rules() -> None:
    r = promtool("test", "rules", "rules_test.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_promtool_test_rules_fails_on_a_broken_rule(tmp_path: Path) -> None:
    """The unit tests can fail: raise the latency threshold and the alert test must break."""
    shutil.copy(PROM / "rules_test.yml", tmp_path)
    text = (PROM / "rules.yml").read_text()
    (tmp_path / "rules.yml").write_text(text.replace("p99_5m > 0.002", "p99_5m > 0.02"))
    r = subprocess.run(["promtool", "test", "rules", "rules_test.yml"], capture_output=True,
                       text=True, cwd=tmp_path, timeout=120)
    assert r.returncode != 0
    assert "SsiPagerFaultLatencyHigh" in r.stdout + r.stderr


def rule_names() -> set[str]:
    text = (PROM / "rules.yml").read_text()
    return set(re.findall(r"^\s*- (?:record|alert): (\S+)$", text, re.M))


def rule_exprs() -> list[str]:
    """Every ``expr:`` of rules.yml, folded (``expr: >``) blocks joined."""
    exprs: list[str] = []
    lines = (PROM / "rules.yml").read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)expr: (.*)$", line)
        if not m:
            continue
        if m.group(2).strip() not in (">", "|", ">-", "|-"):
            exprs.append(m.group(2))
            continue
        block = []
        for nxt in lines[i + 1:]:
            if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= len(m.group(1)):
                break
            block.append(nxt.strip())
        exprs.append(" ".join(block).strip())
    return exprs


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(f"{p['title']}/{t['refId']}", t["expr"]) for p in dash["panels"]
            for t in p["targets"]]


def grafana_to_promql(expr: str) -> str:
    """Replace the dashboard's variables the way Grafana would for 'All'."""
    expr = expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
    assert "$" not in expr, f"unknown dashboard variable in {expr}"
    return expr


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PromServer]:
    """One real server for the module, loaded with the deploy rules and scraping itself."""
    work = tmp_path_factory.mktemp("prom")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["rules.yml"],
        "scrape_configs": [{"job_name": "prometheus",
                            "static_configs": [{"targets": ["127.0.0.1:1"]}]}],
    }
    server = PromServer(work, json.dumps(config),  # JSON is YAML
                        {"rules.yml": (PROM / "rules.yml").read_text()})
    server.start()
    yield server
    server.stop()


def test_dashboard_has_the_required_panels() -> None:
    exprs = " ".join(e for _, e in dashboard_exprs())
    for metric in ("ssi_pager_faults_total", "ssi_pager_fault_duration_seconds_bucket",
                   "ssi_pager_fetched_bytes_total", "ssi_pager_transport_tier",
                   "ssi_pager_errors_total"):
        assert metric in exprs
    assert "histogram_quantile(0.99" in exprs


def exported_sample_names() -> set[str]:
    """Every sample name the exporters can emit: each declared metric family given one sample
    and rendered by prometheus-client's own exposition (so _total, _bucket, _info as scraped)."""
    from prometheus_client.exposition import generate_latest
    from prometheus_client.registry import CollectorRegistry

    from pager.metrics import METRICS, family

    def collect() -> Iterator[object]:
        for name, (kind, _help, labels) in METRICS.items():
            fam = family(name)
            values = ["x"] * len(labels)
            if kind == "histogram":
                fam.add_metric(values, buckets=[("1.0", 1), ("+Inf", 1)], sum_value=0.5)
            elif kind == "info":
                fam.add_metric([], {label: "x" for label in labels})
            else:
                fam.add_metric(values, 1)
            yield fam

    class Declared:
        def collect(self) -> Iterator[object]:
            return collect()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Declared())  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines()
            if line and not line.startswith("#")}


def unknown_series(expr: str, exported: set[str], recorded: set[str]) -> set[str]:
    """The ssi metric / recording-rule names in ``expr`` that nothing produces."""
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values are not names
    names = set(re.findall(r"[A-Za-z_:][\w:]*", expr))
    return {n for n in names if ":" in n and n not in recorded} | \
        {n for n in names if n.startswith("ssi_") and n not in exported}


def test_every_series_the_dashboard_and_rules_use_is_exported() -> None:
    """A misspelled metric would make a panel or an alert silently empty: every name used must
    be one the exporters emit (or a recording rule of rules.yml)."""
    exported, recorded = exported_sample_names(), rule_names()
    assert {"ssi_pager_faults_total", "ssi_pager_fault_duration_seconds_bucket",
            "ssi_pager_build_info", "ssi_memnode_requests_total"} <= exported
    exprs = [*dashboard_exprs(), *(("rules.yml", e) for e in rule_exprs())]
    assert len(exprs) > 20 and all(exprs)
    bad = {name: sorted(unknown_series(e, exported, recorded)) for name, e in exprs}
    assert {k: v for k, v in bad.items() if v} == {}
    # and the check itself catches a misspelling
    assert unknown_series("rate(ssi_pager_fault_total[1m])", exported, recorded) == {
        "ssi_pager_fault_total"}
    assert unknown_series("instance:ssi_pager_fault:rate1m > 0", exported, recorded) == {
        "instance:ssi_pager_fault:rate1m"}


@pytest.mark.parametrize("name,expr", dashboard_exprs())
def test_expression_runs_on_a_real_prometheus(prometheus: PromServer, name: str, expr: str) \
        -> None:
    res = prometheus.query(grafana_to_promql(expr))
    assert res["status"] == "success", f"{name}: {res.get('error')}"


def test_a_bad_expression_is_rejected(prometheus: PromServer) -> None:
    res = prometheus.query("sum by (kind (rate(ssi_pager_errors_total[1m]))")
    assert res["status"] == "error"


def loaded_rules(prometheus: PromServer) -> list[dict[str, object]]:
    """The server's rules once each has been evaluated at least once."""
    deadline = time.monotonic() + 20
    while True:
        groups = prometheus.api("rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if rules and all(r["health"] != "unknown" for r in rules):
            return rules
        assert time.monotonic() < deadline, f"rules never evaluated: {rules}"
        time.sleep(0.25)


def test_server_loads_and_evaluates_every_rule(prometheus: PromServer) -> None:
    rules = loaded_rules(prometheus)
    assert {r["name"] for r in rules} == rule_names()
    assert len(rules) >= 15
    bad = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
    assert bad == {}
    for r in rules:     # and each expression, as the server parsed it, runs as a query
        res = prometheus.query(str(r["query"]))
        assert res["status"] == "success", (r["name"], res)
