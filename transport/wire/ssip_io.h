/* ssip_io.h - socket helpers shared by the C loops that speak SSIP (hand-written, unlike
 * ssip_wire.h beside it). Header-only: every function is static inline.
 *
 * A connection is {fd, ssl}: ssl NULL is a plain socket (send/recv, as before TLS existed),
 * otherwise the TLS 1.3 session that owns the socket (transport/tlsc: the pager's fault lanes
 * and the node's fault lanes of a TLS node), read and written with SSL_read/SSL_write. Both
 * loops keep their sockets blocking (SO_RCVTIMEO/SO_SNDTIMEO may bound them): a TLS "want
 * read/write" is then a timeout, reported as -EAGAIN like a plain recv's. */
#ifndef SSIP_IO_H
#define SSIP_IO_H

#include <errno.h>
#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#include "ssip_poll.h"

struct ssip_conn {
    int fd;
    SSL *ssl;  /* NULL: plaintext */
};

#define SSIP_CONN(fd, ssl) ((struct ssip_conn){(fd), (SSL *)(ssl)})

/* -errno for a failed SSL_read/SSL_write that returned k: -EAGAIN (would block: a timeout),
 * -ECONNRESET (the peer closed), the socket's errno, or -EPROTO (a TLS error: alert, bad
 * record). The thread's OpenSSL error queue is cleared. */
static inline int ssip_tls_errno(SSL *ssl, int k)
{
    int e = errno, rc;
    switch (SSL_get_error(ssl, k)) {
    case SSL_ERROR_WANT_READ:
    case SSL_ERROR_WANT_WRITE:
        rc = e == EINTR ? -EINTR : -EAGAIN;  /* the socket's recv/send failed with e */
        break;
    case SSL_ERROR_ZERO_RETURN:
        rc = -ECONNRESET;
        break;
    case SSL_ERROR_SYSCALL:
        rc = ERR_peek_error() ? -EPROTO : (e ? -e : -ECONNRESET);
        break;
    default:
        rc = -EPROTO;
    }
    ERR_clear_error();
    return rc;
}

/* Send all n bytes (retrying on EINTR, never raising SIGPIPE): 0, or -errno. */
static inline int ssip_send_all(struct ssip_conn c, const void *buf, size_t n)
{
    const uint8_t *p = (const uint8_t *)buf;
    while (n) {
        ssize_t k;
        if (c.ssl) {
            errno = 0;
            int w = SSL_write(c.ssl, p, n > INT_MAX ? INT_MAX : (int)n);
            if (w <= 0) {
                int rc = ssip_tls_errno(c.ssl, w);
                if (rc == -EINTR)
                    continue;
                return rc;
            }
            k = w;
        } else {
            k = send(c.fd, p, n, MSG_NOSIGNAL);
            if (k < 0) {
                if (errno == EINTR)
                    continue;
                return -errno;
            }
        }
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

/* Receive up to n bytes (at least one; a plain socket with MSG_WAITALL): what was read, 0 at
 * end of stream, or -errno. */
static inline ssize_t ssip_recv_some(struct ssip_conn c, void *buf, size_t n, int flags)
{
    for (;;) {
        if (c.ssl) {
            errno = 0;
            int k = SSL_read(c.ssl, buf, n > INT_MAX ? INT_MAX : (int)n);
            if (k > 0)
                return k;
            int rc = ssip_tls_errno(c.ssl, k);
            if (rc == -EINTR)
                continue;
            return rc == -ECONNRESET ? 0 : rc;
        }
        ssize_t k = recv(c.fd, buf, n, flags);
        if (k >= 0)
            return k;
        if (errno != EINTR)
            return -errno;
    }
}

/* Receive exactly n bytes (blocking socket; retrying on EINTR): 0, -ECONNRESET when the peer
 * closed first, or -errno. */
static inline int ssip_recv_all(struct ssip_conn c, void *buf, size_t n)
{
    uint8_t *p = (uint8_t *)buf;
    while (n) {
        ssize_t k = ssip_recv_some(c, p, n, MSG_WAITALL);
        if (k < 0)
            return (int)k;
        if (k == 0)
            return -ECONNRESET;
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

/* ssip_recvmsg_polling on a connection: a plain socket reads the whole msg as before; a TLS
 * one polls its socket (MSG_PEEK) for the window unless decrypted bytes are already buffered
 * (SSL_pending), then reads one record's worth into the first buffer only (the caller reads
 * the rest). What was read, 0 at end of stream, -1 with errno set. */
static inline ssize_t ssip_conn_recv_polling(struct ssip_conn c, struct msghdr *msg,
                                             uint64_t start, uint64_t window,
                                             uint64_t *skip_until, uint64_t *backoff)
{
    if (!c.ssl)
        return ssip_recvmsg_polling(c.fd, msg, start, window, skip_until, backoff);
    uint64_t prev = ssip_mono_ns();
    if (!SSL_pending(c.ssl) && prev - start < window
            && ssip_poll_allowed(window, *skip_until, prev)) {
        unsigned k = 1;
        long switches = SSIP_POLL_UNCOUNTED;
        uint8_t b;
        do {
            ssize_t n = recv(c.fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
            if (n >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
                *backoff = 0;
                break;
            }
            ssip_poll_relax(k++);
        } while (!ssip_poll_over(start, window, &prev, skip_until, backoff, &switches));
    }
    ssize_t n = ssip_recv_some(c, msg->msg_iov[0].iov_base, msg->msg_iov[0].iov_len, 0);
    if (n < 0) {
        errno = (int)-n;
        return -1;
    }
    return n;
}

#endif /* SSIP_IO_H */
