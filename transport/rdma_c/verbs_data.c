/* verbs_data.c - the verbs backend of ssip_rdma.h, the data path on an established
 * connection: SEND/RECV of SSIP messages through the registered message buffers, RDMA READ
 * and WRITE of the registered windows, and the wait for their completions (the completion
 * channel and the rdma_cm event channel polled together with a deadline, so a DISCONNECTED
 * event ends any wait). Connections are made in verbs_setup.c; verbs_conn.h is shared. */
#include "verbs_conn.h"

#include <string.h>

int ssip_v_post_recv(struct ssip_rconn *c)
{
    struct ibv_sge sge = {(uintptr_t)c->msg_recv, SSIP_R_MSG, c->recv_mr->lkey};
    struct ibv_recv_wr wr = {.wr_id = RECV_WR_ID, .sg_list = &sge, .num_sge = 1}, *bad;
    return -ibv_post_recv(c->id->qp, &wr, &bad);
}

uint8_t *ssip_r_buffer(struct ssip_rconn *c, int which) { return c->buf[which & 1]; }

size_t ssip_r_window(struct ssip_rconn *c) { return c->window; }

void ssip_r_keys(struct ssip_rconn *c, uint64_t *read_addr, uint32_t *read_rkey,
                 uint64_t *write_addr, uint32_t *write_rkey)
{
    *read_addr = (uintptr_t)c->buf[0];
    *read_rkey = c->mr[0] ? c->mr[0]->rkey : 0;
    *write_addr = (uintptr_t)c->buf[1];
    *write_rkey = c->mr[1] ? c->mr[1]->rkey : 0;
}

/* Wait for the completion of work request wr_id (RECV_WR_ID: the next receive). A
 * DISCONNECTED event, a failed completion or the deadline end the wait. */
static int wait_wc(struct ssip_rconn *c, uint64_t wr_id, int64_t deadline, const char *what,
                   char *err, size_t errlen)
{
    if (c->disconnected)
        return ssip_r_fail(err, errlen, -ECONNRESET, "%s: the peer disconnected", what);
    struct pollfd p[2] = {{.fd = c->cc->fd, .events = POLLIN},
                          {.fd = c->ch->fd, .events = POLLIN}};
    int armed = 0;
    for (;;) {
        if (wr_id == RECV_WR_ID && c->recv_done)
            return 0;
        struct ibv_wc wc;
        int n = ibv_poll_cq(c->cq, 1, &wc);
        if (n < 0)
            return ssip_r_fail(err, errlen, -EIO, "%s: ibv_poll_cq failed", what);
        if (n == 1) {
            if (wc.status != IBV_WC_SUCCESS) {
                int rc = wc.status == IBV_WC_REM_ACCESS_ERR ? -EACCES
                         : wc.status == IBV_WC_WR_FLUSH_ERR ? -ECONNRESET : -EIO;
                return ssip_r_fail(err, errlen, rc, "%s: work completion %s", what,
                                   ibv_wc_status_str(wc.status));
            }
            if (wc.wr_id == RECV_WR_ID) {
                c->recv_done = 1;
                c->recv_len = wc.byte_len;
            } else if (wc.wr_id == wr_id) {
                return 0;
            }
            continue;
        }
        if (!armed) {  /* arm, then poll once more: a completion may have raced the arming */
            if (ibv_req_notify_cq(c->cq, 0))
                return ssip_r_fail(err, errlen, -EIO, "%s: ibv_req_notify_cq failed", what);
            armed = 1;
            continue;
        }
        int rc = ssip_r_poll(p, 2, deadline);
        if (rc < 0)
            return ssip_r_fail(err, errlen, rc, "%s: poll: %s", what, strerror(-rc));
        if (rc == 0)
            return ssip_r_fail(err, errlen, -ETIMEDOUT, "%s: no completion before the "
                               "deadline", what);
        if (p[1].revents) {
            enum rdma_cm_event_type t;
            int status;
            if (ssip_v_next_event(c->ch, ssip_r_now_ms(), &t, &status, NULL) == 0
                && (t == RDMA_CM_EVENT_DISCONNECTED || t == RDMA_CM_EVENT_DEVICE_REMOVAL
                    || t == RDMA_CM_EVENT_TIMEWAIT_EXIT)) {
                c->disconnected = 1;
                return ssip_r_fail(err, errlen, -ECONNRESET, "%s: the peer disconnected (%s)",
                                   what, rdma_event_str(t));
            }
        }
        if (p[0].revents) {
            struct ibv_cq *cq;
            void *ctx;
            if (ibv_get_cq_event(c->cc, &cq, &ctx) == 0) {
                ibv_ack_cq_events(cq, 1);
                armed = 0;
            }
        }
    }
}

