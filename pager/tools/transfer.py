"""`ssi-pager put` and `ssi-pager get`: a raw memory image (a Firecracker snapshot's memory
file, say) into an address space of the memory nodes, and back.

    ssi-pager put --space NAME FILE (--memnode HOST:PORT... | --etcd URL | --cluster FILE)
    ssi-pager get --space NAME --size BYTES FILE (same node options)

``put`` skips zero pages (a node answers never-written pages as zero, so they need not
travel), except where the space already holds written pages (an earlier image): those are
overwritten with zeros, so within the image's size the space reads back as the image, never
as a mix of the two (pages past its end keep what an earlier, larger image left: `get` the
new image's size). On a cluster it returns once every extent reached ``--replicas`` nodes.
``get`` writes the space's first ``--size`` bytes to FILE (through FILE.part, renamed once
whole), leaving holes where pages were never written; a space etcd records nothing of, or
one with no page written in that range, is refused (rc 1, no file).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time

from pager.errors import ConfigError
from pager.source import PageSource, add_cluster_arguments, parse_source
from pager.source.base import Lane
from transport.wire import PAGE_SIZE
from transport.wire.frames import zero_mask_runs

log = logging.getLogger(__name__)

BLOCK = 1 << 20  # bytes read, checked for zero pages and stored per step
_ZERO_PAGE = bytes(PAGE_SIZE)


def configure(parser: argparse.ArgumentParser, *, get: bool = False) -> None:
    parser.add_argument("file", metavar="FILE",
                        help="raw memory image to write" if get else "raw memory image")
    parser.add_argument("--space", required=True, help="address space on the memory nodes")
    if get:
        from pager.service.serve import size_arg

        parser.add_argument("--size", type=size_arg, required=True,
                            help="bytes to download (the guest's memory size, e.g. 512M)")
    parser.add_argument("--memnode", metavar="HOST:PORT", action="append", default=None,
                        help="memory node (repeat for a cluster)")
    add_cluster_arguments(parser)
    parser.add_argument("--token-file", metavar="F", default=None,
                        help="cluster token (default $XDG_DATA_HOME/ssi-pager/token)")
    parser.add_argument("--insecure-no-auth", action="store_true",
                        help="talk to memory nodes that run without authentication")


def open_source(args: argparse.Namespace, *, existing: bool = False) -> PageSource:
    if not (args.memnode or args.etcd or args.cluster or args.discover):
        raise ConfigError("name the memory nodes: --memnode HOST:PORT (repeatable), "
                          "--etcd URL or --cluster FILE")
    token = None
    if not args.insecure_no_auth:
        from transport.token import load_token
        token = load_token(args.token_file)
    source = parse_source(args.memnode, None, token=token, space=args.space, etcd=args.etcd,
                          cluster=args.cluster, replicas=args.replicas,
                          repair_rate=args.repair_rate, discover=args.discover,
                          existing=existing)
    # each node measured as a pager does (tier line, slow-link warning): a bulk lane to a
    # node across a slow link compresses
    from pager.service.serve import announce_source
    from transport.tcp import run

    try:
        run(announce_source(source))
    except BaseException:
        source.close()
        raise
    return source


def written_runs(block: memoryview) -> list[tuple[int, int]]:
    """(start, end) byte runs of ``block`` made of pages that are not all zero."""
    runs: list[tuple[int, int]] = []
    for off in range(0, len(block), PAGE_SIZE):
        if block[off:off + PAGE_SIZE] == _ZERO_PAGE:
            continue
        if runs and runs[-1][1] == off:
            runs[-1] = (runs[-1][0], off + PAGE_SIZE)
        else:
            runs.append((off, off + PAGE_SIZE))
    return runs


def put(args: argparse.Namespace) -> int:
    try:
        f = open(args.file, "rb")  # noqa: SIM115 - closed below, after the source
    except OSError as exc:
        raise ConfigError(f"cannot read memory image {args.file}: {exc.strerror}") from exc
    size = os.fstat(f.fileno()).st_size
    if size % PAGE_SIZE:
        f.close()
        raise ConfigError(f"{args.file} is {size} bytes, not a whole number of 4 KiB pages: "
                          f"is it a raw memory image?")
    source = open_source(args)
    if hasattr(source, "keep"):
        source.keep(args.space, size)
    t0 = time.monotonic()
    stored = cleared = 0
    buf = bytearray(BLOCK)
    scratch = bytearray(BLOCK)
    try:
        with source.open_lane(bulk=True) as lane:
            for gpa in range(0, size, BLOCK):
                n = f.readinto(buf)
                view = memoryview(buf)[:n]
                runs = written_runs(view)
                # before this block's pages are stored: the fetch over its zero pages' span
                # then brings back only what an earlier image left (nothing, in a new space)
                cleared += clear_written(lane, args.space, gpa, view, runs, scratch)
                for start, end in runs:
                    lane.store_from(args.space, gpa + start, view[start:end])
                    stored += end - start
        if hasattr(source, "record_identities"):
            source.record_identities(args.space)
    finally:
        source.close()
        f.close()
    secs = time.monotonic() - t0
    skipped = size - stored - cleared
    print(f"put: {args.file} -> space {args.space}: {size >> 20} MiB, {stored >> 12} pages "
          f"stored, {skipped >> 12} zero pages skipped"
          + (f", {cleared >> 12} pages of an earlier image zeroed" if cleared else "")
          + f", {secs:.1f} s", file=sys.stderr)
    return 0


def clear_written(lane: Lane, space: str, gpa: int, block: memoryview,
                  runs: list[tuple[int, int]], scratch: bytearray) -> int:
    """Zero the pages the space holds with other bytes where ``block`` (the image at ``gpa``,
    its non-zero ``runs``) has zero pages: one fetch over the span of its zero pages says
    which are written (never-written pages come back as a mask bit, with no data, so a new
    space costs one small reply per block), a store of zeros overwrites them. Bytes zeroed."""
    data = bytearray(len(block) // PAGE_SIZE)  # 1: the image has data in that page
    for start, end in runs:
        data[start // PAGE_SIZE:end // PAGE_SIZE] = b"\1" * ((end - start) // PAGE_SIZE)
    zero = [p for p, d in enumerate(data) if not d]
    if not zero:
        return 0
    first, last = zero[0], zero[-1] + 1
    span = memoryview(scratch)[:(last - first) * PAGE_SIZE]
    mask = lane.fetch_into(space, gpa + first * PAGE_SIZE, span)
    for p in range(last - first):  # the mask now says which pages need no zeroing
        if data[first + p] or span[p * PAGE_SIZE:(p + 1) * PAGE_SIZE] == _ZERO_PAGE:
            mask |= 1 << p
    done = 0
    for p, count in zero_mask_runs(last - first, mask):  # one store per run
        lane.store_from(space, gpa + (first + p) * PAGE_SIZE, bytes(count * PAGE_SIZE))
        done += count * PAGE_SIZE
    return done


def get(args: argparse.Namespace) -> int:
    if args.size % PAGE_SIZE:
        raise ConfigError(f"--size {args.size} is not a multiple of 4 KiB")
    source = open_source(args, existing=True)
    written = 0
    buf = bytearray(BLOCK)
    part = f"{args.file}.part"  # renamed to FILE once whole: a failed get leaves no image
    done = False
    try:
        with open(part, "wb") as f, source.open_lane(bulk=True) as lane:
            f.truncate(args.size)
            for gpa in range(0, args.size, BLOCK):
                n = min(BLOCK, args.size - gpa)
                view = memoryview(buf)[:n]
                mask = lane.fetch_into(args.space, gpa, view)
                for i in range(n // PAGE_SIZE):
                    if not mask >> i & 1:
                        f.seek(gpa + i * PAGE_SIZE)
                        f.write(view[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])
                        written += PAGE_SIZE
        if not written and args.size:
            raise ConfigError(
                f"space {args.space!r} holds no page in its first {args.size} bytes on "
                f"these nodes: check --space, and name the nodes as `put` did (a --memnode "
                f"list, the --cluster file or --etcd); nothing was written to {args.file}")
        os.replace(part, args.file)
        done = True
    except OSError as exc:
        raise ConfigError(f"cannot write {args.file}: {exc.strerror}") from exc
    finally:
        source.close()
        if not done:
            with contextlib.suppress(OSError):
                os.unlink(part)
    holes = (args.size - written) >> 12
    print(f"get: space {args.space} -> {args.file}: {args.size >> 20} MiB, {written >> 12} "
          f"pages written" + (f", {holes} never written (holes)" if holes else ""),
          file=sys.stderr)
    return 0
