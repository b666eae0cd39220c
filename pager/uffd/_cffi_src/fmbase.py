"""The far-memory baseline of ``bench farmem`` (csrc/fmbase.c): the far-memory scheme in one
process, in C, with an in-memory store."""

from .utils import header_cdef

TYPES = header_cdef("ssi_fmbase.h")  # declared once, in the header the C includes

FUNCTIONS = ""
