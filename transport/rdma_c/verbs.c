/* verbs.c - the production backend of ssip_rdma.h over libibverbs and librdmacm.
 *
 * Each connection owns its rdma_cm event channel (an accepted id is migrated to it), its
 * protection domain (ibv_alloc_pd: never librdmacm's shared per-device PD, so an rkey is
 * valid on this connection's QP only), a completion channel and one CQ for sends and
 * receives. Waits poll(2) the completion channel and the event channel together with a
 * deadline, so a DISCONNECTED event ends any wait with -ECONNRESET. Both fds are non-blocking.
 *
 * This file compiles and links on a machine with rdma-core's headers; it runs only on an
 * RDMA NIC or soft-RoCE (rdma_rxe). See transport/README.md. */
#include "ssip_rdma.h"
#include "ssip_wire.h"
#include "rdma_util.h"

#include <fcntl.h>
#include <netdb.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <infiniband/verbs.h>
#include <rdma/rdma_cma.h>

#define QUEUE_DEPTH 8
#define RECV_WR_ID 0

struct ssip_rlisten {
    struct rdma_event_channel *ch;
    struct rdma_cm_id *id;
};

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

const char *ssip_r_backend(void) { return "verbs"; }

int ssip_r_devices(char *names, size_t cap, char *err, size_t errlen)
{
    int n = 0;
    errno = 0;
    struct ibv_device **list = ibv_get_device_list(&n);
    if (!list)
        return ssip_r_fail(err, errlen, errno ? -errno : -ENODEV, "ibv_get_device_list "
                           "failed: %s", strerror(errno ? errno : ENODEV));
    size_t used = 0;
    if (cap)
        names[0] = 0;
    for (int i = 0; i < n; i++) {
        int k = snprintf(names + used, cap > used ? cap - used : 0, "%s%s", i ? " " : "",
                         ibv_get_device_name(list[i]));
        if (k > 0 && used + (size_t)k < cap)
            used += (size_t)k;
    }
    ibv_free_device_list(list);
    return n;
}

static int nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    return fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0 ? -errno : 0;
}

static const char *cm_name(enum rdma_cm_event_type t) { return rdma_event_str(t); }

/* The next event on ch within the deadline, acknowledged; its type in *type and status. */
static int next_event(struct rdma_event_channel *ch, int64_t deadline,
                      enum rdma_cm_event_type *type, int *status, struct rdma_cm_id **id)
{
    struct pollfd p = {.fd = ch->fd, .events = POLLIN};
    for (;;) {
        struct rdma_cm_event *ev;
        if (rdma_get_cm_event(ch, &ev) == 0) {
            *type = ev->event;
            *status = ev->status;
            if (id)
                *id = ev->id;
            rdma_ack_cm_event(ev);
            return 0;
        }
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            return -errno;
        int rc = ssip_r_poll(&p, 1, deadline);
        if (rc <= 0)
            return rc ? rc : -ETIMEDOUT;
    }
}

static int expect_event(struct ssip_rconn *c, enum rdma_cm_event_type want, int64_t deadline,
                        const char *what, char *err, size_t errlen)
{
    enum rdma_cm_event_type t;
    int status;
    int rc = next_event(c->ch, deadline, &t, &status, NULL);
    if (rc == -ETIMEDOUT)
        return ssip_r_fail(err, errlen, rc, "%s: no rdma_cm event before the deadline", what);
    if (rc < 0)
        return ssip_r_fail(err, errlen, rc, "%s: rdma_get_cm_event: %s", what, strerror(-rc));
    if (t == want)
        return 0;
    if (t == RDMA_CM_EVENT_DISCONNECTED)
        c->disconnected = 1;
    rc = t == RDMA_CM_EVENT_REJECTED ? -ECONNREFUSED
         : t == RDMA_CM_EVENT_UNREACHABLE ? -EHOSTUNREACH
         : t == RDMA_CM_EVENT_DISCONNECTED ? -ECONNRESET : -EPROTO;
    return ssip_r_fail(err, errlen, rc, "%s: got %s (status %d), expected %s", what,
                       cm_name(t), status, cm_name(want));
}

static uint8_t *reg(struct ssip_rconn *c, size_t len, int access, struct ibv_mr **mr)
{
    uint8_t *p = NULL;
    if (posix_memalign((void **)&p, SSIP_PAGE_SIZE, len))
        return NULL;
    memset(p, 0, len);
    *mr = ibv_reg_mr(c->pd, p, len, access);
    if (!*mr) {
        free(p);
        return NULL;
    }
    return p;
}

