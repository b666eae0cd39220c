"""Helpers for the trust tests: a client process that runs as another user.

``python tests/engine/trustkit.py MODE SOCK UID GID GROUPS SPACE SEED MIB`` creates its memory
and uffd as root, drops to UID/GID/GROUPS (comma list, may be empty), hands the uffd over and
exits with one of the codes below. MODE ``served``: touch every page and check it against the
data set ``SEED`` (a space of MIB MiB); ``refused``: expect the pager to close the socket.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

SERVED, CONNECT_REFUSED, CLOSED, NOT_CLOSED, STUCK, WRONG_DATA = 0, 11, 12, 13, 14, 15
ROOT = Path(__file__).resolve().parents[2]


def run_as(mode: str, sock: str, uid: int, gid: int, groups: list[int], space: str | None,
           seed: int, mib: int, timeout: float = 90.0) -> tuple[int, str]:
    """Run the client script; (exit code, stderr)."""
    argv = [sys.executable, __file__, mode, sock, str(uid), str(gid),
            ",".join(map(str, groups)), space or "", str(seed), str(mib)]
    p = subprocess.run(argv, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                       capture_output=True, text=True, timeout=timeout, check=False)
    return p.returncode, p.stderr


@contextlib.contextmanager
def shared_dir() -> Iterator[Path]:
    """A directory other users can traverse (pytest's temp dirs are 0700, and every pytest
    run resets its base directory to 0700), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="ssi-trust-"))
    os.chmod(path, 0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def start_halves(sock: str, seed: int, mib: int) -> subprocess.Popen:
    """A client process that touches the first half of its memory, prints "half", waits for a
    line on stdin, then touches the second half and checks everything (exit 0 if right)."""
    return subprocess.Popen([sys.executable, __file__, "halves", sock, str(seed), str(mib)],
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _halves(sock: str, seed: str, mib: str) -> int:
    from pager.tools.workload import Client, DataSet, Touch
    size = int(mib) << 20
    c = Client(size)
    c.handoff(sock)
    if not Touch(c.base, size // 2, threads=2).start().wait(60):
        return STUCK
    print("half", flush=True)
    sys.stdin.readline()
    if not Touch(c.base + size // 2, size // 2, threads=2).start().wait(60):
        return STUCK
    return WRONG_DATA if c.check(DataSet(size, seed=int(seed))) else SERVED


def _main(argv: list[str]) -> int:
    from pager.tools.workload import Client
    if argv[0] == "halves":
        return _halves(*argv[1:])
    mode, sock, uid, gid, groups, space, seed, mib = argv
    size = int(mib) << 20
    Client.FEATURES = ("thread_id",)  # no UNMAP event to wait for at exit if refused
    client = Client(size, space=space or None)
    try:
        return _serve_or_refuse(client, mode, sock, uid, gid, groups, seed, size)
    finally:
        client.uffd.close()  # the last reference when refused: the memory is plain again


def _serve_or_refuse(client, mode: str, sock: str, uid: str, gid: str, groups: str, seed: str,
                     size: int) -> int:
    from pager.tools.workload import DataSet
    os.setgroups([int(g) for g in groups.split(",") if g])
    os.setgid(int(gid))
    os.setuid(int(uid))
    try:
        client.handoff(sock, timeout=2)
    except PermissionError as exc:
        print(f"connect refused: {exc}", file=sys.stderr)
        return CONNECT_REFUSED
    except (BrokenPipeError, ConnectionResetError):
        return CLOSED  # refused before the handshake was even sent
    assert client.sock is not None
    if mode == "refused":
        client.sock.settimeout(20)
        try:
            return CLOSED if client.sock.recv(1) == b"" else NOT_CLOSED
        except ConnectionResetError:  # closed with our handshake unread
            return CLOSED
        except TimeoutError:
            return NOT_CLOSED
    t = client.touch(op="read", threads=2)
    if not t.wait(60):
        return STUCK
    bad = client.check(DataSet(size, seed=int(seed)))
    if bad:
        print(f"{len(bad)} wrong pages, first at {bad[0]:#x}", file=sys.stderr)
        return WRONG_DATA
    return SERVED


if __name__ == "__main__":
    import faulthandler
    import signal
    faulthandler.register(signal.SIGUSR1)
    try:
        code = _main(sys.argv[1:])
    except BaseException as exc:  # report, exit without teardown
        print(f"client failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 99
    sys.stderr.flush()
    os._exit(code)  # no teardown: it could touch registered memory nobody serves any more
