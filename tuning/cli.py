"""`ssi-pager tune check|plan|apply|revert [--json] [--root DIR] [--emit-sysctl-d PATH]`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from tuning import knobs, state
from tuning.knobs import Change, Finding

log = logging.getLogger(__name__)

ACTIONS = ("check", "plan", "apply", "revert")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", choices=ACTIONS,
                        help="check: report (reads only, the default); plan: what apply would "
                             "change; apply: change and record; revert: restore what apply "
                             "recorded")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--root", default="/", metavar="DIR",
                        help="root holding proc/sys, sys, dev, etc (default /; tests use a copy)")
    parser.add_argument("--state", type=Path, metavar="FILE",
                        help=f"apply/revert state file (default ROOT/{state.STATE_REL})")
    parser.add_argument("--uffd-group", default=knobs.UFFD_GROUP, metavar="GROUP",
                        help="group allowed to open /dev/userfaultfd (default %(default)s)")
    parser.add_argument("--hugepages", type=int, default=None, metavar="N",
                        help="2 MiB huge pages to reserve (vm.nr_hugepages) for guests on "
                             "hugetlb memory: one per 2 MiB of their RAM (default: report only)")
    parser.add_argument("--emit-sysctl-d", metavar="PATH",
                        help="write the recommended sysctl.d file to PATH ('-' = stdout)")


def fmt(value: Any) -> str:
    if value is None:
        return "(absent)"
    if isinstance(value, dict):
        return knobs.fmt_device(value) or "(absent)"
    return str(value)


def print_check(findings: list[Finding], root: str) -> None:
    print(f"ssi-pager tune check (root {root})")
    for f in findings:
        cur = f.current if f.current is not None else "-"
        line = f"  {f.status:<7} {f.knob:<30} {cur}"
        if f.status == "change" and f.desired is not None:
            line += f" -> {f.desired}"
        print(line)
        print(f"  {'':<7} {'':<30} {f.message}")


def print_plan(findings: list[Finding]) -> None:
    changes = [c for f in findings for c in f.changes]
    if not changes:
        print("nothing to change: the host is tuned")
    for c in changes:
        print(f"{c.knob} ({c.path}):")
        if c.kind == "file":
            for line in (c.previous or "").splitlines():
                print(f"- {line}")
            for line in (c.new or "").splitlines():
                print(f"+ {line}")
            if c.previous is None:
                print("  (new file)")
        else:
            print(f"- {fmt(c.previous)}")
            print(f"+ {fmt(c.new)}")
    for f in findings:
        if f.status == "warn":
            print(f"note: {f.knob}: {f.message}")


def print_changes(verb: str, changes: list[Change], errors: list[str]) -> None:
    for c in changes:
        print(f"{verb} {c.knob}: {fmt(c.previous)} -> {fmt(c.new)}")
    for e in errors:
        print(f"ssi-pager tune: {e}", file=sys.stderr)


def emit(path: str) -> None:
    text = knobs.sysctl_d()
    if path == "-":
        sys.stdout.write(text)
    else:
        Path(path).write_text(text)
        print(f"wrote {path}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    if args.emit_sysctl_d:
        emit(args.emit_sysctl_d)
        if args.action is None:
            return 0
    action = args.action or "check"
    if args.hugepages is not None and args.hugepages < 0:
        print(f"ssi-pager tune: --hugepages {args.hugepages} is negative; pass a page count",
              file=sys.stderr)
        return 2
    options = knobs.Options(uffd_group=args.uffd_group, hugepages=args.hugepages)
    state_path = args.state or state.default_state_path(args.root)
    if action == "revert":
        done, errors = state.revert(args.root, state_path)
        if args.json:
            print(json.dumps({"reverted": [c.__dict__ for c in done], "errors": errors}))
        else:
            print_changes("restored", done, errors)
            if not done and not errors:
                print("nothing recorded to revert")
        return 1 if errors else 0
    findings = knobs.inspect(args.root, options)
    if action == "apply":
        done, errors = state.apply(args.root, findings, state_path)
        if args.json:
            print(json.dumps({"applied": [c.__dict__ for c in done], "errors": errors,
                              "state": str(state_path)}))
        else:
            print_changes("set", done, errors)
            print(f"previous values recorded in {state_path} (`ssi-pager tune revert`)"
                  if done else "nothing to change: the host is tuned", file=sys.stderr)
        return 1 if errors else 0
    if args.json:
        key = "findings" if action == "check" else "plan"
        rows = [f.to_json() for f in findings]
        if action == "plan":
            rows = [r for r in rows if r["changes"]]
        print(json.dumps({key: rows}))
    elif action == "check":
        print_check(findings, args.root)
    else:
        print_plan(findings)
    return 0
