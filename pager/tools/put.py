"""`ssi-pager put`: upload a raw memory image into an address space (`pager.tools.transfer`)."""

from __future__ import annotations

import argparse

from pager.tools import transfer


def configure(parser: argparse.ArgumentParser) -> None:
    transfer.configure(parser)


def run(args: argparse.Namespace) -> int:
    return transfer.put(args)
