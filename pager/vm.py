"""`ssi-pager vm`: run an unmodified QEMU with all guest RAM behind the pager; suspend, resume.

    ssi-pager vm [--memnode HOST:PORT] [--token-file F] [--space NAME] [--pager SOCKET]
                 [--name NAME] -- qemu-system-x86_64 ARGS...
    ssi-pager vm suspend NAME
    ssi-pager vm resume NAME [--memnode HOST:PORT] [...] -- qemu-system-x86_64 ARGS...

Run: joins the pager listening on ``--pager`` (or starts ``ssi-pager serve`` for this guest),
turns a plain ``-m SIZE`` into a shared ``memory-backend-memfd`` (so the pager and ``suspend``
can read guest RAM), preloads the shim (pager/shim/ssi_shim.c) which hands QEMU's guest RAM to
the pager, adds a QMP socket for ``suspend``, and passes QEMU's exit code through.

Suspend (lazy move, the SSI way): QMP ``stop``; every page the guest ever touched is read from
the RAM memfd and stored in the memory node (pages never touched are already there or zero);
migration with the ``x-ignore-shared`` capability writes only device state to a file; ``quit``.
Resume: a new QEMU with ``-incoming defer``, the same RAM block id and size on a fresh backend,
``x-ignore-shared``, ``migrate-incoming`` from the state file, ``cont``: the guest continues at
once and its RAM is served on demand from the memory node (already during the load: QEMU's
main thread reads guest RAM then).

Per-VM state (QMP socket, vm.json, device state) lives in a 0700 runtime directory:
$SSI_PAGER_RUNTIME_DIR, else $XDG_RUNTIME_DIR/ssi-pager/vm/NAME, else /run/ssi-pager/vm/NAME
(root) or /tmp/ssi-pager-UID/vm/NAME.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pager.errors import VmError

log = logging.getLogger(__name__)

RAM_ID = "ssi-ram"  # the memory-backend id `vm` adds; resume must use the same RAM block id
HANDOFF_TIMEOUT = 30.0  # QEMU maps guest RAM within a second or two of starting
PAGER_START_TIMEOUT = 15.0
QMP_TIMEOUT = 30.0
SEEK_DATA, SEEK_HOLE = 3, 4
STORE_CHUNK = 1 << 20
EXIT_SIGNAL_BASE = 128


def status(msg: str) -> None:
    print(f"ssi-pager vm: {msg}", file=sys.stderr, flush=True)


# --- paths and per-VM state ----------------------------------------------------------------

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


def vm_dir(name: str, create: bool = False) -> Path:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
        raise VmError(f"VM name {name!r}: use letters, digits, '_', '.', '-' (max 64)")
    d = runtime_root() / name
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
    memnode: str | None = None
    token_file: str | None = None
    qemu_pid: int = 0
    memfd: int = -1
    pager_socket: str = ""
    state_file: str = ""
    suspended: bool = False
    stored_bytes: int = 0

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


# --- the QEMU command line -------------------------------------------------------------------

SIZE_RE = re.compile(r"^(\d+)([KMGT]?)(i?B)?$", re.I)


def parse_size(text: str, default_unit: str = "M") -> int:
    """QEMU's -m syntax: a number with optional K/M/G/T suffix (MiB when bare)."""
    m = SIZE_RE.match(text.strip())
    if not m:
        raise VmError(f"cannot read memory size {text!r}; write it like 512M or 2G")
    unit = (m.group(2) or default_unit).upper()
    return int(m.group(1)) << {"B": 0, "K": 10, "M": 20, "G": 30, "T": 40}[unit]


def _opts(value: str) -> dict[str, str]:
    """`a=1,b=2` (first item may be a bare value, returned under "")."""
    out: dict[str, str] = {}
    for i, part in enumerate(value.split(",")):
        k, eq, v = part.partition("=")
        if not eq and i == 0:
            out[""] = part
        else:
            out[k] = v
    return out


@dataclass
class QemuCommand:
    """A QEMU argv with guest RAM set up for the pager."""

    argv: list[str]
    ram_size: int
    ram_id: str
    shared: bool  # guest RAM on a shared memfd (needed by suspend)
    notes: list[str] = field(default_factory=list)


