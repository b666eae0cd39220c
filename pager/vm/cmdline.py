"""The user's QEMU command line, checked and given a shared memfd RAM backend behind plain -m."""

from __future__ import annotations

import logging
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


def prepare_qemu(argv: list[str], ram_id: str = RAM_ID) -> QemuCommand:
    """Check the user's QEMU command line and add a shared memfd backend behind plain -m."""
    if not argv:
        raise VmError("no QEMU command given: ssi-pager vm [options] -- qemu-system-x86_64 ...")
    out: list[str] = [argv[0]]
    mem_value: str | None = None
    backends: dict[str, dict[str, str]] = {}
    machine_backend: str | None = None
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
            raise VmError("-mem-path (hugetlbfs) is not supported yet: guest RAM must be "
                          "anonymous or a memfd; drop -mem-path")
        if opt == "-daemonize":
            raise VmError("-daemonize is not supported: `ssi-pager vm` stays in front of QEMU "
                          "(run it under systemd or nohup instead)")
        if opt == "-mem-prealloc":
            notes.append("-mem-prealloc faults all guest RAM in at start (no lazy paging)")
        if opt == "-object" and val and val.startswith("memory-backend"):
            o = _opts(val)
            backends[o.get("id", "")] = o
            if o.get("hugetlb") in ("on", "yes", "true"):
                raise VmError("memory-backend-memfd with hugetlb=on is not supported yet")
            if o.get("prealloc") in ("on", "yes", "true"):
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
        be = backends.get(machine_backend)
        if be is None:
            raise VmError(f"-machine memory-backend={machine_backend} names no -object")
        be_size = parse_size(be.get("size", "0"), "B")
        if be_size != size:
            raise VmError(f"-m {mem_value} and backend {machine_backend} size differ")
        shared = be.get("", "") == "memory-backend-memfd" and be.get("share") in ("on", "yes",
                                                                                 "true")
        return QemuCommand([*out, "-m", _mem_arg(size)], size, machine_backend, shared, notes)
    out += ["-m", _mem_arg(size),
            "-object", f"memory-backend-memfd,id={ram_id},size={size},share=on",
            "-machine", f"memory-backend={ram_id}"]
    return QemuCommand(out, size, ram_id, True, notes)


def _mem_arg(size: int) -> str:
    return f"{size >> 20}M" if size % (1 << 20) == 0 else f"{size}B"



def shell_quote(s: str) -> str:
    """``s`` as one word of a /bin/sh command (QEMU's ``exec:`` migration URIs)."""
    return "'" + s.replace("'", "'\\''") + "'"
