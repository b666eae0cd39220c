"""Build the small QEMU test guest: a Debian cloud kernel and a busybox initramfs with a workload.

The kernel comes from `fetch-kernel.sh` (cached, downloaded once). The initramfs is written here,
in Python (cpio "newc"), from busybox-static and `workload.c` compiled with `gcc -static` at build
time, and cached by content hash. The guest's /init mounts /proc, runs

    /workload MIB PASSES [wait] [scatter]  (from the kernel command line: ssi.mib=,
        ssi.passes=, ssi.wait=1: wait for a console line after each pass, ssi.scatter=1:
        passes touch one word per page in a scattered order, see workload.c)

on the serial console and powers off, so QEMU (started with -no-reboot) exits by itself.

Used by the QEMU tests (tests/qemu) and by `ssi-pager bench vm`; importable by file path.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
FETCH_KERNEL = HERE / "fetch-kernel.sh"
WORKLOAD_C = HERE / "workload.c"
DEFAULT_CACHE = Path("/var/cache/ssi-pager/guest")
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")

INIT_SCRIPT = """#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
mib=64
passes=3
wait=
scatter=
for arg in $(/bin/busybox cat /proc/cmdline); do
  case "$arg" in
    ssi.mib=*) mib=${arg#ssi.mib=} ;;
    ssi.passes=*) passes=${arg#ssi.passes=} ;;
    ssi.wait=1) wait=wait ;;
    ssi.scatter=1) scatter=scatter ;;
  esac
