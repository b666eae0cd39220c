"""The far-memory baseline of ``bench farmem`` (``csrc/fmbase.c``): ssi-pager's far-memory
scheme (write-protected installs, write-protect faults for dirty tracking, eviction by
write-protect, pread, store, punch, wake) in the workload's own process, in C, with the store
an array in memory and FIFO replacement: no memory node process, no Python on the path. With
``remote`` the store sits behind two TCP loopback connections (a fetch lane and a store lane,
served by two threads of this process), as a memory node on the same host would; with
``all_dirty`` there is no dirty tracking (pages installed writable, every victim written back).
It bounds what a userspace pager of this scheme can do on the host it runs on."""

from __future__ import annotations

from pager.uffd._uffd_cffi import ffi, lib
from pager.uffd.binding import Userfaultfd
from pager.uffd.errors import uffd_error

PAGE = 4096


class FarMemoryBaseline:
    """Serve ``npages`` pages at ``base`` (offset 0 of ``memfd``, mapped shared) under
    ``limit_pages`` resident pages until `stop`. ``poll_us``: every reader (the fault thread on
    the userfaultfd, both ends of the store's connections) polls that long before it blocks,
    as ssi-pager's lanes do by default."""

    def __init__(self, base: int, npages: int, memfd: int, limit_pages: int, *,
                 poll_us: int = 50, batch: int = 256, remote: bool = False,
                 all_dirty: bool = False) -> None:
        self.uffd = Userfaultfd()
        self.uffd.register(base, npages * PAGE, missing=True, wp=True)
        b = self._b = ffi.new("struct ssi_fmb *")
        b.base, b.npages, b.uffd, b.memfd = base, npages, self.uffd.fileno(), memfd
        b.limit_pages, b.poll_us, b.batch = limit_pages, poll_us, batch
        b.remote, b.all_dirty = int(remote), int(all_dirty)
        rc = lib.ssi_fmb_start(b)
        if rc < 0:
            self.uffd.close()
            raise uffd_error(-rc, "ssi_fmb_start", "starting the far-memory baseline")

    def stop(self) -> dict:
        """Stop serving (the memory stays registered: touch it no more); the counters."""
        lib.ssi_fmb_stop(self._b)
        b = self._b
        if b.error:
            raise uffd_error(b.error, "far-memory baseline", "serving faults")
        return {"missing": b.missing, "wp_faults": b.wp, "evicted": b.evicted,
                "written_back": b.written_back, "waits": b.waits}
