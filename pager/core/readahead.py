"""Sequential-stream detection for readahead (pure, no I/O).

Readahead pays off only for a stream of faults on consecutive chunks; on random access it only
costs (fetches nobody reads, and a fault the fast path could have served alone). So nothing is
read ahead until a stream is confirmed: ``min_hits`` faults each on the chunk after the
previous one (or inside what was read ahead for it). A confirmed stream's window doubles on
every further hit up to ``max_chunks``. Several streams (vCPUs, threads) are followed at once,
``max_streams`` of them, least recently used dropped first: a fault that continues none of them
starts a new candidate with no window. A candidate not continued within ``CONFIRM_WITHIN``
faults, or a stream within ``PATIENCE`` (more for a wide window), is dropped with its window,
so chunks a random access pattern happens to touch in order now and then do not add up to a
stream.

The C fault loop serves faults Python never sees; it leaves a fault to Python when it falls on
the chunk right after one it served lately (``follows``), and on each stream's next chunk
(``watch``), so a stream is seen from its second fault on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

NEVER = 1 << 60  # ``min_hits`` of a detector that never reads ahead
CONFIRM_WITHIN = 8  # faults within which a candidate stream must be continued
PATIENCE = 64  # faults a confirmed stream may go without one of its own before it is dropped
PATIENCE_PER_CHUNK = 16  # ... and this many more per chunk of its window


@dataclass(slots=True)
class Stream:
    """One sequential stream of a region: chunk indexes ``first`` .. ``last`` were faulted on,
    chunks up to ``ahead`` were requested (-1: none)."""

    base: int  # the region's base address
    nchunks: int  # chunks in the region
    first: int
    last: int
    hits: int = 0
    window: int = 0
    ahead: int = -1
    seen: int = 0  # the fault clock when the stream was last faulted on

    def stale(self, clock: int) -> bool:
        """Not continued for too many faults (of any stream, or none): forgotten. A candidate
        must go on at once; a stream read far ahead is given longer (its next fault comes once
        the window is used)."""
        if not self.window:
            return clock - self.seen > CONFIRM_WITHIN
        return clock - self.seen > PATIENCE + PATIENCE_PER_CHUNK * self.window

    @property
    def next(self) -> int:
        """The chunk whose fault continues the stream (past everything requested)."""
        return max(self.last, self.ahead) + 1


@dataclass
class Readahead:
    """Per-stream detector: which chunks to read ahead after a fault (see the module doc)."""

    min_hits: int = 2
    max_chunks: int = 32
    max_streams: int = 4
    streams: list[Stream] = field(default_factory=list)  # least recently used first

    @property
    def active(self) -> bool:
        return self.min_hits < NEVER and self.max_streams > 0

    def fresh(self) -> Readahead:
        """A detector with the same settings and no streams (a forked child's)."""
        return Readahead(self.min_hits, self.max_chunks, self.max_streams)

    def on_fault(self, base: int, index: int, nchunks: int, follows: bool = False,
                 clock: int = 0) -> range:
        """Chunk indexes of ``base``'s region to read ahead after a fault at chunk ``index``;
        ``follows``: the chunk before it was faulted on just before (the C loop served it);
        ``clock``: faults so far (all of them, wherever served), to age streams out."""
        if not self.active:
            return range(0)
        streams = self.streams
        for k in range(len(streams) - 1, -1, -1):
            s = streams[k]
            if s.stale(clock):
                del streams[k]
                continue
            if s.base != base:
                continue
            hit = s.last < index <= s.next
            # else a fault behind the stream's front (another thread on it): nothing new
            if not hit and not s.first <= index <= s.last:
                continue
            if s is not streams[-1]:
                streams.remove(s)
                streams.append(s)
            s.seen = clock
            if not hit:
                return range(0)
            s.hits += 1
            s.last = index
            return self._ahead(s, index)
        follows = follows and index > 0
        s = Stream(base, nchunks, index - follows, index, hits=int(follows), seen=clock)
        streams.append(s)
        if len(streams) > self.max_streams:
            del streams[0]
        return self._ahead(s, index)

    def _ahead(self, s: Stream, index: int) -> range:
        if s.hits < self.min_hits:
            return range(0)
        s.window = min(self.max_chunks, max(2, s.window * 2))
        first = max(index + 1, s.ahead + 1)
        stop = min(s.nchunks, index + 1 + s.window)
        if first >= stop:
            return range(0)
        s.ahead = stop - 1
        return range(first, stop)

    def watch(self, clock: int = 0) -> list[tuple[int, int]]:
        """``(region base, chunk index)`` of the next chunk of each stream seen going on (a
        fault there must reach the detector: the C loop leaves it to Python); stale streams
        are dropped here."""
        self.streams = [s for s in self.streams if not s.stale(clock)]
        return [(s.base, s.next) for s in self.streams if s.hits and s.next < s.nchunks]
