"""cdef of the page installer (``csrc/install.c``): the one implementation of UFFDIO_COPY /
ZEROPAGE with zero masks and EEXIST, shared by the C fault loop and the Python path, and the
residency log both fill (every resident chunk: address, length, how)."""

from .utils import header_cdef

TYPES = header_cdef("ssi_install.h")  # declared once, in the header the C includes

FUNCTIONS = ""
