"""SSI-HV page transport: PageTransport over TCP (default) or RDMA (automatic upgrade)."""
