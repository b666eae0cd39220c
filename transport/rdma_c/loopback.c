/* loopback.c - TEST DOUBLE of the verbs backend: ssip_rdma.h over TCP sockets.
 *
 * This machine has no RDMA device, so the frame logic (lane.c), the Python shells and the
 * memory node's RDMA service are tested against this double (module
 * transport.rdma_c._rdma_loopback_cffi, chosen only by SSI_PAGER_RDMA_LOOPBACK=1). It is
 * never a transport: it says "loopback" everywhere it is named.
 *
 * What it models: a connection's registered buffers with random 32-bit rkeys and the access
 * each was registered with (buffer 0 remote-readable, buffer 1 remote-writable on the
 * node's side, nothing remote on the pager's); one-sided READ/WRITE checked against the
 * target connection's own keys, bounds and access (what a per-connection protection domain
 * gives: another connection's rkey is a remote access error); SEND/RECV messages;
 * disconnects (end of stream: -ECONNRESET); connect rejects; deadlines on every wait.
 * What it does not model: the passive side's "NIC" serves one-sided requests only while
 * that side waits in ssip_r_recv (the node always does between requests). */
#include "ssip_rdma.h"
#include "ssip_wire.h"
#include "rdma_util.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <unistd.h>

enum { OP_HELLO = 1, OP_ACCEPT, OP_REJECT, OP_SEND, OP_READ, OP_READ_RESP, OP_WRITE,
       OP_WRITE_ACK };

struct pkt {  /* one packet on the loopback socket, then len payload bytes */
    uint8_t op, status;
    uint16_t pad;
    uint32_t len;
    uint32_t rkey;
    uint32_t pad2;
    uint64_t addr;
};

struct ssip_rlisten {
    int fd;
};

struct ssip_rconn {
    int fd;
    int passive;
    size_t window;
    uint8_t *buf[2];
    uint32_t rkey[2];
};

const char *ssip_r_backend(void) { return "loopback"; }

int ssip_r_devices(char *names, size_t cap, char *err, size_t errlen)
{
    (void)err;
    (void)errlen;
    snprintf(names, cap, "loopback-double");
    return 1;
}

