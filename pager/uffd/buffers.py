"""Addresses of Python buffers for the C calls, and keeping their memory in place meanwhile."""

from __future__ import annotations

from pager.uffd._uffd_cffi import ffi


def address_of(buffer) -> tuple[object, int]:
    """``(keepalive, address)`` of any writable or read-only buffer, without copying.

    Keep ``keepalive`` referenced while the address is in use.
    """
    if isinstance(buffer, int):
        return None, buffer
    keep, addr, _ = pin(buffer)
    return keep, addr


def pin(buffer) -> tuple[object, int, int]:
    """``(keepalive, address, nbytes)`` of a contiguous buffer; the keepalive holds the
    memory in place (a bytearray cannot be resized, an mmap not closed) while it lives.

    For a memoryview the keepalive pins the object that owns the memory (``view.obj``), never
    the memoryview itself: an exported memoryview must not end up in cyclic garbage with its
    exporter. CPython 3.11 (and 3.12 before 3.12.7; gh-77894) may clear such a memoryview
    first: it drops the managed buffer while the export is alive (the bytes can be freed under
    the C code using them), then dereferences NULL when the export is released. The fault
    engine's readahead install (a memoryview and its keepalive in a frame that an exception's
    traceback kept in a reference cycle) crashed the pager in garbage collection that way.
    """
    if type(buffer) is not memoryview:
        keep = ffi.from_buffer(buffer)
        return keep, int(ffi.cast("uintptr_t", keep)), len(keep)
    probe = ffi.from_buffer(buffer)  # the view's own address and size, released at once
    try:
        addr, nbytes = int(ffi.cast("uintptr_t", probe)), len(probe)
    finally:
        ffi.release(probe)
    owner = buffer.obj
    while type(owner) is memoryview:
        owner = owner.obj
    try:
        keep = ffi.from_buffer(owner)
    except TypeError:  # the owner exports no buffer itself: pin the view (nothing better)
        keep = ffi.from_buffer(buffer)
        return keep, int(ffi.cast("uintptr_t", keep)), len(keep)
    base = int(ffi.cast("uintptr_t", keep))
    if not base <= addr <= addr + nbytes <= base + len(keep):  # an exporter's own layout
        ffi.release(keep)
        keep = ffi.from_buffer(buffer)
    return keep, addr, nbytes
