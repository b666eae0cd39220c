"""The pager as a service: the UFFD handshake server, `serve`, and the restart supervisor."""
