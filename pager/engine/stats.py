"""The fault engine's counters.

``EngineStats`` fields (plain ints, bumped by the fault threads, summed at scrape time by
pager.metrics):

================== ========================================================================
faults             page-fault events read (``faults_write`` of them writes, ``faults_wp``,
                   ``faults_minor`` by kind)
served_fetch       faults resolved by fetching their chunk from the source
served_zero        faults in REMOVE'd ranges resolved with zero pages (nothing fetched)
served_wait        faults resolved by a readahead chunk that was in flight (readahead hit)
served_dup         faults in a chunk already installed in the same batch / EEXIST
unknown_faults     faults outside every region (poisoned)
failed_faults      faults that could not be served (fetch failed after retries; poisoned)
fetched_bytes      bytes fetched from the source (faults + readahead)
copied_bytes       bytes installed with UFFDIO_COPY
zero_pages         pages installed with UFFDIO_ZEROPAGE (never written, or removed)
served_unprotect   write-protect faults resolved by clearing the protection (no dirty tracking)
served_continue    minor faults resolved with UFFDIO_CONTINUE
written_back_bytes bytes of dirty pages written back to the node by the evictor (far memory);
                   ``c_written_back_bytes`` of them in C (a batch at once)
evictions          units evicted (``evicted_bytes``); ``clean_drops`` of them clean, dropped
                   without a transfer; ``evict_latency_sum_us``: time spent evicting them
                   (write-protect .. wake, per batch), ``evict_latency_count`` units
wp_dirty           write-protect faults that marked a unit dirty (far memory); ``wp_stale``:
                   write-protect faults on a unit evicted meanwhile (woken, fault again)
reprotects         dirty units write-protected again by the CLOCK hand (reference sampling)
evict_waits        faults on a unit being evicted, resolved by the evictor's wake
full_waits         faults that waited for the evictor to make room under the limit
store_errors       failed write-back attempts (retried; nothing is punched before the ack)
holes_kept         dirty stretches written back around pages never installed (their node copy
                   is kept, not overwritten with zeros)
eexist             UFFDIO_COPY/ZEROPAGE that found pages present
eagain             faults deferred by EAGAIN (a layout event was pending)
fetch_errors       failed fetch attempts; ``retries`` of them retried
readahead_chunks   chunks requested by the readahead detector
readahead_installed  readahead chunks installed
readahead_wasted   readahead chunks dropped (unmapped, failed, client gone) or fully present
removes / unmaps / remaps / forks   layout events handled
latency_buckets    fault service time histogram (event read -> installed), counts per bucket
                   with upper bounds ``LATENCY_BUCKETS_US`` (last = +Inf); ``latency_sum_us``,
                   ``latency_count``
prefetch_bytes     bytes a working-set replay installed ahead of faults
prefetch_wasted    replay bytes dropped (layout changed, client gone, install failed)
prefetch_yields    times a replay batch stopped half way because a fault was waiting
ws_recorded_pages  pages of working sets recorded (stored on the memory node)
inflight           chunks being fetched right now (gauge)
c_faults           faults served by the C loop (also counted in ``faults`` and ``served_*``);
                   ``c_wp_dirty`` of them write-protect faults (also in ``wp_dirty``)
================== ========================================================================
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field, fields

LATENCY_BUCKETS_US = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 25_000,
                      100_000, 1_000_000)


@dataclass
class EngineStats:
    """Plain integer counters (see the module docstring for each field)."""

    faults: int = 0
    faults_write: int = 0
    faults_wp: int = 0
    faults_minor: int = 0
    served_fetch: int = 0
    served_zero: int = 0
    served_wait: int = 0
    served_dup: int = 0
    served_unprotect: int = 0
    served_continue: int = 0
    unknown_faults: int = 0
    failed_faults: int = 0
    fetched_bytes: int = 0
    copied_bytes: int = 0
    zero_pages: int = 0
    eexist: int = 0
    written_back_bytes: int = 0
    eagain: int = 0
    fetch_errors: int = 0
    retries: int = 0
    readahead_chunks: int = 0
    readahead_installed: int = 0
    readahead_wasted: int = 0
    removes: int = 0
    unmaps: int = 0
    remaps: int = 0
    forks: int = 0
    prefetch_bytes: int = 0
    prefetch_wasted: int = 0
    prefetch_yields: int = 0
    ws_recorded_pages: int = 0
    inflight: int = 0
    c_faults: int = 0
    c_wp_dirty: int = 0
    c_written_back_bytes: int = 0
    evictions: int = 0
    evicted_bytes: int = 0
    clean_drops: int = 0
    evict_latency_sum_us: int = 0
    evict_latency_count: int = 0
    wp_dirty: int = 0
    wp_stale: int = 0
    reprotects: int = 0
    evict_waits: int = 0
    full_waits: int = 0
    store_errors: int = 0
    holes_kept: int = 0
    latency_sum_us: int = 0
    latency_count: int = 0
    latency_buckets: list[int] = field(
        default_factory=lambda: [0] * (len(LATENCY_BUCKETS_US) + 1))

    def observe_us(self, us: int) -> None:
        self.latency_buckets[bisect.bisect_left(LATENCY_BUCKETS_US, us)] += 1
        self.latency_sum_us += us
        self.latency_count += 1

    def observe_evict_us(self, us: int, units: int) -> None:
        """A batch of ``units`` evicted in ``us`` µs (write-protect .. wake)."""
        self.evict_latency_sum_us += us
        self.evict_latency_count += units

    def add(self, other: EngineStats) -> None:
        for f in fields(self):
            if f.name == "latency_buckets":
                self.latency_buckets = [a + b for a, b in
                                        zip(self.latency_buckets, other.latency_buckets,
                                            strict=True)]
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, int | list[int]]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def latency_quantile_us(self, q: float) -> float:
        """Upper bound of the bucket holding quantile ``q`` (coarse; for summaries)."""
        total = sum(self.latency_buckets)
        if not total:
            return 0.0
        seen = 0
        for i, n in enumerate(self.latency_buckets):
            seen += n
            if seen >= q * total:
                return float(LATENCY_BUCKETS_US[i]) if i < len(LATENCY_BUCKETS_US) else 1e7
        return 1e7
