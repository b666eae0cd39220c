"""The memory node: server, page store, C fault lane, command line."""