static int post_recv(struct ssip_rconn *c)
{
    struct ibv_sge sge = {(uintptr_t)c->msg_recv, SSIP_R_MSG, c->recv_mr->lkey};
    struct ibv_recv_wr wr = {.wr_id = RECV_WR_ID, .sg_list = &sge, .num_sge = 1}, *bad;
    return -ibv_post_recv(c->id->qp, &wr, &bad);
}

/* PD, completion channel, CQ, QP and buffers of c->id; passive: buffers 0/1 remotely
 * readable/writable (the node), else buffer 0 local only (the pager) */
static int setup(struct ssip_rconn *c, size_t window, int passive, char *err, size_t errlen)
{
    struct ibv_context *ctx = c->id->verbs;
    c->window = window;
    if (!(c->pd = ibv_alloc_pd(ctx)))
        return ssip_r_fail(err, errlen, -errno, "ibv_alloc_pd: %s", strerror(errno));
    if (!(c->cc = ibv_create_comp_channel(ctx)) || nonblock(c->cc->fd) < 0)
        return ssip_r_fail(err, errlen, -errno, "ibv_create_comp_channel: %s",
                           strerror(errno));
    if (!(c->cq = ibv_create_cq(ctx, 2 * QUEUE_DEPTH, NULL, c->cc, 0)))
        return ssip_r_fail(err, errlen, -errno, "ibv_create_cq: %s", strerror(errno));
    struct ibv_qp_init_attr attr = {
        .send_cq = c->cq, .recv_cq = c->cq, .qp_type = IBV_QPT_RC, .sq_sig_all = 1,
        .cap = {.max_send_wr = QUEUE_DEPTH, .max_recv_wr = QUEUE_DEPTH,
                .max_send_sge = 1, .max_recv_sge = 1}};
    if (rdma_create_qp(c->id, c->pd, &attr))
        return ssip_r_fail(err, errlen, -errno, "rdma_create_qp: %s", strerror(errno));
    c->qp = 1;
    int remote[2] = {IBV_ACCESS_REMOTE_READ,
                     IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE};
    if (!(c->msg_send = reg(c, SSIP_R_MSG, 0, &c->send_mr))
        || !(c->msg_recv = reg(c, SSIP_R_MSG, IBV_ACCESS_LOCAL_WRITE, &c->recv_mr)))
        return ssip_r_fail(err, errlen, -ENOMEM, "ibv_reg_mr (messages): %s", strerror(errno));
    for (int i = 0; i < (passive ? 2 : 1); i++)
        if (!(c->buf[i] = reg(c, window, passive ? remote[i] : IBV_ACCESS_LOCAL_WRITE,
                              &c->mr[i])))
            return ssip_r_fail(err, errlen, -ENOMEM, "ibv_reg_mr (%zu-byte window): %s",
                               window, strerror(errno));
    int rc = post_recv(c);
    return rc ? ssip_r_fail(err, errlen, rc, "ibv_post_recv: %s", strerror(-rc)) : 0;
}

static struct ssip_rconn *new_conn(void)
{
    struct ssip_rconn *c = calloc(1, sizeof *c);
    if (c)
        c->wr_seq = 1;
    return c;
}

static int resolve(const char *host, int port, int passive, struct addrinfo **ai,
                   char *err, size_t errlen)
{
    char service[16];
    snprintf(service, sizeof service, "%d", port);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                             .ai_flags = passive ? AI_PASSIVE : 0};
    int rc = getaddrinfo(host, service, &hints, ai);
    return rc ? ssip_r_fail(err, errlen, -EHOSTUNREACH, "cannot resolve %s: %s", host,
                            gai_strerror(rc)) : 0;
}

int ssip_r_listen(const char *host, int port, int backlog, struct ssip_rlisten **out,
                  char *err, size_t errlen)
{
    struct addrinfo *ai;
    int rc = resolve(host, port, 1, &ai, err, errlen);
    if (rc)
        return rc;
    struct ssip_rlisten *l = calloc(1, sizeof *l);
    if (!l) {
        freeaddrinfo(ai);
        return ssip_r_fail(err, errlen, -ENOMEM, "out of memory");
    }
    if (!(l->ch = rdma_create_event_channel()) || nonblock(l->ch->fd) < 0)
        rc = ssip_r_fail(err, errlen, -errno, "rdma_create_event_channel: %s",
                         strerror(errno));
    else if (rdma_create_id(l->ch, &l->id, NULL, RDMA_PS_TCP))
        rc = ssip_r_fail(err, errlen, -errno, "rdma_create_id: %s", strerror(errno));
    else if (rdma_bind_addr(l->id, ai->ai_addr))
        rc = ssip_r_fail(err, errlen, -errno, "rdma_bind_addr %s:%d: %s (is it an address "
                         "of an RDMA device?)", host, port, strerror(errno));
    else if (rdma_listen(l->id, backlog))
        rc = ssip_r_fail(err, errlen, -errno, "rdma_listen: %s", strerror(errno));
    freeaddrinfo(ai);
    if (rc) {
        ssip_r_listen_close(l);
        return rc;
    }
    *out = l;
    return 0;
}

