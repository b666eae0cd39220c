"""`ssi-pager memnode`: run a memory node.

Prints "memnode: listening on HOST:PORT" on stderr once it accepts connections (tests and
scripts wait for that line). Authentication is on unless --insecure-no-auth is given.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Any

from transport.errors import TransportError
from transport.node import fastlane
from transport.node.server import MemoryNode
from transport.node.store import DEFAULT_MAX_SPACES, PageStore
from transport.polling import add_poll_argument
from transport.tcp import DEFAULT_HOST, parse_endpoint
from transport.tcp import run as run_loop
from transport.token import default_store_dir, default_token_path, ensure_token
from transport.wire import DEFAULT_MAX_SPACE_BYTES

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", metavar="HOST:PORT", default=DEFAULT_HOST,
                        help="address to listen on (default 127.0.0.1; with no port the first "
                             "free one of 50051-50100)")
    parser.add_argument("--store", metavar="PATH", default=None,
                        help=f"page store directory (default {default_store_dir()})")
    parser.add_argument("--token-file", metavar="F", default=None,
                        help=f"cluster token, created 0600 on first start "
                             f"(default {default_token_path()})")
    parser.add_argument("--insecure-no-auth", action="store_true",
                        help="accept unauthenticated peers (anyone reaching the port can read "
                             "and overwrite guest memory)")
    parser.add_argument("--tls", action="store_true",
                        help="TLS 1.3 on every connection, pagers authenticated by a "
                             "certificate of the cluster CA (made in --tls-dir on first start)")
    parser.add_argument("--tls-dir", metavar="DIR", default=None,
                        help="TLS material: ca.pem, cert.pem, key.pem (and ca.key to issue "
                             "certificates); default $XDG_DATA_HOME/ssi-pager/tls")
    parser.add_argument("--fsync", action="store_true",
                        help="fdatasync every write before acknowledging it (survives power "
                             "loss, slower); without it a killed node still loses nothing")
    parser.add_argument("--max-space-gib", type=int, default=DEFAULT_MAX_SPACE_BYTES >> 30,
                        help="largest address space served, GiB (default %(default)s)")
    parser.add_argument("--max-spaces", type=int, default=DEFAULT_MAX_SPACES,
                        help="most address spaces the node holds (two open files each; "
                             "default %(default)s)")
    parser.add_argument("--name", default="memnode",
                        help="node name reported to peers; with --etcd or --announce, its "
                             "unique id in the cluster (default there: HOSTNAME-ADDRESS-PORT)")
    parser.add_argument("--no-fastlane", action="store_true",
                        help="serve pagers' fault lanes in Python too, not in the C loop "
                             "(for comparison; also SSI_PAGER_NO_FASTLANE=1)")
    add_poll_argument(parser, "the C fault lane", adaptive=True)
    from pager import metrics

    metrics.add_metrics_argument(parser)
    parser.add_argument("--etcd", metavar="URL",
                        help="register this node in etcd (http://HOST:2379) under a lease, "
                             "so pagers started with --etcd find it; --name must be unique")
    parser.add_argument("--announce", action="store_true",
                        help="announce this node over mDNS on the LAN (found by `serve "
                             "--discover`; needs python-zeroconf)")
    parser.add_argument("--advertise", metavar="HOST:PORT",
                        help="endpoint pagers reach this node on (default: the listening "
                             "address; give it when listening on 0.0.0.0)")
    parser.add_argument("--rdma", action="store_true",
                        help="also serve RDMA (rdma_cm/verbs, C) on the TCP port + 1000; "
                             "without an RDMA device this warns and serves TCP only")


def run(args: argparse.Namespace) -> int:
    host, port = parse_endpoint(args.listen)
    if args.insecure_no_auth:
        token = None
        local = host in ("127.0.0.1", "::1", "localhost")
        who = "any local process" if local else "anyone on the network"
        print(f"memnode: WARNING: authentication is off (--insecure-no-auth): {who} that "
              f"reaches {host}:{port or '(first free port)'} can read and overwrite every "
              "guest's memory. Drop the flag to require the cluster token", file=sys.stderr)
    else:
        token = ensure_token(args.token_file)
    if args.max_spaces < 1 or args.max_space_gib < 1:
        raise TransportError(f"--max-spaces {args.max_spaces} and --max-space-gib "
                             f"{args.max_space_gib} must each be at least 1")
    fastlane.set_poll_us(args.poll_us, args.poll_max_us)
    store = PageStore(args.store or default_store_dir(), sync=args.fsync,
                      max_space_bytes=args.max_space_gib << 30, max_spaces=args.max_spaces)
    tls = None
    if args.tls or args.tls_dir:
        from transport.tls import ensure_tls_dir, server_context

        tls = server_context(ensure_tls_dir(args.tls_dir, name=args.name, who="memnode"))
    node = MemoryNode(store, token=token, host=host, port=port, name=args.name,
                      max_space_bytes=args.max_space_gib << 30,
                      fastlane=False if args.no_fastlane else None, tls=tls)
    try:
        return run_loop(_serve(node, args))
    finally:
        store.close()


async def _serve(node: MemoryNode, args: argparse.Namespace) -> int:
    endpoint = await node.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    auth = "off (insecure)" if node.token is None else \
        f"token {args.token_file or default_token_path()}"
    if node.tls is not None:
        auth += ", TLS 1.3 (cluster CA certificates)"
    print(f"memnode: store {node.store.root}, auth {auth}, "
          f"{sum(s.pages for s in node.store.spaces.values())} pages in "
          f"{len(node.store.spaces)} spaces", file=sys.stderr)
    if args.rdma and node.tls is not None:
        print("memnode: --rdma ignored with --tls: RDMA lanes carry no TLS", file=sys.stderr)
    rdma = start_rdma(node) if args.rdma and node.tls is None else None
    exporter = None
    if getattr(args, "metrics", None):
        from pager import metrics

        exporter = await metrics.start_memnode_metrics(args.metrics, node)
    registration = announcement = None
    if getattr(args, "etcd", None):
        registration = await loop.run_in_executor(None, _register, args, endpoint)
    if getattr(args, "announce", False):
        from transport.discovery import Announcement

        announcement = await loop.run_in_executor(
            None, Announcement, _unique_name(args, args.advertise or endpoint),
            args.advertise or endpoint)
    print(f"memnode: listening on {endpoint}", file=sys.stderr, flush=True)
    await stop.wait()
    print("memnode: stopping", file=sys.stderr)
    for held in (registration, announcement):
        if held is not None:
            await loop.run_in_executor(None, held.close)
    if rdma is not None:  # off the loop: its threads may be waiting on the loop
        await asyncio.to_thread(rdma.stop)
    if exporter is not None:
        await exporter.close()
    await node.close()
    return 0


def _register(args: argparse.Namespace, endpoint: str) -> Any:
    from transport.leases import register_node

    advertise = args.advertise or endpoint
    if parse_endpoint(advertise)[0] in ("0.0.0.0", "::"):
        raise TransportError(f"--etcd: pagers cannot reach {advertise}; give --advertise "
                             f"HOST:PORT with this host's address")
    name = _unique_name(args, advertise)
    reg = register_node(args.etcd, name, advertise)
    print(f"memnode: registered as {name} in etcd {args.etcd}", file=sys.stderr)
    return reg


def _unique_name(args: argparse.Namespace, endpoint: str) -> str:
    """--name, or HOSTNAME-ADDRESS-PORT for the default: registries need unique names."""
    if args.name != "memnode":
        return args.name
    import socket

    host, port = parse_endpoint(endpoint)
    return f"{socket.gethostname()}-{host.replace('.', '-').replace(':', '-')}-{port}"


def start_rdma(node: MemoryNode) -> Any:
    """The RDMA listener next to the TCP one, or None with one warning line saying why.

    Any failure (no extension, no device, a device whose setup fails) leaves the node serving
    TCP as before: RDMA waits happen in C with the GIL released, in threads of their own."""
    try:
        from transport.node.rdma import RdmaServer

        server = RdmaServer(node.store, node.token, node.host, int(node.port or 0),
                            max_space_bytes=node.max_space_bytes,
                            loop=asyncio.get_running_loop())
        server.start()
    except Exception as exc:
        log.warning("RDMA unavailable, serving TCP only: %s", exc)
        print(f"memnode: RDMA not served, TCP only: {exc}", file=sys.stderr)
        return None
    print(f"memnode: RDMA listening on {node.host}:{server.port}", file=sys.stderr)
    return server
