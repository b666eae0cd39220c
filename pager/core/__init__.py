"""Pure fault-handling state, no I/O: regions, client state machine, interval sets."""
