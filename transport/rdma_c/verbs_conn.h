/* verbs_conn.h - what the two halves of the verbs backend of ssip_rdma.h share (private):
 * a connection's state, and the two helpers each half takes from the other. verbs_setup.c
 * makes and tears down connections (devices, listen, accept, connect, close: rdma_cm and the
 * verbs objects), verbs_data.c moves bytes on an established one (SEND/RECV, RDMA READ/WRITE
 * and their completions).
 *
 * Each connection owns its rdma_cm event channel (an accepted id is migrated to it), its
 * protection domain (ibv_alloc_pd: never librdmacm's shared per-device PD, so an rkey is
 * valid on this connection's QP only), a completion channel and one CQ for sends and
 * receives. Waits poll(2) the completion channel and the event channel together with a
 * deadline, so a DISCONNECTED event ends any wait with -ECONNRESET. Both fds are non-blocking.
 *
 * These files compile and link on a machine with rdma-core's headers; they run only on an
 * RDMA NIC or soft-RoCE (rdma_rxe). See transport/README.md. */
#ifndef SSIP_VERBS_CONN_H
#define SSIP_VERBS_CONN_H

#include "ssip_rdma.h"
#include "ssip_wire.h"
#include "rdma_util.h"

#include <infiniband/verbs.h>
#include <rdma/rdma_cma.h>

#define QUEUE_DEPTH 8
#define RECV_WR_ID 0

struct ssip_rconn {
    struct rdma_event_channel *ch;
    struct rdma_cm_id *id;
    struct ibv_pd *pd;
    struct ibv_comp_channel *cc;
    struct ibv_cq *cq;
    int qp;                       /* rdma_create_qp succeeded */
    int established, disconnected;
    uint8_t *msg_send, *msg_recv; /* SSIP_R_MSG bytes each */
    struct ibv_mr *send_mr, *recv_mr;
    uint8_t *buf[2];
    struct ibv_mr *mr[2];
    size_t window;
    uint64_t wr_seq;
    int recv_done;                /* a receive completed and was not consumed yet */
    uint32_t recv_len;
};

/* The next event on ch within the deadline, acknowledged; its type in *type and status
 * (verbs_setup.c). */
__attribute__((visibility("hidden")))
int ssip_v_next_event(struct rdma_event_channel *ch, int64_t deadline,
                      enum rdma_cm_event_type *type, int *status, struct rdma_cm_id **id);
/* Post the connection's one receive into its message buffer (verbs_data.c); 0 or -errno. */
__attribute__((visibility("hidden")))
int ssip_v_post_recv(struct ssip_rconn *c);

#endif /* SSIP_VERBS_CONN_H */
