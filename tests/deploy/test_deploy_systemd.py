"""deploy/systemd units: `systemd-analyze verify` clean, hardened, and userfaultfd still allowed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
NAMES = ["ssi-pager.service", "ssi-pager-memnode.service"]
INSTALLED_AT = "/usr/local/bin/ssi-pager"

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="systemd-analyze missing: deploy/setup-host.sh installs it")


def copies(tmp_path: Path, edit: tuple[str, str] | None = None) -> list[Path]:
    """The units with ExecStart pointing at an executable that exists on this machine."""
    exe = shutil.which("ssi-pager")
    if exe is None:
        exe = str(tmp_path / "ssi-pager")
        Path(exe).write_text("#!/bin/sh\nexit 0\n")
        os.chmod(exe, 0o755)
    out = []
    for name in NAMES:
        text = (UNITS / name).read_text()
        assert f"ExecStart={INSTALLED_AT} " in text
        text = text.replace(INSTALLED_AT, exe)
        if edit:
            text = text.replace(*edit)
        (tmp_path / name).write_text(text)
        out.append(tmp_path / name)
    return out


def verify(paths: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, paths)],
                          capture_output=True, text=True, timeout=60)


def directives(name: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_units_verify_without_warnings(tmp_path: Path) -> None:
    r = verify(copies(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "", r.stderr


def test_verify_catches_a_broken_directive(tmp_path: Path) -> None:
    r = verify(copies(tmp_path, ("Restart=on-failure", "Restart=sometimes")))
    assert "restart specifier" in r.stderr


@pytest.mark.parametrize("name", NAMES)
def test_units_keep_userfaultfd_and_secrets_reachable(name: str) -> None:
    d = directives(name)
    assert d.get("PrivateDevices", ["no"]) == ["no"]
    assert d.get("MemoryDenyWriteExecute", ["no"]) == ["no"]
    assert d["LoadCredential"] == ["token:/etc/ssi-pager/token"]
    assert "%d/token" in d["ExecStart"][0]
    assert d["StateDirectory"] and d["RuntimeDirectory"]
    assert d["NoNewPrivileges"] == ["yes"]
    assert d["DevicePolicy"] == ["closed"]
    # the syscall allow-list lets userfaultfd(2) through
    (filt,) = d["SystemCallFilter"]
    groups = subprocess.run(["systemd-analyze", "syscall-filter", *filt.split()[:1]],
                            capture_output=True, text=True, timeout=30).stdout
    assert "userfaultfd" in filt.split() or re.search(r"^\s+userfaultfd$", groups, re.M)
    if name == "ssi-pager.service":
        assert "/dev/userfaultfd rw" in d["DeviceAllow"]


@pytest.mark.parametrize("name", NAMES)
def test_units_exposure_is_low(tmp_path: Path, name: str) -> None:
    unit = next(p for p in copies(tmp_path) if p.name == name)
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) < 4.0, r.stdout


def exec_argv(name: str, override: dict[str, str] | None = None) -> list[str]:
    """ExecStart's arguments after `ssi-pager`, with specifiers and Environment= defaults
    (``override``: what an EnvironmentFile sets on top of them)."""
    d = directives(name)
    env = dict(kv.split("=", 1) for line in d["Environment"] for kv in line.split())
    env.update(override or {})
    # unbraced $VAR: split into words (none when empty), as systemd does
    argv = [w for a in d["ExecStart"][0].split()[1:]
            for w in (env[a[1:]].split() if re.fullmatch(r"\$\w+", a) else [a])]
    spec = {"%d": "/run/credentials/x", "%S": "/var/lib", "%t": "/run"}
    out = []
    for a in argv:
        for k, v in spec.items():
            a = a.replace(k, v)
        out.append(re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], a))
    return out


@pytest.mark.parametrize("name", NAMES)
def test_exec_start_is_accepted_by_the_cli(name: str) -> None:
    from pager.cli import build_parser
    argv = exec_argv(name)
    parser = build_parser(argv)
    sub = argv[0]
    args = parser.parse_args(argv)
    assert args.command == sub
    assert args.token_file == "/run/credentials/x/token"
    assert args.metrics.startswith("127.0.0.1:")


def env_file_blocks() -> dict[str, list[dict[str, str]]]:
    """The environment files deploy/README.md has the admin write: path -> [{VAR: value}] (one
    per place the guide writes that file)."""
    text = (UNITS.parent / "README.md").read_text()
    blocks: dict[str, list[dict[str, str]]] = {}
    for path, body in re.findall(r"cat > (\S+) <<EOF\n(.*?)\n\s*EOF", text, re.S):
        blocks.setdefault(path, []).append(
            dict(line.strip().split("=", 1) for line in body.splitlines() if line.strip()))
    return blocks


@pytest.mark.parametrize("name", NAMES)
def test_environment_file_variables_match_the_unit(name: str) -> None:
    """Each variable the unit uses has a default (Environment=) and is documented in
    deploy/README.md; each variable the README's environment file sets is used by the unit."""
    d = directives(name)
    (env_file,) = d["EnvironmentFile"]
    path = env_file.removeprefix("-")
    blocks = env_file_blocks()
    assert path in blocks, f"deploy/README.md does not show what goes into {path}"
    used = set(re.findall(r"\$\{?(\w+)\}?", d["ExecStart"][0]))
    defaults = {kv.split("=", 1)[0] for line in d["Environment"] for kv in line.split()}
    assert used, d["ExecStart"]
    assert used <= defaults, f"no Environment= default for {used - defaults}"
    readme = (UNITS.parent / "README.md").read_text()
    assert {v for v in used if v not in readme} == set(), "variables the README never names"
    from pager.cli import build_parser
    for block in blocks[path]:
        assert set(block) <= used, f"{path} sets {set(block) - used}, unused"
        # the values the README writes give a command line the CLI accepts, and carry them
        argv = exec_argv(name, block)
        assert all(word in argv for value in block.values() for word in value.split()), argv
        args = build_parser(argv).parse_args(argv)
        assert args.command == argv[0]