static int post_send(struct ssip_rconn *c, enum ibv_wr_opcode op, void *local, uint32_t lkey,
                     size_t len, uint64_t raddr, uint32_t rkey, int timeout_ms,
                     const char *what, char *err, size_t errlen)
{
    int64_t deadline = ssip_r_now_ms() + timeout_ms;
    if (c->disconnected)
        return ssip_r_fail(err, errlen, -ECONNRESET, "%s: the peer disconnected", what);
    struct ibv_sge sge = {(uintptr_t)local, (uint32_t)len, lkey};
    struct ibv_send_wr wr = {.wr_id = ++c->wr_seq, .sg_list = &sge, .num_sge = 1,
                             .opcode = op, .send_flags = IBV_SEND_SIGNALED}, *bad;
    wr.wr.rdma.remote_addr = raddr;
    wr.wr.rdma.rkey = rkey;
    int rc = ibv_post_send(c->id->qp, &wr, &bad);
    if (rc)
        return ssip_r_fail(err, errlen, -rc, "%s: ibv_post_send: %s", what, strerror(rc));
    return wait_wc(c, wr.wr_id, deadline, what, err, errlen);
}

int ssip_r_send(struct ssip_rconn *c, const void *msg, size_t len, int timeout_ms,
                char *err, size_t errlen)
{
    if (len > SSIP_R_MSG)
        return ssip_r_fail(err, errlen, -EMSGSIZE, "message of %zu bytes exceeds %d", len,
                           SSIP_R_MSG);
    memcpy(c->msg_send, msg, len);
    return post_send(c, IBV_WR_SEND, c->msg_send, c->send_mr->lkey, len, 0, 0, timeout_ms,
                     "RDMA send", err, errlen);
}

int ssip_r_recv(struct ssip_rconn *c, void *out, size_t cap, int timeout_ms,
                char *err, size_t errlen)
{
    int rc = wait_wc(c, RECV_WR_ID, ssip_r_now_ms() + timeout_ms, "RDMA receive", err,
                     errlen);
    if (rc < 0)
        return rc;
    uint32_t n = c->recv_len;
    c->recv_done = 0;
    if (n > cap)
        return ssip_r_fail(err, errlen, -EMSGSIZE, "received %u bytes, room for %zu", n, cap);
    memcpy(out, c->msg_recv, n);
    rc = ssip_v_post_recv(c);  /* keep one receive posted */
    return rc ? ssip_r_fail(err, errlen, rc, "ibv_post_recv: %s", strerror(-rc)) : (int)n;
}

/* An RDMA READ or WRITE of len bytes between buffer 0 and the peer's raddr/rkey. */
static int read_write(struct ssip_rconn *c, enum ibv_wr_opcode op, const char *what,
                      size_t len, uint64_t raddr, uint32_t rkey, int timeout_ms, char *err,
                      size_t errlen)
{
    if (len > c->window)
        return ssip_r_fail(err, errlen, -EINVAL, "%s of %zu bytes exceeds the %zu-byte buffer",
                           what, len, c->window);
    return post_send(c, op, c->buf[0], c->mr[0]->lkey, len, raddr, rkey, timeout_ms, what,
                     err, errlen);
}

int ssip_r_read(struct ssip_rconn *c, size_t len, uint64_t raddr, uint32_t rkey,
                int timeout_ms, char *err, size_t errlen)
{
    return read_write(c, IBV_WR_RDMA_READ, "RDMA READ", len, raddr, rkey, timeout_ms, err,
                      errlen);
}

int ssip_r_write(struct ssip_rconn *c, size_t len, uint64_t raddr, uint32_t rkey,
                 int timeout_ms, char *err, size_t errlen)
{
    return read_write(c, IBV_WR_RDMA_WRITE, "RDMA WRITE", len, raddr, rkey, timeout_ms, err,
                      errlen);
}
