"""Typed userfaultfd events, decoded from the kernel's ``struct uffd_msg``.

Events are small frozen-slot dataclasses; ``match`` on their class in the handler. Fields are
plain ints (addresses are host virtual addresses in the registering process).
"""

from __future__ import annotations

from dataclasses import dataclass

from pager.uffd._uffd_cffi import lib

EVENT_PAGEFAULT: int = lib.UFFD_EVENT_PAGEFAULT
EVENT_FORK: int = lib.UFFD_EVENT_FORK
EVENT_REMAP: int = lib.UFFD_EVENT_REMAP
EVENT_REMOVE: int = lib.UFFD_EVENT_REMOVE
EVENT_UNMAP: int = lib.UFFD_EVENT_UNMAP

FLAG_WRITE: int = lib.UFFD_PAGEFAULT_FLAG_WRITE
FLAG_WP: int = lib.UFFD_PAGEFAULT_FLAG_WP
FLAG_MINOR: int = lib.UFFD_PAGEFAULT_FLAG_MINOR


@dataclass(frozen=True, slots=True)
class PageFault:
    """A thread touched a registered page: missing (neither wp nor minor), wp or minor."""

    address: int            # faulting address (page-aligned unless UFFD_FEATURE_EXACT_ADDRESS)
    write: bool             # the access was a write
    wp: bool                # write to a write-protected page (resolve with writeprotect(False))
    minor: bool             # page is in the page cache but not mapped (resolve with continue_)
    thread_id: int = 0      # faulting thread's id with UFFD_FEATURE_THREAD_ID, else 0

    @property
    def kind(self) -> str:
        return "wp" if self.wp else "minor" if self.minor else "missing"


@dataclass(frozen=True, slots=True)
class Fork:
    """The process forked; ``ufd`` is a NEW userfaultfd for the child's copy of the ranges.

    The reader owns the fd: serve it (``Userfaultfd.adopt(ufd)``) or ``os.close`` it.
    """

    ufd: int


@dataclass(frozen=True, slots=True)
class Remap:
    """mremap() moved ``length`` bytes of a registered range from ``old`` to ``new``."""

    old: int
    new: int
    length: int


@dataclass(frozen=True, slots=True)
class Remove:
    """madvise(DONTNEED/REMOVE) dropped [start, end): those pages now read as zero/empty."""

    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Unmap:
    """munmap() (or mremap shrink) removed [start, end) from the registered ranges."""

    start: int
    end: int


@dataclass(frozen=True, slots=True)
class UnknownEvent:
    """An event kind this binding does not know (a newer kernel); raw words kept."""

    event: int
    words: tuple[int, int, int]


Event = PageFault | Fork | Remap | Remove | Unmap | UnknownEvent


def decode(words: list[int], count: int) -> list[Event]:
    """Events from ``ssi_uffd_read``'s flat output: 4 words per event (see userfaultfd.py)."""
    out: list[Event] = []
    append = out.append
    for i in range(0, 4 * count, 4):
        kind = words[i]
        if kind == EVENT_PAGEFAULT:
            flags = words[i + 1]
            append(PageFault(words[i + 2], bool(flags & FLAG_WRITE), bool(flags & FLAG_WP),
                             bool(flags & FLAG_MINOR), words[i + 3]))
        elif kind == EVENT_REMOVE:
            append(Remove(words[i + 1], words[i + 2]))
        elif kind == EVENT_UNMAP:
            append(Unmap(words[i + 1], words[i + 2]))
        elif kind == EVENT_REMAP:
            append(Remap(words[i + 1], words[i + 2], words[i + 3]))
        elif kind == EVENT_FORK:
            append(Fork(words[i + 1]))
        else:
            append(UnknownEvent(kind, (words[i + 1], words[i + 2], words[i + 3])))
    return out
