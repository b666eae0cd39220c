"""A QEMU guest whose RAM is on 2 MiB huge pages, all of it behind the pager (marked qemu):
``memory-backend-memfd,hugetlb=on``, ``-mem-path`` on a hugetlbfs mount, and ``vm --hugetlb``
for plain -m. The workload's checksums are those of a run on the host."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pagerkit import MEM_MIB
from vmkit import VmRun

from tuning.errors import HugePagesError
from tuning.hugepages import reserved

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


@pytest.fixture
def huge_pool():
    """The guest's RAM in free 2 MiB pages, given back after."""
    try:
        with reserved(MEM_MIB // 2 + 4) as pool:
            if pool.page_size != 2 << 20:
                pytest.skip(f"default huge page size is {pool.page_size}, not 2 MiB")
            yield pool
    except HugePagesError as exc:
        pytest.skip(str(exc))


@pytest.fixture
def hugetlbfs(tmp_path: Path):
    """A private hugetlbfs mount (unmounted after)."""
    d = tmp_path / "huge"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "none", str(d)],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"cannot mount hugetlbfs: {r.stderr.strip()}")
    yield d
    subprocess.run(["umount", str(d)], check=True, timeout=30)


def run_vm_verbose(*args: str):
    """``ssi-pager -v vm ARGS`` to its end: the pager's log (page sizes) is in stderr."""
    with VmRun(argv=[sys.executable, "-m", "pager.cli", "-v", "vm", *args]) as run:
        return run.finish()


def _assert_booted_on_huge_pages(res, expected, checksums) -> None:
    assert res.returncode == 0, res.stderr[-3000:]
    assert checksums(res.stdout) == expected
    assert "handed to the pager" in res.stderr
    assert "2048 KiB pages" in res.stderr, res.stderr[-3000:]  # the handshake said 2 MiB


def test_memfd_hugetlb_backend(guest, expected, checksums, runtime, huge_pool):
    res = run_vm_verbose("--name", "hugememfd", "--", *guest.qemu_args(),
                 "-object", f"memory-backend-memfd,id=hram,size={MEM_MIB}M,hugetlb=on",
                 "-machine", "memory-backend=hram")
    _assert_booted_on_huge_pages(res, expected, checksums)


def test_mem_path_on_hugetlbfs(guest, expected, checksums, runtime, huge_pool, hugetlbfs):
    res = run_vm_verbose("--name", "hugepath", "--", *guest.qemu_args(),
                 "-mem-path", str(hugetlbfs))
    _assert_booted_on_huge_pages(res, expected, checksums)
    assert os.listdir(hugetlbfs) == []  # QEMU's RAM file was unlinked