void ssip_r_listen_close(struct ssip_rlisten *l)
{
    if (!l)
        return;
    if (l->id)
        rdma_destroy_id(l->id);
    if (l->ch)
        rdma_destroy_event_channel(l->ch);
    free(l);
}

struct ssip_rreq {
    struct rdma_cm_id *id;
};

int ssip_r_get_request(struct ssip_rlisten *l, int timeout_ms, struct ssip_rreq **out,
                       char *err, size_t errlen)
{
    int64_t deadline = ssip_r_now_ms() + timeout_ms;
    enum rdma_cm_event_type t;
    int status, rc;
    struct rdma_cm_id *id;
    do {  /* only connect requests arrive here: accepted ids are migrated at once */
        rc = next_event(l->ch, deadline, &t, &status, &id);
        if (rc < 0)
            return ssip_r_fail(err, errlen, rc, "waiting for a connect request: %s",
                               strerror(-rc));
    } while (t != RDMA_CM_EVENT_CONNECT_REQUEST);
    struct ssip_rreq *r = calloc(1, sizeof *r);
    if (!r) {
        rdma_reject(id, NULL, 0);
        rdma_destroy_id(id);
        return ssip_r_fail(err, errlen, -ENOMEM, "out of memory");
    }
    r->id = id;
    *out = r;
    return 0;
}

int ssip_r_accept(struct ssip_rreq *r, int timeout_ms, size_t window, int admit,
                  struct ssip_rconn **out, char *err, size_t errlen)
{
    int64_t deadline = ssip_r_now_ms() + timeout_ms;
    struct rdma_cm_id *id = r->id;
    int rc;
    free(r);
    if (!admit) {
        rdma_reject(id, NULL, 0);
        rdma_destroy_id(id);
        return ssip_r_fail(err, errlen, -EBUSY, "connect request rejected: connection limit");
    }
    struct ssip_rconn *c = new_conn();
    if (!c) {
        rdma_reject(id, NULL, 0);
        rdma_destroy_id(id);
        return ssip_r_fail(err, errlen, -ENOMEM, "out of memory");
    }
    c->id = id;
    if (!(c->ch = rdma_create_event_channel()) || nonblock(c->ch->fd) < 0)
        rc = ssip_r_fail(err, errlen, -errno, "rdma_create_event_channel: %s",
                         strerror(errno));
    else if (rdma_migrate_id(id, c->ch))
        rc = ssip_r_fail(err, errlen, -errno, "rdma_migrate_id: %s", strerror(errno));
    else
        rc = setup(c, window, 1, err, errlen);
    if (rc) {
        rdma_reject(id, NULL, 0);
        ssip_r_close(c);
        return rc;
    }
    struct rdma_conn_param param = {.responder_resources = 1, .initiator_depth = 1,
                                    .rnr_retry_count = 7};
    if (rdma_accept(id, &param))
        rc = ssip_r_fail(err, errlen, -errno, "rdma_accept: %s", strerror(errno));
    else
        rc = expect_event(c, RDMA_CM_EVENT_ESTABLISHED, deadline, "accept", err, errlen);
    if (rc) {
        ssip_r_close(c);
        return rc;
    }
    c->established = 1;
    *out = c;
    return 0;
}

