"""Errors of the pager package (engine, handoff, serve, vm).

The userfaultfd binding has its own hierarchy (`pager.uffd.errors.UffdError`), the transport
its own (`transport.errors.TransportError`); this one covers the pager service itself.
"""

from __future__ import annotations


class PagerError(Exception):
    """Base of every pager-service error; the message says what to do."""


class ConfigError(PagerError):
    """A command line, config or environment value is wrong or unreadable."""


class HandoffError(PagerError):
    """A client's handshake (regions JSON + uffd) was malformed or incomplete."""


class FaultError(PagerError):
    """A fault could not be served (source failed after retries, range unknown)."""


class VmError(PagerError):
    """Starting, suspending or resuming a QEMU guest failed."""


class ChildError(PagerError):
    """A process started by a tool (a bench's memory node or pager) did not come up."""
