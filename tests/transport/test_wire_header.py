"""The C header of the wire format is generated from the Python module and compiles."""

import subprocess

from transport.wire import cheader


def test_committed_header_is_what_the_module_generates():
    assert cheader.HEADER_PATH.read_text() == cheader.render(), (
        "transport/wire/ssip_wire.h is stale: run `python -m transport.wire.cheader`")


def test_header_compiles_and_its_constants_match(tmp_path):
    src = tmp_path / "probe.c"
    names = [name for name, value, _ in cheader._defines() if isinstance(value, int)]
    body = "\n".join(f'    printf("{n} %llu\\n", (unsigned long long){n});' for n in names)
    src.write_text(f'#include <stdio.h>\n#include "ssip_wire.h"\nint main(void) {{\n{body}\n'
                   "    return 0;\n}\n")
    exe = tmp_path / "probe"
    subprocess.run(["gcc", "-Wall", "-Werror", "-I", str(cheader.HEADER_PATH.parent), "-o",
                    str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    got = dict(line.split() for line in out.splitlines())
    want = {n: str(v) for n, v, _ in cheader._defines() if isinstance(v, int)}
    assert got == want
