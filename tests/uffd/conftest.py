"""Helpers for the binding tests: real userfaultfd, real memory, faults raised by C threads."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from pager.uffd import Event, Userfaultfd
from pager.uffd.mman import Mapping
from pager.uffd.toucher import Background, Toucher

PAGE = 4096


def serve(u: Userfaultfd, worker: Toucher | Background, handle: Callable[[Event], None],
          timeout: float = 10.0) -> list[Event]:
    """Read and handle events until ``worker`` (C threads) finishes; returns every event seen."""
    seen: list[Event] = []
    deadline = time.monotonic() + timeout
    while not worker.finished:
        if time.monotonic() > deadline:
            raise AssertionError(f"worker still blocked after {timeout}s; events: {seen[-5:]}")
        if not u.wait(0.05):
            continue
        for ev in u.read_events():
            seen.append(ev)
            handle(ev)
    # events raised just before the worker finished (none expected, but collect them)
    seen.extend(u.read_events())
    return seen


@pytest.fixture
def anon():
    m = Mapping.anonymous(64 * PAGE)
    yield m
    m.close()


@pytest.fixture
def memfd():
    m = Mapping.memfd(64 * PAGE)
    yield m
    m.close()
