"""Helper processes of a guest: the pager (`ssi-pager serve`) and a memory node; stopping them."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

from pager.errors import VmError
from pager.vm.nodes import Nodes

log = logging.getLogger(__name__)

PAGER_START_TIMEOUT = 15.0
EXIT_SIGNAL_BASE = 128

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """preexec_fn for helper processes: ``sig`` when `ssi-pager vm` itself dies, so a killed
    `vm` leaves nothing behind."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


def pager_dies_with_parent() -> None:
    """The pager `vm` started goes at once with `vm` (SIGKILL: a SIGTERM would make it serve
    its client until that exits, and its client is this guest); the shim then stops QEMU
    (fail closed)."""
    die_with_parent(signal.SIGKILL)


SO_ACCEPTCON = 0x10000  # /proc/net/unix "Flags" of a listening socket


def socket_live(path: str) -> bool:
    """Is a server listening on the Unix socket ``path``? Looked up in /proc/net/unix first,
    so the pager's log does not see a connection that never sends a handshake; a connect
    probe only for a socket file this network namespace does not list."""
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return False
    except OSError:
        return False
    want = os.path.abspath(path)
    with contextlib.suppress(OSError), open("/proc/net/unix") as f:
        for line in f:
            cols = line.split()
            if len(cols) >= 8 and cols[7] == want and int(cols[3], 16) & SO_ACCEPTCON:
                return True
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def spawn_pager(sock: Path, memnode: str | None, token_file: str | None, extra: list[str], *,
                prefix: list[str] | None = None, log: Path | None = None,
                verbose: int = 0) -> subprocess.Popen:
    """`ssi-pager serve` on ``sock`` fetching from ``memnode`` (None: the memory nodes are
    named in ``extra``; ``prefix``: e.g. `ip netns exec NS`; ``log``: output file, else our
    stderr); returns once the socket is bound."""
    cmd = [*(prefix or []), sys.executable, "-m", "pager.cli", *["-v"] * verbose, "serve",
           "--socket", str(sock), *(["--memnode", memnode] if memnode else [])]
    if token_file:
        cmd += ["--token-file", str(token_file)]
    cmd += extra
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    with open(log, "ab") if log else contextlib.nullcontext() as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                preexec_fn=pager_dies_with_parent)
    deadline = time.monotonic() + PAGER_START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-800:] if log else "see its messages above"
            raise VmError(f"the pager exited with code {proc.returncode} before listening "
                          f"(command: {' '.join(cmd)}): {tail}")
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(sock.stat().st_mode):
                return proc  # bound; the shim retries a connect refused before listen()
        time.sleep(0.05)
    stop_process(proc)
    raise VmError(f"the pager did not listen on {sock} within {PAGER_START_TIMEOUT:.0f} s")


def start_pager(sock: Path, args: argparse.Namespace, space: str,
                nodes: Nodes) -> subprocess.Popen:
    """The pager `vm` starts for one guest on ``nodes`` (output on our stderr)."""
    limit = getattr(args, "max_resident", None)
    return spawn_pager(sock, None, args.token_file,
                       [*nodes.serve_args(), "--space", space,
                        *(["--max-resident", str(limit)] if limit is not None else []),
                        *(args.pager_arg or [])],
                       verbose=getattr(args, "verbose", 0) or 0)


MEMNODE_LISTENING = re.compile(r"listening on (\S+)")


def spawn_memnode(store: Path, log: Path, token_file: str | None,
                  listen: str = "127.0.0.1:0", prefix: list[str] | None = None
                  ) -> tuple[subprocess.Popen, str]:
    """`ssi-pager memnode` (``prefix``: e.g. `ip netns exec NS`); (process, endpoint) once it
    listens. Output goes to ``log`` (a pipe nobody reads could fill and block it)."""
    cmd = [*(prefix or []), sys.executable, "-m", "pager.cli", "memnode", "--listen", listen,
           "--store", str(store)]
    if token_file:
        cmd += ["--token-file", str(token_file)]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                preexec_fn=die_with_parent)
    deadline = time.monotonic() + PAGER_START_TIMEOUT
    while time.monotonic() < deadline:
        m = MEMNODE_LISTENING.search(log.read_text(errors="replace"))
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    stop_process(proc)
    raise VmError(f"the memory node did not start: {log.read_text(errors='replace')[-800:]}")


def start_local_memnode(d: Path, token_file: str | None) -> tuple[subprocess.Popen, str]:
    """A memory node on loopback for a guest run without --memnode (fresh RAM: all zero)."""
    return spawn_memnode(d / "store", d / "memnode.log", token_file)


def stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; a process that outlives even that (stuck in
    the kernel) is reported, not waited for forever."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("process %d (%s) did not exit after SIGKILL", proc.pid,
                            proc.args[0] if isinstance(proc.args, list) else proc.args)


def stop_all(procs: list[subprocess.Popen]) -> None:
    """Stop helpers in reverse start order (the pager before the memory node it uses)."""
    for proc in reversed(procs):
        stop_process(proc)


def exit_code(rc: int) -> int:
    return EXIT_SIGNAL_BASE - rc if rc < 0 else rc

