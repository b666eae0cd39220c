"""``ssi-pager check``: what userfaultfd supports on this host, as a table or JSON.

Access paths (syscall, /dev/userfaultfd, the sysctl), the features the running kernel offers,
and for each memory kind (anonymous, shmem/memfd, hugetlbfs) which register modes work and which
ioctls each allows. Everything is probed on real memory; nothing is assumed from the headers.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import stat
import sys

from pager.uffd._uffd_cffi import lib
from pager.uffd.binding import Feature, Ioctl, Userfaultfd, names
from pager.uffd.errors import UffdError
from pager.uffd.mman import Mapping
from pager.uffd.opener import open_raw_fd

SYSCTL = "/proc/sys/vm/unprivileged_userfaultfd"
DEV = "/dev/userfaultfd"
MODES = ("missing", "wp", "minor")
# features that change fault behaviour or need privileges; not needed to probe registration
_PROBE_SKIP = Feature.SIGBUS | Feature.WP_ASYNC | Feature.EVENT_FORK


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _try_open(access: str) -> dict:
    try:
        fd, how = open_raw_fd(os.O_CLOEXEC, access)
    except UffdError as exc:
        return {"ok": False, "error": errno.errorcode.get(exc.errno or 0, "?"),
                "message": str(exc)}
    os.close(fd)
    return {"ok": True, "via": how}


def access_paths() -> dict:
    dev: dict = {"path": DEV, "exists": os.path.exists(DEV)}
    if dev["exists"]:
        st = os.stat(DEV)
        dev["mode"] = oct(stat.S_IMODE(st.st_mode))
        dev["uid"], dev["gid"] = st.st_uid, st.st_gid
        dev.update(_try_open("dev"))
    return {"syscall": _try_open("syscall"), "dev": dev,
            "unprivileged_userfaultfd": _read(SYSCTL), "euid": os.geteuid()}


def hugepage_info() -> dict:
    info = {"size": 0, "total": 0, "free": 0}
    for line in (_read("/proc/meminfo") or "").splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if key == "Hugepagesize" and parts:
            info["size"] = int(parts[0]) * 1024
        elif key == "HugePages_Total" and parts:
            info["total"] = int(parts[0])
        elif key == "HugePages_Free" and parts:
            info["free"] = int(parts[0])
    return info


def _probe_kind(make, features: int) -> dict:
    """Register each mode on a fresh mapping made by ``make``; allowed ioctls or the error."""
    out: dict = {}
    for mode in MODES:
        try:
            m = make()
        except UffdError as exc:
            return {"error": f"cannot map: {exc}"}
        try:
            with Userfaultfd(features=features) as u:
                mask = u.register(m.address, m.length, **{
                    "missing": mode == "missing", "wp": mode == "wp", "minor": mode == "minor"})
                out[mode] = {"ok": True, "ioctls": names(mask, Ioctl)}
        except UffdError as exc:
            out[mode] = {"ok": False, "error": errno.errorcode.get(exc.errno or 0, "?")}
        finally:
            m.close()
    return out


def memory_kinds(features: int) -> dict:
    page = os.sysconf("SC_PAGE_SIZE")
    kinds = {
        "anonymous": _probe_kind(lambda: Mapping.anonymous(16 * page), features),
        "shmem/memfd": _probe_kind(lambda: Mapping.memfd(16 * page), features),
    }
    huge = hugepage_info()
    if not huge["size"]:
        kinds["hugetlbfs"] = {"skipped": "this kernel has no huge page support"}
    else:
        probe = _probe_kind(lambda: Mapping.memfd(2 * huge["size"], hugetlb=True,
                                                  noreserve=True), features)
        if huge["total"] == 0:
            probe["note"] = ("no huge pages reserved (vm.nr_hugepages=0): registration probed, "
                             "but faults could not be served")
        if "error" in probe:
            probe = {"skipped": "no hugetlbfs mapping possible; reserve huge pages with "
                                "`sysctl vm.nr_hugepages=N`"}
        kinds["hugetlbfs"] = probe
    return kinds


def report() -> dict:
    rep: dict = {"kernel": os.uname().release, "access": access_paths()}
    rep["build_header"] = {name[len("SSI_HAS_"):].lower(): bool(getattr(lib, name))
                           for name in dir(lib) if name.startswith("SSI_HAS_")}
    try:
        with Userfaultfd() as u:
            available = int(u.available)
            rep["api_ioctls"] = names(u.ioctls, Ioctl)
    except UffdError as exc:
        rep["usable"] = False
        rep["error"] = str(exc)
        return rep
    rep["usable"] = True
    rep["features"] = {m.name.lower(): bool(available & m.value) for m in Feature}
    rep["memory"] = memory_kinds(available & ~int(_PROBE_SKIP))
    return rep


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def render(rep: dict) -> str:
    lines = [f"userfaultfd on Linux {rep['kernel']}"]
    acc = rep["access"]
    sc = acc["syscall"]
    lines.append(f"  syscall userfaultfd(2)   {'ok' if sc['ok'] else 'refused: ' + sc['error']}")
    dev = acc["dev"]
    if dev["exists"]:
        state = "ok" if dev.get("ok") else "refused: " + dev.get("error", "?")
        lines.append(f"  {DEV:<24} {state} (mode {dev['mode']}, uid {dev['uid']}, "
                     f"gid {dev['gid']})")
    else:
        lines.append(f"  {DEV:<24} absent (Linux < 6.1)")
    lines.append(f"  vm.unprivileged_userfaultfd = {acc['unprivileged_userfaultfd']}"
                 f"   (running as uid {acc['euid']})")
    if not rep.get("usable"):
        lines.append(f"NOT USABLE: {rep.get('error')}")
        return "\n".join(lines)
    lines.append(f"  API ioctls: {' '.join(rep['api_ioctls'])}")
    lines.append("features (kernel offers / build header had the constant):")
    hdr = rep["build_header"]
    for name, ok in rep["features"].items():
        from_hdr = hdr.get(f"uffd_feature_{name}", True)
        lines.append(f"  {name:<22} {_yes(ok):<4}{'' if from_hdr else '  (UAPI fallback)'}")
    lines.append("register modes and allowed ioctls per memory kind:")
    for kind, probe in rep["memory"].items():
        if "skipped" in probe:
            lines.append(f"  {kind:<12} skipped: {probe['skipped']}")
            continue
        for mode in MODES:
            r = probe.get(mode, {})
            what = " ".join(r["ioctls"]) if r.get("ok") else f"no ({r.get('error', '?')})"
            lines.append(f"  {kind:<12} {mode:<8} {what}")
        if "note" in probe:
            lines.append(f"  {kind:<12} note: {probe['note']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    rep = report()
    if args.json:
        print(json.dumps(rep, indent=None, sort_keys=False))
    else:
        print(render(rep))
    if not rep.get("usable"):
        print("ssi-pager: userfaultfd is not usable here; see the access lines above",
              file=sys.stderr)
        return 1
    return 0
