"""Start QEMU with its guest RAM behind the pager, wait for the RAM handoff, wait for its exit."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import select
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pager.errors import VmError
from pager.vm.cmdline import prepare_qemu
from pager.vm.nodes import Nodes
from pager.vm.procs import (
    exit_code,
    socket_live,
    start_local_memnode,
    start_pager,
    stop_all,
    stop_process,
)
from pager.vm.state import (
    RAM_ID,
    VmState,
    check_name,
    cleanup,
    pid_alive,
    runtime_root,
    status,
    vm_dir,
)

log = logging.getLogger(__name__)

HANDOFF_TIMEOUT = 30.0  # QEMU maps guest RAM within a second or two of starting


@dataclass
class Launch:
    """A started QEMU with guest RAM handed off (and the pager we started for it, if any)."""

    qemu: subprocess.Popen
    helpers: list[subprocess.Popen]  # pager and local memory node started for this guest
    state: VmState
    dir: Path


def launch(args: argparse.Namespace, qemu_argv: list[str], name: str, *,
           incoming: bool = False, ram_id: str = RAM_ID,
           expect_size: int | None = None, stdout: int | None = None,
           stdin: int | None = None) -> Launch:
    """Start (or join) the pager and QEMU with the shim; return after the handoff."""
    from pager.shim import library

    shim = library()
    cmd = prepare_qemu(qemu_argv, ram_id, hugetlb=bool(getattr(args, "hugetlb", False)))
    if expect_size is not None and cmd.ram_size != expect_size:
        raise VmError(f"resume needs the same RAM size as the suspended guest "
                      f"({expect_size >> 20} MiB), got -m {cmd.ram_size >> 20} MiB")
    for note in cmd.notes:
        status(f"note: {note}")
    d = vm_dir(name, create=True)
    qmp_path = d / "qmp.sock"
    with contextlib.suppress(FileNotFoundError):
        qmp_path.unlink()
    argv = [*cmd.argv, "-qmp", f"unix:{qmp_path},server=on,wait=off"]
    if incoming:
        argv += ["-incoming", "defer"]
    space = args.space or name
    helpers: list[subprocess.Popen] = []
    if args.pager and socket_live(args.pager):
        pager_sock = Path(args.pager)
        status(f"joining the pager at {pager_sock}")
        if getattr(args, "max_resident", None):
            status("note: --max-resident applies to a pager `vm` starts; the pager joined "
                   "keeps its own limit (`serve --max-resident`)")
    else:
        pager_sock = Path(args.pager) if args.pager else d / "pager.sock"
        nodes = Nodes.from_args(args)
        if not nodes:
            node, memnode = start_local_memnode(d, args.token_file)
            helpers.append(node)
            status(f"no --memnode: started a local memory node on {memnode} (fresh RAM)")
            nodes = Nodes((memnode,), token_file=args.token_file)
        try:
            helpers.append(start_pager(pager_sock, args, space, nodes))
        except BaseException:
            stop_all(helpers)
            raise
        status(f"started the pager (pid {helpers[-1].pid}) on {pager_sock}")
    r, w = os.pipe()
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(filter(None, [str(shim), env.get("LD_PRELOAD", "")]))
    env.update(SSI_PAGER_SOCKET=str(pager_sock), SSI_PAGER_RAM_SIZE=str(cmd.ram_size),
               SSI_PAGER_SPACE=space, SSI_PAGER_STATUS_FD=str(w))
    try:
        qemu = subprocess.Popen(argv, env=env, pass_fds=(w,), stdout=stdout, stdin=stdin)
    except OSError as exc:
        os.close(r)
        os.close(w)
        stop_all(helpers)
        raise VmError(f"cannot start {argv[0]}: {exc.strerror}") from exc
    os.close(w)
    state = VmState(name=name, space=space, ram_size=cmd.ram_size, ram_id=cmd.ram_id,
                    qemu_pid=qemu.pid,
                    pager_socket=str(pager_sock), state_file=str(d / "device-state"),
                    max_resident=getattr(args, "max_resident", None) or 0)
    Nodes.from_args(args).record(state)
    try:
        line = _wait_handoff(r, qemu)
    except BaseException:
        stop_process(qemu)
        stop_all(helpers)
        raise
    finally:
        os.close(r)
    if line is None:  # QEMU exited before mapping RAM (bad arguments, shim refused)
        stop_all(helpers)
        return Launch(qemu, [], state, d)
    m = re.search(r"memfd=(-?\d+)", line)
    state.memfd = int(m.group(1)) if m else -1
    if not cmd.shared:
        state.memfd = -1
    state.save(d)
    status(f"guest RAM {cmd.ram_size >> 20} MiB handed to the pager (space {space!r}, "
           f"{'shared memfd' if state.memfd >= 0 else 'anonymous'}); QEMU pid {qemu.pid}")
    return Launch(qemu, helpers, state, d)


def _wait_handoff(fd: int, qemu: subprocess.Popen) -> str | None:
    """The shim's "ok ..." line; None if QEMU exited first; VmError after the timeout."""
    deadline = time.monotonic() + HANDOFF_TIMEOUT
    buf = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            chunk = os.read(fd, 256)
            buf += chunk
            if b"\n" in buf:
                return buf.decode(errors="replace").strip()
            if not chunk:  # every writer gone: QEMU exited (or exec'd away) without handoff
                qemu.wait()
                return None
        elif qemu.poll() is not None:
            return None
    raise VmError(f"QEMU mapped no guest RAM of the -m size within {HANDOFF_TIMEOUT:.0f} s, so "
                  f"nothing was handed to the pager; use plain -m or a memory-backend-memfd of "
                  f"the same size")


def finish(launch_: Launch) -> int:
    """Wait for QEMU, stop the pager we started, report; QEMU's exit code."""
    def forward(signum: int, _frame: object) -> None:
        if launch_.qemu.poll() is None:
            launch_.qemu.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        rc = launch_.qemu.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        stop_all(launch_.helpers)
    code = exit_code(rc)
    d = launch_.dir
    state = VmState.load_or_none(d)
    if state is not None and state.suspended:
        status(f"guest {state.name!r} suspended; resume with `ssi-pager vm resume "
               f"{state.name} -- <same QEMU arguments>`")
    else:
        if rc < 0:
            sig = signal.Signals(-rc).name
            hint = " (a guest page could not be served: see the pager's messages)" \
                if sig == "SIGBUS" else ""
            status(f"QEMU was killed by {sig}{hint}; exit code {code}")
        else:
            status(f"QEMU exited with code {code}")
        cleanup(d)
    return code


def check_name_free(name: str) -> None:
    """Refuse a name whose VM is running or suspended (its state would be overwritten)."""
    d = runtime_root() / check_name(name)
    old = VmState.load_or_none(d) if (d / "vm.json").exists() else None
    if old is not None and (old.suspended or pid_alive(old.qemu_pid)):
        raise VmError(f"a VM named {name!r} is {'suspended' if old.suspended else 'running'}"
                      f" ({d}); pick another --name or resume/stop it")


def do_run(args: argparse.Namespace, qemu_argv: list[str]) -> int:
    name = args.name or args.space or f"vm-{os.getpid()}"
    check_name_free(name)
    return finish(launch(args, qemu_argv, name))
