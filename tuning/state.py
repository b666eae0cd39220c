"""`apply` and `revert`: make the planned changes, record what was there, put it back.

The state file (JSON, 0600) lists every target written with its previous value. A second
`apply` keeps the first recorded previous value of a target, so `revert` always returns to
the host as it was before ssi-pager touched it; `revert` removes the state file when done.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tuning import sysfs
from tuning.errors import KnobWriteError, StateError
from tuning.knobs import Change, Finding

log = logging.getLogger(__name__)

STATE_REL = "var/lib/ssi-pager/tune-state.json"
STATE_VERSION = 1


def default_state_path(root: str | os.PathLike[str]) -> Path:
    return sysfs.path_of(root, STATE_REL)


def load_state(path: Path) -> list[dict[str, Any]]:
    """The recorded changes, [] when there is no state file."""
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return []
    except (OSError, ValueError) as exc:
        raise StateError(f"cannot read tune state {path}: {exc}; fix or remove it (its "
                         f"'previous' values are what revert restores)") from exc
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION or \
            not isinstance(data.get("changes"), list):
        raise StateError(f"{path} is not an ssi-pager tune state file (version "
                         f"{STATE_VERSION}); fix or remove it")
    return data["changes"]


def save_state(path: Path, changes: list[dict[str, Any]]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"version": STATE_VERSION, "updated": time.time(), "changes": changes},
                      f, indent=2)
        os.replace(tmp, path)
    except OSError as exc:
        raise StateError(f"cannot write tune state {path}: {exc.strerror}; run as root or pass "
                         f"--state FILE somewhere writable (nothing was changed)",
                         exc.errno) from exc


def apply(root: str | os.PathLike[str], findings: list[Finding], state_path: Path) \
        -> tuple[list[Change], list[str]]:
    """Make every planned change; record previous values first. Returns (done, errors)."""
    recorded = load_state(state_path)
    known = {(c["kind"], c["path"]) for c in recorded}
    done: list[Change] = []
    errors: list[str] = []
    for finding in findings:
        for change in finding.changes:
            key = (change.kind, change.path)
            if key not in known:
                # written before the change, so a crash midway still leaves a revertable record
                recorded.append(asdict(change))
                known.add(key)
                save_state(state_path, recorded)
            try:
                sysfs.write_target(root, change.kind, change.path, change.new)
            except KnobWriteError as exc:
                errors.append(f"{change.knob}: {exc}")
                continue
            now = sysfs.read_target(root, change.kind, change.path)
            if not sysfs.same_value(change.kind, now, change.new):
                errors.append(f"{change.knob}: wrote {change.new!r} but the kernel reports "
                              f"{now!r}")
            done.append(change)
    return done, errors


def revert(root: str | os.PathLike[str], state_path: Path) -> tuple[list[Change], list[str]]:
    """Restore every recorded previous value (last change first); drop the state file."""
    recorded = load_state(state_path)
    if not recorded and not state_path.exists():
        raise StateError(f"no tune state at {state_path}: nothing was applied there (or pass "
                         f"the --state used with apply)")
    done: list[Change] = []
    errors: list[str] = []
    for rec in reversed(recorded):
        change = Change(**rec)
        now = sysfs.read_target(root, change.kind, change.path)
        if not sysfs.same_value(change.kind, now, change.new):
            log.warning("%s changed since apply (%r, applied %r); restoring %r anyway",
                        change.knob, now, change.new, change.previous)
        try:
            sysfs.write_target(root, change.kind, change.path, change.previous)
        except KnobWriteError as exc:
            errors.append(f"{change.knob}: {exc}")
            continue
        done.append(Change(change.knob, change.kind, change.path, now, change.previous))
    if errors:
        # keep only what could not be restored, so a second revert retries exactly those
        failed = {e.split(":", 1)[0] for e in errors}
        save_state(state_path, [r for r in recorded if r["knob"] in failed])
    else:
        state_path.unlink(missing_ok=True)
    return done, errors
