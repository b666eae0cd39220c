"""The `ssi-pager` command: one sub-command per job, each implemented in its own module.

Every module named in COMMANDS / BENCHES exposes ``configure(parser)`` to add its arguments
and ``run(args) -> int`` to do the work; they are imported only when chosen, so a broken or
slow import in one job never breaks another (`ssi-pager check` works without uvloop, say).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from pager import __version__

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("pager.tools.demo", "run a memory node, the pager and a checked workload (no config)"),
    "serve": ("pager.service.serve", "serve page faults of VMM clients on a Unix socket"),
    "memnode": ("transport.node.cli", "run a memory node (page store server)"),
    "vm": ("pager.vm.cli", "run a QEMU guest with its RAM behind the pager"),
    "tune": ("tuning.cli", "check, plan, apply or revert host tuning (sysctl)"),
    "check": ("pager.uffd.check", "report what userfaultfd supports on this host"),
    "rdma-check": ("transport.rdma_c.check",
                   "connect an RDMA lane to a memory node, prove it and time it"),
    "status": ("pager.tools.status", "show a running pager's and its memory nodes' state"),
    "put": ("pager.tools.put", "upload a raw memory image into an address space"),
    "get": ("pager.tools.get", "download an address space into a raw memory image"),
}
# bench kind -> (module, help)
BENCHES: dict[str, tuple[str, str]] = {
    "uffd": ("pager.uffd.bench", "UFFDIO_COPY/ZEROPAGE cost and local fault latency"),
    "transport": ("transport.bench", "page fetch latency and throughput"),
    "faults": ("pager.tools.bench", "end-to-end fault resolution from memory node and file"),
    "vm": ("pager.vm.bench", "QEMU guest wall time with and without the pager"),
    "cluster": ("pager.tools.cluster_bench", "fetch and store cost of replication (R=2)"),
    "farmem": ("pager.tools.farmem", "far memory: ssi-pager under a resident limit vs kernel "
               "swap to zram"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssi-pager",
        description="userfaultfd pager: guest memory served from SSI-HV memory nodes",
    )
    parser.add_argument("--version", action="version", version=f"ssi-pager {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        if name == chosen:
            importlib.import_module(module).configure(p)
    bench = sub.add_parser("bench", help="benchmarks printing JSON lines",
                           description="benchmarks printing one JSON object per line")
    bench.set_defaults(_help=bench)
    bsub = bench.add_subparsers(dest="bench", metavar="KIND")
    if chosen == "bench":
        kind = next((a for a in argv[argv.index("bench") + 1:] if not a.startswith("-")), None)
        for name, (module, help_) in BENCHES.items():
            p = bsub.add_parser(name, help=help_, description=help_)
            p.set_defaults(_module=module)
            if name == kind:
                importlib.import_module(module).configure(p)
    return parser


def setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    module = getattr(args, "_module", None)
    if module is None:
        getattr(args, "_help", parser).print_help(sys.stderr)
        return 2
    setup_logging(args.verbose)
    from pager.errors import PagerError
    from transport.errors import TransportError
    from tuning.errors import TuningError

    try:
        return int(importlib.import_module(module).run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (PagerError, TransportError, TuningError, OSError) as exc:
        # every package's errors derive from Exception with a message that says what to do
        print(f"ssi-pager: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
