"""The hugetlb pool (``vm.nr_hugepages``): what guests on 2 MiB pages (Firecracker
``huge_pages: "2M"``, QEMU ``memory-backend-memfd,hugetlb=on`` or ``-mem-path`` on hugetlbfs)
draw their RAM from.

`pool(root)` reads it; `reserved(count)` makes sure ``count`` more pages are free while a block
runs and gives the pool back after (tests, `ssi-pager vm` when asked to); `pages_for(bytes)`
converts a RAM size. The persistent setting is the `tune` knob (tuning.knobs.HugePages).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

from tuning import sysfs
from tuning.errors import HugePagesError, KnobWriteError

log = logging.getLogger(__name__)

SYSCTL = "vm.nr_hugepages"
MEMINFO = "proc/meminfo"


@dataclass(frozen=True)
class Pool:
    total: int       # pages in the pool (vm.nr_hugepages reads this)
    free: int        # of which not in use
    page_size: int   # bytes (the default huge page size)
    surplus: int = 0  # of which in use beyond the persistent pool (freed when released)


def pool(root: str | os.PathLike[str] = "/") -> Pool | None:
    """The default-size hugetlb pool, or None when the kernel has none."""
    text = sysfs.read_file(root, MEMINFO)
    if text is None:
        return None
    info = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if rest.split():
            info[key] = int(rest.split()[0])
    if "HugePages_Total" not in info or "Hugepagesize" not in info:
        return None
    return Pool(info["HugePages_Total"], info.get("HugePages_Free", 0),
                info["Hugepagesize"] * 1024, info.get("HugePages_Surp", 0))


def pages_for(nbytes: int, page_size: int) -> int:
    return -(-nbytes // page_size)


@contextlib.contextmanager
def reserved(count: int, root: str | os.PathLike[str] = "/") -> Iterator[Pool]:
    """At least ``count`` free huge pages while the block runs (vm.nr_hugepages raised as
    needed, lowered again by as much after: other users' reservations in between are kept).
    HugePagesError when the kernel cannot.

    Surplus pages (still in use after an earlier block lowered the pool under them) become
    persistent when the pool is raised; they are given back too, or each block that starts
    while an earlier one's memory is still mapped would leave that many pages reserved."""
    before = pool(root)
    if before is None:
        raise HugePagesError("this kernel has no hugetlb pool (CONFIG_HUGETLBFS off)")
    raise_by = max(0, count - before.free)
    if raise_by:
        try:
            sysfs.write_text(root, sysfs.sysctl_rel(SYSCTL), str(before.total + raise_by))
        except KnobWriteError as exc:
            raise HugePagesError(f"cannot reserve {count} huge pages ({exc}); run as root or "
                                 f"`ssi-pager tune apply --hugepages {count}`",
                                 exc.errno) from None
    try:
        now = pool(root)
        if now is None or now.free < count:
            got = 0 if now is None else now.free
            raise HugePagesError(f"the kernel found only {got} of {count} free huge pages "
                                 f"({before.page_size >> 20} MiB): memory is fragmented or "
                                 f"short; reserve them at boot (hugepages={count} on the "
                                 f"kernel command line)")
        yield now
    finally:
        after = pool(root) if raise_by else None
        if after is not None:
            try:
                persistent = after.total - after.surplus
                sysfs.write_text(root, sysfs.sysctl_rel(SYSCTL),
                                 str(max(0, persistent - raise_by - before.surplus)))
            except KnobWriteError as exc:
                log.warning("could not give %d huge pages back (%s): %s", raise_by, SYSCTL,
                            exc)
