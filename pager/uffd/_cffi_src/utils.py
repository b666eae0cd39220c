"""Assemble the header modules into one out-of-line API-mode FFI."""

from __future__ import annotations

import os
import re
from types import ModuleType

from cffi import FFI

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
_DIM = re.compile(r"\[([A-Za-z_][^\]]*)\]")  # an array size named by a macro


def header_cdef(name: str) -> str:
    """The cdef of ``csrc/<name>``: its declarations as they are, with each ``#define`` and each
    array size taken from the compiled header (``...``) and the guard lines left out."""
    out = []
    with open(os.path.join(CSRC, name)) as f:
        for line in f.read().splitlines():
            s = line.strip()
            if s.startswith(("#ifndef", "#endif", "#include")):
                continue
            m = re.match(r"#define\s+(\w+)\s+\S", s)
            if s.startswith("#define"):
                if m is None:  # the guard (a name without a value)
                    continue
                line = f"#define {m.group(1)} ..."
            out.append(_DIM.sub("[...]", line))
    return "\n".join(out)


def build_ffi(module_name: str, modules: list[ModuleType], *,
              libraries: list[str] | None = None,
              extra_compile_args: list[str] | None = None,
              preamble: str | None = None, sources: list[str] | None = None,
              include_dirs: list[str] | None = None) -> FFI:
    """One FFI whose cdef is every module's TYPES + FUNCTIONS.

    The C comes from ``preamble`` (usually one ``#include``) and the ``sources`` files; a
    module may still carry its C as ``INCLUDES`` / ``CUSTOMIZATIONS`` strings, appended to the
    preamble."""
    ffi = FFI()
    source = [preamble or ""]
    for mod in modules:
        source.append(getattr(mod, "INCLUDES", ""))
    for mod in modules:
        source.append(getattr(mod, "CUSTOMIZATIONS", ""))
    for mod in modules:
        ffi.cdef(mod.TYPES)
    for mod in modules:
        ffi.cdef(mod.FUNCTIONS)
    ffi.set_source(module_name, "\n".join(source), libraries=libraries or [],
                   sources=sources or [], include_dirs=include_dirs or [],
                   define_macros=[("_GNU_SOURCE", None)],
                   extra_compile_args=extra_compile_args or [])
    return ffi
