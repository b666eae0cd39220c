"""A real QEMU guest with all of its RAM behind the pager (tests/qemu, marked qemu).

The guest's workload fills 128 MiB with a pattern, rewrites it in 4 passes and prints a checksum
after each; the expected checksums come from the same static binary run on the host. Tests that
suspend use the waiting guest: after each pass but the last it prints "pass N waiting" and reads
a line from its console, so the suspend happens at a known point and never races the guest.
Every wait has a deadline, also when the guest prints nothing (tests/qemu/vmkit.py); KVM cannot
run guests on this host, so QEMU uses TCG.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess

import pytest
from vmkit import RUN_TIMEOUT, Result, VmRun, run_vm, vm_cmd

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


def suspend(name: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """`ssi-pager vm suspend NAME` (no guest of its own: a plain run with a deadline)."""
    return subprocess.run(vm_cmd("suspend", name, *extra), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT)


def run_and_suspend(args: list[str], name: str, at: str, resumed: bool = False) -> Result:
    """``ssi-pager vm ARGS`` until the console shows ``at``, then `suspend NAME`; the finished
    run. ``resumed``: ARGS resume a guest waiting after a pass; it is let go on first."""
    with VmRun(*args) as run:
        if resumed:
            run.status_until("resumed")
            run.send("go")
        run.read_until(at)
        sus = suspend(name)
        assert sus.returncode == 0, sus.stderr
        res = run.finish()
    assert res.returncode == 0, res.stderr[-2000:]
    return res


def release(run: VmRun, first: int, passes: int) -> None:
    """Let a waiting guest that waits after pass ``first`` run to its end: one line per wait
    (the first wait is already on the console, or was before a suspend)."""
    run.send("go")
    for p in range(first + 1, passes):
        run.read_until(f"pass {p} waiting")
        run.send("go")


@pytest.mark.parametrize("extra", [[], ["-sandbox", "on"]], ids=["plain", "sandbox"])
def test_boot_all_ram_behind_pager(guest, expected, checksums, runtime, extra):
    """`ssi-pager vm` with no options: its own pager and loopback memory node serve all RAM
    (also under QEMU's seccomp sandbox)."""
    res = run_vm("--name", "boot", "--", *guest.qemu_args(), *extra)
    assert res.returncode == 0, res.stderr[-2000:]
    assert checksums(res.stdout) == expected
    assert "handed to the pager" in res.stderr
    assert "QEMU exited with code 0" in res.stderr
    assert not (runtime / "boot").exists(), "per-VM state left behind after a normal exit"


def test_qemu_exit_code_passes_through(guest, runtime):
    """A QEMU that fails (bad option) makes `ssi-pager vm` fail with QEMU's code."""
    res = run_vm("--name", "bad", "--", *guest.qemu_args(), "-no-such-option")
    assert res.returncode == 1
    assert "no-such-option" in res.stderr


@pytest.mark.parametrize("where", ["same-host", "other-host"])
def test_suspend_resume_same_checksums(waiting_guest, expected, checksums, runtime, pager,
                                       memnode, token, where):
    """Suspend after pass 1, resume in a new QEMU with a fresh memfd: the guest finishes with
    the uninterrupted run's checksums, and its RAM came from the memory node on demand.
    other-host: the runtime dir is gone; the device state comes from the memory node too."""
    g = waiting_guest
    common = ["--memnode", memnode, "--token-file", str(token), "--pager", str(pager.socket)]
    res1 = run_and_suspend([*common, "--name", "mover", "--", *g.qemu_args()], "mover",
                           "pass 1 waiting")
    assert "suspended" in res1.stderr
    before = res1.stdout
    assert "RESULT" not in before and "pass 2" not in before, "the guest went on after suspend"
    assert checksums(before) == expected[:1]
    state = runtime / "mover" / "device-state"
    assert 0 < state.stat().st_size < 4 << 20, "device state should not contain guest RAM"

    resume = ["resume", "mover", "--pager", str(pager.socket)]
    if where == "other-host":
        shutil.rmtree(runtime / "mover")
        resume += ["--memnode", memnode, "--token-file", str(token)]
    m0 = pager.metrics()
    with VmRun(*resume, "--", *g.qemu_args()) as second:
        second.status_until("resumed")
        release(second, 1, g.passes)
        res = second.finish()
    assert res.returncode == 0, res.stderr[-2000:]
    after = checksums(res.stdout)
    assert checksums(before) + after == expected, (before, after)
    m1 = pager.metrics()
    fetched = m1["ssi_pager_fetched_bytes_total"] - m0.get("ssi_pager_fetched_bytes_total", 0)
    key = 'ssi_pager_faults_total{kind="missing",outcome="fetched"}'
    assert m1.get(key, 0) > m0.get(key, 0), "no fault was served from the memory node"
    # the workload's pages (128 MiB, rewritten once before the suspend) came back on demand
    assert fetched >= 64 << 20, f"only {fetched} bytes fetched from the memory node"
    assert not (runtime / "mover").exists()
    if where == "other-host":
        assert "fetched from" in res.stderr
    # resumed once: the stored state is spent, a second resume is refused before QEMU starts
    again = run_vm("resume", "mover", "--memnode", memnode, "--token-file", str(token), "--",
                   *g.qemu_args())
    assert again.returncode == 1
    assert "no suspended guest" in again.stderr
    assert not (runtime / "mover").exists()


def test_suspend_refusals_leave_the_guest_resumable(small_guest, small_expected, checksums,
                                                    runtime, pager, memnode, token):
    """A name in use (running, then suspended), a second suspend and a resume with another RAM
    size are refused with what to do, and none of them harms the guest: it resumes and ends
    with the uninterrupted run's checksums."""
    g = small_guest
    common = ["--memnode", memnode, "--token-file", str(token), "--pager", str(pager.socket)]
    with VmRun(*common, "--name", "busy", "--", *g.qemu_args()) as first:
        first.read_until("pass 1 waiting")
        clash = run_vm(*common, "--name", "busy", "--", *g.qemu_args())
        assert clash.returncode == 1
        assert "a VM named 'busy' is running" in clash.stderr
        sus = suspend("busy")
        assert sus.returncode == 0, sus.stderr
        res1 = first.finish()
    assert res1.returncode == 0, res1.stderr[-2000:]
    again = suspend("busy")
    assert again.returncode == 1
    assert "'busy' is already suspended; resume it" in again.stderr
    clash = run_vm(*common, "--name", "busy", "--", *g.qemu_args())
    assert clash.returncode == 1
    assert "a VM named 'busy' is suspended" in clash.stderr
    bigger = run_vm("resume", "busy", "--", *g.qemu_args(memory=False),
                    "-m", f"{2 * g.mem_mib}M")
    assert bigger.returncode == 1
    assert f"same RAM size as the suspended guest ({g.mem_mib} MiB)" in bigger.stderr
    assert json.loads((runtime / "busy" / "vm.json").read_text())["suspended"]
    with VmRun("resume", "busy", "--", *g.qemu_args()) as second:
        second.status_until("resumed")
        release(second, 1, g.passes)
        res = second.finish()
    assert res.returncode == 0, res.stderr[-2000:]
    assert checksums(res1.stdout + res.stdout) == small_expected


def suspend_refused_guest_runs_on(vm_args: list[str], name: str, message: str, passes: int,
                                  expected: list[str], checksums) -> str:
    """Run a waiting guest, have `suspend` refused with ``message`` at pass 1, let the guest
    finish: it must end with ``expected`` checksums. `ssi-pager vm`'s status text."""
    with VmRun(*vm_args[:vm_args.index("--")], "--name", name,
               *vm_args[vm_args.index("--"):]) as run:
        run.read_until("pass 1 waiting")
        sus = suspend(name)
        assert sus.returncode == 1
        assert message in sus.stderr
        release(run, 1, passes)
        res = run.finish()
    assert res.returncode == 0, res.stderr[-2000:]
    assert checksums(res.stdout) == expected
    return res.stderr


def test_suspend_needs_memory_node(small_guest, small_expected, checksums, runtime):
    """A guest started without --memnode (its RAM on a memory node of its own, gone with it)
    cannot be suspended; the refusal leaves it running."""
    g = small_guest
    suspend_refused_guest_runs_on(["--", *g.qemu_args()], "local",
                                  "suspend needs memory nodes to hold the guest's RAM",
                                  g.passes, small_expected, checksums)


def test_suspend_needs_shared_ram(small_guest, small_expected, checksums, runtime, pager,
                                  memnode, token):
    """Guest RAM on a private backend cannot be read by suspend: refused, the guest runs on."""
    g = small_guest
    size = f"{g.mem_mib}M"
    args = ["--memnode", memnode, "--token-file", str(token), "--pager", str(pager.socket),
            "--", *g.qemu_args(memory=False), "-m", size,
            "-object", f"memory-backend-ram,id=private,size={size}",
            "-machine", "memory-backend=private"]
    status = suspend_refused_guest_runs_on(args, "private",
                                           "suspend needs guest RAM on a shared memfd",
                                           g.passes, small_expected, checksums)
    assert "anonymous" in status


def test_no_pager_fails_loudly(guest, tmp_path):
    """The shim with no pager listening: QEMU exits at once with a message, never runs."""
    from pager.shim import library

    env = dict(os.environ, LD_PRELOAD=str(library()),
               SSI_PAGER_SOCKET=str(tmp_path / "nobody.sock"),
               SSI_PAGER_RAM_SIZE=str(guest.mem_mib << 20))
    proc = subprocess.run(guest.qemu_args(), env=env, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT)
    assert proc.returncode != 0
    assert "ssi-pager shim: cannot reach the pager" in proc.stderr
    assert "guest up" not in proc.stdout


def test_pager_dies_fails_loudly(waiting_guest, runtime, pager, memnode, token):
    """Killing the pager while the guest waits stops QEMU with a message (within the run's
    deadline); the guest never finishes."""
    with VmRun("--memnode", memnode, "--token-file", str(token), "--pager",
               str(pager.socket), "--name", "victim", "--", *waiting_guest.qemu_args()) as run:
        run.read_until("pass 1 waiting")
        pager.proc.send_signal(signal.SIGKILL)
        res = run.finish()
    assert res.returncode != 0
    assert "the pager closed the handoff socket" in res.stderr
    assert "RESULT" not in res.stdout


def test_shim_inert_without_pager_environment(guest, expected, checksums):
    """Preloaded without SSI_PAGER_SOCKET the shim does nothing."""
    from pager.shim import library

    env = {k: v for k, v in os.environ.items() if not k.startswith("SSI_PAGER_")}
    env["LD_PRELOAD"] = str(library())
    proc = subprocess.run(guest.qemu_args(), env=env, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert checksums(proc.stdout) == expected
    assert "ssi-pager" not in proc.stderr


def test_state_dir_private(guest, runtime, memnode, token, pager):
    """The per-VM runtime dir (QMP socket, state) is 0700 while the guest runs."""
    with VmRun("--memnode", memnode, "--token-file", str(token), "--pager",
               str(pager.socket), "--name", "priv", "--", *guest.qemu_args()) as run:
        run.read_until("guest up")
        d = runtime / "priv"
        assert d.stat().st_mode & 0o777 == 0o700
        assert (d / "qmp.sock").exists()
        res = run.finish()
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.netns
def test_boot_memory_node_in_another_namespace(guest, expected, checksums, runtime, tmp_path,
                                               token):
    """`ssi-pager vm` (and its pager) in one namespace, the memory node in another: the guest
    boots from pages served across the veth link and computes the right checksums."""
    from pager.vm.bench import netns_helper, start_memnode
    from pager.vm.procs import stop_process

    netns = netns_helper()
    why = netns.unavailable()
    if why:
        pytest.skip(why)
    with netns.two_hosts() as (ns_a, _ip_a, ns_b, ip_b):
        node, endpoint = start_memnode(tmp_path, token, f"{ip_b}:0",
                                       ["ip", "netns", "exec", ns_b])
        try:
            assert endpoint.startswith(ip_b)
            argv = ["ip", "netns", "exec", ns_a,
                    *vm_cmd("--memnode", endpoint, "--token-file", str(token), "--name", "far",
                            "--", *guest.qemu_args())]
            with VmRun(argv=argv) as run:
                res = run.finish()
        finally:
            stop_process(node)
    assert res.returncode == 0, res.stderr[-2000:]
    assert checksums(res.stdout) == expected
    assert f"pager: serving {runtime / 'far' / 'pager.sock'} from memnode {endpoint}" in \
        res.stderr


def test_memory_node_lost_fails_loudly(guest, runtime, tmp_path, token):
    """The memory node dies before the guest's first fault: the pager gives up after its fetch
    timeout and the faulting vCPU gets SIGBUS, so QEMU dies instead of hanging."""
    from pager.vm.bench import start_memnode
    from pager.vm.procs import stop_process

    node, endpoint = start_memnode(tmp_path, token)
    try:
        with VmRun("--memnode", endpoint, "--token-file", str(token),
                   "--pager-arg=--fetch-timeout=2", "--name", "orphan", "--",
                   *guest.qemu_args()) as run:
            run.status_until("started the pager")
            stop_process(node)  # before QEMU has mapped (let alone touched) guest RAM
            res = run.finish()
    finally:
        stop_process(node)
    assert res.returncode != 0
    assert "RESULT" not in res.stdout
    assert "SIGBUS" in res.stderr or "code 135" in res.stderr, res.stderr[-2000:]


def test_killed_vm_command_stops_guest(guest, runtime):
    """SIGKILL to `ssi-pager vm`: its pager dies with it, and the shim then stops QEMU."""
    with VmRun("--name", "orphaned", "--", *guest.qemu_args()) as run:
        run.read_until("guest up")
        qemu_pid = json.loads((runtime / "orphaned" / "vm.json").read_text())["qemu_pid"]
        pidfd = os.pidfd_open(qemu_pid)
        try:
            run.proc.kill()  # `vm` alone: what follows is up to its pager and the shim
            run.proc.wait(RUN_TIMEOUT)
            ready, _, _ = select.select([pidfd], [], [], 30)
        finally:
            os.close(pidfd)
        assert ready, "QEMU kept running without its pager"


def test_suspend_resume_twice(waiting_guest, expected, checksums, runtime, pager, memnode,
                              token):
    """Suspend, resume, suspend the resumed guest again, resume: pages the second run never
    touched still come from the first suspend, and the result is still the uninterrupted one."""
    g = waiting_guest
    common = ["--memnode", memnode, "--token-file", str(token), "--pager", str(pager.socket)]
    seen = run_and_suspend([*common, "--name", "twice", "--", *g.qemu_args()], "twice",
                           "pass 1 waiting").stdout
    seen += run_and_suspend(["resume", "twice", *common, "--", *g.qemu_args()], "twice",
                            "pass 2 waiting", resumed=True).stdout
    assert checksums(seen) == expected[:2], "the guest went on after its second suspend"
    with VmRun("resume", "twice", *common, "--", *g.qemu_args()) as run:
        run.status_until("resumed")
        release(run, 2, g.passes)
        res = run.finish()
    assert res.returncode == 0, res.stderr[-2000:]
    assert checksums(seen + res.stdout) == expected
