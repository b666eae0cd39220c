"""Page sources: where the bytes of a fault come from (see `pager.source.base`).

- ``MemnodeSource`` (`pager.source.memnode`): memory nodes.
- ``FileSource`` (`pager.source.file`): a snapshot file.
"""

from __future__ import annotations

from pager.errors import ConfigError
from pager.source.base import Lane, PageSource
from pager.source.file import FileSource
from pager.source.memnode import MemnodeSource

__all__ = ["FileSource", "Lane", "MemnodeSource", "PageSource", "parse_source"]


def parse_source(memnode: str | None, source: str | None, *, token: bytes | None,
                 space: str) -> PageSource:
    """The source named on the command line (``--memnode HOST:PORT`` or ``--source file:P``)."""
    if bool(memnode) == bool(source):
        raise ConfigError("give exactly one of --memnode HOST:PORT or --source file:PATH")
    if source:
        if source.startswith("file:"):
            return FileSource(source[5:])
        if source.startswith("memnode:"):
            memnode = source[8:]
        else:
            raise ConfigError(f"unknown source {source!r}; use file:PATH or --memnode HOST:PORT")
    return MemnodeSource(memnode, token, space)  # type: ignore[arg-type]
