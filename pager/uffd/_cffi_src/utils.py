"""Assemble the header modules into one out-of-line API-mode FFI."""

from __future__ import annotations

from types import ModuleType

from cffi import FFI


def build_ffi(module_name: str, modules: list[ModuleType], *,
              libraries: list[str] | None = None,
              extra_compile_args: list[str] | None = None) -> FFI:
    """One FFI whose cdef is every module's TYPES + FUNCTIONS and whose source is their C."""
    ffi = FFI()
    source = []
    for mod in modules:
        source.append(mod.INCLUDES)
    for mod in modules:
        source.append(mod.CUSTOMIZATIONS)
    for mod in modules:
        ffi.cdef(mod.TYPES)
    for mod in modules:
        ffi.cdef(mod.FUNCTIONS)
    ffi.set_source(module_name, "\n".join(source), libraries=libraries or [],
                   define_macros=[("_GNU_SOURCE", None)],
                   extra_compile_args=extra_compile_args or [])
    return ffi
