"""Page compression negotiated per connection (sans-IO).

HELLO may offer ``"compress": [names]`` (the client's preference order); the node answers the
first it also has in WELCOME ``"compress"`` (absent: none). From then on either side may send a
STORE or DATA payload compressed, marked with `Flag.COMPRESSED`; a payload that does not shrink
by at least `MIN_SAVING` travels raw (no flag), so incompressible pages cost one attempt, not a
bigger frame. A compressed STORE carries the raw length in ``arg``; a compressed DATA's raw
length follows from the request and the zero mask, as for a raw one.

Codecs: "lz4" (lz4.block: cheap enough to pay on a 1 Gbit link even for pages that compress
only a little) and "zstd" (zstandard level 1: smaller output for a slower link). Either is
optional: a side without the module does not offer or accept it. Fault lanes (HELLO "lane":
"fault", including the C loops) never offer compression, so they never receive a compressed
frame.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from transport.errors import ProtocolError

log = logging.getLogger(__name__)

MIN_SAVING = 8  # compress only when the payload shrinks by at least 1/MIN_SAVING
# tiers (transport.base.TransportTier values) on which compressing bulk lanes pays: a round
# trip of 200 us or more is a link slower than the codecs (1 Gbit or less)
PAYS_ON_TIERS = frozenset({"Standard", "Basic"})


def pays_on(tier: str) -> bool:
    """Does compression pay on a link of ``tier``?"""
    return tier in PAYS_ON_TIERS


def _lz4() -> tuple[Callable[[Any], bytes], Callable[[Any, int], bytes]] | None:
    try:
        import lz4.block
    except ImportError:
        return None

    def compress(data: Any) -> bytes:
        return lz4.block.compress(data, mode="fast", store_size=False)

    def decompress(data: Any, size: int) -> bytes:
        return lz4.block.decompress(data, uncompressed_size=size)
    return compress, decompress


def _zstd() -> tuple[Callable[[Any], bytes], Callable[[Any, int], bytes]] | None:
    try:
        import zstandard
    except ImportError:
        return None
    cctx = zstandard.ZstdCompressor(level=1, write_content_size=False, write_checksum=False)
    dctx = zstandard.ZstdDecompressor()

    def compress(data: Any) -> bytes:
        return cctx.compress(data)

    def decompress(data: Any, size: int) -> bytes:
        return dctx.decompress(data, max_output_size=size)
    return compress, decompress


_CODECS: dict[str, tuple[Callable[[Any], bytes], Callable[[Any, int], bytes]]] = {}
for _name, _make in (("lz4", _lz4), ("zstd", _zstd)):
    if (_pair := _make()) is not None:
        _CODECS[_name] = _pair
CODECS: tuple[str, ...] = tuple(_CODECS)  # the codecs this side has, in preference order


def check_offer(offer: Any) -> tuple[str, ...]:
    """The codecs a caller asks a connection to offer: known names, installed here."""
    names = (offer,) if isinstance(offer, str) else tuple(offer or ())
    for n in names:
        if n not in ("lz4", "zstd"):
            raise ValueError(f"unknown compression {n!r}: use lz4 or zstd")
        if n not in _CODECS:
            raise ValueError(f"compression {n!r} needs its Python module: pip install "
                             f"{'lz4' if n == 'lz4' else 'zstandard'}")
    return names


def choose(offered: Any) -> str | None:
    """The node's pick from a HELLO's ``"compress"`` list: the first it has, else None."""
    if not isinstance(offered, list | tuple):
        return None
    for name in offered[:8]:
        if isinstance(name, str) and name in _CODECS:
            return name
    return None


def compress(codec: str, data: Any) -> bytes | None:
    """``data`` compressed with ``codec``, or None when that does not save at least
    1/`MIN_SAVING` of it (send it raw)."""
    out = _CODECS[codec][0](data)
    n = len(data)
    return out if len(out) <= n - n // MIN_SAVING else None


def decompress(codec: str | None, data: Any, size: int, request_id: int = 0) -> bytes:
    """The ``size`` raw bytes of a compressed payload; a payload that does not decompress to
    exactly ``size`` bytes (or a compressed frame on a connection without a codec) is a
    BAD_FRAME error."""
    from transport.wire.frames import ErrorCode

    if codec is None:
        raise ProtocolError("compressed payload on a connection that negotiated no "
                            "compression", ErrorCode.BAD_FRAME, request_id=request_id)
    try:
        out = _CODECS[codec][1](data, size)
    except Exception as exc:  # each codec raises its own error types for garbage
        raise ProtocolError(f"{codec} payload does not decompress: {exc}", ErrorCode.BAD_FRAME,
                            request_id=request_id) from None
    if len(out) != size:
        raise ProtocolError(f"{codec} payload decompresses to {len(out)} bytes, not {size}",
                            ErrorCode.BAD_FRAME, request_id=request_id)
    return out
