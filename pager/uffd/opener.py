"""Opening a userfaultfd: the syscall first, ``/dev/userfaultfd`` when the syscall is refused;
and what the running kernel offers."""

from __future__ import annotations

import errno
import logging
import os

from pager.uffd._uffd_cffi import ffi, lib
from pager.uffd.errors import PERMISSION_HINT, uffd_error

log = logging.getLogger(__name__)


def open_raw_fd(flags: int, access: str) -> tuple[int, str]:
    """A new userfaultfd fd (no UFFDIO_API yet) and how it was opened ("syscall" or
    "/dev/userfaultfd"): the syscall first, the device when the syscall is refused (EPERM)."""
    if access not in ("auto", "syscall", "dev"):
        raise ValueError(f"access must be 'auto', 'syscall' or 'dev', not {access!r}")
    sys_err = 0
    if access in ("auto", "syscall"):
        fd = lib.ssi_uffd_open(flags)
        if fd >= 0:
            return fd, "syscall"
        sys_err = -fd
        if access == "syscall" or sys_err not in (errno.EPERM, errno.ENOSYS):
            raise uffd_error(sys_err, "userfaultfd(2)")
        log.debug("userfaultfd(2) refused (%s), trying /dev/userfaultfd", os.strerror(sys_err))
    fd = lib.ssi_uffd_open_dev(flags)
    if fd >= 0:
        return fd, "/dev/userfaultfd"
    dev_err = -fd
    detail = f"/dev/userfaultfd: {os.strerror(dev_err)}"
    if sys_err:
        detail = f"userfaultfd(2): {os.strerror(sys_err)}; " + detail
    if dev_err in (errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTTY) or sys_err:
        raise uffd_error(errno.EPERM if sys_err == errno.EPERM else dev_err,
                         "open userfaultfd", f"{detail}; {PERMISSION_HINT}")
    raise uffd_error(dev_err, "open /dev/userfaultfd", detail)


def supported_features(access: str = "auto") -> int:
    """Every feature the running kernel offers (UFFDIO_API on a throw-away userfaultfd)."""
    fd, _ = open_raw_fd(os.O_CLOEXEC | lib.UFFD_USER_MODE_ONLY, access)
    try:
        api = ffi.new("struct uffdio_api *")
        rc = lib.ssi_uffd_api(fd, 0, api)
        if rc < 0:
            raise uffd_error(-rc, "UFFDIO_API")
        return int(api.features)
    finally:
        os.close(fd)
