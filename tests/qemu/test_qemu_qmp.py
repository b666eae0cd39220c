"""`pager.vm.qmp.Qmp` against a real QEMU (no guest: `-machine none`) and against a socket that
never answers: commands, QEMU's refusals as VmError, and a deadline on every step."""

from __future__ import annotations

import shutil
import socket
import subprocess

import pytest

from pager.errors import VmError
from pager.vm.qmp import Qmp

QEMU = "qemu-system-x86_64"
EXIT_TIMEOUT = 30


@pytest.fixture
def qemu_qmp(tmp_path):
    """A QEMU without a guest whose QMP socket appears some time after the start."""
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} is not installed (apt-get install qemu-system-x86)")
    path = tmp_path / "qmp.sock"
    proc = subprocess.Popen([QEMU, "-machine", "none", "-nodefaults", "-display", "none",
                             "-qmp", f"unix:{path},server=on,wait=off"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield proc, path
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(EXIT_TIMEOUT)


def test_commands_refusals_and_quit(qemu_qmp):
    proc, path = qemu_qmp
    with Qmp(path) as qmp:  # connects once QEMU listens, however soon after the start
        assert qmp.execute("query-status")["status"] == "running"
        assert qmp.execute("query-migrate") == {}
        with pytest.raises(VmError, match="QMP no-such-command failed: The command "
                                          "no-such-command has not been found"):
            qmp.execute("no-such-command")
        qmp.execute("stop")
        assert qmp.execute("query-status")["status"] == "paused"
        qmp.quit()
    assert proc.wait(EXIT_TIMEOUT) == 0


def test_no_socket_fails_at_the_deadline(tmp_path):
    with pytest.raises(VmError, match=r"cannot reach QEMU's QMP socket .*absent.sock within "
                                      r"1 s \(the socket does not exist\); is the VM running"):
        Qmp(tmp_path / "absent.sock", timeout=1)


def test_silent_server_fails_at_the_deadline(tmp_path):
    """A socket that accepts but never greets (a hung QEMU): VmError, no hang."""
    path = tmp_path / "silent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(str(path))
        srv.listen(8)
        with pytest.raises(VmError, match=r"within 1 s \(no greeting\)"):
            Qmp(path, timeout=1)