def prepare_qemu(argv: list[str], ram_id: str = RAM_ID) -> QemuCommand:
    """Check the user's QEMU command line and add a shared memfd backend behind plain -m."""
    if not argv:
        raise VmError("no QEMU command given: ssi-pager vm [options] -- qemu-system-x86_64 ...")
    out: list[str] = [argv[0]]
    mem_value: str | None = None
    backends: dict[str, dict[str, str]] = {}
    machine_backend: str | None = None
    notes: list[str] = []
    i = 1
    while i < len(argv):
        a = argv[i]
        opt = a[1:] if a.startswith("--") else a
        val = argv[i + 1] if i + 1 < len(argv) else None
        if opt in ("-m", "-mem-path", "-object", "-machine", "-M", "-numa") and val is None:
            raise VmError(f"QEMU option {a} needs a value")
        if opt == "-m":
            mem_value = val
            i += 2
            continue  # re-added below, once
        if opt == "-mem-path":
            raise VmError("-mem-path (hugetlbfs) is not supported yet: guest RAM must be "
                          "anonymous or a memfd; drop -mem-path")
        if opt == "-daemonize":
            raise VmError("-daemonize is not supported: `ssi-pager vm` stays in front of QEMU "
                          "(run it under systemd or nohup instead)")
        if opt == "-mem-prealloc":
            notes.append("-mem-prealloc faults all guest RAM in at start (no lazy paging)")
        if opt == "-object" and val and val.startswith("memory-backend"):
            o = _opts(val)
            backends[o.get("id", "")] = o
            if o.get("hugetlb") in ("on", "yes", "true"):
                raise VmError("memory-backend-memfd with hugetlb=on is not supported yet")
            if o.get("prealloc") in ("on", "yes", "true"):
                notes.append("prealloc=on faults all guest RAM in at start (no lazy paging)")
        if opt in ("-machine", "-M") and val:
            mb = _opts(val).get("memory-backend")
            if mb:
                machine_backend = mb
        if "vhost-user" in a:
            raise VmError("vhost-user devices are not supported yet: another process would "
                          "map guest RAM outside the pager's userfaultfd")
        if opt == "-numa" and val and "memdev=" in val:
            raise VmError("NUMA guests (several RAM backends) are not supported yet")
        out.append(a)
        if opt in ("-m", "-object", "-machine", "-M", "-numa") and val is not None:
            out.append(val)
            i += 2
        else:
            i += 1
    mem = _opts(mem_value) if mem_value else {"": "128M"}
    if "maxmem" in mem or "slots" in mem:
        raise VmError("memory hotplug (-m maxmem=/slots=) is not supported yet")
    size = parse_size(mem.get("size") or mem.get("", "128M"))
    if machine_backend is not None:
        be = backends.get(machine_backend)
        if be is None:
            raise VmError(f"-machine memory-backend={machine_backend} names no -object")
        be_size = parse_size(be.get("size", "0"), "B")
        if be_size != size:
            raise VmError(f"-m {mem_value} and backend {machine_backend} size differ")
        shared = be.get("", "") == "memory-backend-memfd" and be.get("share") in ("on", "yes",
                                                                                 "true")
        return QemuCommand([*out, "-m", _mem_arg(size)], size, machine_backend, shared, notes)
    out += ["-m", _mem_arg(size),
            "-object", f"memory-backend-memfd,id={ram_id},size={size},share=on",
            "-machine", f"memory-backend={ram_id}"]
    return QemuCommand(out, size, ram_id, True, notes)


def _mem_arg(size: int) -> str:
    return f"{size >> 20}M" if size % (1 << 20) == 0 else f"{size}B"


# --- QMP -------------------------------------------------------------------------------------

