"""The SSIP wire format, defined once (sans-IO); `ssip_wire.h` is its C mirror."""
