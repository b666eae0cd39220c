"""The fast lane's C is real source: it compiles warning-free on its own, takes its wire
numbers from ssip_wire.h only, and a lane that fails to load is reported, not hidden."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from pathlib import Path

from transport.node import fastlane

ROOT = Path(__file__).resolve().parents[2]
NODE = ROOT / "transport" / "node"


def test_fastlane_c_compiles_without_warnings(tmp_path):
    cc = shutil.which("gcc") or shutil.which("cc")
    assert cc, "a C compiler is needed to build the fast lane"
    done = subprocess.run(
        [cc, "-c", "-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11", "-D_GNU_SOURCE",
         f"-I{NODE}", f"-I{ROOT / 'transport' / 'wire'}", str(NODE / "fastlane.c"),
         "-o", str(tmp_path / "fastlane.o")],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_fastlane_c_has_no_private_wire_numbers():
    src = (NODE / "fastlane.c").read_text() + (NODE / "fastlane.h").read_text()
    assert '#include "ssip_wire.h"' in src
    # no wire constant of its own: every frame number and size is an SSIP_* name
    defines = re.findall(r"#define\s+(\w+)", src)
    assert all(d.startswith("SSI_FL_") or d == "SSI_FASTLANE_H" for d in defines), defines
    assert not [d for d in defines if re.search(r"HDR|PAGE|FETCH|DATA|VERSION|URGENT", d)]


def test_extension_is_built_from_those_files():
    assert fastlane.lib is not None, fastlane.MISSING
    assert fastlane.lib.SSI_FL_MAX_SPACES == 16
    assert fastlane.ffi.sizeof("struct ssi_fl_conn") > 16 * fastlane.ffi.sizeof(
        "struct ssi_fl_space")


def test_missing_lane_is_a_warning_naming_the_error(monkeypatch, caplog):
    monkeypatch.setattr(fastlane, "lib", None)
    monkeypatch.setattr(fastlane, "MISSING", "ImportError: undefined symbol: ssi_fl_serve")
    monkeypatch.delenv(fastlane.ENV_OFF, raising=False)
    with caplog.at_level(logging.WARNING, logger=fastlane.__name__):
        assert fastlane.enabled() is False
    text = caplog.text
    assert "undefined symbol: ssi_fl_serve" in text and "build_ext --inplace" in text


def test_lane_turned_off_on_purpose_is_quiet(monkeypatch, caplog):
    monkeypatch.setattr(fastlane, "lib", None)
    with caplog.at_level(logging.WARNING, logger=fastlane.__name__):
        assert fastlane.enabled(False) is False
    assert not caplog.records
