"""Several "hosts" for the cluster tests: network namespaces on one bridge of the test's own
(root namespace address .1, hosts .10, .11, ...), removed on exit. Root only."""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from pager.tools.child import Child

_count = itertools.count()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@contextlib.contextmanager
def hosts(n: int) -> Iterator[list[tuple[str, str, str]]]:
    """``n`` namespaces: [(namespace, its address, its host-side veth)]."""
    k = next(_count)
    tag = f"sc{os.getpid() % 10000}{k}"
    subnet = f"10.79.{(os.getpid() + k) % 250}"
    bridge = f"{tag}br"
    made: list[str] = []
    _ip("link", "add", bridge, "type", "bridge")
    try:
        _ip("addr", "add", f"{subnet}.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        out = []
        for i in range(n):
            ns, host_if, ns_if = f"{tag}n{i}", f"{tag}h{i}", f"{tag}v{i}"
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
            _ip("link", "set", ns_if, "netns", ns)
            _ip("link", "set", host_if, "master", bridge, "up")
            addr = f"{subnet}.{10 + i}"
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", ns_if)
            _ip("-n", ns, "link", "set", ns_if, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            out.append((ns, addr, host_if))
        yield out
    finally:
        for ns in made:
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("netns", "del", ns)
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("link", "del", bridge)


def cut(host_if: str) -> None:
    """Partition a host: its link goes down, its peers get no reset, only silence."""
    _ip("link", "set", host_if, "down")


class NsMemnode(Child):
    """`ssi-pager memnode` inside a namespace, listening on its address (``stop()`` it)."""

    def __init__(self, ns: str, addr: str, tmp: Path, token_file: Path, root: Path,
                 *extra: str) -> None:
        self.endpoint = f"{addr}:50051"
        super().__init__(["memnode", "--listen", self.endpoint, "--store", str(tmp / "store"),
                          "--token-file", str(token_file), *extra], tmp / "memnode.log",
                         root, prefix=["ip", "netns", "exec", ns])


@contextlib.contextmanager
def ns_cluster(n: int, tmp: Path, root: Path, *extra: str
               ) -> Iterator[tuple[list[tuple[str, str, str]], list[NsMemnode], Path]]:
    """``n`` hosts, a memory node listening in each (``extra``: more memnode arguments) and
    their one token (tmp/token): yields (hosts, nodes, token file); all gone on exit."""
    from transport.token import ensure_token

    token_file = tmp / "token"
    ensure_token(str(token_file))
    with hosts(n) as hs:
        nodes: list[NsMemnode] = []
        try:
            for i, (ns, addr, _) in enumerate(hs):
                (tmp / f"n{i}").mkdir()
                nodes.append(NsMemnode(ns, addr, tmp / f"n{i}", token_file, root, *extra))
            for node in nodes:
                node.wait_for(r"listening on (\S+)", timeout=30)
            yield hs, nodes, token_file
        finally:
            for node in nodes:
                node.stop()
