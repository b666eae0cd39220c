/* userfaultfd ioctl helpers: the argument struct on the C stack, one ioctl per call, no Python
 * allocation, safe from several threads at once. */
#include "ssi_uffd.h"

/* Every helper returns -errno on failure, so Python needs no ffi.errno round trip. */
int ssi_uffd_open(int flags)
{
    long fd = syscall(__NR_userfaultfd, flags);
    return fd < 0 ? -errno : (int)fd;
}

int ssi_uffd_open_dev(int flags)
{
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0)
        return -errno;
    int fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
    int err = errno;
    close(dev);
    return fd < 0 ? -err : fd;
}

int ssi_uffd_api(int fd, uint64_t features, struct uffdio_api *out)
{
    struct uffdio_api api = { .api = UFFD_API, .features = features };
    if (ioctl(fd, UFFDIO_API, &api) < 0)
        return -errno;
    *out = api;
    return 0;
}

int ssi_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode,
                             uint64_t *ioctls)
{
    struct uffdio_register reg = { .range = { start, len }, .mode = mode };
    if (ioctl(fd, UFFDIO_REGISTER, &reg) < 0)
        return -errno;
    *ioctls = reg.ioctls;
    return 0;
}

int ssi_uffd_range(int fd, unsigned long request, uint64_t start, uint64_t len)
{
    struct uffdio_range range = { start, len };
    return ioctl(fd, request, &range) < 0 ? -errno : 0;
}

/* For the filling ioctls the kernel writes the bytes done (or -errno) in the last field.
 * A partial result (some bytes done, then EAGAIN/EEXIST...) returns the positive count; the
 * caller compares it with len. Nothing done returns -errno. */
static int64_t ssi_done(int rc, int64_t field)
{
    if (rc == 0)
        return field;
    if (field > 0)
        return field;
    return -errno;
}

int64_t ssi_uffd_copy(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode)
{
    struct uffdio_copy c = { .dst = dst, .src = src, .len = len, .mode = mode, .copy = 0 };
    int rc = ioctl(fd, UFFDIO_COPY, &c);
    return ssi_done(rc, c.copy);
}

int64_t ssi_uffd_copy_buf(int fd, uint64_t dst, const void *src, uint64_t len,
                                 uint64_t mode)
{
    return ssi_uffd_copy(fd, dst, (uint64_t)(uintptr_t)src, len, mode);
}

int64_t ssi_uffd_zeropage(int fd, uint64_t start, uint64_t len, uint64_t mode)
{
    struct uffdio_zeropage z = { .range = { start, len }, .mode = mode, .zeropage = 0 };
    int rc = ioctl(fd, UFFDIO_ZEROPAGE, &z);
    return ssi_done(rc, z.zeropage);
}

int ssi_uffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode)
{
    struct uffdio_writeprotect w = { .range = { start, len }, .mode = mode };
    return ioctl(fd, UFFDIO_WRITEPROTECT, &w) < 0 ? -errno : 0;
}

int64_t ssi_uffd_continue(int fd, uint64_t start, uint64_t len, uint64_t mode)
{
    struct uffdio_continue c = { .range = { start, len }, .mode = mode, .mapped = 0 };
    int rc = ioctl(fd, UFFDIO_CONTINUE, &c);
    return ssi_done(rc, c.mapped);
}

int64_t ssi_uffd_poison(int fd, uint64_t start, uint64_t len, uint64_t mode)
{
    struct uffdio_poison p = { .range = { start, len }, .mode = mode, .updated = 0 };
    int rc = ioctl(fd, UFFDIO_POISON, &p);
    return ssi_done(rc, p.updated);
}

int64_t ssi_uffd_move(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode)
{
    struct uffdio_move m = { .dst = dst, .src = src, .len = len, .mode = mode, .move = 0 };
    int rc = ioctl(fd, UFFDIO_MOVE, &m);
    return ssi_done(rc, m.move);
}

/* read() up to max_events messages at once and flatten each into SSI_EVENT_WORDS words:
 *   PAGEFAULT [event, flags, address, ptid]   FORK  [event, ufd, 0, 0]
 *   REMAP     [event, from, to, len]          REMOVE/UNMAP [event, start, end, 0]
 * Returns the number of events, 0 when none is pending (non-blocking fd), or -errno. */
int ssi_uffd_read(int fd, uint64_t *out, int max_events)
{
    struct uffd_msg msgs[SSI_READ_MAX];
    if (max_events > SSI_READ_MAX)
        max_events = SSI_READ_MAX;
    if (max_events < 1)
        return -EINVAL;
    ssize_t n;
    do {
        n = read(fd, msgs, sizeof(struct uffd_msg) * (size_t)max_events);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return errno == EAGAIN ? 0 : -errno;
    int count = (int)(n / (ssize_t)sizeof(struct uffd_msg));
    for (int i = 0; i < count; i++) {
        const struct uffd_msg *m = &msgs[i];
        uint64_t *w = out + (size_t)i * SSI_EVENT_WORDS;
        w[0] = m->event;
        switch (m->event) {
        case UFFD_EVENT_PAGEFAULT:
            w[1] = m->arg.pagefault.flags;
            w[2] = m->arg.pagefault.address;
            w[3] = m->arg.pagefault.feat.ptid;
            break;
        case UFFD_EVENT_FORK:
            w[1] = m->arg.fork.ufd; w[2] = 0; w[3] = 0;
            break;
        case UFFD_EVENT_REMAP:
            w[1] = m->arg.remap.from; w[2] = m->arg.remap.to; w[3] = m->arg.remap.len;
            break;
        case UFFD_EVENT_REMOVE:
        case UFFD_EVENT_UNMAP:
            w[1] = m->arg.remove.start; w[2] = m->arg.remove.end; w[3] = 0;
            break;
        default:
            w[1] = m->arg.reserved.reserved1; w[2] = m->arg.reserved.reserved2;
            w[3] = m->arg.reserved.reserved3;
        }
    }
    return count;
}

/* poll() for up to timeout_ms (-1: forever), then ssi_uffd_read(): one call, GIL released once.
 * 0 when nothing arrived in time (or a signal interrupted the wait). */
int ssi_uffd_wait_read(int fd, uint64_t *out, int max_events, int timeout_ms)
{
    struct pollfd p = { .fd = fd, .events = POLLIN };
    int r = poll(&p, 1, timeout_ms);
    if (r < 0)
        return errno == EINTR ? 0 : -errno;
    if (r == 0)
        return 0;
    if (p.revents & POLLNVAL)
        return -EBADF;
    return ssi_uffd_read(fd, out, max_events);
}

uint64_t ssi_addr(const void *p)
{
    return (uint64_t)(uintptr_t)p;
}
