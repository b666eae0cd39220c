"""`ssi-pager vm suspend`: guest RAM into the memory node, device state beside it, QEMU ends."""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from pathlib import Path

from pager.errors import VmError
from pager.vm.cmdline import shell_quote
from pager.vm.nodes import Nodes
from pager.vm.qmp import Qmp
from pager.vm.ramstore import store_device_state, store_ram
from pager.vm.state import VmState, status, vm_dir

log = logging.getLogger(__name__)


def do_suspend(args: argparse.Namespace, name: str) -> int:
    d = vm_dir(name)
    state = VmState.load(d)
    if state.suspended:
        raise VmError(f"VM {name!r} is already suspended; resume it with `ssi-pager vm resume "
                      f"{name} -- <same QEMU arguments>`")
    nodes = Nodes.from_args(args, state)
    if not nodes:
        raise VmError("suspend needs memory nodes to hold the guest's RAM: the VM was started "
                      "without --memnode (or pass --memnode HOST:PORT, --etcd URL or "
                      "--cluster FILE)")
    if state.memfd < 0:
        raise VmError("suspend needs guest RAM on a shared memfd (plain -m, or "
                      "memory-backend-memfd with share=on)")
    t0 = time.monotonic()
    qmp = Qmp(d / "qmp.sock")
    try:
        qmp.execute("stop")
        stored = store_ram(f"/proc/{state.qemu_pid}/fd/{state.memfd}", state.ram_size,
                           nodes, state.space,
                           only_changed=state.max_resident > 0)
        t_ram = time.monotonic() - t0
        qmp.execute("migrate-set-capabilities",
                    capabilities=[{"capability": "x-ignore-shared", "state": True}])
        state_file = Path(state.state_file)
        with contextlib.suppress(FileNotFoundError):
            state_file.unlink()
        qmp.execute("migrate", uri=f"exec:cat > {shell_quote(str(state_file))}")
        qmp.wait_migration()
        store_device_state(nodes, state, state_file.read_bytes())
        state.suspended = True
        state.stored_bytes = stored
        nodes.record(state)
        state.save(d)
        qmp.quit()
    except BaseException:
        with contextlib.suppress(VmError, OSError):
            qmp.execute("cont")
        raise
    finally:
        qmp.close()
    dev = Path(state.state_file).stat().st_size
    status(f"suspended {name!r}: {stored >> 20} MiB of RAM to {nodes} in {t_ram:.2f} s, "
           f"device state {dev >> 10} KiB (in {state.state_file} and on the memory node)")
    return 0
