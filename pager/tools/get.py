"""`ssi-pager get`: download an address space into a raw memory image (`pager.tools.transfer`)."""

from __future__ import annotations

import argparse

from pager.tools import transfer


def configure(parser: argparse.ArgumentParser) -> None:
    transfer.configure(parser, get=True)


def run(args: argparse.Namespace) -> int:
    return transfer.get(args)
