"""Run `ssi-pager memnode` with a metrics endpoint, for CLIs that lack ``--metrics``.

    python tests/metrics/memnode_launcher.py METRICS_HOSTPORT memnode-args...

Starts the same `transport.memnode_cli` code; once the node listens, its metrics endpoint is
started through `pager.metrics.start_memnode_metrics` (the call ``--metrics`` makes).
"""

from __future__ import annotations

import sys

from pager import metrics
from pager.cli import main
from transport import memnode_cli


def install(hostport: str) -> None:
    cls = memnode_cli.MemoryNode
    start = cls.start

    async def start_with_metrics(self):  # type: ignore[no-untyped-def]
        endpoint = await start(self)
        self.metrics_server = await metrics.start_memnode_metrics(hostport, self)
        return endpoint

    cls.start = start_with_metrics


if __name__ == "__main__":
    install(sys.argv[1])
    sys.exit(main(["memnode", *sys.argv[2:]]))
