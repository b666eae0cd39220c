"""Adaptive polling, shared by the pager's C fault loop and the memory node's C fault lane.

After the last event either loop keeps reading its fd without blocking for a bounded window
before it sleeps in poll()/recv() again: a fault (or a FETCH) that arrives inside the window is
seen within one read instead of after a thread wakeup, and an idle loop still sleeps.
"""

from __future__ import annotations

import argparse

from transport.errors import TransportError

# µs of non-blocking reads after the last event (``--poll-us`` of serve and memnode), chosen
# with `ssi-pager bench faults` (polling on/off cases, CPU s per million faults): it covers the
# gap between a fault's reply and the next fault of a faulting thread (remote 4 KiB p50 ~21 µs
# on against ~41-44 µs off on the idle development VM) and costs ~0% CPU when no fault comes.
# A node whose lane sees sparser requests (R=2 over 3 nodes) gains from longer windows
# (`bench cluster`: 200 µs on the nodes took the R=2 / one-node fault p50 ratio from
# 1.18-1.26 to 1.10-1.15 in four alternated pairs), which `memnode --poll-us` sets.
DEFAULT_POLL_US = 50
# The memory node's lanes adapt their window between --poll-us and this (--poll-max-us), by the
# halt-polling rule (ssip_poll_adapt in transport/wire/ssip_poll.h). Chosen with `bench
# cluster` (R=2 over 3 nodes, alternated pairs): 1000 µs took the R=2 fault p50 from a median
# of 43.5 to 40.3 µs; 400 µs gained less. An idle lane still sleeps after one window.
DEFAULT_POLL_MAX_US = 1000
MAX_POLL_US = 1_000_000


def check_poll_us(value: int) -> int:
    """``value`` if it is a usable window (0 = off), else a TransportError saying what to pass."""
    if not 0 <= value <= MAX_POLL_US:
        raise TransportError(f"poll window {value} µs is out of range; pass 0 (off) to "
                             f"{MAX_POLL_US} µs, e.g. --poll-us {DEFAULT_POLL_US}")
    return value


def poll_us_arg(text: str) -> int:
    """argparse type of ``--poll-us``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of µs; pass e.g. "
                                         f"--poll-us {DEFAULT_POLL_US}, or 0 for off") from None
    try:
        return check_poll_us(value)
    except TransportError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_poll_argument(parser: argparse.ArgumentParser, what: str,
                      adaptive: bool = False) -> None:
    """``--poll-us`` (and with ``adaptive``, ``--poll-max-us``) on ``parser``."""
    parser.add_argument("--poll-us", type=poll_us_arg, default=DEFAULT_POLL_US, metavar="N",
                        help=f"µs {what} keeps reading without blocking after the last event "
                             f"before it sleeps (adaptive polling; 0 = off, default "
                             f"%(default)s)")
    if adaptive:
        parser.add_argument("--poll-max-us", type=poll_us_arg, default=DEFAULT_POLL_MAX_US,
                            metavar="N",
                            help=f"{what} doubles its window, up to this many µs, while "
                                 "requests keep arriving just after it ends, and halves it "
                                 "back to --poll-us when they stop (0 or <= --poll-us: a "
                                 "fixed window; default %(default)s)")
