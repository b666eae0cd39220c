"""Shared pytest configuration: the suite runs against the real kernel, sockets and processes."""
