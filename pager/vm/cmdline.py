"""The user's QEMU command line, checked and given a shared memfd RAM backend behind plain -m.

Huge pages: ``memory-backend-memfd,hugetlb=on`` is kept as given; ``-mem-path DIR`` (a hugetlbfs
or tmpfs mount) becomes a shared ``memory-backend-file`` in DIR, so the pager gets the file as
the RAM's memfd; ``prepare_qemu(..., hugetlb=True)`` puts plain -m on 2 MiB pages. The pager
learns the page size from the shim's handshake.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field

from pager.errors import VmError
from pager.vm.state import RAM_ID

log = logging.getLogger(__name__)

SIZE_RE = re.compile(r"^(\d+)([KMGT]?)(i?B)?$", re.I)


def parse_size(text: str, default_unit: str = "M") -> int:
    """QEMU's -m syntax: a number with optional K/M/G/T suffix (MiB when bare)."""
    m = SIZE_RE.match(text.strip())
    if not m:
        raise VmError(f"cannot read memory size {text!r}; write it like 512M or 2G")
    unit = (m.group(2) or default_unit).upper()
    return int(m.group(1)) << {"B": 0, "K": 10, "M": 20, "G": 30, "T": 40}[unit]


def _opts(value: str) -> dict[str, str]:
    """`a=1,b=2` (first item may be a bare value, returned under "")."""
    out: dict[str, str] = {}
    for i, part in enumerate(value.split(",")):
        k, eq, v = part.partition("=")
        if not eq and i == 0:
            out[""] = part
        else:
            out[k] = v
    return out


@dataclass
class QemuCommand:
    """A QEMU argv with guest RAM set up for the pager."""

    argv: list[str]
    ram_size: int
    ram_id: str
    shared: bool  # guest RAM on a shared memfd (needed by suspend)
    notes: list[str] = field(default_factory=list)
    hugetlb: bool = False  # guest RAM on huge pages (hugetlbfs)


HUGE_PAGE = 2 << 20
ON = ("on", "yes", "true")


def fs_type(path: str) -> str | None:
    """The file system type of the mount holding ``path`` (from /proc/self/mounts)."""
    best, kind = "", None
    real = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            mnt = parts[1].replace("\\040", " ")
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, kind = mnt, parts[2]
    return kind


def _check_huge_size(size: int, what: str) -> None:
    if size % HUGE_PAGE:
        raise VmError(f"{what}: guest RAM on huge pages must be a multiple of 2 MiB, not "
                      f"{size} bytes; round -m up")


