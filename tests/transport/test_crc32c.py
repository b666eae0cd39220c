"""CRC32C of the store's page checksums (`transport.node.checksum`, C in crc32c.c): the
published check values, every length and alignment against the portable tables, and the CPU's
crc32 instruction in use wherever the CPU has SSE4.2."""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from transport.node import checksum
from transport.node.checksum import crc32c, crc32c_table, page_sums
from transport.wire import PAGE_SIZE

NODE = Path(__file__).resolve().parents[2] / "transport" / "node"

# RFC 3720 (iSCSI) B.4 and the common check value
VECTORS = [
    (b"", 0x00000000),
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
]


@pytest.mark.parametrize(("data", "want"), VECTORS, ids=lambda v: f"{v:#x}"
                         if isinstance(v, int) else f"{len(v)}B")
def test_check_values(data, want):
    assert crc32c(data) == want
    assert crc32c_table(data) == want


def test_every_length_and_alignment_matches_the_tables():
    rng = random.Random(14)
    buf = bytes(rng.getrandbits(8) for _ in range(3 * PAGE_SIZE + 64))
    view = memoryview(buf)
    for off in range(8):
        for n in range(1, PAGE_SIZE + 1):
            assert crc32c(view[off:off + n]) == crc32c_table(view[off:off + n]), (off, n)
    for n in (2 * PAGE_SIZE, 3 * PAGE_SIZE + 57):  # past the three-stream block sizes
        assert crc32c(view[3:3 + n]) == crc32c_table(view[3:3 + n]), n


def test_continuing_a_crc_is_the_crc_of_the_concatenation():
    a, b = os.urandom(1000), os.urandom(5000)
    assert crc32c(b, crc32c(a)) == crc32c(a + b) == crc32c_table(b, crc32c_table(a))


def test_the_cpu_instruction_is_used_where_the_cpu_has_it():
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")),
                     [])
    assert checksum.hardware() == ("sse4_2" in flags)


def test_page_sums_are_per_page_of_the_kind():
    data = os.urandom(5 * PAGE_SIZE)
    pages = [data[i:i + PAGE_SIZE] for i in range(0, len(data), PAGE_SIZE)]
    assert list(page_sums("crc32c", data)) == [crc32c_table(p) for p in pages]
    assert list(page_sums("crc32", data)) == [zlib.crc32(p) for p in pages]
    assert len(page_sums("crc32c", b"")) == 0
    # native-order u32, as the .sums file holds them
    assert struct.unpack("=5I", page_sums("crc32c", data).tobytes()) == tuple(
        crc32c(p) for p in pages)


def test_the_bench_lines_name_both_kinds_and_their_ratio():
    lines = checksum.bench_lines(seconds=0.01, label="t")
    assert [x["name"] for x in lines] == ["checksum-crc32-4k", "checksum-crc32c-4k",
                                          "ratio-checksum-crc32c-crc32-4k"]
    assert all(x["label"] == "t" for x in lines)
    crc32, crc32c_, ratio = lines
    assert crc32["ns_per_page"] > 0 and crc32c_["ns_per_page"] > 0
    assert crc32c_["hardware"] == checksum.hardware()
    assert ratio["ratio"] == pytest.approx(crc32c_["ns_per_page"] / crc32["ns_per_page"],
                                           rel=0.01)


FALLBACK_MAIN = r"""
#include <stdio.h>
#include "crc32c.h"
int main(void)
{
    static unsigned char b[3 * 4096 + 8];
    for (unsigned i = 0; i < sizeof b; i++)
        b[i] = (unsigned char)(i * 131 + 7);
    printf("%d %08x", ssi_crc32c_hardware(), ssi_crc32c(0, "123456789", 9));
    for (unsigned n = 0; n <= 3 * 4096; n += 1 + n / 7)
        printf(" %08x", ssi_crc32c(0, b + n % 8, n));
    printf("\n");
    return 0;
}
"""


def test_without_the_instruction_the_tables_answer_the_same(tmp_path):
    """crc32c.c built without its SSE4.2 path (as on a CPU or architecture without it): the
    same answers from the table fallback, which says it is no hardware."""
    cc = shutil.which("gcc") or shutil.which("cc")
    assert cc, "a C compiler is needed to build crc32c.c"
    (tmp_path / "main.c").write_text(FALLBACK_MAIN)
    exe = tmp_path / "fallback"
    done = subprocess.run([cc, "-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11",
                           "-DSSI_CRC32C_NO_HW", f"-I{NODE}", str(tmp_path / "main.c"),
                           str(NODE / "crc32c.c"), "-o", str(exe)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60,
                         check=True).stdout.split()
    assert out[:2] == ["0", "e3069283"]
    b = bytes((i * 131 + 7) & 0xFF for i in range(3 * 4096 + 8))
    want, n = [], 0
    while n <= 3 * 4096:
        want.append(f"{crc32c(b[n % 8:n % 8 + n]):08x}")  # this process: the instruction
        n += 1 + n // 7
    assert out[2:] == want
