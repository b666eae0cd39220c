"""Prometheus metrics of a `ClusterSource` (nodes, extents, replication lag, repairs), read
from ``source.state()`` at scrape time; `ssi-pager status` shows them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


class ClusterCollector(Collector):
    def __init__(self, source: Any) -> None:
        self.source = source

    def collect(self) -> Iterator[Any]:
        st = self.source.state()
        info = GaugeMetricFamily("ssi_pager_cluster_info", "The cluster a pager reads from",
                                 labels=["membership", "replicas", "epoch"])
        info.add_metric([st["membership"], str(st["replicas"]), str(st["epoch"] or "")], 1)
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
