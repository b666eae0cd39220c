"""Far memory bookkeeping for one client: what is resident, clean or dirty, and what to evict
next. No I/O: the fault thread and the evictor (``pager.engine.evict``) feed it, holding the
client's far-memory lock, and do the syscalls.

Unit: the fault path's chunk (aligned to the region base, like ``Region.chunk``). A unit is
fetched whole and evicted whole, so a fetch and an eviction never overlap part of a unit: a
unit being fetched is never picked, and a missing fault in a unit being evicted is left to the
evictor's UFFDIO_WAKE (the writer then faults again, after the punch, and fetches the stored
copy).

Clean and dirty: every unit is installed write-protected (``UFFDIO_COPY_MODE_WP``); the first
write raises a write-protect fault, :meth:`FarMemory.on_write` marks the unit dirty and the
fault thread clears the protection. A clean unit is identical to the node's copy and is dropped
without any transfer; a dirty one is written back first. A unit whose history is unknown (found
resident by a restarted pager, or installed by someone else: EEXIST) is dirty.

Replacement policy (the kernel gives a userspace pager no accessed bits): CLOCK, with the
reference count fed by what userspace can see:

- a write-protect fault: +1 for the first write after the unit's fetch; the full count
  (``MAX_REF``) for a write to a unit the hand protected again (re-use across a whole turn);
- a *ghost hit*: a missing fault on a unit evicted recently (the ghost list remembers as many
  evicted units as the limit holds) starts at 2: the working set came back, keep it longer;
- a first fetch starts at 0: a unit touched once (a scan, the cold part of a skewed workload)
  leaves at the hand's next pass, FIFO among themselves.
- sampled re-protection: when the hand takes the last reference of a dirty, unprotected unit,
  it asks the evictor to write-protect the unit again (still dirty): a write before the hand's
  next turn is seen and gives the full count, so a unit written all the time costs one
  write-protect fault every ``MAX_REF`` turns, not one a turn. Reads of resident units remain
  invisible; the ghost list is what catches a read-mostly hot set (its units come back and are
  kept).

The hand gives a unit with a reference a second chance (count - 1, to the back of the queue);
units busy (being fetched or evicted) are skipped.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass

IDLE, FETCHING, EVICTING = 0, 1, 2
MAX_REF = 3
POLICIES = ("clock", "fifo")


@dataclass(slots=True)
class Unit:
    """One resident unit."""

    length: int
    dirty: bool = False
    ref: int = 0
    protected: bool = True  # write-protected in the guest's mm: its next write faults
    busy: int = IDLE
    sampled: bool = False  # protected again by the hand: its next write proves re-use


@dataclass(frozen=True, slots=True)
class Victim:
    """A unit picked for eviction (marked EVICTING, already write-protected by the caller)."""

    start: int
    length: int
    dirty: bool


def _referenced(u: Unit) -> None:
    """A write-protect fault on ``u``: dirty and unprotected from now on, and a reference.
    A write after the hand protected the unit again shows re-use across a whole turn of the
    hand: the full count (the hand then samples it only every ``MAX_REF`` turns); a first
    write after its fetch (a read-modify-write of a unit touched once): one."""
    u.dirty = True
    u.protected = False
    u.ref = MAX_REF if u.sampled else min(MAX_REF, u.ref + 1)
    u.sampled = False


class FarMemory:
    """Resident units of one client and the CLOCK over them (see the module docstring)."""

    def __init__(self, limit: int, unit: int, *, low: float = 0.85, high: float = 0.95,
                 policy: str = "clock") -> None:
        if policy not in POLICIES:
            raise ValueError(f"eviction policy {policy!r}: expected one of {POLICIES}")
        self.policy = policy  # "fifo": references ignored (the baseline CLOCK is measured against)
        self.unit = unit
        self._fractions = (low, high)
        self.set_limit(limit)
        self.units: collections.OrderedDict[int, Unit] = collections.OrderedDict()
        self.ghosts: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.fetching: set[int] = set()
        self.bytes = 0  # resident bytes (whole units)
        self.ghost_hits = 0

    def set_limit(self, limit: int) -> None:
        """Resident bytes allowed; the evictor runs from ``high`` down to ``low``."""
        if limit < 4 * self.unit:
            raise ValueError(f"resident limit {limit} is below 4 units of {self.unit} bytes")
        self.limit = limit
        self.low = int(limit * self._fractions[0])
        self.high = int(limit * self._fractions[1])

    # -- the fault thread ----------------------------------------------------------------
    def begin_fetch(self, start: int) -> bool:
        """A missing fault in unit ``start``: False if it is being evicted (the evictor wakes
        the faulting thread after the punch); otherwise the unit is marked as being fetched
        (never picked until :meth:`end_fetch`)."""
        u = self.units.get(start)
        if u is not None and u.busy == EVICTING:
            return False
        self.fetching.add(start)
        return True

    def end_fetch(self, start: int) -> None:
        self.fetching.discard(start)

    def installed(self, start: int, length: int, known: bool) -> None:
        """Unit ``start`` is resident; ``known``: installed write-protected by this pager from
        the node's copy (else: dirty, its content is not known to be on the node)."""
        u = self.units.get(start)
        if u is None:
            u = self.units[start] = Unit(length)
            self.bytes += length
            if self.ghosts.pop(start, 0) is None:
                u.ref = 2
                self.ghost_hits += 1
        if not known:
            u.dirty = True
            u.protected = False

    def on_write(self, start: int, length: int) -> bool:
        """A write-protect fault in unit ``start``: True to clear the protection now (the unit
        is dirty from here on), False if the unit is being evicted (the evictor wakes)."""
        u = self.units.get(start)
        if u is None:  # resident but not known (a restarted pager): dirty from now on
            self.units[start] = Unit(length, dirty=True, protected=False)
            self.bytes += length
            return True
        if u.busy == EVICTING:
            return False
        _referenced(u)
        return True

    def written(self, start: int) -> bool:
        """The C loop cleared unit ``start``'s protection for a write: dirty (also while it
        is being evicted: the evictor reads this before it decides what is clean). False if
        the unit is not resident (the fault was older than its eviction)."""
        u = self.units.get(start)
        if u is None:
            return False
        _referenced(u)
        return True

    def forget(self, start: int, end: int, starts: Sequence[int] | None = None) -> None:
        """Units inside ``[start, end)`` are gone (REMOVE, UNMAP): no longer resident.
        ``starts``: where a unit there can start (each region's chunks in the range), looked up
        one by one when there are fewer of them than resident units: a REMOVE of a few pages
        then costs a few lookups, not a pass over every resident unit."""
        units = self.units
        keys = starts if starts is not None and len(starts) < len(units) else list(units)
        for key in keys:
            u = units.get(key)
            if u is not None and start <= key and key + u.length <= end:
                del units[key]
                self.bytes -= u.length

    def move(self, old: int, new: int, length: int) -> None:
        """mremap: units of ``[old, old+length)`` now live at ``new``."""
        self.forget(new, new + length)
        for key in [k for k in self.units if old <= k < old + length]:
            self.units[new + (key - old)] = self.units.pop(key)

    # -- the evictor ----------------------------------------------------------------------
    def excess(self) -> int:
        """Bytes to evict now: down to the low watermark once above the high one."""
        return self.bytes - self.low if self.bytes > self.high else 0

    def full(self, length: int) -> bool:
        """Would installing ``length`` more bytes exceed the limit?"""
        return self.bytes + length > self.limit

    def pick(self, want: int) -> tuple[list[Victim], list[tuple[int, int]]]:
        """Up to ``want`` bytes of victims (marked EVICTING; the caller write-protects them),
        and the dirty units to write-protect again as a reference sample."""
        victims: list[Victim] = []
        reprotect: list[tuple[int, int]] = []
        got = 0
        units = self.units
        for _ in range(2 * len(units) + 1):
            if got >= want or not units:
                break
            key, u = next(iter(units.items()))
            units.move_to_end(key)
            if u.busy or key in self.fetching:
                continue
            if u.ref and self.policy == "clock":
                u.ref -= 1
                if not u.ref and u.dirty and not u.protected:
                    u.protected = u.sampled = True
                    reprotect.append((key, u.length))
                continue
            u.busy = EVICTING
            victims.append(Victim(key, u.length, u.dirty))
            got += u.length
        return victims, reprotect

    def abort(self, v: Victim, dirty: bool = True) -> None:
        """The eviction of ``v`` did not happen (a layout event pending, a store failed while
        closing): the unit stays resident (dirty: its protection is not known to hold)."""
        u = self.units.get(v.start)
        if u is not None:
            u.busy = IDLE
            u.dirty = u.dirty or dirty
            u.protected = u.protected and not dirty

    def evicted(self, v: Victim) -> None:
        """``v`` is on the node and punched: not resident, remembered as a ghost."""
        u = self.units.pop(v.start, None)
        if u is not None:
            self.bytes -= u.length
        self.ghosts[v.start] = None
        while len(self.ghosts) > max(1, self.limit // self.unit):
            self.ghosts.popitem(last=False)

    def dirty_bytes(self) -> int:
        return sum(u.length for u in self.units.values() if u.dirty)
