"""`ssi-pager status [--json]`: a short table of a running pager and its memory nodes.

Reads the pager's metrics endpoint (``serve --metrics``, default 127.0.0.1:9850) twice,
``--interval`` apart, for rates and the fault p99 over that interval, and each memory node's
metrics endpoint given with ``--memnode`` (``memnode --metrics``, e.g. 127.0.0.1:9851).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from prometheus_client.parser import text_string_to_metric_families

from pager.errors import PagerError
from pager.metrics import parse_hostport

log = logging.getLogger(__name__)

DEFAULT_PAGER = "127.0.0.1:9850"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pager", default=DEFAULT_PAGER, metavar="HOST:PORT",
                        help="the pager's metrics endpoint (default %(default)s)")
    parser.add_argument("--memnode", action="append", default=[], metavar="HOST:PORT",
                        help="a memory node's metrics endpoint (repeatable)")
    parser.add_argument("--etcd", metavar="URL",
                        help="also list the memory nodes and space owners registered in etcd")
    parser.add_argument("--interval", type=float, default=1.0, metavar="S",
                        help="seconds between the two reads giving rates (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


@dataclass
class Scrape:
    """Samples of one /metrics read: name -> list of (labels, value)."""

    at: float
    samples: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)

    def all(self, name: str) -> list[tuple[dict[str, str], float]]:
        return self.samples.get(name, [])

    def total(self, name: str, **match: str) -> float:
        return sum(v for labels, v in self.all(name)
                   if all(labels.get(k) == x for k, x in match.items()))


def url_of(hostport: str) -> str:
    """The metrics URL of ``--pager``/``--memnode``: HOST:PORT, PORT, or the URL the pager
    or node prints (``http://HOST:PORT/metrics``)."""
    if "://" in hostport:
        hostport = urlsplit(hostport).netloc
    host, port = parse_hostport(hostport, "--pager/--memnode")
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}/metrics"


