"""userfaultfd for Python: a cffi (API mode) binding and a small Pythonic layer.

    from pager.uffd import Userfaultfd, PageFault, Remove
    with Userfaultfd(features=["thread_id", "event_remove"]) as u:
        u.register(addr, length, missing=True)
        for ev in u.read_events():               # many uffd_msg per read(); [] if none pending
            match ev:
                case PageFault(address=a): u.copy(a - a % PAGE_SIZE, page_bytes)
                case Remove(start=s, end=e): ...

Modules: ``binding`` (Userfaultfd, Feature, Ioctl, RawEvents), ``events`` (typed events),
``errors`` (UffdError tree), ``toucher`` (C threads that fault without the GIL), ``mman``
(mappings at known addresses), ``check`` / ``bench`` (the CLI's ``check`` and ``bench uffd``).

Fast path for a fault loop (no per-event objects, no allocation per call)::

    raw = RawEvents(64)
    n = u.read_raw(raw)                          # 0 when nothing is pending
    for i in range(n):
        kind, flags, addr, tid = raw.words[4*i:4*i+4]   # kind == EVENT_PAGEFAULT, ...
        done = u.copy(addr & mask, src_address, 65536)  # int src: no buffer conversion

``copy``/``zeropage``/``continue_``/``poison``/``move`` return bytes done: a result below the
length asked is a partial operation (reported, never hidden); nothing done raises
``UffdExists`` (EEXIST) or ``UffdRetry`` (EAGAIN) and friends.
"""

from pager.uffd.binding import (
    PAGE_SIZE,
    Feature,
    Ioctl,
    RawEvents,
    Userfaultfd,
    feature_mask,
)
from pager.uffd.buffers import address_of
from pager.uffd.errors import (
    UffdClosed,
    UffdError,
    UffdExists,
    UffdFault,
    UffdGone,
    UffdInvalid,
    UffdPermission,
    UffdRetry,
    UffdUnsupported,
)
from pager.uffd.events import (
    EVENT_FORK,
    EVENT_PAGEFAULT,
    EVENT_REMAP,
    EVENT_REMOVE,
    EVENT_UNMAP,
    Event,
    Fork,
    PageFault,
    Remap,
    Remove,
    UnknownEvent,
    Unmap,
)
from pager.uffd.opener import supported_features

__all__ = [
    "EVENT_FORK", "EVENT_PAGEFAULT", "EVENT_REMAP", "EVENT_REMOVE", "EVENT_UNMAP", "PAGE_SIZE",
    "Event", "Feature", "Fork", "Ioctl", "PageFault", "RawEvents", "Remap", "Remove",
    "UffdClosed", "UffdError", "UffdExists", "UffdFault", "UffdGone", "UffdInvalid",
    "UffdPermission", "UffdRetry", "UffdUnsupported", "UnknownEvent", "Unmap", "Userfaultfd",
    "address_of", "feature_mask", "supported_features",
]
