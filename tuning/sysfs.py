"""Tiny readers and writers of /proc/sys, /sys, /proc/self, /dev and /etc under a root directory.

Every function takes ``root`` (``/`` on a live host; a directory holding a copy of ``proc/sys``
and ``sys`` in tests). Missing files read as ``None``; they are reported by the caller, never a
crash. Writers raise `KnobWriteError` with the errno and what to do.

Three kinds of target are written by `apply` and restored by `revert`:
  "text"   a /proc/sys or /sys file, value = its text (stripped)
  "choice" a sysfs multiple-choice file ("always [madvise] never"), value = the chosen word
  "file"   a config file (udev rule, limits.d), value = content or None for "absent"
  "device" a device node's owner, group and mode, value = {"uid", "gid", "mode"}
"""

from __future__ import annotations

import errno as errno_
import os
import re
from pathlib import Path
from typing import Any

from tuning.errors import KnobWriteError

Value = Any  # str | None | dict[str, int]


def path_of(root: str | os.PathLike[str], rel: str) -> Path:
    """The absolute path of ``rel`` (e.g. "proc/sys/vm/max_map_count") below ``root``."""
    return Path(root) / rel.lstrip("/")


def sysctl_rel(name: str) -> str:
    """'net.core.rmem_max' -> 'proc/sys/net/core/rmem_max'."""
    return "proc/sys/" + name.replace(".", "/")


def read_text(root: str | os.PathLike[str], rel: str) -> str | None:
    """A file's content with surrounding whitespace stripped, or None when absent/unreadable."""
    try:
        return path_of(root, rel).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:  # EINVAL: e.g. /sys/class/net/lo/speed; EACCES
        if exc.errno in (errno_.EINVAL, errno_.EACCES, errno_.EPERM, errno_.ENODEV,
                         errno_.EOPNOTSUPP):
            return None
        raise


def write_text(root: str | os.PathLike[str], rel: str, value: str) -> None:
    """Write one value to a /proc/sys or /sys file (no newline games: the kernel parses it)."""
    path = path_of(root, rel)
    if not path.exists():
        raise KnobWriteError(f"{path} does not exist: this kernel lacks the knob; skip it",
                             errno_.ENOENT)
    try:
        with open(path, "w") as f:
            f.write(value + "\n")
    except OSError as exc:
        raise KnobWriteError(f"cannot write {value!r} to {path}: {exc.strerror}; run as root "
                             f"on a host (not a container with read-only /proc/sys)",
                             exc.errno) from exc


def read_sysctl(root: str | os.PathLike[str], name: str) -> str | None:
    """A sysctl's value with tabs normalised to single spaces, None when the kernel lacks it."""
    text = read_text(root, sysctl_rel(name))
    return None if text is None else " ".join(text.split())


def read_selected(root: str | os.PathLike[str], rel: str) -> str | None:
    """The bracketed choice of a multiple-choice file: 'always [madvise] never' -> 'madvise'."""
    text = read_text(root, rel)
    if text is None:
        return None
    m = re.search(r"\[([^\]]+)\]", text)
    return m.group(1) if m else text


def read_file(root: str | os.PathLike[str], rel: str) -> str | None:
    """A config file's exact content, or None when absent."""
    try:
        return path_of(root, rel).read_text()
    except FileNotFoundError:
        return None


def write_file(root: str | os.PathLike[str], rel: str, content: str | None) -> None:
    """Create/replace a config file (0644), or remove it when ``content`` is None."""
    path = path_of(root, rel)
    try:
        if content is None:
            path.unlink(missing_ok=True)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".ssi-pager-tmp")
        tmp.write_text(content)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        raise KnobWriteError(f"cannot write {path}: {exc.strerror}; run as root", exc.errno) \
            from exc


def read_device(root: str | os.PathLike[str], rel: str) -> dict[str, int] | None:
    """{'uid', 'gid', 'mode'} of a device node (mode = permission bits), None when absent."""
    try:
        st = os.stat(path_of(root, rel))
    except FileNotFoundError:
        return None
    return {"uid": st.st_uid, "gid": st.st_gid, "mode": st.st_mode & 0o7777}


def write_device(root: str | os.PathLike[str], rel: str, value: dict[str, int]) -> None:
    """Set a device node's owner, group and mode."""
    path = path_of(root, rel)
    try:
        os.chown(path, value["uid"], value["gid"])
        os.chmod(path, value["mode"])
    except OSError as exc:
        raise KnobWriteError(f"cannot chown/chmod {path}: {exc.strerror}; run as root",
                             exc.errno) from exc


def read_target(root: str | os.PathLike[str], kind: str, rel: str) -> Value:
    """Current value of a target of ``kind`` ("text", "choice", "file", "device")."""
    if kind == "text":
        return read_text(root, rel)
    if kind == "choice":
        return read_selected(root, rel)
    if kind == "file":
        return read_file(root, rel)
    if kind == "device":
        return read_device(root, rel)
    raise ValueError(f"unknown target kind {kind!r}")


def write_target(root: str | os.PathLike[str], kind: str, rel: str, value: Value) -> None:
    """Set a target of ``kind`` to ``value`` (inverse of `read_target`)."""
    if kind in ("text", "choice"):
        write_text(root, rel, value)
    elif kind == "file":
        write_file(root, rel, value)
    elif kind == "device":
        write_device(root, rel, value)
    else:
        raise ValueError(f"unknown target kind {kind!r}")


def same_value(kind: str, a: Value, b: Value) -> bool:
    """Whether two values of a target are equal (sysctl whitespace ignored)."""
    if kind == "text" and a is not None and b is not None:
        return a.split() == b.split()
    return a == b


def net_links(root: str | os.PathLike[str]) -> dict[str, int | None]:
    """Link speed in Mbit/s of each network interface except loopback (None = unknown/down)."""
    base = path_of(root, "sys/class/net")
    out: dict[str, int | None] = {}
    if not base.is_dir():
        return out
    for entry in sorted(base.iterdir()):
        if entry.name == "lo":
            continue
        text = read_text(root, f"sys/class/net/{entry.name}/speed")
        try:
            speed = int(text) if text is not None else None
        except ValueError:
            speed = None
        out[entry.name] = speed if speed is not None and speed > 0 else None
    return out


def rdma_devices(root: str | os.PathLike[str]) -> list[str]:
    """Names of RDMA devices (/sys/class/infiniband/*), e.g. ['mlx5_0', 'rxe0']."""
    base = path_of(root, "sys/class/infiniband")
    return sorted(p.name for p in base.iterdir()) if base.is_dir() else []


def memlock_limit(root: str | os.PathLike[str]) -> tuple[int | None, int | None] | None:
    """(soft, hard) RLIMIT_MEMLOCK in bytes from proc/self/limits (None = unlimited)."""
    text = read_text(root, "proc/self/limits")
    if text is None:
        return None
    for line in text.splitlines():
        if line.startswith("Max locked memory"):
            fields = line[len("Max locked memory"):].split()
            return (None if fields[0] == "unlimited" else int(fields[0]),
                    None if fields[1] == "unlimited" else int(fields[1]))
    return None
