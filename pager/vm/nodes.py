"""The memory nodes a guest's RAM lives on: one ``--memnode``, several, or a cluster
(``--etcd URL``, ``--cluster FILE``, ``--replicas R``), as `vm`, `vm suspend` and `vm resume`
name them and vm.json records them; the page source stores and fetches go through is built by
`pager.source.source_from_args`, the same one `serve` uses."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Any

from pager.source import PageSource, source_from_args

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Nodes:
    memnodes: tuple[str, ...] = ()
    etcd: str | None = None
    cluster: str | None = None
    replicas: int | None = None
    token_file: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, saved: Any = None) -> Nodes:
        """The nodes the options name; those ``saved`` (a VmState) recorded when the options
        name none."""
        memnode = getattr(args, "memnode", None)
        memnodes = tuple([memnode] if isinstance(memnode, str) else memnode or ())
        etcd, cluster = getattr(args, "etcd", None), getattr(args, "cluster", None)
        token = getattr(args, "token_file", None)
        replicas = getattr(args, "replicas", None)
        if not (memnodes or etcd or cluster) and saved is not None:
            old = saved.memnode
            memnodes = tuple([old] if isinstance(old, str) else old or ())
            etcd, cluster = saved.etcd, saved.cluster
            replicas = replicas if replicas is not None else saved.replicas
        return cls(memnodes, etcd, cluster, replicas, token or (saved.token_file if saved
                                                                 else None))

    def __bool__(self) -> bool:
        return bool(self.memnodes or self.etcd or self.cluster)

    def __str__(self) -> str:
        if self.etcd:
            return f"the cluster in etcd at {self.etcd}"
        if self.cluster:
            return f"the cluster of {self.cluster}"
        if len(self.memnodes) > 1:
            return f"memory nodes {', '.join(self.memnodes)}"
        return self.memnodes[0] if self.memnodes else "no memory node"

    def source(self, space: str, *, owns: bool = False) -> PageSource:
        """A page source on these nodes for ``space`` (close it after use). ``owns``: take
        the space over, as a pager does; `vm` suspend and resume do not (the pager does)."""
        args = argparse.Namespace(memnode=list(self.memnodes), etcd=self.etcd,
                                  cluster=self.cluster, replicas=self.replicas,
                                  token_file=self.token_file, space=space)
        return source_from_args(args, owns=owns)

    def serve_args(self) -> list[str]:
        """These nodes as `ssi-pager serve` options."""
        out = [a for m in self.memnodes for a in ("--memnode", m)]
        if self.etcd:
            out += ["--etcd", self.etcd]
        if self.cluster:
            out += ["--cluster", self.cluster]
        if self.replicas is not None:
            out += ["--replicas", str(self.replicas)]
        return out

    def record(self, state: Any) -> None:
        """Write these nodes into ``state`` (a VmState)."""
        state.memnode = (self.memnodes[0] if len(self.memnodes) == 1
                         else list(self.memnodes) or None)
        state.etcd, state.cluster, state.replicas = self.etcd, self.cluster, self.replicas
        state.token_file = self.token_file
