"""C declarations of the userfaultfd binding, one module per header (built by ``_build.py``).

Each module defines four strings: ``INCLUDES`` (C preprocessor lines), ``TYPES`` (cdef: structs
and constants, values ``...`` so the compiler fills them in from the real header), ``FUNCTIONS``
(cdef: prototypes) and ``CUSTOMIZATIONS`` (C code: fallbacks for constants newer than the build
host's header, ``SSI_HAS_*`` flags, and helper functions).
"""
