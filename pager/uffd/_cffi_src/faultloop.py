"""cdef of the fault engine's per-fault loop in C (``ssi_pfl_run``, ``csrc/faultloop.c``, which
says what it serves and what it returns to Python). The declarations are ``csrc/ssi_pfl.h``,
read as this cdef; the wire constants come from ``transport/wire/ssip_wire.h``."""

from .utils import header_cdef

TYPES = header_cdef("ssi_pfl.h")  # declared once, in the header the C includes

FUNCTIONS = ""
