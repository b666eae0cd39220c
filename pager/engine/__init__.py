"""The fault engine: one lean fault thread per client uffd, Python as the control plane.

Modules: ``engine`` (``FaultEngine``: source, clients, totals), ``client`` (``ClientPager``: the
per-client fault thread, its event loop and the fault policy: backoff, poisoning), ``install``
(installs through the one C installer, residency reported to the client state), ``readahead``
(the readahead lane), ``prefetch`` (working-set record and replay: fetched on a helper thread,
installed by the fault thread), ``cloop`` (glue to the C fault loop), ``evict`` (far memory: the
evictor thread of a client under a resident limit), ``dirty`` (far memory: the fault thread's
side, write-protect dirty tracking, and the checks and setup of such a client), ``fail``
(a fault that cannot be served: poisoning; a client whose space a newer owner holds), ``stats``
(``EngineStats``).

Shape (decided from measurements, see README "Design"): asyncio scheduling per fault costs more
than the fault, so each client gets a plain thread that blocks in poll(2), reads up to 64 uffd
events per read(2), asks the client state (``pager.core.state``) what to do for the fault's
kind (missing, write-protect, minor) and does it: fetch the chunk and install it through the
one C installer (``ssi_install``: UFFDIO_COPY, UFFDIO_ZEROPAGE, EEXIST), zero fill, unprotect
or continue, all through blocking calls that release the GIL. Every installed chunk is reported
to the state, which keeps the exact resident set. The uvloop loop (handoff
server, metrics) stays idle on the fast path. A second thread per client, the *readahead lane*,
fetches chunks ahead of sequential streams on its own connection; the fault thread installs
what it fetched only when no fault is waiting, so readahead never delays a fault. All ioctls on
a client's uffd come from its fault thread, in event order, which is what makes REMOVE safe:

Kernel rules this code relies on (linux/fs/userfaultfd.c, Documentation/admin-guide/mm/
userfaultfd.rst):
- UFFDIO_COPY / ZEROPAGE fail with EEXIST when a page is already there: someone (readahead, a
  previous fault) filled it; done, but no waiter was woken, so UFFDIO_WAKE the range.
- While a non-cooperative event (REMOVE, UNMAP, REMAP, FORK) is queued and not yet read, every
  ioctl on the uffd fails with EAGAIN (``mmap_changing``): defer the fault, read the events,
  retry. A REMOVE is read *before* madvise zaps the pages, so data fetched before it must never
  be installed after it into removed pages: removed ranges are checked at install time, by the
  thread that reads the events.
- UFFDIO_COPY fails with ESRCH once the client's mm is gone (process exited): the client ends.
- Events of a forked child arrive on the new uffd the FORK event carries.

The C fast path (``c_loop``, default on; ``SSI_PAGER_C_LOOP=0`` or ``serve --no-c-loop`` turn it
off): measured, the Python loop above adds ~5 us to a ~11 us remote 4 KiB fault, so for sources
whose lanes expose a socket (memory node), the fault thread hands the per-fault loop to C
(``pager.uffd.faultloop``, GIL released): poll, read a batch, fetch each ordinary fault's
chunk, ``ssi_install`` it (the same installer), logging each installed chunk in a ring. C
returns every event it does not serve (layout events, WP/MINOR faults, faults in REMOVE'd or
read-ahead chunks or outside the table, failed installs, and with readahead on a fault on the
chunk after one C served lately or on a stream's next chunk, for the stream detector: see
``readahead``) together with the rest of the batch, in order, to the Python path below, and
any fetch error after dropping the connection, so retries, poisoning, REMOVE and fork semantics
stay in Python. Its counters are folded into ``EngineStats`` and its residency ring into the
state whenever it returns (at least every 50 ms, and when the ring is too full for another
chunk); ``ClientPager.quiesce`` waits for that. A fault waiting when C returned is left to C
when it runs again next. Forked children use the Python loop.

Failure policy: a fetch that fails is retried with exponential backoff (10 ms .. 1 s) until
``fetch_timeout``; a page a node holds is never zero-filled instead. A fault that cannot be
served is logged, counted (``failed_faults``) and the page is poisoned (UFFDIO_POISON), so the
client gets SIGBUS at that address rather than wrong data or a silent hang.
"""

from pager.engine.client import ClientPager
from pager.engine.engine import DEFAULT_CHUNK, DEFAULT_READAHEAD, RA_BATCH, FaultEngine
from pager.engine.stats import LATENCY_BUCKETS_US, EngineStats

__all__ = ["DEFAULT_CHUNK", "DEFAULT_READAHEAD", "LATENCY_BUCKETS_US", "RA_BATCH", "ClientPager",
           "EngineStats", "FaultEngine"]
