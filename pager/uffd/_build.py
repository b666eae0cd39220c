"""Build the binding's cffi extension ``pager.uffd._uffd_cffi`` (API mode, out of line).

Named in setup.py's ``cffi_modules``; setuptools runs it at install. It can also be run by hand:
``python pager/uffd/_build.py`` compiles the extension in place.
"""

import os
import sys

# setuptools executes this file outside the package: import the header modules from its folder
# (importing ``pager.uffd`` here would need the extension that is being built).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _cffi_src import faultloop, mman, toucher, userfaultfd
from _cffi_src.utils import build_ffi

sys.path.pop(0)

ffi = build_ffi(
    "pager.uffd._uffd_cffi",
    [userfaultfd, mman, toucher, faultloop],  # faultloop uses the others' helpers
    libraries=["pthread"],
    extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"],
)

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    ffi.compile(tmpdir=os.path.join(here, "..", ".."), verbose=True)
