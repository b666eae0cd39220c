"""ssi-pager: userfaultfd pager for SSI-HV guests (Phase 6)."""

__version__ = "0.1.0"