done
echo "guest up mib=$mib passes=$passes"
/workload "$mib" "$passes" $wait $scatter
echo "workload exit $?"
/bin/busybox poweroff -f
"""

CHECKSUM_RE = re.compile(r"^pass (\d+) checksum ([0-9a-f]{16})\s*$", re.M)
RESULT_RE = re.compile(r"^RESULT checksum ([0-9a-f]{16})\s*$", re.M)


class GuestUnavailable(RuntimeError):
    """The guest cannot be built here (no kernel, no busybox-static, no static libc)."""


def cache_dir() -> Path:
    """Build cache: $SSI_PAGER_GUEST_CACHE, else /var/cache/ssi-pager/guest, else a tmp dir."""
    env = os.environ.get("SSI_PAGER_GUEST_CACHE")
    if env:
        return Path(env)
    try:
        DEFAULT_CACHE.mkdir(parents=True, exist_ok=True)
        if os.access(DEFAULT_CACHE, os.W_OK):
            return DEFAULT_CACHE
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"ssi-pager-guest-{os.getuid()}"


def kernel(fetch: bool = True) -> Path:
    """Path of the cached guest kernel, fetching it first if needed (and allowed)."""
    for cached in (cache_dir() / "vmlinuz", DEFAULT_CACHE / "vmlinuz"):
        if cached.is_file() and cached.stat().st_size > 0 and os.access(cached, os.R_OK):
            return cached
    cached = cache_dir() / "vmlinuz"
    if not fetch:
        raise GuestUnavailable(f"no guest kernel cached at {cached}; run {FETCH_KERNEL}")
    env = dict(os.environ, SSI_PAGER_GUEST_CACHE=str(cache_dir()))
    proc = subprocess.run([str(FETCH_KERNEL)], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    if proc.returncode != 0 or not cached.is_file():
        raise GuestUnavailable(f"guest kernel not cached and not fetchable: "
                               f"{proc.stderr.strip() or 'fetch-kernel.sh failed'}")
    return cached


def _busybox() -> Path:
    for cand in BUSYBOX_CANDIDATES:
        p = Path(cand)
        if p.is_file():
            out = subprocess.run(["file", "-L", str(p)], capture_output=True, text=True,
                                 check=False).stdout if shutil.which("file") else "static"
            if "dynamically linked" not in out:
                return p
    raise GuestUnavailable("busybox-static is not installed (apt-get install busybox-static)")


def _cpio_entry(name: str, mode: int, data: bytes = b"", ino: int = 0,
                rdev: tuple[int, int] = (0, 0)) -> bytes:
    """One cpio "newc" record (the format the kernel unpacks an initramfs from)."""
    namez = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(namez), 0)
    head = b"070701" + b"".join(b"%08X" % f for f in fields)
    rec = head + namez
    rec += b"\0" * (-len(rec) % 4)
    rec += data
    rec += b"\0" * (-len(rec) % 4)
    return rec


def _cpio(entries: list[tuple[str, int, bytes, tuple[int, int]]]) -> bytes:
    out = [_cpio_entry(n, m, d, ino=i + 1, rdev=r) for i, (n, m, d, r) in enumerate(entries)]
    out.append(_cpio_entry("TRAILER!!!", 0))
    blob = b"".join(out)
    return blob + b"\0" * (-len(blob) % 512)


def _compile_workload(out: Path) -> None:
    gcc = shutil.which("gcc")
    if gcc is None:
        raise GuestUnavailable("gcc is not installed (apt-get install gcc libc6-dev)")
    proc = subprocess.run([gcc, "-O2", "-static", "-o", str(out), str(WORKLOAD_C)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise GuestUnavailable(f"cannot build the static workload: {proc.stderr.strip()}")


def workload_binary() -> Path:
    """The static workload, built (or reused) in the cache; it also runs on the host."""
    cdir = cache_dir()
    key = hashlib.sha256(WORKLOAD_C.read_bytes()).hexdigest()[:16]
    target = cdir / f"workload-{key}"
    if not target.is_file():
        cdir.mkdir(parents=True, exist_ok=True)
        part = cdir / f".workload-{key}.{os.getpid()}"
        _compile_workload(part)
        os.replace(part, target)
    return target


def expected_checksums(work_mib: int, passes: int, scatter: bool = False) -> list[str]:
    """Per-pass checksums of an uninterrupted run, computed by the same binary on the host."""
    argv = [str(workload_binary()), str(work_mib), str(passes)] + (["scatter"] if scatter else [])
    out = subprocess.run(argv,
                         capture_output=True, text=True, check=True, timeout=300).stdout
    return checksums(out)


def initramfs() -> Path:
    """Build (or reuse) the guest initramfs; returns its path."""
    busybox = _busybox()
    bb = busybox.read_bytes()
    key = hashlib.sha256(bb + WORKLOAD_C.read_bytes() + INIT_SCRIPT.encode()).hexdigest()[:16]
    cdir = cache_dir()
    target = cdir / f"initramfs-{key}.cpio"
    if target.is_file():
        return target
    cdir.mkdir(parents=True, exist_ok=True)
    wl = workload_binary()
    with tempfile.TemporaryDirectory(dir=cdir) as tmp:
        d, x, f = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o755, stat.S_IFCHR | 0o600
        entries = [(p, d, b"", (0, 0)) for p in ("bin", "dev", "proc", "sys", "tmp")]
        entries += [
            ("dev/console", f, b"", (5, 1)),
            ("dev/ttyS0", f, b"", (4, 64)),
            ("dev/null", stat.S_IFCHR | 0o666, b"", (1, 3)),
            ("bin/busybox", x, bb, (0, 0)),
            ("bin/sh", stat.S_IFLNK | 0o777, b"busybox", (0, 0)),
            ("init", x, INIT_SCRIPT.encode(), (0, 0)),
            ("workload", x, wl.read_bytes(), (0, 0)),
        ]
        part = Path(tmp) / "out.cpio"
        part.write_bytes(_cpio(entries))
        os.replace(part, target)
    return target


@dataclass(frozen=True)
class Guest:
    """A bootable test guest: kernel + initramfs + what the workload does."""

    kernel: Path
    initrd: Path
    mem_mib: int = 256
    work_mib: int = 128
    passes: int = 3
    wait: bool = False  # after each pass but the last, wait for a line on the console
    scatter: bool = False  # passes touch one word per page, pages in a scattered order

    def cmdline(self) -> str:
        return (f"console=ttyS0 panic=-1 quiet rdinit=/init "
                f"ssi.mib={self.work_mib} ssi.passes={self.passes}"
                + (" ssi.wait=1" if self.wait else "")
                + (" ssi.scatter=1" if self.scatter else ""))

    def qemu_args(self, qemu: str = "qemu-system-x86_64", accel: str = "tcg",
                  memory: bool = True) -> list[str]:
        """A QEMU command line: serial console on stdout, no display, exits on power-off."""
        args = [qemu, "-accel", accel, "-nographic", "-no-reboot", "-nodefaults",
                "-serial", "stdio", "-monitor", "none",
                "-kernel", str(self.kernel), "-initrd", str(self.initrd),
                "-append", self.cmdline()]
        if memory:
            args += ["-m", f"{self.mem_mib}M"]
        return args


def build(mem_mib: int = 256, work_mib: int = 128, passes: int = 3, fetch: bool = True) -> Guest:
    """Everything needed to boot the test guest; raises GuestUnavailable with the reason."""
    return Guest(kernel(fetch=fetch), initramfs(), mem_mib, work_mib, passes)


def checksums(console: str) -> list[str]:
    """The per-pass checksums printed so far, in pass order."""
    return [m.group(2) for m in CHECKSUM_RE.finditer(console)]


def result(console: str) -> str | None:
    """The final checksum, or None if the workload did not finish."""
    m = RESULT_RE.search(console)
    return m.group(1) if m else None
