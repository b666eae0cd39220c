"""Errors of the tuning package."""

from __future__ import annotations


class TuningError(Exception):
    """Base of every tuning error; errno kept where an OS call failed."""
