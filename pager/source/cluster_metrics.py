"""Prometheus metrics of a `ClusterSource` (nodes, extents, replication lag, repairs), read
from ``source.state()`` (`cluster_state`) at scrape time; `ssi-pager status` shows them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pager.source.placement import EXTENT_SHIFT, EXTENT_SIZE, HOME

if TYPE_CHECKING:
    from pager.source.cluster import ClusterSource


class ClusterCollector(Collector):
    def __init__(self, source: Any) -> None:
        self.source = source

    def collect(self) -> Iterator[Any]:
        st = self.source.state()
        info = GaugeMetricFamily("ssi_pager_cluster_info", "The cluster a pager reads from: "
                                 "its space's placement scheme and home node",
                                 labels=["membership", "replicas", "epoch", "placement",
                                         "home"])
        info.add_metric([st["membership"], str(st["replicas"]), str(st["epoch"] or ""),
                         st["placement"], st["home"] or ""], 1)
        yield info
        yield GaugeMetricFamily("ssi_pager_cluster_fenced",
                                "1 once a newer pager owns this pager's space (it stopped "
                                "using it)", value=1 if st["fenced"] else 0)
        node = GaugeMetricFamily("ssi_pager_cluster_node_info", "Memory nodes of the cluster",
                                 labels=["node", "endpoint", "transport", "tier", "state"])
        rtt = GaugeMetricFamily("ssi_pager_cluster_node_rtt_seconds",
                                "Measured round trip to a memory node", labels=["node"])
        ext = GaugeMetricFamily("ssi_pager_cluster_node_extents",
                                "Extents a memory node holds (of the spaces in use)",
                                labels=["node"])
        for n in st["nodes"]:
            node.add_metric([n["id"], n["endpoint"] or "", n["transport"] or "?",
                             n["tier"] or "", n["state"]], 1)
            if n["rtt_us"] is not None:
                rtt.add_metric([n["id"]], n["rtt_us"] / 1e6)
            ext.add_metric([n["id"]], n["extents"])
        yield node
        yield rtt
        yield ext
        yield GaugeMetricFamily("ssi_pager_cluster_under_replicated_extents",
                                "Extents on fewer than R live nodes",
                                value=st["under_replicated"])
        yield GaugeMetricFamily("ssi_pager_cluster_replication_lag_seconds",
                                "Seconds since an extent has been under-replicated",
                                value=st["replication_lag_seconds"])
        for name, key, help_ in (
                ("ssi_pager_cluster_repairs", "repairs", "Extent copies made by repair"),
                ("ssi_pager_cluster_repair_bytes", "repair_bytes",
                 "Bytes repair wrote onto nodes (the pages written, not whole extents)"),
                ("ssi_pager_cluster_failovers", "failovers", "Fetches retried on a replica"),
                ("ssi_pager_cluster_node_failures", "node_failures",
                 "Memory nodes seen failing"),
                ("ssi_pager_cluster_lost_replicas", "lost_replicas",
                 "Extents a node could not serve from its store (I/O error, failed check)")):
            yield CounterMetricFamily(name, help_, value=st[key])


def cluster_state(src: ClusterSource) -> dict[str, Any]:
    """``src`` as `ssi-pager status` shows it: its space's placement and home, each node
    (transport, tier, state, round trip, extents held of the spaces in use), replication
    and repair counters."""
    scheme = src.scheme(src.space)
    first = src.targets(src.space, 0)[:1] if scheme == HOME else []
    with src.lock:
        per_node: dict[str, int] = dict.fromkeys(src.members, 0)
        for space, size in src.spaces.items():
            for ext in range(-(-size >> EXTENT_SHIFT)):
                for n in src.holders(space, ext):
                    per_node[n] = per_node.get(n, 0) + 1
        nodes = [{"id": n, "endpoint": src.lanes.nodes.get(n),
                  "transport": src.lanes.lane_kind(n),
                  "tier": src.lanes.tiers.get(n),  # measured when its transport was chosen
                  "state": "gone" if n not in src.members else "down" if n in src.down
                  else "live",  # gone: left the membership (its etcd lease expired)
                  "rtt_us": round(src.rtt[n] * 1e6, 1) if n in src.rtt else None,
                  "extents": per_node.get(n, 0)} for n in sorted(src.gen)]
        lag = 0.0 if src.lag_since is None else time.monotonic() - src.lag_since
        return {"membership": src.membership.source, "replicas": src.r,
                "placement": scheme, "home": first[0] if first else None,
                "epoch": src.epoch, "fenced": src.fenced,
                "extent_bytes": EXTENT_SIZE, "nodes": nodes,
                "under_replicated": src.under_replicated,
                "replication_lag_seconds": round(lag, 3), **src.counters}
