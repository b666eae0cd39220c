"""Errors of the transport package; every one says what to do about it."""

from __future__ import annotations


class TransportError(Exception):
    """Base of every transport error."""