static int io_full(int fd, void *buf, size_t n, int64_t deadline, int writing)
{
    uint8_t *p = buf;
    while (n) {
        struct pollfd pf = {.fd = fd, .events = writing ? POLLOUT : POLLIN};
        int rc = ssip_r_poll(&pf, 1, deadline);
        if (rc <= 0)
            return rc ? rc : -ETIMEDOUT;
        ssize_t k = writing ? send(fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT)
                            : recv(fd, p, n, MSG_DONTWAIT);
        if (k == 0)
            return -ECONNRESET;
        if (k < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)
                continue;
            return errno == EPIPE ? -ECONNRESET : -errno;
        }
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

static int put(int fd, uint8_t op, uint8_t status, uint64_t addr, uint32_t rkey,
               const void *data, uint32_t len, int64_t deadline)
{
    struct pkt h = {.op = op, .status = status, .len = len, .rkey = rkey, .addr = addr};
    int rc = io_full(fd, &h, sizeof h, deadline, 1);
    return rc || !len ? rc : io_full(fd, (void *)data, len, deadline, 1);
}

static int fail_io(char *err, size_t errlen, int rc, const char *what)
{
    if (rc == -ETIMEDOUT)
        return ssip_r_fail(err, errlen, rc, "%s: no completion before the deadline "
                           "(loopback double)", what);
    if (rc == -ECONNRESET)
        return ssip_r_fail(err, errlen, rc, "%s: the peer disconnected (loopback double)",
                           what);
    return ssip_r_fail(err, errlen, rc, "%s: %s (loopback double)", what, strerror(-rc));
}

/* the target buffer of a one-sided request, or NULL: a remote access error */
static uint8_t *target(struct ssip_rconn *c, int which, const struct pkt *h)
{
    if (!c->passive || !c->buf[which] || h->rkey != c->rkey[which])
        return NULL;
    uintptr_t base = (uintptr_t)c->buf[which];
    if (h->addr < base || h->len > c->window || h->addr - base > c->window - h->len)
        return NULL;
    return c->buf[which] + (h->addr - base);
}

/* Read packets until one of type want arrives (its header in *h, payload to out[cap]);
 * one-sided requests from the peer are served on the way. */
static int await_pkt(struct ssip_rconn *c, uint8_t want, struct pkt *h, void *out, size_t cap,
                     int64_t deadline, const char *what, char *err, size_t errlen)
{
    for (;;) {
        int rc = io_full(c->fd, h, sizeof *h, deadline, 0);
        if (rc)
            return fail_io(err, errlen, rc, what);
        uint8_t *dst = NULL;
        if (h->op == want) {
            if (h->len > cap)
                return ssip_r_fail(err, errlen, -EMSGSIZE, "%s: %u bytes, room for %zu",
                                   what, h->len, cap);
            dst = out;
        } else if (h->op == OP_WRITE) {
            dst = target(c, 1, h);
        } else if (h->op != OP_READ) {
            return ssip_r_fail(err, errlen, -EPROTO, "%s: unexpected packet %u (loopback "
                               "double)", what, h->op);
        }
        if (h->op == OP_WRITE || h->op == want) {
            uint8_t sink[SSIP_PAGE_SIZE];
            for (uint32_t left = h->len; left;) {  /* a refused WRITE's bytes are dropped */
                uint32_t k = dst ? left : left < sizeof sink ? left : sizeof sink;
                if ((rc = io_full(c->fd, dst ? dst + (h->len - left) : sink, k, deadline, 0)))
                    return fail_io(err, errlen, rc, what);
                left -= k;
            }
        }
        if (h->op == want)
            return 0;
        if (h->op == OP_WRITE)
            rc = put(c->fd, OP_WRITE_ACK, dst == NULL, 0, 0, NULL, 0, deadline);
        else {
            const uint8_t *src = target(c, 0, h);
            rc = put(c->fd, OP_READ_RESP, src == NULL, 0, 0, src, src ? h->len : 0, deadline);
        }
        if (rc)
            return fail_io(err, errlen, rc, what);
    }
}

static int make_buffers(struct ssip_rconn *c, size_t window, int passive)
{
    c->window = window;
    c->passive = passive;
    for (int i = 0; i < (passive ? 2 : 1); i++) {
        if (!(c->buf[i] = calloc(1, window)))
            return -ENOMEM;
        if (getrandom(&c->rkey[i], sizeof c->rkey[i], 0) != sizeof c->rkey[i])
            return -EIO;
    }
    return 0;
}

int ssip_r_listen(const char *host, int port, int backlog, struct ssip_rlisten **out,
                  char *err, size_t errlen)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, host, &a.sin_addr) != 1)
        return ssip_r_fail(err, errlen, -EINVAL, "loopback double listens on IPv4 "
                           "addresses only, not %s", host);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;
    if (fd < 0)
        return ssip_r_fail(err, errlen, -errno, "socket: %s", strerror(errno));
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) || listen(fd, backlog)) {
        int rc = -errno;
        close(fd);
        return ssip_r_fail(err, errlen, rc, "loopback double listen %s:%d: %s", host, port,
                           strerror(-rc));
    }
    struct ssip_rlisten *l = calloc(1, sizeof *l);
    if (!l) {
        close(fd);
        return ssip_r_fail(err, errlen, -ENOMEM, "out of memory");
    }
    l->fd = fd;
    *out = l;
    return 0;
}

void ssip_r_listen_close(struct ssip_rlisten *l)
{
    if (l) {
        close(l->fd);
        free(l);
    }
}

struct ssip_rreq {
    int fd;
};

