"""Build hooks setuptools cannot express in pyproject.toml: the cffi extension."""

from setuptools import setup

setup(cffi_modules=["pager/uffd/_build.py:ffi"])
