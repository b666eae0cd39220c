"""Errors of the tuning package."""

from __future__ import annotations


class TuningError(Exception):
    """Base of every tuning error; errno kept where an OS call failed."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class KnobWriteError(TuningError):
    """Writing a sysctl, sysfs file, device node or config file failed."""


class StateError(TuningError):
    """The tune state file (what `apply` changed) is missing, unreadable or malformed."""


class HugePagesError(TuningError):
    """The hugetlb pool cannot hold the huge pages asked for."""
