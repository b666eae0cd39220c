"""Where a VM's runtime state lives and what is recorded about it (vm.json)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from pager.errors import VmError

log = logging.getLogger(__name__)

RAM_ID = "ssi-ram"  # the memory-backend id `vm` adds; resume must use the same RAM block id
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# files `vm` may leave in a VM's directory; removed when the guest is gone
RUNTIME_FILES = ("qmp.sock", "pager.sock", "vm.json", "vm.json.tmp", "device-state",
                 "device-state.resume", "device-state.remote", "memnode.log")


def status(msg: str) -> None:
    """A status line of `ssi-pager vm` on stderr (the guest console owns stdout)."""
    print(f"ssi-pager vm: {msg}", file=sys.stderr, flush=True)


def runtime_root() -> Path:
    env = os.environ.get("SSI_PAGER_RUNTIME_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "ssi-pager" / "vm"
    if os.geteuid() == 0:
        return Path("/run/ssi-pager/vm")
    return Path(f"/tmp/ssi-pager-{os.getuid()}/vm")


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise VmError(f"VM name {name!r}: use letters, digits, '_', '.', '-' (max 64)")
    return name


def vm_dir(name: str, create: bool = False) -> Path:
    """The 0700 runtime directory of VM ``name`` (``create``: make it; else it must exist)."""
    d = runtime_root() / check_name(name)
    if create:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(d, 0o700)
    elif not d.is_dir():
        raise VmError(f"no VM named {name!r} (no {d}); start it with `ssi-pager vm --name "
                      f"{name} -- qemu-system-x86_64 ...`")
    return d


@dataclass
class VmState:
    """What `suspend` and `resume` need to know about a VM; saved as vm.json in its dir."""

    name: str
    space: str
    ram_size: int
    ram_id: str
    memnode: str | list[str] | None = None  # one memory node, or several (a cluster)
    token_file: str | None = None
    etcd: str | None = None  # a cluster in etcd (`--etcd URL`)
    cluster: str | None = None  # a cluster file (`--cluster FILE`)
    replicas: int | None = None
    qemu_pid: int = 0
    memfd: int = -1
    pager_socket: str = ""
    state_file: str = ""
    suspended: bool = False
    stored_bytes: int = 0
    max_resident: int = 0  # far memory: suspend writes only the pages the node lacks

    def save(self, d: Path) -> None:
        tmp = d / "vm.json.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, d / "vm.json")

    @classmethod
    def load(cls, d: Path) -> VmState:
        try:
            return cls(**json.loads((d / "vm.json").read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise VmError(f"cannot read {d / 'vm.json'} ({exc}); was the VM started with "
                          f"`ssi-pager vm`?") from exc

    @classmethod
    def load_or_none(cls, d: Path) -> VmState | None:
        try:
            return cls.load(d)
        except VmError:
            return None


def cleanup(d: Path) -> None:
    """Remove a VM's runtime directory (the guest ended or moved away for good)."""
    for f in RUNTIME_FILES:
        with contextlib.suppress(FileNotFoundError):
            (d / f).unlink()
    shutil.rmtree(d / "store", ignore_errors=True)
    with contextlib.suppress(OSError):
        d.rmdir()


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
