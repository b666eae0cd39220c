"""What a stop does to the clients still attached (deploy/README.md, "Stop and restart").

SIGTERM (``systemctl stop``/``restart``) never strands a guest: the pager stops accepting new
clients and keeps serving the attached ones until they exit, for at most ``--stop-timeout``
seconds (a second SIGTERM or SIGINT: at once). Then every page of theirs not served yet is
poisoned with UFFDIO_POISON and the blocked threads are woken: a client that touches such a
page gets SIGBUS (as from a memory error) instead of hanging forever or reading zeros, and each
poisoned client is named in the log. Under ``--supervise``, SIGHUP (``systemctl reload``)
restarts the pager instead and the new one takes every client over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Collection

from pager.uffd.binding import Userfaultfd
from pager.uffd.errors import UffdError, UffdExists, UffdGone, UffdRetry

log = logging.getLogger(__name__)

HANDOVER_EXIT = 75  # a supervised pager that handed its clients over: start the next at once


def say(msg: str) -> None:
    """A lifecycle line on stderr (the journal) and in the log."""
    print(f"pager: {msg}", file=sys.stderr, flush=True)
    log.info("%s", msg)


async def drain(live: Callable[[], Collection], timeout: float, force: asyncio.Event) -> list:
    """Wait until no client is attached, ``timeout`` passed or ``force`` is set; returns the
    clients still attached then."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while live() and not force.is_set():
        left = deadline - loop.time()
        if left <= 0:
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(force.wait(), min(left, 0.1))
    return list(live())


def poison_unserved(uffd_fd: int, regions, name: str) -> int:
    """Poison every page of ``regions`` not resolved yet through ``uffd_fd`` (a duplicate the
    caller owns and this closes), then wake every blocked thread; returns bytes poisoned."""
    u = Userfaultfd.adopt(uffd_fd)
    total = 0
    try:
        for r in regions:
            # far memory: a page evicted while write-protected keeps a write-protect marker
            # where its entry was, which the kernel will not poison over (EEXIST, as if it
            # were there); un-protecting drops the markers (no pager tracks writes any more)
            with contextlib.suppress(UffdError):
                u.writeprotect(r.base, r.size, protect=False, dontwake=True)
            total += _poison_range(u, r.base, r.base + r.size, r.page_size, name)
            with contextlib.suppress(UffdError):
                u.wake(r.base, r.size)
    finally:
        u.close()
    return total


def _poison_range(u: Userfaultfd, pos: int, end: int, page: int, name: str) -> int:
    done = 0
    retries = 0
    while pos < end:
        try:
            n = u.poison(pos, end - pos, dontwake=True)
        except UffdExists:
            pos += page  # served already: leave it
            continue
        except UffdRetry:
            # layout events wait to be read: read them (nobody serves them any more) and retry
            retries += 1
            if retries > 1000:
                log.error("%s: the address space keeps changing; %#x-%#x not poisoned",
                          name, pos, end)
                return done
            with contextlib.suppress(UffdError):
                u.read_events(timeout=0)
            continue
        except UffdGone:  # the client exited meanwhile: no thread of it is left to block
            log.info("%s: exited; nothing left to poison", name)
            return done
        except UffdError as exc:
            log.error("%s: cannot poison %#x-%#x (%s); threads faulting there stay blocked",
                      name, pos, end, exc)
            return done
        pos += n
        done += n
    return done


def dup_or_none(fd: int) -> int | None:
    try:
        return os.dup(fd)
    except OSError:
        return None
