"""The C mirror of `transport.wire.frames`: ``render()`` writes ``ssip_wire.h``.

The header is generated, never edited by hand: ``python -m transport.wire.cheader`` rewrites
it, and tests/transport/test_wire_header.py fails when the committed file differs from what
``render()`` produces (so every constant the C loops use is the Python module's).
"""

from __future__ import annotations

import sys
from pathlib import Path

from transport.wire import frames as p

HEADER_PATH = Path(__file__).with_name("ssip_wire.h")


def _defines() -> list[tuple[str, int | str, str]]:
    rows: list[tuple[str, int | str, str]] = [
        ("SSIP_MAGIC", '"' + p.MAGIC.decode() + '"', "4 bytes, not NUL-terminated on the wire"),
        ("SSIP_VERSION", p.VERSION, "header version byte"),
        ("SSIP_HEADER_SIZE", p.HEADER.size, "fixed little-endian header"),
        ("SSIP_PAGE_SHIFT", p.PAGE_SHIFT, "wire page (zero-mask granule)"),
        ("SSIP_PAGE_SIZE", p.PAGE_SIZE, ""),
        ("SSIP_MAX_PAGES", p.MAX_PAGES, "pages per FETCH/STORE frame (zero mask is u32)"),
        ("SSIP_MAX_DATA", p.MAX_DATA, "page bytes per frame"),
        ("SSIP_MAX_CONTROL", p.MAX_CONTROL, "msgpack bytes per control frame"),
    ]
    rows += [(f"SSIP_T_{t.name}", int(t), "") for t in p.T]
    rows += [(f"SSIP_FLAG_{f.name}", int(f), "") for f in p.Flag]
    rows += [(f"SSIP_E_{e.name}", int(e), "") for e in p.ErrorCode]
    return rows


def render() -> str:
    lines = [
        "/* ssip_wire.h - the SSIP frame format for C; GENERATED from transport/wire/frames.py",
        " * by transport/wire/cheader.py. Do not edit: run `python -m transport.wire.cheader`. */",
        "#ifndef SSIP_WIRE_H",
        "#define SSIP_WIRE_H",
        "",
        "#include <stdint.h>",
        "",
    ]
    for name, value, comment in _defines():
        text = f"#define {name} {value}u" if isinstance(value, int) else f"#define {name} {value}"
        lines.append(f"{text:<40}/* {comment} */" if comment else text)
    lines += [
        "",
        "/* header fields, in order: magic | version u8 | type u8 | flags u16 | request id u32 |",
        " * space u32 | gpa u64 | length u32 | arg u32 (all little-endian) */",
        "struct ssip_header {",
        "    char magic[4];",
        "    uint8_t version;",
        "    uint8_t type;",
        "    uint16_t flags;",
        "    uint32_t request_id;",
        "    uint32_t space;",
        "    uint64_t gpa;",
        "    uint32_t length;",
        "    uint32_t arg;",
        "} __attribute__((packed));",
        "",
        "_Static_assert(sizeof(struct ssip_header) == SSIP_HEADER_SIZE, \"SSIP header size\");",
        "",
        "#endif /* SSIP_WIRE_H */",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    HEADER_PATH.write_text(render())
    print(f"wrote {HEADER_PATH}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