int ssip_r_connect(const char *host, int port, int timeout_ms, size_t window,
                   struct ssip_rconn **out, char *err, size_t errlen)
{
    int64_t deadline = ssip_r_now_ms() + timeout_ms;
    struct addrinfo *ai;
    int rc = resolve(host, port, 0, &ai, err, errlen);
    if (rc)
        return rc;
    struct ssip_rconn *c = new_conn();
    if (!c) {
        freeaddrinfo(ai);
        return ssip_r_fail(err, errlen, -ENOMEM, "out of memory");
    }
    if (!(c->ch = rdma_create_event_channel()) || nonblock(c->ch->fd) < 0)
        rc = ssip_r_fail(err, errlen, -errno, "rdma_create_event_channel: %s",
                         strerror(errno));
    else if (rdma_create_id(c->ch, &c->id, NULL, RDMA_PS_TCP))
        rc = ssip_r_fail(err, errlen, -errno, "rdma_create_id: %s", strerror(errno));
    else if (rdma_resolve_addr(c->id, NULL, ai->ai_addr, ssip_r_left(deadline)))
        rc = ssip_r_fail(err, errlen, -errno, "rdma_resolve_addr %s: %s", host,
                         strerror(errno));
    else if (!(rc = expect_event(c, RDMA_CM_EVENT_ADDR_RESOLVED, deadline, "resolve address",
                                 err, errlen))) {
        if (rdma_resolve_route(c->id, ssip_r_left(deadline)))
            rc = ssip_r_fail(err, errlen, -errno, "rdma_resolve_route: %s", strerror(errno));
        else
            rc = expect_event(c, RDMA_CM_EVENT_ROUTE_RESOLVED, deadline, "resolve route",
                              err, errlen);
    }
    freeaddrinfo(ai);
    if (!rc)
        rc = setup(c, window, 0, err, errlen);
    if (!rc) {
        struct rdma_conn_param param = {.responder_resources = 1, .initiator_depth = 1,
                                        .retry_count = 7, .rnr_retry_count = 7};
        if (rdma_connect(c->id, &param))
            rc = ssip_r_fail(err, errlen, -errno, "rdma_connect: %s", strerror(errno));
        else
            rc = expect_event(c, RDMA_CM_EVENT_ESTABLISHED, deadline, "connect", err, errlen);
    }
    if (rc) {
        ssip_r_close(c);
        return rc;
    }
    c->established = 1;
    *out = c;
    return 0;
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
            if (next_event(c->ch, ssip_r_now_ms(), &t, &status, NULL) == 0
                && (t == RDMA_CM_EVENT_DISCONNECTED || t == RDMA_CM_EVENT_DEVICE_REMOVAL
                    || t == RDMA_CM_EVENT_TIMEWAIT_EXIT)) {
                c->disconnected = 1;
                return ssip_r_fail(err, errlen, -ECONNRESET, "%s: the peer disconnected (%s)",
                                   what, cm_name(t));
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
    rc = post_recv(c);  /* keep one receive posted */
    return rc ? ssip_r_fail(err, errlen, rc, "ibv_post_recv: %s", strerror(-rc)) : (int)n;
}

int ssip_r_read(struct ssip_rconn *c, size_t len, uint64_t raddr, uint32_t rkey,
                int timeout_ms, char *err, size_t errlen)
{
    if (len > c->window)
        return ssip_r_fail(err, errlen, -EINVAL, "RDMA READ of %zu bytes exceeds the "
                           "%zu-byte buffer", len, c->window);
    return post_send(c, IBV_WR_RDMA_READ, c->buf[0], c->mr[0]->lkey, len, raddr, rkey,
                     timeout_ms, "RDMA READ", err, errlen);
}

int ssip_r_write(struct ssip_rconn *c, size_t len, uint64_t raddr, uint32_t rkey,
                 int timeout_ms, char *err, size_t errlen)
{
    if (len > c->window)
        return ssip_r_fail(err, errlen, -EINVAL, "RDMA WRITE of %zu bytes exceeds the "
                           "%zu-byte buffer", len, c->window);
    return post_send(c, IBV_WR_RDMA_WRITE, c->buf[0], c->mr[0]->lkey, len, raddr, rkey,
                     timeout_ms, "RDMA WRITE", err, errlen);
}

void ssip_r_close(struct ssip_rconn *c)
{
    if (!c)
        return;
    if (c->established && !c->disconnected && c->id) {
        rdma_disconnect(c->id);  /* the peer sees DISCONNECTED; we do not wait for ours */
    }
    if (c->qp)
        rdma_destroy_qp(c->id);
    struct ibv_mr *mrs[4] = {c->send_mr, c->recv_mr, c->mr[0], c->mr[1]};
    uint8_t *bufs[4] = {c->msg_send, c->msg_recv, c->buf[0], c->buf[1]};
    for (int i = 0; i < 4; i++) {  /* every MR before the PD that holds it */
        if (mrs[i])
            ibv_dereg_mr(mrs[i]);
        free(bufs[i]);
    }
    if (c->cq)
        ibv_destroy_cq(c->cq);
    if (c->cc)
        ibv_destroy_comp_channel(c->cc);
    if (c->pd)
        ibv_dealloc_pd(c->pd);
    if (c->id)
        rdma_destroy_id(c->id);
    if (c->ch)
        rdma_destroy_event_channel(c->ch);
    free(c);
}
