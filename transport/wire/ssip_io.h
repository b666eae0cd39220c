/* ssip_io.h - socket helpers shared by the C loops that speak SSIP (hand-written, unlike
 * ssip_wire.h beside it). Header-only: every function is static inline. */
#ifndef SSIP_IO_H
#define SSIP_IO_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>

/* Send all n bytes (retrying on EINTR, never raising SIGPIPE): 0, or -errno. */
static inline int ssip_send_all(int fd, const void *buf, size_t n)
{
    const uint8_t *p = (const uint8_t *)buf;
    while (n) {
        ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

/* Receive exactly n bytes (blocking socket; retrying on EINTR): 0, -ECONNRESET when the peer
 * closed first, or -errno. */
static inline int ssip_recv_all(int fd, void *buf, size_t n)
{
    uint8_t *p = (uint8_t *)buf;
    while (n) {
        ssize_t k = recv(fd, p, n, MSG_WAITALL);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (k == 0)
            return -ECONNRESET;
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

#endif /* SSIP_IO_H */
