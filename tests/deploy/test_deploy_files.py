"""Committed deploy files equal what the code generates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tuning import knobs

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_sysctl_d_file_is_freshly_generated(tmp_path: Path) -> None:
    out = tmp_path / "90-ssi-pager.conf"
    r = subprocess.run([sys.executable, "-m", "pager.cli", "tune", "--emit-sysctl-d", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (DEPLOY / "sysctl.d" / "90-ssi-pager.conf").read_text() == out.read_text(), \
        "regenerate: ssi-pager tune --emit-sysctl-d deploy/sysctl.d/90-ssi-pager.conf"


def test_udev_rule_matches_what_tune_apply_installs() -> None:
    committed = (DEPLOY / "udev" / "60-ssi-pager-userfaultfd.rules").read_text()
    assert committed == knobs.udev_rule(knobs.UFFD_GROUP)
    assert 'MODE="0660"' in committed and "0666" not in committed  # never world-writable


def test_readme_tier_table_matches_the_transport() -> None:
    import re

    from transport.base import TIER_BOUNDS_US, TransportTier
    text = (DEPLOY / "README.md").read_text()
    rows = re.findall(r"^\| (\w+) \| ([^|]+) µs \|", text, re.M)
    assert [name for name, _ in rows] == [t.value for t in TransportTier]
    uppers = [float(re.findall(r"[\d.]+", bounds)[-1]) for _, bounds in rows[:-1]]
    assert uppers == [bound for bound, _ in TIER_BOUNDS_US]
