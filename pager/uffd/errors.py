"""Errors of the userfaultfd binding: one hierarchy rooted in ``UffdError(OSError)``.

Each keeps the errno (``exc.errno``) and says what to do. The fault engine catches exactly the
cases that are normal results of racing with the guest: ``UffdExists`` (EEXIST: someone already
filled the page) and ``UffdRetry`` (EAGAIN: the mapping is changing, e.g. a REMOVE event is
pending; read events, then retry).
"""

from __future__ import annotations

import errno as _errno
import os


class UffdError(OSError):
    """A userfaultfd operation failed; ``errno`` says why, the message says what to do."""

    #: the failed operation ("UFFDIO_COPY", "userfaultfd(2)", ...)
    op: str = ""
    #: bytes the kernel handled before stopping (partial operations), else 0
    done: int = 0

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno, str(self.errno)) if self.errno else "?"
        return f"{self.strerror} [{name}]"


class UffdExists(UffdError):
    """EEXIST: the page is already populated (another resolver won the race) or registered."""


class UffdRetry(UffdError):
    """EAGAIN: the address space is changing (pending REMOVE/UNMAP/REMAP/FORK event).

    Read and handle the pending events, then retry the operation.
    """


class UffdInvalid(UffdError):
    """EINVAL: an argument is wrong (alignment, length, mode, feature); the message names it."""


class UffdUnsupported(UffdInvalid):
    """The running kernel lacks a requested feature, register mode or ioctl."""


class UffdGone(UffdError):
    """ESRCH / ENOENT: the process owning the memory exited, or the range is not registered."""


class UffdPermission(UffdError):
    """EPERM / EACCES: the caller may not create a userfaultfd or use a feature."""


class UffdClosed(UffdError):
    """EBADF: the userfaultfd was closed."""


class UffdFault(UffdError):
    """EFAULT: a source buffer or destination range is not mapped in this process."""


PERMISSION_HINT = (
    "allow userfaultfd for this user: run as root (or with CAP_SYS_PTRACE), or set "
    "`sysctl vm.unprivileged_userfaultfd=1`, or give the user read/write access to "
    "/dev/userfaultfd (e.g. a udev rule with GROUP=\"kvm\" MODE=\"0660\"); "
    "`ssi-pager tune check` reports these settings"
)

_CLASSES: dict[int, type[UffdError]] = {
    _errno.EEXIST: UffdExists,
    _errno.EAGAIN: UffdRetry,
    _errno.EINVAL: UffdInvalid,
    _errno.ESRCH: UffdGone,
    _errno.ENOENT: UffdGone,
    _errno.EPERM: UffdPermission,
    _errno.EACCES: UffdPermission,
    _errno.EBADF: UffdClosed,
    _errno.EFAULT: UffdFault,
}

ADVICE: dict[int, str] = {
    _errno.EEXIST: "the range is already populated; nothing to do for those pages",
    _errno.EAGAIN: "the mapping is changing: read pending events (REMOVE/UNMAP/REMAP), then retry",
    _errno.ESRCH: "the process owning this memory has exited; drop its userfaultfd",
    _errno.ENOENT: ("no registered mapping covers the range: it was unmapped, or never "
                    "registered with this userfaultfd"),
    _errno.EPERM: PERMISSION_HINT,
    _errno.EACCES: PERMISSION_HINT,
    _errno.EBADF: "the userfaultfd is closed; open a new one",
    _errno.EFAULT: "an address is not mapped in this process (source buffer or event buffer)",
    _errno.ENOMEM: "the kernel could not allocate memory (or the target process is exiting)",
    _errno.ENOSPC: "the target process is exiting or the range ran out of space",
    _errno.EBUSY: ("the range is already registered by another userfaultfd; unregister it "
                   "there first"),
    _errno.ENOTTY: "the running kernel does not know this ioctl",
}


def uffd_error(err: int, op: str, detail: str = "", *, done: int = 0,
               cls: type[UffdError] | None = None) -> UffdError:
    """The typed error for ``err`` from ``op``, with detail (e.g. which argument) and advice."""
    parts = [f"{op}: {os.strerror(err)}"]
    if detail:
        parts.append(detail)
    advice = ADVICE.get(err)
    if advice and advice not in detail:
        parts.append(advice)
    if done:
        parts.append(f"{done} bytes were done before the error")
    exc = (cls or _CLASSES.get(err, UffdError))(err, "; ".join(parts))
    exc.op, exc.done = op, done
    return exc
