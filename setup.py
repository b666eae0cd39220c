"""Build hooks setuptools cannot express in pyproject.toml: the cffi extension."""

from setuptools import Extension, setup

# The QEMU preload library: a plain shared object for LD_PRELOAD (no PyInit; never imported),
# built like an extension so `pip install .` and `pip install -e .` both place it in pager/shim/.
SHIM = Extension("pager.shim._ssi_shim", sources=["pager/shim/ssi_shim.c"],
                 libraries=["dl", "pthread"], extra_compile_args=["-O2", "-Wall"])

setup(cffi_modules=["pager/uffd/_build.py:ffi", "transport/node/_fastlane_build.py:ffi"],
      ext_modules=[SHIM])