def prepare_qemu(argv: list[str], ram_id: str = RAM_ID, *, hugetlb: bool = False) -> QemuCommand:
    """Check the user's QEMU command line and add a shared memfd backend behind plain -m
    (on huge pages with ``hugetlb``)."""
    if not argv:
        raise VmError("no QEMU command given: ssi-pager vm [options] -- qemu-system-x86_64 ...")
    out: list[str] = [argv[0]]
    mem_value: str | None = None
    backends: dict[str, dict[str, str]] = {}
    machine_backend: str | None = None
    mem_path: str | None = None
    notes: list[str] = []
    i = 1
    while i < len(argv):
        a = argv[i]
        opt = a[1:] if a.startswith("--") else a
        val = argv[i + 1] if i + 1 < len(argv) else None
        if opt in ("-m", "-mem-path", "-object", "-machine", "-M", "-numa") and val is None:
            raise VmError(f"QEMU option {a} needs a value")
        if opt == "-m":
            mem_value = val
            i += 2
            continue  # re-added below, once
        if opt == "-mem-path":
            mem_path = val
            i += 2
            continue  # becomes a shared memory-backend-file below
        if opt == "-daemonize":
            raise VmError("-daemonize is not supported: `ssi-pager vm` stays in front of QEMU "
                          "(run it under systemd or nohup instead)")
        if opt == "-mem-prealloc":
            notes.append("-mem-prealloc faults all guest RAM in at start (no lazy paging)")
        if opt == "-object" and val and val.startswith("memory-backend"):
            o = _opts(val)
            backends[o.get("id", "")] = o
            if o.get("prealloc") in ON:
                notes.append("prealloc=on faults all guest RAM in at start (no lazy paging)")
        if opt in ("-machine", "-M") and val:
            mb = _opts(val).get("memory-backend")
            if mb:
                machine_backend = mb
        if "vhost-user" in a:
            raise VmError("vhost-user devices are not supported yet: another process would "
                          "map guest RAM outside the pager's userfaultfd")
        if opt == "-numa" and val and "memdev=" in val:
            raise VmError("NUMA guests (several RAM backends) are not supported yet")
        out.append(a)
        if opt in ("-m", "-object", "-machine", "-M", "-numa") and val is not None:
            out.append(val)
            i += 2
        else:
            i += 1
    mem = _opts(mem_value) if mem_value else {"": "128M"}
    if "maxmem" in mem or "slots" in mem:
        raise VmError("memory hotplug (-m maxmem=/slots=) is not supported yet")
    size = parse_size(mem.get("size") or mem.get("", "128M"))
    if machine_backend is not None:
        if mem_path is not None:
            raise VmError("-mem-path and -machine memory-backend= both give guest RAM; keep one")
        be = backends.get(machine_backend)
        if be is None:
            raise VmError(f"-machine memory-backend={machine_backend} names no -object")
        be_size = parse_size(be.get("size", "0"), "B")
        if be_size != size:
            raise VmError(f"-m {mem_value} and backend {machine_backend} size differ")
        kind = be.get("", "")
        huge = kind == "memory-backend-memfd" and be.get("hugetlb") in ON
        if kind == "memory-backend-file":
            huge = _ram_dir(be.get("mem-path", ""), "memory-backend-file mem-path")
        if huge:
            _check_huge_size(size, f"backend {machine_backend}")
        # a memfd backend is shared unless share=off; a file backend only with share=on
        shared = (kind == "memory-backend-memfd" and be.get("share", "on") in ON) or (
            kind == "memory-backend-file" and be.get("share") in ON)
        return QemuCommand([*out, "-m", _mem_arg(size)], size, machine_backend, shared, notes,
                           huge)
    if mem_path is not None:
        huge = _ram_dir(mem_path, "-mem-path")
        if huge:
            _check_huge_size(size, "-mem-path")
        out += ["-m", _mem_arg(size),
                "-object", f"memory-backend-file,id={ram_id},size={size},mem-path={mem_path},"
                           f"share=on",
                "-machine", f"memory-backend={ram_id}"]
        return QemuCommand(out, size, ram_id, True, notes, huge)
    if hugetlb:
        _check_huge_size(size, "-m")
    out += ["-m", _mem_arg(size),
            "-object", f"memory-backend-memfd,id={ram_id},size={size},share=on"
                       + (",hugetlb=on,hugetlbsize=2M" if hugetlb else ""),
            "-machine", f"memory-backend={ram_id}"]
    return QemuCommand(out, size, ram_id, True, notes, hugetlb)


def _ram_dir(path: str, what: str) -> bool:
    """Whether RAM files in ``path`` are huge pages (hugetlbfs) or not (tmpfs); VmError for
    anything else (a disk-backed file would page guest RAM to disk behind the pager)."""
    if not path or not os.path.isdir(path):
        raise VmError(f"{what} {path!r} is not a directory; give a hugetlbfs mount "
                      f"(e.g. /dev/hugepages) or tmpfs")
    kind = fs_type(path)
    if kind not in ("hugetlbfs", "tmpfs"):
        raise VmError(f"{what} {path} is on {kind or 'an unknown file system'}: guest RAM "
                      f"files must be on hugetlbfs (e.g. /dev/hugepages) or tmpfs")
    return kind == "hugetlbfs"


def _mem_arg(size: int) -> str:
    return f"{size >> 20}M" if size % (1 << 20) == 0 else f"{size}B"



def shell_quote(s: str) -> str:
    """``s`` as one word of a /bin/sh command (QEMU's ``exec:`` migration URIs)."""
    return "'" + s.replace("'", "'\\''") + "'"