class Qmp:
    """A minimal synchronous QMP client (one command at a time; events are skipped)."""

    def __init__(self, path: Path, timeout: float = QMP_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(timeout)
                self.sock.connect(str(path))
                break
            except OSError as exc:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise VmError(f"cannot reach QEMU's QMP socket {path}: {exc.strerror}; "
                                  f"is the VM running?") from exc
                time.sleep(0.01)
        self.buf = b""
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise VmError("QEMU closed the QMP connection")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    def execute(self, command: str, **arguments: object) -> object:
        msg: dict[str, object] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise VmError(f"QMP {command} failed: {reply['error'].get('desc', reply)}")

    def wait_migration(self, timeout: float = 300.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.execute("query-migrate")
            st = info.get("status") if isinstance(info, dict) else None
            if st == "completed":
                return info  # type: ignore[return-value]
            if st in ("failed", "cancelled"):
                raise VmError(f"migration {st}: {info.get('error-desc', '')}")  # type: ignore
            time.sleep(0.002)
        raise VmError("migration did not complete in time")

    def close(self) -> None:
        self.sock.close()


# --- the pager -------------------------------------------------------------------------------

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn for helper processes: SIGTERM when `ssi-pager vm` itself dies, so a killed
    `vm` leaves no pager behind (and the shim then stops QEMU: fail closed)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


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


def spawn_pager(sock: Path, memnode: str, token_file: str | None, extra: list[str], *,
                prefix: list[str] | None = None, log: Path | None = None,
                verbose: int = 0) -> subprocess.Popen:
    """`ssi-pager serve` on ``sock`` fetching from ``memnode`` (``prefix``: e.g. `ip netns exec
    NS`; ``log``: output file, else our stderr); returns once the socket is bound."""
    cmd = [*(prefix or []), sys.executable, "-m", "pager.cli", *["-v"] * verbose, "serve",
           "--socket", str(sock), "--memnode", memnode]
    if token_file:
        cmd += ["--token-file", str(token_file)]
    cmd += extra
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    with open(log, "ab") if log else contextlib.nullcontext() as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                preexec_fn=die_with_parent)
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
                memnode: str) -> subprocess.Popen:
    """The pager `vm` starts for one guest (output on our stderr)."""
    return spawn_pager(sock, memnode, args.token_file,
                       ["--space", space, *(args.pager_arg or [])],
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
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stop_all(procs: list[subprocess.Popen]) -> None:
    """Stop helpers in reverse start order (the pager before the memory node it uses)."""
    for proc in reversed(procs):
        stop_process(proc)


def exit_code(rc: int) -> int:
    return EXIT_SIGNAL_BASE - rc if rc < 0 else rc


# --- run / resume ----------------------------------------------------------------------------

@dataclass
class Launch:
    """A started QEMU with guest RAM handed off (and the pager we started for it, if any)."""

    qemu: subprocess.Popen
    helpers: list[subprocess.Popen]  # pager and local memory node started for this guest
    state: VmState
    dir: Path


def launch(args: argparse.Namespace, qemu_argv: list[str], name: str, *,
           incoming: bool = False, ram_id: str = RAM_ID,
           expect_size: int | None = None, stdout: int | None = None) -> Launch:
    """Start (or join) the pager and QEMU with the shim; return after the handoff."""
    from pager.shim import library

    shim = library()
    cmd = prepare_qemu(qemu_argv, ram_id)
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
    else:
        pager_sock = Path(args.pager) if args.pager else d / "pager.sock"
        memnode = args.memnode
        if not memnode:
            node, memnode = start_local_memnode(d, args.token_file)
            helpers.append(node)
            status(f"no --memnode: started a local memory node on {memnode} (fresh RAM)")
        try:
            helpers.append(start_pager(pager_sock, args, space, memnode))
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
        qemu = subprocess.Popen(argv, env=env, pass_fds=(w,), stdout=stdout)
    except OSError as exc:
        os.close(r)
        os.close(w)
        stop_all(helpers)
        raise VmError(f"cannot start {argv[0]}: {exc.strerror}") from exc
    os.close(w)
    state = VmState(name=name, space=space, ram_size=cmd.ram_size, ram_id=cmd.ram_id,
                    memnode=args.memnode, token_file=args.token_file, qemu_pid=qemu.pid,
                    pager_socket=str(pager_sock), state_file=str(d / "device-state"))
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
    state = _reload(d)
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
        _cleanup(d)
    return code


def _reload(d: Path) -> VmState | None:
    try:
        return VmState.load(d)
    except VmError:
        return None


def _cleanup(d: Path) -> None:
    for f in ("qmp.sock", "pager.sock", "vm.json", "vm.json.tmp", "device-state",
              "device-state.resume", "device-state.remote", "memnode.log"):
        with contextlib.suppress(FileNotFoundError):
            (d / f).unlink()
    shutil.rmtree(d / "store", ignore_errors=True)
    with contextlib.suppress(OSError):
        d.rmdir()


def do_run(args: argparse.Namespace, qemu_argv: list[str]) -> int:
    name = args.name or args.space or f"vm-{os.getpid()}"
    d = runtime_root() / name
    if (d / "vm.json").exists():
        old = _reload(d)
        if old is not None and (old.suspended or _alive(old.qemu_pid)):
            raise VmError(f"a VM named {name!r} is {'suspended' if old.suspended else 'running'}"
                          f" ({d}); pick another --name or resume/stop it")
    return finish(launch(args, qemu_argv, name))


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def do_resume(args: argparse.Namespace, name: str, qemu_argv: list[str]) -> int:
    return finish(resume_start(args, name, qemu_argv))


def resume_start(args: argparse.Namespace, name: str, qemu_argv: list[str], *,
                 stdout: int | None = None,
                 before_cont: Callable[[Launch], None] | None = None) -> Launch:
    """Start the new QEMU, load the device state, `cont`; returns the running guest.
    ``before_cont`` runs once the device state is loaded (the benchmark's eager load)."""
    d = vm_dir(name, create=True)
    if (d / "vm.json").exists():
        saved = VmState.load(d)
        if not saved.suspended:
            raise VmError(f"VM {name!r} is not suspended; suspend it first")
    else:  # suspended on another host: everything needed is on the memory node
        if not args.memnode:
            raise VmError(f"VM {name!r} was not suspended on this host: give the memory node "
                          f"holding it (--memnode HOST:PORT, --token-file F)")
        try:
            meta, data = load_device_state(args.memnode, args.token_file, args.space or name)
        except BaseException:
            _cleanup(d)
            raise
        saved = VmState(name=name, space=meta["space"], ram_size=int(meta["ram_size"]),
                        ram_id=str(meta["ram_id"]), memnode=args.memnode,
                        token_file=args.token_file, suspended=True,
                        state_file=str(d / "device-state.remote"))
        Path(saved.state_file).write_bytes(data)
        status(f"device state of {name!r} ({len(data) >> 10} KiB) fetched from {args.memnode}")
    state_file = Path(args.state or saved.state_file)
    if not state_file.is_file():
        raise VmError(f"device state {state_file} missing; copy it from the suspending host "
                      f"and pass --state FILE, or give --memnode to load it from there")
    args.memnode = args.memnode or saved.memnode
    args.token_file = args.token_file or saved.token_file
    args.space = args.space or saved.space
    if not args.pager and saved.pager_socket and socket_live(saved.pager_socket):
        args.pager = saved.pager_socket  # the shared pager the guest used before
    if not args.memnode:
        raise VmError("resume needs the memory node holding the guest's RAM: --memnode HOST:PORT")
    # keep the device state out of the way of the new instance's own state file
    held = d / "device-state.resume"
    if state_file.resolve() == (d / "device-state").resolve():
        os.replace(state_file, held)
        state_file = held
    t0 = time.monotonic()
    lau = launch(args, qemu_argv, name, incoming=True, ram_id=saved.ram_id,
                 expect_size=saved.ram_size, stdout=stdout)
    if lau.qemu.poll() is not None:
        return lau
    try:
        qmp = Qmp(lau.dir / "qmp.sock")
        try:
            qmp.execute("migrate-set-capabilities",
                        capabilities=[{"capability": "x-ignore-shared", "state": True}])
            qmp.execute("migrate-incoming", uri=f"exec:cat {_shell_quote(str(state_file))}")
            qmp.wait_migration()
            # resumed once: the stored state goes stale as soon as the guest runs
            load_device_state(args.memnode, args.token_file, args.space, clear=True)
            if before_cont is not None:
                before_cont(lau)
            qmp.execute("cont")
        finally:
            qmp.close()
    except (VmError, OSError) as exc:
        stop_process(lau.qemu)
        stop_all(lau.helpers)
        raise VmError(f"resume of {name!r} failed: {exc}") from exc
    status(f"guest {name!r} resumed in {time.monotonic() - t0:.2f} s (RAM served on demand "
           f"from {args.memnode}, space {args.space!r})")
    for f in (held, d / "device-state.remote"):
        with contextlib.suppress(FileNotFoundError):
            f.unlink()
    return lau


def _shell_quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


# --- suspend ---------------------------------------------------------------------------------

def data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of the allocated parts of a memfd: pages the guest ever touched."""
    off = 0
    while off < size:
        try:
            start = os.lseek(fd, off, SEEK_DATA)
        except OSError as exc:
            if exc.errno == 6:  # ENXIO: no data after off
                return
            raise
        if start >= size:
            return
        end = min(os.lseek(fd, start, SEEK_HOLE), size)
        yield start, end - start
        off = end


def store_ram(memfd_path: str, size: int, memnode: str, token_file: str | None,
              space: str) -> int:
    """Copy every allocated page of guest RAM into the memory node; bytes stored."""
    from transport.tcp import BlockingChannel
    from transport.token import load_token

    token = load_token(token_file)
    fd = os.open(memfd_path, os.O_RDONLY | os.O_CLOEXEC)
    stored = 0
    buf = bytearray(STORE_CHUNK)
    view = memoryview(buf)
    try:
        with BlockingChannel.connect(memnode, token, space) as ch:
            for start, length in data_ranges(fd, size):
                for off in range(start, start + length, STORE_CHUNK):
                    n = min(STORE_CHUNK, start + length - off)
                    got = os.preadv(fd, [view[:n]], off)
                    if got != n:
                        raise VmError(f"short read of guest RAM at {off:#x}")
                    ch.store(off, view[:n])
                    stored += n
    finally:
        os.close(fd)
    return stored


VMSTATE_MAGIC = "ssi-pager-vm-state-1"
PAGE = 4096


def state_space(space: str) -> str:
    """The memory-node address space holding a suspended guest's device state."""
    name = f"{space}.vmstate"
    if len(name) > 64:
        raise VmError(f"space name {space!r} is too long to suspend (max 56 characters)")
    return name


def store_device_state(memnode: str, token_file: str | None, st: VmState,
                       data: bytes) -> None:
    """Device state + what resume needs to know, into the memory node: page 0 a JSON header,
    the state from page 1. The header is cleared first and written last, so a suspend cut
    short never leaves a header describing half-written state."""
    from transport.tcp import BlockingChannel
    from transport.token import load_token

    meta = {"magic": VMSTATE_MAGIC, "name": st.name, "space": st.space,
            "ram_size": st.ram_size, "ram_id": st.ram_id, "device_bytes": len(data)}
    header = json.dumps(meta).encode()
    padded = data + bytes(-len(data) % PAGE)
    with BlockingChannel.connect(memnode, load_token(token_file),
                                 state_space(st.space)) as ch:
        ch.store(0, bytes(PAGE))
        for off in range(0, len(padded), STORE_CHUNK):
            ch.store(PAGE + off, padded[off:off + STORE_CHUNK])
        ch.store(0, header.ljust(PAGE, b"\0"))


def load_device_state(memnode: str, token_file: str | None, space: str,
                      clear: bool = False) -> tuple[dict, bytes]:
    """(header, device state) of a guest suspended into ``space``; ``clear`` invalidates
    them (a guest must be resumed once: its RAM changes as soon as it runs)."""
    from transport.tcp import BlockingChannel
    from transport.token import load_token

    with BlockingChannel.connect(memnode, load_token(token_file), state_space(space)) as ch:
        if clear:
            ch.store(0, bytes(PAGE))
            return {}, b""
        page = bytearray(PAGE)
        if ch.fetch_into(0, page) & 1 or not page.rstrip(b"\0"):
            raise VmError(f"no suspended guest in space {space!r} on {memnode}: suspend it "
                          f"first (or it was already resumed)")
        try:
            meta = json.loads(page.rstrip(b"\0"))
        except ValueError as exc:
            raise VmError(f"the suspended-guest header in {state_space(space)!r} on {memnode} "
                          f"is unreadable ({exc})") from exc
        if not isinstance(meta, dict) or meta.get("magic") != VMSTATE_MAGIC:
            raise VmError(f"{state_space(space)!r} on {memnode} holds no ssi-pager guest")
        n = int(meta["device_bytes"])
        buf = bytearray(n + (-n % PAGE))
        view = memoryview(buf)
        for off in range(0, len(buf), STORE_CHUNK):
            part = view[off:off + STORE_CHUNK]
            zero = ch.fetch_into(PAGE + off, part)
            for i in range(len(part) // PAGE):
                if zero >> i & 1:
                    part[i * PAGE:(i + 1) * PAGE] = bytes(PAGE)
    return meta, bytes(buf[:n])


def do_suspend(args: argparse.Namespace, name: str) -> int:
    d = vm_dir(name)
    state = VmState.load(d)
    if state.suspended:
        raise VmError(f"VM {name!r} is already suspended")
    memnode = args.memnode or state.memnode
    if not memnode:
        raise VmError("suspend needs a memory node to hold the guest's RAM: the VM was started "
                      "without --memnode (or pass --memnode HOST:PORT)")
    if state.memfd < 0:
        raise VmError("suspend needs guest RAM on a shared memfd (plain -m, or "
                      "memory-backend-memfd with share=on)")
    t0 = time.monotonic()
    qmp = Qmp(d / "qmp.sock")
    try:
        qmp.execute("stop")
        stored = store_ram(f"/proc/{state.qemu_pid}/fd/{state.memfd}", state.ram_size,
                           memnode, args.token_file or state.token_file, state.space)
        t_ram = time.monotonic() - t0
        qmp.execute("migrate-set-capabilities",
                    capabilities=[{"capability": "x-ignore-shared", "state": True}])
        state_file = Path(state.state_file)
        with contextlib.suppress(FileNotFoundError):
            state_file.unlink()
        qmp.execute("migrate", uri=f"exec:cat > {_shell_quote(str(state_file))}")
        qmp.wait_migration()
        store_device_state(memnode, args.token_file or state.token_file, state,
                           state_file.read_bytes())
        state.suspended = True
        state.stored_bytes = stored
        state.memnode = memnode
        state.save(d)
        qmp.execute("quit")
    except BaseException:
        with contextlib.suppress(VmError, OSError):
            qmp.execute("cont")
        raise
    finally:
        qmp.close()
    dev = Path(state.state_file).stat().st_size
    status(f"suspended {name!r}: {stored >> 20} MiB of RAM to {memnode} in {t_ram:.2f} s, "
           f"device state {dev >> 10} KiB (in {state.state_file} and on the memory node)")
    return 0


# --- CLI -------------------------------------------------------------------------------------

def _add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memnode", metavar="HOST:PORT",
                   help="memory node holding guest RAM (default: the pager's own source)")
    p.add_argument("--token-file", metavar="F", help="cluster token (default: the user's)")
    p.add_argument("--space", metavar="NAME", help="memory-node address space (default: name)")
    p.add_argument("--pager", metavar="SOCKET",
                   help="join the pager on this socket (started here if nothing listens)")
    p.add_argument("--name", metavar="NAME", help="VM name for suspend/resume (default: space)")
    p.add_argument("--state", metavar="FILE", help="resume: device state file (default: saved)")
    p.add_argument("--pager-arg", action="append", metavar="ARG",
                   help="extra argument for the started `ssi-pager serve` (repeatable)")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.usage = ("ssi-pager vm [options] -- qemu-system-x86_64 ARGS...\n"
                    "       ssi-pager vm suspend NAME\n"
                    "       ssi-pager vm resume NAME [options] -- qemu-system-x86_64 ARGS...")
    _add_options(parser)
    parser.add_argument("words", nargs=argparse.REMAINDER,
                        help="suspend NAME | resume NAME [options] -- QEMU ARGS | -- QEMU ARGS")


def run(args: argparse.Namespace) -> int:
    words = list(args.words)
    if words and words[0] == "--":
        words = words[1:]
        action = None
    else:
        action = words[0] if words and words[0] in ("suspend", "resume") else None
    if action is None:
        if not words:
            raise VmError("no QEMU command: ssi-pager vm [options] -- qemu-system-x86_64 ...")
        return do_run(args, words)
    if len(words) < 2:
        raise VmError(f"usage: ssi-pager vm {action} NAME")
    name = words[1]
    rest = words[2:]
    head, qemu_argv = (rest[:rest.index("--")], rest[rest.index("--") + 1:]) if "--" in rest \
        else (rest, [])
    if head:
        sub = argparse.ArgumentParser(prog=f"ssi-pager vm {action} {name}")
        _add_options(sub)
        extra = sub.parse_args(head)
        for k, v in vars(extra).items():
            if v is not None:
                setattr(args, k, v)
    if action == "suspend":
        return do_suspend(args, name)
    if not qemu_argv:
        raise VmError("resume needs the QEMU command: ssi-pager vm resume NAME -- "
                      "qemu-system-x86_64 ARGS (same machine, devices and -m)")
    return do_resume(args, name, qemu_argv)