int ssip_r_get_request(struct ssip_rlisten *l, int timeout_ms, struct ssip_rreq **out,
                       char *err, size_t errlen)
{
    int64_t deadline = ssip_r_now_ms() + timeout_ms;
    struct pollfd p = {.fd = l->fd, .events = POLLIN};
    int rc = ssip_r_poll(&p, 1, deadline);
    if (rc <= 0)
        return ssip_r_fail(err, errlen, rc ? rc : -ETIMEDOUT, "waiting for a connect "
                           "request: %s", rc ? strerror(-rc) : "timed out");
    int fd = accept4(l->fd, NULL, NULL, SOCK_CLOEXEC), one = 1;
    if (fd < 0)
        return ssip_r_fail(err, errlen, -errno, "accept: %s", strerror(errno));
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct pkt h;
    if ((rc = io_full(fd, &h, sizeof h, deadline + 1000, 0)) || h.op != OP_HELLO) {
        close(fd);
        return ssip_r_fail(err, errlen, rc ? rc : -EPROTO, "connect request: no hello");
    }
    struct ssip_rreq *r = calloc(1, sizeof *r);
    if (!r) {
        close(fd);
        return ssip_r_fail(err, errlen, -ENOMEM, "out of memory");
    }
    r->fd = fd;
    *out = r;
    return 0;
}

int ssip_r_accept(struct ssip_rreq *r, int timeout_ms, size_t window, int admit,
                  struct ssip_rconn **out, char *err, size_t errlen)
{
    int64_t deadline = ssip_r_now_ms() + timeout_ms;
    int fd = r->fd, rc;
    free(r);
    if (!admit) {
        put(fd, OP_REJECT, 0, 0, 0, NULL, 0, deadline);
        close(fd);
        return ssip_r_fail(err, errlen, -EBUSY, "connect request rejected: connection limit");
    }
    struct ssip_rconn *c = calloc(1, sizeof *c);
    if (!c || make_buffers(c, window, 1)) {
        close(fd);
        ssip_r_close(c);
        return ssip_r_fail(err, errlen, -ENOMEM, "out of memory");
    }
    c->fd = fd;
    if ((rc = put(fd, OP_ACCEPT, 0, 0, 0, NULL, 0, deadline))) {
        ssip_r_close(c);
        return fail_io(err, errlen, rc, "accept");
    }
    *out = c;
    return 0;
}

int ssip_r_connect(const char *host, int port, int timeout_ms, size_t window,
                   struct ssip_rconn **out, char *err, size_t errlen)
{
    int64_t deadline = ssip_r_now_ms() + timeout_ms;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, host, &a.sin_addr) != 1)
        return ssip_r_fail(err, errlen, -EHOSTUNREACH, "loopback double connects to IPv4 "
                           "addresses only, not %s", host);
    struct ssip_rconn *c = calloc(1, sizeof *c);
    if (!c || make_buffers(c, window, 0)) {
        ssip_r_close(c);
        return ssip_r_fail(err, errlen, -ENOMEM, "out of memory");
    }
    int one = 1, rc;
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (c->fd < 0) {
        rc = -errno;
        free(c->buf[0]);
        free(c);
        return ssip_r_fail(err, errlen, rc, "socket: %s", strerror(-rc));
    }
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(c->fd, (struct sockaddr *)&a, sizeof a) && errno != EINPROGRESS) {
        rc = ssip_r_fail(err, errlen, -errno, "connect %s:%d: %s (loopback double)", host,
                         port, strerror(errno));
        ssip_r_close(c);
        return rc;
    }
    struct pkt h;
    if ((rc = put(c->fd, OP_HELLO, 0, 0, 0, NULL, 0, deadline))
        || (rc = io_full(c->fd, &h, sizeof h, deadline, 0))) {
        ssip_r_close(c);
        return fail_io(err, errlen, rc == -EPIPE ? -ECONNREFUSED : rc, "connect");
    }
    if (h.op != OP_ACCEPT) {
        ssip_r_close(c);
        return ssip_r_fail(err, errlen, -ECONNREFUSED, "connect %s:%d: rejected (loopback "
                           "double)", host, port);
    }
    *out = c;
    return 0;
}