def scrape(hostport: str, what: str) -> Scrape:
    url = url_of(hostport)
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PagerError(f"cannot read the {what}'s metrics at {url}: {reason}; is it running "
                         f"with --metrics {urlsplit(url).netloc}? (pass --pager / --memnode "
                         f"HOST:PORT)") \
            from exc
    out = Scrape(time.monotonic())
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.samples.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile over cumulative (le, count) pairs, in the same unit."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return lower      # beyond the last finite bound: report that bound
            return lower + (le - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = le, count
    return lower


def fault_buckets(s: Scrape) -> dict[float, float]:
    rows = s.all("ssi_pager_fault_duration_seconds_bucket")
    return {float(labels["le"]): v for labels, v in rows}


def guests(s: Scrape) -> list[dict[str, Any]]:
    """Resident bytes and the resident limit (None: no limit) of each client, with its
    process id and address spaces (None: a pager before they were exported)."""
    limits = {lb["client"]: int(v) for lb, v in s.all("ssi_pager_resident_limit_bytes")}
    who = {lb["client"]: lb for lb, _ in s.all("ssi_pager_client_info")}
    out = []
    for lb, v in s.all("ssi_pager_resident_bytes"):
        w = who.get(lb["client"], {})
        pid = w.get("pid")
        out.append({"client": lb["client"], "resident_bytes": int(v),
                    "limit_bytes": limits.get(lb["client"]),
                    "pid": int(pid) if pid and pid.isdigit() else None,
                    "spaces": w["space"].split(",") if w.get("space") else None})
    return out


def pager_status(a: Scrape, b: Scrape) -> dict[str, Any]:
    dt = max(b.at - a.at, 1e-9)
    ba, bb = fault_buckets(a), fault_buckets(b)
    window = [(le, bb[le] - ba.get(le, 0.0)) for le in bb]
    p99 = histogram_quantile(0.99, window)
    p99_window = "interval"
    if p99 is None:  # no fault in the interval: since start
        p99, p99_window = histogram_quantile(0.99, list(bb.items())), "since start"
    faults = b.total("ssi_pager_faults_total")
    build = b.all("ssi_pager_build_info")
    rtts = {lb["node"]: v for lb, v in b.all("ssi_pager_transport_rtt_seconds")}
    tiers = {lb["node"]: lb["tier"] for lb, v in b.all("ssi_pager_transport_tier") if v}
    peers = [{"node": lb["node"], "transport": lb.get("transport", "?"),
              "tier": tiers.get(lb["node"]), "rtt_us": None if lb["node"] not in rtts
              else round(rtts[lb["node"]] * 1e6, 1)}
             for lb, _ in b.all("ssi_pager_peer_info")]
    return {
        "version": build[0][0].get("version") if build else None,
        "clients": int(b.total("ssi_pager_clients")),
        "regions": int(b.total("ssi_pager_regions")),
        "resident_bytes": int(b.total("ssi_pager_resident_bytes")),
        "guests": guests(b),
        "written_back_bytes_per_s": round((b.total("ssi_pager_written_back_bytes_total")
                                           - a.total("ssi_pager_written_back_bytes_total"))
                                          / dt),
        "evictions": int(b.total("ssi_pager_evictions_total")),
        "faults": int(faults),
        "faults_per_s": round((faults - a.total("ssi_pager_faults_total")) / dt, 1),
        "fetched_bytes_per_s": round((b.total("ssi_pager_fetched_bytes_total")
                                      - a.total("ssi_pager_fetched_bytes_total")) / dt),
        "p99_us": None if p99 is None else round(p99 * 1e6, 1),
        "p99_window": p99_window,
        "errors": int(b.total("ssi_pager_errors_total")),
        "pages_in_flight": int(b.total("ssi_pager_pages_in_flight")),
        "peers": peers,
        "cluster": cluster_status(b),
    }


def cluster_status(b: Scrape) -> dict[str, Any] | None:
    """The pager's cluster (``ssi_pager_cluster_*``), or None for a one-node pager."""
    info = b.all("ssi_pager_cluster_info")
    if not info:
        return None
    rtts = {lb["node"]: v for lb, v in b.all("ssi_pager_cluster_node_rtt_seconds")}
    extents = {lb["node"]: int(v) for lb, v in b.all("ssi_pager_cluster_node_extents")}
    return {
        "membership": info[0][0]["membership"], "replicas": int(info[0][0]["replicas"]),
        "epoch": int(epoch) if (epoch := info[0][0]["epoch"]).isdigit() else None,
        "placement": info[0][0].get("placement") or None,
        "home": info[0][0].get("home") or None,
        "fenced": b.total("ssi_pager_cluster_fenced") > 0,
        "nodes": [{"node": lb["node"], "endpoint": lb["endpoint"],
                   "transport": lb["transport"], "tier": lb.get("tier") or None,
                   "state": lb["state"],
                   "rtt_us": round(rtts[lb["node"]] * 1e6, 1) if lb["node"] in rtts else None,
                   "extents": extents.get(lb["node"], 0)}
                  for lb, _ in b.all("ssi_pager_cluster_node_info")],
        "under_replicated": int(b.total("ssi_pager_cluster_under_replicated_extents")),
        "replication_lag_s": b.total("ssi_pager_cluster_replication_lag_seconds"),
        "repairs": int(b.total("ssi_pager_cluster_repairs_total")),
        "repair_bytes": int(b.total("ssi_pager_cluster_repair_bytes_total")),
        "failovers": int(b.total("ssi_pager_cluster_failovers_total")),
        "node_failures": int(b.total("ssi_pager_cluster_node_failures_total")),
        "lost_replicas": int(b.total("ssi_pager_cluster_lost_replicas_total")),
    }


def etcd_status(url: str) -> dict[str, Any]:
    """Memory nodes and space owners registered in etcd (unreachable: an "error")."""
    import json as json_

    from transport.membership import NODES, OWNERS, etcd_client

    try:
        client = etcd_client(url)
        nodes = {m["key"].decode()[len(NODES):]: json_.loads(v)
                 for v, m in client.get_prefix(NODES)}
        owners = {m["key"].decode()[len(OWNERS):]: json_.loads(v)
                  for v, m in client.get_prefix(OWNERS)}
    except Exception as exc:  # etcd3gw's errors, bad JSON: shown, not raised
        return {"endpoint": url, "error": str(exc).strip() or type(exc).__name__}
    return {"endpoint": url, "nodes": nodes, "owners": owners}


def memnode_status(hostport: str, a: Scrape, b: Scrape) -> dict[str, Any]:
    dt = max(b.at - a.at, 1e-9)
    req = b.total("ssi_memnode_requests_total")
    return {
        "metrics": hostport,
        "stored_pages": int(b.total("ssi_memnode_stored_pages")),
        "stored_bytes": int(b.total("ssi_memnode_stored_bytes")),
        "connections": int(b.total("ssi_memnode_connections")),
        "requests_per_s": round((req - a.total("ssi_memnode_requests_total")) / dt, 1),
        "errors": int(sum(v for lb, v in b.all("ssi_memnode_requests_total")
                          if lb.get("result") != "ok")),
    }


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def print_table(st: dict[str, Any]) -> None:
    if st["pager"] is not None:
        print_pager(st)
    else:
        print(f"pager {st['endpoint']}: not reachable ({st['pager_error']})")
    print_cluster(st)


def print_pager(st: dict[str, Any]) -> None:
    p = st["pager"]
    p99 = "-" if p["p99_us"] is None else f"{p['p99_us']:.0f} µs"
    print(f"pager {st['endpoint']} (ssi-pager {p['version']})")
    print(f"  clients {p['clients']}  regions {p['regions']}  resident "
          f"{human_bytes(p['resident_bytes'])}  faults/s {p['faults_per_s']:.0f}  p99 {p99}  "
          f"fetched {human_bytes(p['fetched_bytes_per_s'])}/s  errors {p['errors']}")
    if any(g["limit_bytes"] is not None for g in p["guests"]):
        print(f"  evictions {p['evictions']}  written back "
              f"{human_bytes(p['written_back_bytes_per_s'])}/s")
        print(f"  {'GUEST':<12} {'PID':>8} {'RESIDENT':>12} {'LIMIT':>12}  SPACE")
        for g in p["guests"]:
            lim = "-" if g["limit_bytes"] is None else human_bytes(g["limit_bytes"])
            pid = "-" if g["pid"] is None else str(g["pid"])
            space = ",".join(g["spaces"]) if g["spaces"] else "-"
            print(f"  {g['client']:<12} {pid:>8} {human_bytes(g['resident_bytes']):>12} "
                  f"{lim:>12}  {space}")
    if p["peers"]:
        print(f"  {'PEER':<24} {'TRANSPORT':<10} {'TIER':<16} RTT")
        for peer in p["peers"]:
            rtt = "-" if peer["rtt_us"] is None else f"{peer['rtt_us']:.0f} µs"
            print(f"  {peer['node']:<24} {peer['transport']:<10} {peer['tier'] or '-':<16} {rtt}")


def print_cluster(st: dict[str, Any]) -> None:
    c = (st["pager"] or {}).get("cluster")
    if c:
        fenced = " (FENCED: a newer pager owns the space)" if c.get("fenced") else ""
        placed = c.get("placement") or "?"
        if c.get("home"):
            placed += f" ({c['home']})"
        print(f"cluster {c['membership']}: R={c['replicas']}, placement {placed}, "
              f"epoch {c['epoch'] or '-'}{fenced}, "
              f"under-replicated extents {c['under_replicated']} (lag "
              f"{c['replication_lag_s']:.1f} s), repairs {c['repairs']} "
              f"({human_bytes(c['repair_bytes'])}), failovers {c['failovers']}, node failures "
              f"{c.get('node_failures', 0)}, replicas "
              f"lost to store errors {c.get('lost_replicas', 0)}")
        w = max([12, *(len(n["node"]) for n in c["nodes"])])
        e = max([22, *(len(n["endpoint"]) for n in c["nodes"])])
        print(f"  {'NODE':<{w}} {'ENDPOINT':<{e}} {'TRANSPORT':<10} {'TIER':<17} {'STATE':<6} "
              f"{'EXTENTS':>7} RTT")
        for n in c["nodes"]:
            rtt = "-" if n["rtt_us"] is None else f"{n['rtt_us']:.0f} µs"
            print(f"  {n['node']:<{w}} {n['endpoint']:<{e}} {n['transport']:<10} "
                  f"{n.get('tier') or '-':<17} {n['state']:<6} {n['extents']:>7} {rtt}")
    e = st.get("etcd")
    if e:
        if "error" in e:
            print(f"etcd {e['endpoint']}: unreachable ({e['error']})")
        else:
            nodes = ", ".join(f"{k}={v.get('endpoint')}"
                              for k, v in sorted(e["nodes"].items()))
            owners = ", ".join(f"{k}={v.get('pager')}@{v.get('epoch')}"
                               for k, v in sorted(e["owners"].items()))
            print(f"etcd {e['endpoint']}: {len(e['nodes'])} nodes registered ({nodes}); "
                  f"owners: {owners or 'none'}")
    for m in st["memnodes"]:
        if "error" in m:
            print(f"memnode {m['metrics']}: not reachable ({m['error']})")
            continue
        print(f"memnode {m['metrics']}: stored {human_bytes(m['stored_bytes'])} "
              f"({m['stored_pages']} pages), {m['connections']} connections, "
              f"{m['requests_per_s']:.0f} requests/s, {m['errors']} errors")


def _scrape(hostport: str, what: str) -> Scrape | str:
    """A scrape, or what went wrong (an endpoint down must not hide the others)."""
    try:
        return scrape(hostport, what)
    except PagerError as exc:
        return str(exc)


def collect(pager: str, memnodes: list[str], interval: float) -> dict[str, Any]:
    """The pager's and each memory node's figures over ``interval`` s; an endpoint that does
    not answer is named with its error (``pager_error``, a memnode's ``error``)."""
    whats = {pager: "pager", **{m: "memory node" for m in memnodes}}
    first = {k: _scrape(k, w) for k, w in whats.items()}
    time.sleep(max(interval, 0.0))
    second = {k: _scrape(k, w) if not isinstance(first[k], str) else first[k]
              for k, w in whats.items()}

    def pair(k: str) -> tuple[Scrape, Scrape] | str:
        a, b = first[k], second[k]
        return (a, b) if not isinstance(a, str) and not isinstance(b, str) else str(
            a if isinstance(a, str) else b)

    st: dict[str, Any] = {"endpoint": pager, "pager": None, "memnodes": []}
    got = pair(pager)
    if isinstance(got, str):
        st["pager_error"] = got
    else:
        st["pager"] = pager_status(*got)
    for m in memnodes:
        got = pair(m)
        st["memnodes"].append({"metrics": m, "error": got} if isinstance(got, str)
                              else memnode_status(m, *got))
    return st


def run(args: argparse.Namespace) -> int:
    st = collect(args.pager, args.memnode, args.interval)
    if st["pager"] is None and not args.etcd and not any(
            "error" not in m for m in st["memnodes"]):
        raise PagerError(st["pager_error"])  # nothing answered: say why, exit 1
    if args.etcd:
        st["etcd"] = etcd_status(args.etcd)
    if args.json:
        json.dump(st, sys.stdout)
        print()
    else:
        print_table(st)
    return 0
