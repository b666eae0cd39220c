"""`ssi-pager vm`'s QEMU command-line handling and RAM scan (no QEMU started)."""

from __future__ import annotations

import os
import re

import pytest

from pager.errors import VmError
from pager.uffd.mman import data_ranges
from pager.vm.cmdline import prepare_qemu
from pager.vm.state import RAM_ID, vm_dir


def test_plain_m_becomes_shared_memfd():
    cmd = prepare_qemu(["qemu-system-x86_64", "-m", "512M", "-nographic"])
    assert cmd.ram_size == 512 << 20 and cmd.shared and cmd.ram_id == RAM_ID
    a = cmd.argv
    assert a[:3] == ["qemu-system-x86_64", "-nographic", "-m"] and a.count("-m") == 1
    assert f"memory-backend-memfd,id={RAM_ID},size={512 << 20},share=on" in a
    assert a[a.index("-machine") + 1] == f"memory-backend={RAM_ID}"


@pytest.mark.parametrize(("text", "size"), [("256", 256 << 20), ("1G", 1 << 30),
                                            ("size=2G", 2 << 30), ("768m", 768 << 20),
                                            ("1024MiB", 1 << 30)])
def test_sizes(text, size):
    assert prepare_qemu(["q", "-m", text]).ram_size == size


def test_default_ram_is_qemus_128m():
    assert prepare_qemu(["q"]).ram_size == 128 << 20


def test_user_memfd_backend_is_kept():
    argv = ["q", "-m", "1G", "-object", "memory-backend-memfd,id=mem,size=1G,share=on",
            "-machine", "q35,memory-backend=mem"]
    cmd = prepare_qemu(argv)
    assert cmd.ram_id == "mem" and cmd.shared
    assert cmd.argv.count("-object") == 1


def test_private_backend_is_not_shared():
    cmd = prepare_qemu(["q", "-m", "1G", "-object", "memory-backend-ram,id=m,size=1G",
                           "-machine", "memory-backend=m"])
    assert not cmd.shared


@pytest.mark.parametrize(("argv", "message"), [
    (["q", "-m", "1G", "-mem-path", "/nonexistent-dir"], "-mem-path '/nonexistent-dir' is not a "
                                                         "directory"),
    (["q", "-m", "1G", "-mem-path", "/proc"], "-mem-path /proc is on proc: guest RAM files"),
    (["q", "-m", "1G", "-mem-path", "/dev/shm", "-object", "memory-backend-memfd,id=m,size=1G",
      "-machine", "memory-backend=m"], "-mem-path and -machine memory-backend= both"),
    (["q", "-m", "3M", "-object", "memory-backend-memfd,id=m,size=3M,hugetlb=on",
      "-machine", "memory-backend=m"], "must be a multiple of 2 MiB, not 3145728 bytes"),
    (["q", "-m", "1G,slots=2,maxmem=4G"], "memory hotplug (-m maxmem=/slots=)"),
    (["q", "-m", "lots"], "cannot read memory size 'lots'; write it like 512M"),
    (["q", "-m"], "QEMU option -m needs a value"),
    (["q", "-m", "1G", "-machine", "memory-backend=nope"],
     "-machine memory-backend=nope names no -object"),
    (["q", "-m", "1G", "-object", "memory-backend-memfd,id=m,size=2G,share=on",
      "-machine", "memory-backend=m"], "-m 1G and backend m size differ"),
    (["q", "-m", "1G", "-numa", "node,memdev=m0"], "NUMA guests (several RAM backends)"),
    (["q", "-m", "1G", "-netdev", "vhost-user,id=n,chardev=c"],
     "vhost-user devices are not supported"),
    (["q", "-m", "1G", "-device", "vhost-user-blk-pci,chardev=c"],
     "vhost-user devices are not supported"),
    (["q", "-m", "1G", "-daemonize"], "-daemonize is not supported"),
    ([], "no QEMU command given"),
])
def test_unsupported_or_wrong_is_refused(argv, message):
    with pytest.raises(VmError, match=re.escape(message)):
        prepare_qemu(argv)


def test_hugetlb_memfd_backend_is_kept():
    argv = ["q", "-m", "1G", "-object", "memory-backend-memfd,id=m,size=1G,hugetlb=on",
            "-machine", "memory-backend=m"]
    cmd = prepare_qemu(argv)
    assert cmd.hugetlb and cmd.shared and cmd.ram_id == "m"
    assert cmd.argv.count("-object") == 1


def test_plain_m_on_huge_pages():
    cmd = prepare_qemu(["q", "-m", "512M"], hugetlb=True)
    assert cmd.hugetlb and cmd.shared
    assert (f"memory-backend-memfd,id={RAM_ID},size={512 << 20},share=on,hugetlb=on,"
            f"hugetlbsize=2M") in cmd.argv


def test_mem_path_becomes_a_shared_file_backend():
    """-mem-path on tmpfs (/dev/shm): a shared memory-backend-file, not huge pages."""
    cmd = prepare_qemu(["q", "-m", "256M", "-mem-path", "/dev/shm"])
    assert cmd.shared and not cmd.hugetlb and "-mem-path" not in cmd.argv
    assert (f"memory-backend-file,id={RAM_ID},size={256 << 20},mem-path=/dev/shm,share=on"
            in cmd.argv)
    assert cmd.argv[cmd.argv.index("-machine") + 1] == f"memory-backend={RAM_ID}"


def test_prealloc_is_noted():
    cmd = prepare_qemu(["q", "-m", "1G", "-mem-prealloc"])
    assert any("prealloc" in n for n in cmd.notes)


def test_data_ranges_skip_untouched_pages():
    """SEEK_DATA/SEEK_HOLE on a real memfd find exactly the pages that were ever written."""
    size = 64 << 20
    fd = os.memfd_create("ram-test")
    try:
        os.ftruncate(fd, size)
        assert list(data_ranges(fd, size)) == []
        os.pwrite(fd, b"x" * 4096, 8 << 20)
        os.pwrite(fd, b"y" * 8192, 40 << 20)
        assert list(data_ranges(fd, size)) == [(8 << 20, 4096), (40 << 20, 8192)]
    finally:
        os.close(fd)


def test_vm_names_are_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("SSI_PAGER_RUNTIME_DIR", str(tmp_path))
    for bad in ("../x", "", "a/b", "-x", "x" * 65):
        with pytest.raises(VmError, match=f"VM name {re.escape(repr(bad))}: use letters"):
            vm_dir(bad, create=True)
    d = vm_dir("good-1", create=True)
    assert d.stat().st_mode & 0o777 == 0o700
    with pytest.raises(VmError, match="no VM named"):
        vm_dir("absent")
