"""`ssi-pager vm resume`: a new QEMU continues a suspended guest, its RAM served on demand."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from pager.errors import VmError
from pager.vm.cmdline import prepare_qemu, shell_quote
from pager.vm.launch import Launch, finish, launch
from pager.vm.nodes import Nodes
from pager.vm.procs import socket_live, stop_all, stop_process
from pager.vm.qmp import Qmp
from pager.vm.ramstore import clear_device_state, load_device_state
from pager.vm.state import VmState, cleanup, status, vm_dir

log = logging.getLogger(__name__)


def do_resume(args: argparse.Namespace, name: str, qemu_argv: list[str]) -> int:
    return finish(resume_start(args, name, qemu_argv))


def _saved_state(args: argparse.Namespace, name: str, d: Path) -> VmState:
    """The suspended guest's record: from vm.json, or (suspended on another host) from the
    header the memory node holds, with its device state written next to it."""
    if (d / "vm.json").exists():
        saved = VmState.load(d)
        if not saved.suspended:
            raise VmError(f"VM {name!r} is not suspended; suspend it first")
        return saved
    nodes = Nodes.from_args(args)
    if not nodes:
        cleanup(d)
        raise VmError(f"VM {name!r} was not suspended on this host: give the memory nodes "
                      f"holding it (--memnode HOST:PORT, --etcd URL or --cluster FILE; "
                      f"--token-file F)")
    try:
        meta, data = load_device_state(nodes, args.space or name)
    except BaseException:
        cleanup(d)
        raise
    saved = VmState(name=name, space=meta["space"], ram_size=int(meta["ram_size"]),
                    ram_id=str(meta["ram_id"]), suspended=True,
                    state_file=str(d / "device-state.remote"))
    nodes.record(saved)
    Path(saved.state_file).write_bytes(data)
    status(f"device state of {name!r} ({len(data) >> 10} KiB) fetched from {nodes}")
    return saved


def resume_start(args: argparse.Namespace, name: str, qemu_argv: list[str], *,
                 stdout: int | None = None, stdin: int | None = None,
                 before_cont: Callable[[Launch], None] | None = None) -> Launch:
    """Start the new QEMU, load the device state, `cont`; returns the running guest.
    ``before_cont`` runs once the device state is loaded (the benchmark's eager load).
    A resume refused or failed before `cont` leaves the guest suspended, resumable again."""
    d = vm_dir(name, create=True)
    saved = _saved_state(args, name, d)
    size = prepare_qemu(qemu_argv, saved.ram_id).ram_size
    if size != saved.ram_size:
        raise VmError(f"resume needs the same RAM size as the suspended guest "
                      f"({saved.ram_size >> 20} MiB), got -m {size >> 20} MiB")
    state_file = Path(args.state or saved.state_file)
    if not state_file.is_file():
        raise VmError(f"device state {state_file} missing; copy it from the suspending host "
                      f"and pass --state FILE, or give --memnode to load it from there")
    nodes = Nodes.from_args(args, saved)
    args.memnode, args.etcd, args.cluster = list(nodes.memnodes), nodes.etcd, nodes.cluster
    args.replicas, args.token_file = nodes.replicas, nodes.token_file
    args.space = args.space or saved.space
    if not args.pager and saved.pager_socket and socket_live(saved.pager_socket):
        args.pager = saved.pager_socket  # the shared pager the guest used before
    if not nodes:
        raise VmError("resume needs the memory nodes holding the guest's RAM: --memnode "
                      "HOST:PORT, --etcd URL or --cluster FILE")
    # keep the device state out of the way of the new instance's own state file
    held = d / "device-state.resume"
    own = state_file.resolve() == (d / "device-state").resolve()
    if own:
        os.replace(state_file, held)
        state_file = held
    t0 = time.monotonic()
    try:
        lau = _start_and_load(args, name, qemu_argv, saved, state_file, stdout, stdin,
                              before_cont)
    except BaseException:
        if own:
            os.replace(held, d / "device-state")
            saved.save(d)  # the failed launch recorded a running guest over it
        raise
    if lau.qemu.poll() is not None:
        return lau
    status(f"guest {name!r} resumed in {time.monotonic() - t0:.2f} s (RAM served on demand "
           f"from {nodes}, space {args.space!r})")
    for f in (held, d / "device-state.remote"):
        with contextlib.suppress(FileNotFoundError):
            f.unlink()
    return lau


def _start_and_load(args: argparse.Namespace, name: str, qemu_argv: list[str],
                    saved: VmState, state_file: Path, stdout: int | None,
                    stdin: int | None, before_cont: Callable[[Launch], None] | None) -> Launch:
    lau = launch(args, qemu_argv, name, incoming=True, ram_id=saved.ram_id,
                 expect_size=saved.ram_size, stdout=stdout, stdin=stdin)
    if lau.qemu.poll() is not None:
        return lau
    try:
        with Qmp(lau.dir / "qmp.sock") as qmp:
            qmp.execute("migrate-set-capabilities",
                        capabilities=[{"capability": "x-ignore-shared", "state": True}])
            qmp.execute("migrate-incoming", uri=f"exec:cat {shell_quote(str(state_file))}")
            qmp.wait_migration()
            # resumed once: the stored state goes stale as soon as the guest runs
            clear_device_state(Nodes.from_args(args), args.space)
            if before_cont is not None:
                before_cont(lau)
            qmp.execute("cont")
    except (VmError, OSError) as exc:
        stop_process(lau.qemu)
        stop_all(lau.helpers)
        raise VmError(f"resume of {name!r} failed: {exc}") from exc
    return lau
