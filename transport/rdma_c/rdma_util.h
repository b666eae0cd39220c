/* rdma_util.h - helpers the RDMA backends and lane.c share (header-only, static inline). */
#ifndef SSIP_RDMA_UTIL_H
#define SSIP_RDMA_UTIL_H

#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <time.h>

/* format the message into err[errlen]; returns rc (a -errno) */
__attribute__((format(printf, 4, 5)))
static inline int ssip_r_fail(char *err, size_t errlen, int rc, const char *fmt, ...)
{
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return rc;
}

static inline int64_t ssip_r_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* milliseconds left until deadline (>= 0) */
static inline int ssip_r_left(int64_t deadline)
{
    int64_t left = deadline - ssip_r_now_ms();
    return left < 0 ? 0 : left > 0x7fffffff ? 0x7fffffff : (int)left;
}

/* poll fds until one is readable or the deadline: > 0 ready, 0 timed out, -errno */
static inline int ssip_r_poll(struct pollfd *fds, nfds_t n, int64_t deadline)
{
    for (;;) {
        for (nfds_t i = 0; i < n; i++)
            fds[i].revents = 0;
        int rc = poll(fds, n, ssip_r_left(deadline));
        if (rc >= 0)
            return rc;
        if (errno != EINTR)
            return -errno;
    }
}

#endif /* SSIP_RDMA_UTIL_H */
