"""The far-memory workload (csrc/rmw.c): pthreads doing random reads and read-modify-writes
over pages, each value checked against a model outside the paged memory."""

from .utils import header_cdef

TYPES = header_cdef("ssi_rmw.h")  # declared once, in the header the C includes

FUNCTIONS = ""
