"""The C reference pager the benchmarks compare against: its sources are ``../shared/refpager``
beside the checkout (the nearest ``shared/refpager`` beside it or beside a folder holding it, so
a git worktree nested in the project folder finds it too; ``$SSI_REFPAGER_SRC`` elsewhere),
built with ``make`` into a temporary directory; ``--refpager DIR`` (or ``$SSI_REFPAGER``) names
a directory already built.

One lookup for every bench (uffd, transport, faults) and the tests that run them.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import subprocess
from pathlib import Path

from pager.errors import ConfigError

log = logging.getLogger(__name__)

CHECKOUT = Path(__file__).resolve().parents[2]
BINARIES = ("refpager-local", "refpager-remote", "refpager-memnode")


def source_dir() -> Path | None:
    """The reference's sources: ``$SSI_REFPAGER_SRC``, else ``../shared/refpager`` beside the
    checkout; None when neither holds a Makefile."""
    env = os.environ.get("SSI_REFPAGER_SRC")
    candidates = [Path(env)] if env else [d / "shared" / "refpager" for d in CHECKOUT.parents]
    return next((p for p in candidates if (p / "Makefile").is_file()), None)


def missing_reason() -> str:
    """Why no reference can be found or built (for messages)."""
    where = os.environ.get("SSI_REFPAGER_SRC") or f"{CHECKOUT.parent}/shared/refpager (or " \
        f"shared/refpager beside a folder above it)"
    return (f"no C reference pager sources at {where}: put the shared folder beside the "
            f"checkout, set SSI_REFPAGER_SRC=DIR, or pass --refpager BUILT_DIR")


def check_built(folder: str | Path) -> Path:
    """``folder`` if it holds the built reference, else ConfigError saying what is missing."""
    path = Path(folder)
    absent = [b for b in BINARIES if not os.access(path / b, os.X_OK)]
    if absent:
        raise ConfigError(f"--refpager {folder}: {', '.join(absent)} missing or not "
                          f"executable; build it with `make -C {folder}`")
    return path


def build(dest: Path) -> Path:
    """Copy the sources to ``dest`` and ``make`` them; ConfigError when that cannot be done."""
    src = source_dir()
    if src is None:
        raise ConfigError(missing_reason())
    if shutil.which("make") is None:
        raise ConfigError("building the C reference pager needs make and gcc")
    shutil.copytree(src, dest, dirs_exist_ok=True)
    r = subprocess.run(["make", "-C", str(dest)], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise ConfigError(f"building the C reference pager in {dest} failed: "
                          f"{(r.stdout + r.stderr)[-1500:]}")
    log.info("built the C reference pager from %s in %s", src, dest)
    return check_built(dest)


def locate(folder: str | Path | None, tmp: Path) -> Path:
    """The built reference: ``folder`` (or ``$SSI_REFPAGER``) if given, else a build of the
    sources in ``tmp``/refpager. ConfigError says what is missing when neither works."""
    folder = folder or os.environ.get("SSI_REFPAGER")
    if folder:
        return check_built(folder)
    return build(tmp / "refpager")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--refpager DIR`` and ``--no-ref``, the same for every bench."""
    parser.add_argument("--refpager", default=None, metavar="DIR",
                        help="a directory with the C reference pager already built (default: "
                             "$SSI_REFPAGER, else ../shared/refpager beside the checkout, "
                             "built into a temporary directory; missing: an error)")
    parser.add_argument("--no-ref", action="store_true",
                        help="skip the C reference pager: no reference and no ratio lines")


def free_port() -> int:
    """A loopback port for refpager-memnode (it takes a number, not a socket)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
