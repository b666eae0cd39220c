"""The RDMA data path in C (cffi): ``ssip_rdma.h`` is its interface, ``lane.c`` the fault path,
``verbs_setup.c`` (connection setup) and ``verbs_data.c`` (data path) the libibverbs/librdmacm
backend (extension ``_rdma_cffi``) and ``loopback.c`` a TEST DOUBLE over TCP sockets (extension
``_rdma_loopback_cffi``) for machines without RDMA.
`transport.rdma` is the Python shell that loads one of them; see transport/README.md."""
