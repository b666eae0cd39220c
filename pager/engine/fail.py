"""How a client's fault that cannot be served ends (``FailMixin``, part of ``ClientPager``):
the page is poisoned (UFFDIO_POISON), so the client gets SIGBUS there, never wrong data or a
silent hang; and a client whose space a newer owner holds (fencing) is served no page from
then on."""

from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING

from pager.core.region import PAGE_SIZE
from pager.uffd.errors import UffdError
from pager.uffd.mman import data_ranges

if TYPE_CHECKING:
    from pager.engine.client import ClientPager

log = logging.getLogger(__name__)


class FailMixin:
    """Poisoning and fencing, part of ``ClientPager``."""

    def fence(self: ClientPager, why: str) -> None:
        """A newer owner holds this client's space (a node refused this pager's epoch): no
        page is fetched or stored for it from now on. Its missing pages are poisoned as it
        faults on them (SIGBUS), its evictor stops (the limit is no longer held), and what
        it has resident stays: nothing the guest wrote is dropped here."""
        if self.fenced is not None:
            return
        self.fenced = why
        self.error = f"fenced: {why}"
        log.error("%s (pid %d): its space is owned by a newer pager now (%s): no page is "
                  "fetched or written back for it any more; it gets SIGBUS at the next page "
                  "it does not have", self.name, self.pid, why)
        if self.evictor is not None:
            self.evictor.kick()
        with self.fm_lock:
            self.fm_lock.notify_all()  # a fault waiting for room goes on (over the limit)

    def _fail(self: ClientPager, addr: int, why: str) -> None:
        """A fault that cannot be served: log, remember, poison the page (client: SIGBUS)."""
        r = self.state.regions.find(addr)
        size = r.page_size if r is not None else PAGE_SIZE
        page = r.page(addr) if r is not None else addr - addr % PAGE_SIZE
        self.error = f"fault at {page:#x} not served: {why}"
        log.error("%s (pid %d): %s; the client gets SIGBUS there", self.name, self.pid,
                  self.error)
        try:
            self._poison(page, size)
        except Exception as exc:
            log.error("%s: cannot poison %#x (%s); the faulting thread stays blocked",
                      self.name, page, exc)

    def _poison(self: ClientPager, page: int, size: int) -> None:
        """UFFDIO_POISON one page. A page punched while write-protected (far memory) keeps a
        write-protect marker where its entry was, and the kernel will not poison over it: the
        marker is dropped first (un-protecting a marker clears it), if the memfd holds no
        page there. A page installed meanwhile is woken instead: the thread finds it there."""
        try:
            self.uffd.poison(page, size)
            return
        except UffdError as exc:
            if exc.errno != errno.EEXIST:
                raise
        r = self.state.regions.find(page)
        if self.memfd is None or r is None or not r.memfd or any(
                data_ranges(self.memfd, r.gpa(page) + size, r.gpa(page))):
            self.uffd.wake(page, size)
            return
        self.uffd.writeprotect(page, size, protect=False, dontwake=True)
        try:
            self.uffd.poison(page, size)
        except UffdError as exc:
            if exc.errno != errno.EEXIST:
                raise
            self.uffd.wake(page, size)
