"""Build the transport's cffi extension ``transport._fastlane_cffi`` (API mode, out of line).

Named in setup.py's ``cffi_modules``. By hand: ``python transport/_fastlane_build.py`` compiles
it in place. The memory node runs without it (Python path only) when it is missing.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0]) == _HERE:
    sys.path.pop(0)  # run by hand: transport/token.py would shadow the stdlib's token

import importlib.util  # noqa: E402


def _load(name: str, path: str):
    # setuptools runs this file outside the package; importing ``transport`` or ``pager`` here
    # would import their runtime dependencies, so load the plain source modules by path
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_utils = _load("_ssi_cffi_utils", os.path.join(_HERE, "..", "pager", "uffd", "_cffi_src",
                                               "utils.py"))
fastlane = _load("_ssi_fastlane_src", os.path.join(_HERE, "_cffi_src", "fastlane.py"))

ffi = _utils.build_ffi(
    "transport._fastlane_cffi",
    [fastlane],
    extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"],
)

if __name__ == "__main__":
    sys.exit(ffi.compile(tmpdir=os.path.join(_HERE, ".."), verbose=True) and 0)
