"""The `ssi-pager vm` command: run a guest (`-- QEMU ARGS`), `suspend NAME`, `resume NAME`."""

from __future__ import annotations

import argparse
import logging

from pager.errors import VmError
from pager.service.serve import size_arg
from pager.vm.launch import do_run
from pager.vm.resume import do_resume
from pager.vm.suspend import do_suspend

log = logging.getLogger(__name__)


def _add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memnode", metavar="HOST:PORT", action="append",
                   help="memory node holding guest RAM (repeat for several: a cluster; "
                        "default: a local one started here)")
    p.add_argument("--etcd", metavar="URL",
                   help="guest RAM on the memory nodes registered in etcd (http://HOST:2379)")
    p.add_argument("--cluster", metavar="FILE",
                   help='guest RAM on the memory nodes of a JSON file {"nodes": {"ID": '
                        '"HOST:PORT"}}')
    p.add_argument("--replicas", type=int, metavar="R",
                   help="copies of every extent of guest RAM (default 2 with at least 2 "
                        "nodes)")
    p.add_argument("--token-file", metavar="F", help="cluster token (default: the user's)")
    p.add_argument("--space", metavar="NAME", help="memory-node address space (default: name)")
    p.add_argument("--pager", metavar="SOCKET",
                   help="join the pager on this socket (started here if nothing listens)")
    p.add_argument("--name", metavar="NAME", help="VM name for suspend/resume (default: space)")
    p.add_argument("--state", metavar="FILE", help="resume: device state file (default: saved)")
    p.add_argument("--max-resident", type=size_arg, metavar="SIZE",
                   help="far memory: keep the guest's resident RAM under SIZE (e.g. 128M), "
                        "the rest on the memory node (passed to the pager started here)")
    p.add_argument("--pager-arg", action="append", metavar="ARG",
                   help="extra argument for the started `ssi-pager serve` (repeatable)")
    p.add_argument("--hugetlb", action="store_true", default=None,
                   help="plain -m guest RAM on 2 MiB huge pages (memory-backend-memfd,"
                        "hugetlb=on); reserve them first: `ssi-pager tune apply --hugepages N`")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.usage = ("ssi-pager vm [options] -- qemu-system-x86_64 ARGS...\n"
                    "       ssi-pager vm suspend NAME\n"
                    "       ssi-pager vm resume NAME [options] -- qemu-system-x86_64 ARGS...")
    _add_options(parser)
    parser.add_argument("words", nargs=argparse.REMAINDER,
                        help="suspend NAME | resume NAME [options] -- QEMU ARGS | -- QEMU ARGS")


def run(args: argparse.Namespace) -> int:
    words = list(args.words)
    if words and words[0] == "--":
        words = words[1:]
        action = None
    else:
        action = words[0] if words and words[0] in ("suspend", "resume") else None
    if action is None:
        if not words:
            raise VmError("no QEMU command: ssi-pager vm [options] -- qemu-system-x86_64 ...")
        return do_run(args, words)
    if len(words) < 2:
        raise VmError(f"usage: ssi-pager vm {action} NAME")
    name = words[1]
    rest = words[2:]
    head, qemu_argv = (rest[:rest.index("--")], rest[rest.index("--") + 1:]) if "--" in rest \
        else (rest, [])
    if head:
        sub = argparse.ArgumentParser(prog=f"ssi-pager vm {action} {name}")
        _add_options(sub)
        extra = sub.parse_args(head)
        for k, v in vars(extra).items():
            if v is not None:
                setattr(args, k, v)
    if action == "suspend":
        return do_suspend(args, name)
    if not qemu_argv:
        raise VmError("resume needs the QEMU command: ssi-pager vm resume NAME -- "
                      "qemu-system-x86_64 ARGS (same machine, devices and -m)")
    return do_resume(args, name, qemu_argv)