uint8_t *ssip_r_buffer(struct ssip_rconn *c, int which) { return c->buf[which & 1]; }

size_t ssip_r_window(struct ssip_rconn *c) { return c->window; }

void ssip_r_keys(struct ssip_rconn *c, uint64_t *read_addr, uint32_t *read_rkey,
                 uint64_t *write_addr, uint32_t *write_rkey)
{
    *read_addr = (uintptr_t)c->buf[0];
    *read_rkey = c->rkey[0];
    *write_addr = (uintptr_t)c->buf[1];
    *write_rkey = c->rkey[1];
}

int ssip_r_send(struct ssip_rconn *c, const void *msg, size_t len, int timeout_ms,
                char *err, size_t errlen)
{
    if (len > SSIP_R_MSG)
        return ssip_r_fail(err, errlen, -EMSGSIZE, "message of %zu bytes exceeds %d", len,
                           SSIP_R_MSG);
    int rc = put(c->fd, OP_SEND, 0, 0, 0, msg, (uint32_t)len, ssip_r_now_ms() + timeout_ms);
    return rc ? fail_io(err, errlen, rc, "RDMA send") : 0;
}

int ssip_r_recv(struct ssip_rconn *c, void *out, size_t cap, int timeout_ms,
                char *err, size_t errlen)
{
    struct pkt h;
    int rc = await_pkt(c, OP_SEND, &h, out, cap, ssip_r_now_ms() + timeout_ms, "RDMA receive",
                       err, errlen);
    return rc ? rc : (int)h.len;
}

static int one_sided(struct ssip_rconn *c, uint8_t op, size_t len, uint64_t raddr,
                     uint32_t rkey, int timeout_ms, const char *what, char *err, size_t errlen)
{
    int64_t deadline = ssip_r_now_ms() + timeout_ms;
    if (len > c->window)
        return ssip_r_fail(err, errlen, -EINVAL, "%s of %zu bytes exceeds the %zu-byte "
                           "buffer", what, len, c->window);
    int rc;
    if (op == OP_WRITE) {
        rc = put(c->fd, op, 0, raddr, rkey, c->buf[0], (uint32_t)len, deadline);
    } else {  /* a READ names its length in the header and carries no payload */
        struct pkt req = {.op = op, .len = (uint32_t)len, .rkey = rkey, .addr = raddr};
        rc = io_full(c->fd, &req, sizeof req, deadline, 1);
    }
    if (rc)
        return fail_io(err, errlen, rc, what);
    if (op == OP_READ) {
        struct pkt h;
        rc = await_pkt(c, OP_READ_RESP, &h, c->buf[0], len, deadline, what, err, errlen);
        if (!rc && h.status)
            rc = ssip_r_fail(err, errlen, -EACCES, "%s: work completion remote access error "
                             "(loopback double)", what);
        return rc;
    }
    struct pkt h;
    rc = await_pkt(c, OP_WRITE_ACK, &h, NULL, 0, deadline, what, err, errlen);
    if (!rc && h.status)
        rc = ssip_r_fail(err, errlen, -EACCES, "%s: work completion remote access error "
                         "(loopback double)", what);
    return rc;
}

int ssip_r_read(struct ssip_rconn *c, size_t len, uint64_t raddr, uint32_t rkey,
                int timeout_ms, char *err, size_t errlen)
{
    return one_sided(c, OP_READ, len, raddr, rkey, timeout_ms, "RDMA READ", err, errlen);
}

int ssip_r_write(struct ssip_rconn *c, size_t len, uint64_t raddr, uint32_t rkey,
                 int timeout_ms, char *err, size_t errlen)
{
    return one_sided(c, OP_WRITE, len, raddr, rkey, timeout_ms, "RDMA WRITE", err, errlen);
}

void ssip_r_close(struct ssip_rconn *c)
{
    if (!c)
        return;
    if (c->fd > 0)
        close(c->fd);
    free(c->buf[0]);
    free(c->buf[1]);
    free(c);
}
