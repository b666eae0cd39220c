"""A real QEMU guest with all of its RAM behind the pager (tests/qemu, marked qemu).

The guest's workload fills 128 MiB with a pattern, rewrites it in 4 passes and prints a checksum
after each; the expected checksums come from the same static binary run on the host. Every
QEMU run has a timeout: a guest that hangs fails the test instead of stalling the suite.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

RUN_TIMEOUT = 90


def vm_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pager.cli", "vm", *args]


def start_vm(*args: str) -> subprocess.Popen:
    """``ssi-pager vm ARGS`` in the background, console on stdout, status lines on stderr."""
    return subprocess.Popen(vm_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def read_until(proc: subprocess.Popen, pattern: str, timeout: float = 60) -> str:
    """Console text up to the first line containing ``pattern`` (fails on EOF or timeout)."""
    text = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), True)
    for line in iter(proc.stdout.readline, ""):
        text.append(line)
        if pattern in line:
            return "".join(text)
        assert time.monotonic() < deadline, f"no {pattern!r} within {timeout} s"
    pytest.fail(f"console ended before {pattern!r}:\n{''.join(text)[-2000:]}")


@pytest.mark.parametrize("extra", [[], ["-sandbox", "on"]], ids=["plain", "sandbox"])
def test_boot_all_ram_behind_pager(guest, expected, checksums, runtime, extra):
    """`ssi-pager vm` with no options: its own pager and loopback memory node serve all RAM
    (also under QEMU's seccomp sandbox)."""
    proc = subprocess.run(vm_cmd("--name", "boot", "--", *guest.qemu_args(), *extra),
                          capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert checksums(proc.stdout) == expected
    assert "handed to the pager" in proc.stderr
    assert "QEMU exited with code 0" in proc.stderr
    assert not (runtime / "boot").exists(), "per-VM state left behind after a normal exit"


def test_qemu_exit_code_passes_through(guest, runtime):
    """A QEMU that fails (bad option) makes `ssi-pager vm` fail with QEMU's code."""
    proc = subprocess.run(vm_cmd("--name", "bad", "--", *guest.qemu_args(),
                                 "-no-such-option"),
                          capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert proc.returncode == 1
    assert "no-such-option" in proc.stderr


@pytest.mark.parametrize("where", ["same-host", "other-host"])
def test_suspend_resume_same_checksums(guest, expected, checksums, runtime, pager, memnode,
                                       token, where):
    """Suspend after pass 1, resume in a new QEMU with a fresh memfd: the guest finishes with
    the uninterrupted run's checksums, and its RAM came from the memory node on demand.
    other-host: the runtime dir is gone; the device state comes from the memory node too."""
    common = ["--memnode", memnode, "--token-file", str(token), "--pager", str(pager.socket)]
    first = start_vm(*common, "--name", "mover", "--", *guest.qemu_args())
    try:
        before = read_until(first, "pass 1 checksum")
        sus = subprocess.run(vm_cmd("suspend", "mover"), capture_output=True, text=True,
                             timeout=RUN_TIMEOUT)
        assert sus.returncode == 0, sus.stderr
        out, err = first.communicate(timeout=RUN_TIMEOUT)
    finally:
        first.kill()
    before += out
    assert first.returncode == 0, err[-2000:]
    assert "suspended" in err
    assert "RESULT" not in before, "the guest finished before it was suspended"
    done_before = checksums(before)
    assert done_before == expected[:len(done_before)]
    state = runtime / "mover" / "device-state"
    assert 0 < state.stat().st_size < 4 << 20, "device state should not contain guest RAM"

    resume = ["resume", "mover", "--pager", str(pager.socket)]
    if where == "other-host":
        shutil.rmtree(runtime / "mover")
        resume += ["--memnode", memnode, "--token-file", str(token)]
    m0 = pager.metrics()
    res = subprocess.run(vm_cmd(*resume, "--", *guest.qemu_args()),
                         capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed" in res.stderr
    after = checksums(res.stdout)
    assert done_before + after == expected, (done_before, after)
    assert checksums(before + res.stdout)[-1] == expected[-1]
    m1 = pager.metrics()
    fetched = m1["ssi_pager_fetched_bytes_total"] - m0.get("ssi_pager_fetched_bytes_total", 0)
    key = 'ssi_pager_faults_total{kind="missing",outcome="fetched"}'
    assert m1.get(key, 0) > m0.get(key, 0), "no fault was served from the memory node"
    # the workload's pages (128 MiB, minus what it already rewrote) came back on demand
    assert fetched >= 64 << 20, f"only {fetched} bytes fetched from the memory node"
    assert not (runtime / "mover").exists()
    if where == "other-host":
        assert "fetched from" in res.stderr
    # resumed once: the stored state is spent, a second resume is refused before QEMU starts
    again = subprocess.run(vm_cmd("resume", "mover", "--memnode", memnode, "--token-file",
                                  str(token), "--", *guest.qemu_args()),
                           capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert again.returncode == 1
    assert "no suspended guest" in again.stderr
    assert not (runtime / "mover").exists()


def test_no_pager_fails_loudly(guest, tmp_path):
    """The shim with no pager listening: QEMU exits at once with a message, never runs."""
    from pager.shim import library

    env = dict(os.environ, LD_PRELOAD=str(library()),
               SSI_PAGER_SOCKET=str(tmp_path / "nobody.sock"),
               SSI_PAGER_RAM_SIZE=str(guest.mem_mib << 20))
    proc = subprocess.run(guest.qemu_args(), env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode != 0
    assert "ssi-pager shim: cannot reach the pager" in proc.stderr
    assert "guest up" not in proc.stdout


def test_pager_dies_fails_loudly(guest, runtime, pager, memnode, token):
    """Killing the pager while the guest runs stops QEMU with a message, within seconds."""
    proc = start_vm("--memnode", memnode, "--token-file", str(token), "--pager",
                    str(pager.socket), "--name", "victim", "--",
                    *guest.qemu_args())
    try:
        read_until(proc, "pass 1 progress")
        pager.proc.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert "the pager closed the handoff socket" in err
    assert "RESULT" not in out
    assert took < 10, f"QEMU took {took:.1f} s to stop after the pager died"


def test_shim_inert_without_pager_environment(guest, expected, checksums):
    """Preloaded without SSI_PAGER_SOCKET (as in QEMU's helper children) the shim does nothing."""
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
    proc = start_vm("--memnode", memnode, "--token-file", str(token), "--pager",
                    str(pager.socket), "--name", "priv", "--",
                    *guest.qemu_args())
    try:
        read_until(proc, "guest up")
        d = Path(runtime / "priv")
        assert d.stat().st_mode & 0o777 == 0o700
        assert (d / "qmp.sock").exists()
        proc.communicate(timeout=RUN_TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 0


@pytest.mark.netns
def test_boot_memory_node_in_another_namespace(guest, expected, checksums, runtime, tmp_path,
                                               token):
    """`ssi-pager vm` (and its pager) in one namespace, the memory node in another: the guest
    boots from pages served across the veth link and computes the right checksums."""
    from pager.vm.bench import netns_helper, start_memnode

    netns = netns_helper()
    why = netns.unavailable()
    if why:
        pytest.skip(why)
    with netns.two_hosts() as (ns_a, _ip_a, ns_b, ip_b):
        node, endpoint = start_memnode(tmp_path, token, f"{ip_b}:0",
                                       ["ip", "netns", "exec", ns_b])
        try:
            assert endpoint.startswith(ip_b)
            proc = netns.run_in(ns_a, vm_cmd("--memnode", endpoint, "--token-file", str(token),
                                             "--name", "far", "--", *guest.qemu_args()),
                                capture_output=True, text=True, timeout=RUN_TIMEOUT)
        finally:
            from pager.vm.procs import stop_process
            stop_process(node)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert checksums(proc.stdout) == expected
    assert f"pager: serving {runtime / 'far' / 'pager.sock'} from memnode {endpoint}" in \
        proc.stderr


def test_memory_node_lost_fails_loudly(guest, runtime, tmp_path, token):
    """The memory node dies before the guest's first fault: the pager gives up after its fetch
    timeout and the faulting vCPU gets SIGBUS, so QEMU dies instead of hanging."""
    from pager.vm.bench import start_memnode
    from pager.vm.procs import stop_process

    node, endpoint = start_memnode(tmp_path, token)
    proc = start_vm("--memnode", endpoint, "--token-file", str(token),
                    "--pager-arg=--fetch-timeout=2", "--name", "orphan", "--",
                    *guest.qemu_args())
    try:
        assert proc.stderr is not None
        for line in iter(proc.stderr.readline, ""):
            if "started the pager" in line:
                break
        stop_process(node)  # before QEMU has mapped (let alone touched) guest RAM
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        stop_process(node)
    assert proc.returncode != 0
    assert "RESULT" not in out
    assert "SIGBUS" in err or "code 135" in err, err[-2000:]


def test_killed_vm_command_stops_guest(guest, runtime):
    """SIGKILL to `ssi-pager vm`: its pager dies with it, and the shim then stops QEMU."""
    proc = start_vm("--name", "orphaned", "--", *guest.qemu_args())
    try:
        read_until(proc, "guest up")
        qemu_pid = json.loads((runtime / "orphaned" / "vm.json").read_text())["qemu_pid"]
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and _alive(qemu_pid):
            time.sleep(0.1)
        assert not _alive(qemu_pid), "QEMU kept running without its pager"
    finally:
        proc.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_suspend_resume_twice(guest, expected, checksums, runtime, pager, memnode, token):
    """Suspend, resume, suspend the resumed guest again, resume: pages the second run never
    touched still come from the first suspend, and the result is still the uninterrupted one."""
    common = ["--memnode", memnode, "--token-file", str(token), "--pager", str(pager.socket)]
    seen = ""
    start = vm_cmd(*common, "--name", "twice", "--", *guest.qemu_args())
    for stop_at in ("pass 1 checksum", " checksum "):  # then the resumed run's first one
        proc = subprocess.Popen(start, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        try:
            seen += read_until(proc, stop_at)
            sus = subprocess.run(vm_cmd("suspend", "twice"), capture_output=True, text=True,
                                 timeout=RUN_TIMEOUT)
            assert sus.returncode == 0, sus.stderr
            out, err = proc.communicate(timeout=RUN_TIMEOUT)
        finally:
            proc.kill()
        assert proc.returncode == 0, err[-2000:]
        seen += out
        start = vm_cmd("resume", "twice", *common, "--", *guest.qemu_args())
    assert "RESULT" not in seen, "the guest finished before its second suspend"
    res = subprocess.run(start, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert checksums(seen + res.stdout) == expected
