"""Page sources: where the bytes of a fault come from (see `pager.source.base`).

- ``MemnodeSource`` (`pager.source.memnode`): memory nodes.
- ``FileSource`` (`pager.source.file`): a snapshot file.
"""

from __future__ import annotations

import argparse

from pager.errors import ConfigError
from pager.source.base import CRoutes, Lane, PageSource
from pager.source.file import FileSource
from pager.source.memnode import MemnodeSource
from transport.wire import valid_space_name

__all__ = ["CRoutes", "FileSource", "Lane", "MemnodeSource", "PageSource", "add_cluster_arguments",
           "parse_source", "source_from_args"]


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """--etcd, --cluster and --replicas (memory nodes as a cluster)."""
    parser.add_argument("--etcd", metavar="URL",
                        help="find the memory nodes in etcd (http://HOST:2379)")
    parser.add_argument("--cluster", metavar="FILE",
                        help='memory nodes from a JSON file {"nodes": {"ID": "HOST:PORT"}}')
    parser.add_argument("--discover", action="store_true",
                        help="find the memory nodes announced over mDNS on this LAN "
                             "(`memnode --announce`)")
    parser.add_argument("--replicas", type=int, default=None, metavar="R",
                        help="copies of every extent (default 2 with at least 2 nodes)")
    parser.add_argument("--repair-rate", type=float, default=64.0, metavar="MIB_S",
                        help="MiB/s at most copied back to under-replicated extents "
                             "(default %(default)s)")


def parse_source(memnode: str | list[str] | None, source: str | None, *,
                 token: bytes | None, space: str, etcd: str | None = None,
                 cluster: str | None = None, replicas: int | None = None,
                 owns: bool = False, repair_rate: float = 64.0,
                 discover: bool = False, existing: bool = False) -> PageSource:
    """The source named on the command line: ``--memnode HOST:PORT`` (repeatable),
    ``--etcd URL``, ``--cluster FILE`` or ``--source file:P``. ``owns``: this pager owns
    ``space`` (serve): it takes the space over in etcd (or uses the cluster file's owner
    epoch) and its stores carry that epoch. ``existing``: only read ``space`` (get): one the
    cluster records no placement of is refused before any node is contacted."""
    memnodes = [memnode] if isinstance(memnode, str) else list(memnode or [])
    from transport.errors import TransportError
    from transport.tcp.endpoint import require_port

    for ep in memnodes:  # a typo fails now, not as a node that never answers
        try:
            port = require_port(ep)[1]
        except TransportError as exc:
            raise ConfigError(f"--memnode: {exc} (ports are 1-65535)") from None
        if port == 0:
            raise ConfigError(f"--memnode: port 0 in endpoint {ep!r}: give the node's port "
                              f"(ports are 1-65535)")
    if (memnodes or etcd or cluster or discover) and not valid_space_name(space):
        raise ConfigError(f"--space {space!r}: an address space name is 1-64 letters, digits, "
                          f"'-', '_' or '.', not starting with '.'")
    if len(memnodes) > 1 or etcd or cluster or discover:
        if source:
            raise ConfigError("give memory nodes or --source file:PATH, not both")
        from pager.source.cluster import ClusterSource
        from pager.source.placement import check_replicas, unknown_scheme
        from transport.leases import Ownership
        from transport.membership import membership_from

        if discover:
            if etcd or cluster or memnodes:
                raise ConfigError("--discover finds the memory nodes itself: drop --memnode, "
                                  "--etcd and --cluster")
            from transport.discovery import DiscoveryMembership

            membership = DiscoveryMembership()
        else:
            membership = membership_from(etcd=etcd, cluster=cluster, memnodes=memnodes)
        # every option is checked before the space is taken over: a pager that then exits
        # on a bad option must not have fenced the one serving the space
        check_replicas(replicas, len(membership.nodes()))
        if (scheme := membership.scheme(space)) and (why := unknown_scheme(
                space, scheme, membership.source)):
            membership.close()
            raise ConfigError(why)
        if existing and membership.known(space) is False:
            membership.close()
            raise ConfigError(f"no space {space!r} in the cluster (etcd records no placement "
                              f"of it: nothing was put or served there); check --space")
        if repair_rate <= 0:
            raise ConfigError(f"--repair-rate {repair_rate:g}: give a positive MiB/s")
        owner = None
        if owns:
            if etcd:
                owner = Ownership.acquire(etcd, space, pager_id())
            elif (fixed := membership.owner(space)) is not None:
                owner = Ownership(space, int(fixed["epoch"]), str(fixed.get("pager", "")))
        return ClusterSource(membership, token, space, replicas=replicas, owner=owner,
                             repair_rate=repair_rate * (1 << 20))
    memnode = memnodes[0] if memnodes else None
    if replicas not in (None, 1):
        raise ConfigError(f"--replicas {replicas} needs at least {replicas} memory nodes")
    if bool(memnode) == bool(source):
        raise ConfigError("give exactly one of --memnode HOST:PORT or --source file:PATH")
    if source:
        if source.startswith("file:"):
            return FileSource(source[5:])
        if source.startswith("memnode:"):
            memnode = source[8:]
        else:
            raise ConfigError(f"unknown source {source!r}; use file:PATH or --memnode HOST:PORT")
    return MemnodeSource(memnode, token, space)  # type: ignore[arg-type]


def source_from_args(args: argparse.Namespace, *, space: str | None = None,
                     owns: bool = True) -> PageSource:
    """The source a command's options name (``--memnode`` once or repeated, ``--etcd``,
    ``--cluster``, ``--discover``, ``--source file:P``, ``--replicas``, ``--token-file``,
    ``--insecure-no-auth``), for ``space`` (default ``args.space``): `serve`, and `vm`'s
    suspend and resume, so guest RAM stored by either reaches the same ``R`` replicas.
    ``owns``: take the space over (fencing its previous owner), as a pager does."""
    token = None
    clustered = (getattr(args, "etcd", None) or getattr(args, "cluster", None)
                 or getattr(args, "discover", False))
    if (args.memnode or clustered) and not getattr(args, "insecure_no_auth", False):
        from transport.token import load_token
        token = load_token(args.token_file)
    if getattr(args, "tls", False) or getattr(args, "tls_dir", None):
        from transport.tls import client_context, ensure_tls_dir, use_client_tls

        use_client_tls(client_context(ensure_tls_dir(args.tls_dir, name="pager",
                                                     who="pager")))
    return parse_source(args.memnode, getattr(args, "source", None), token=token,
                        space=space or args.space, etcd=getattr(args, "etcd", None),
                        cluster=getattr(args, "cluster", None),
                        replicas=getattr(args, "replicas", None), owns=owns,
                        repair_rate=getattr(args, "repair_rate", 64.0),
                        discover=getattr(args, "discover", False))


def pager_id() -> str:
    """This pager, as etcd's owner keys name it: host and pid."""
    import os
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"
