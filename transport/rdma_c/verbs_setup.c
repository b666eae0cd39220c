/* verbs_setup.c - the verbs backend of ssip_rdma.h, connection setup and teardown: device
 * discovery, listen, connect requests, accept, connect (rdma_cm events each waited for with a
 * deadline), the verbs objects of a connection (PD, completion channel, CQ, RC QP, registered
 * buffers) and close. The data path is verbs_data.c; what both share, verbs_conn.h. */
#include "verbs_conn.h"

#include <fcntl.h>
#include <netdb.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

struct ssip_rlisten {
    struct rdma_event_channel *ch;
    struct rdma_cm_id *id;
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

int ssip_v_next_event(struct rdma_event_channel *ch, int64_t deadline,
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
    int rc = ssip_v_next_event(c->ch, deadline, &t, &status, NULL);
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
    int rc = ssip_v_post_recv(c);
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
        rc = ssip_v_next_event(l->ch, deadline, &t, &status, &id);
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
