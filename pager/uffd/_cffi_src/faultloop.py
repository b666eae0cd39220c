"""The fault engine's per-fault loop in C (``ssi_pfl_run``), called from a client's fault thread
with the GIL released (cffi releases it around every call).

Python stays the control plane: it gives the loop the region table (host base, size, offset in
the space, the socket and space handle of that space's fault-lane connection), the "slow"
address ranges (REMOVE'd pages, chunks being read ahead), the uffd, the fds that interrupt it
(the client's eventfd, a forked child's pidfd), an event buffer (a ``RawEvents`` array, same
4-word layout as ``ssi_uffd_read``) and a chunk buffer. The loop polls, reads a batch of events
and serves every plain MISSING fault on an ordinary chunk itself: one FETCH request, one reply
straight into the buffer, UFFDIO_COPY of the written pages and UFFDIO_ZEROPAGE of the others,
EEXIST finished page by page and woken, as the Python path does. It returns as soon as it meets
anything else, with the events it has not handled (``first`` .. ``n`` of the buffer) left for
Python: layout events, write-protect or minor faults, faults outside the table or on a slow
chunk, an install that failed (EAGAIN while a layout event is pending, ESRCH, ...) and any
fetch error (``SSI_PFL_FETCH_ERROR``: the connection's state is unknown; Python drops it and
serves the fault with retries). Python's counters are mirrored in ``struct ssi_pfl_stats``,
which Python folds into ``EngineStats`` whenever the loop returns (at least every ``max_ns``
while busy, and 10 ms after the last fault served).

Wire protocols: ``SSI_PFL_PROTO_SSIP`` is the memory node's FETCH/DATA of
``transport/wire/protocol.py`` (32-byte little-endian header ``magic "SSIP" | version u8 | type u8
| flags u16 | request id u32 | space u32 | gpa u64 | length u32 | arg u32``; the DATA reply's
``arg`` is the zero mask and only the written pages follow, packed). Its numbers are defined
once here, exported as ``SSI_PFL_WIRE_*`` and checked against transport.wire.protocol by
tests/engine/test_c_loop.py (the memory node's C lane keeps its own copy in
transport/_cffi_src/fastlane.py, which has no shared header). ``SSI_PFL_PROTO_RAW`` is the
reference memory node's format used by ``bench faults`` (``{u64 offset, u32 length}`` ->
``length`` raw bytes, nothing zero).

This module's C uses ``ssi_uffd_read`` (userfaultfd.py) and ``ssi_now_ns`` (toucher.py): it is
concatenated after them by _build.py.
"""

INCLUDES = """
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
"""

TYPES = """
#define SSI_PFL_MAX_REGIONS ...
#define SSI_PFL_MAX_SLOW ...
#define SSI_PFL_MAX_WAKE ...
#define SSI_PFL_NBUCKETS ...

#define SSI_PFL_IDLE ...
#define SSI_PFL_WAKE ...
#define SSI_PFL_EVENTS ...
#define SSI_PFL_FETCH_ERROR ...
#define SSI_PFL_READ_ERROR ...

#define SSI_PFL_PROTO_SSIP ...
#define SSI_PFL_PROTO_RAW ...

#define SSI_PFL_WIRE_HEADER ...
#define SSI_PFL_WIRE_VERSION ...
#define SSI_PFL_WIRE_FETCH ...
#define SSI_PFL_WIRE_DATA ...
#define SSI_PFL_WIRE_URGENT ...
#define SSI_PFL_WIRE_MAX_DATA ...

struct ssi_pfl_region {
    uint64_t base;      /* host address */
    uint64_t size;      /* bytes */
    uint64_t gpa;       /* offset of base in the region's space */
    int sock;           /* that space's fault-lane socket; -1: faults here go to Python */
    int proto;          /* SSI_PFL_PROTO_* */
    uint32_t space;     /* the space's handle on that connection */
};

struct ssi_pfl_stats {
    uint64_t faults;
    uint64_t faults_write;
    uint64_t served_fetch;
    uint64_t served_dup;
    uint64_t fetched_bytes;
    uint64_t copied_bytes;
    uint64_t zero_pages;
    uint64_t eexist;
    uint64_t latency_sum_us;
    uint64_t latency_count;
    uint64_t latency_buckets[...];
};

struct ssi_pfl {
    int uffd;
    int nwake;
    int wake_fds[...];         /* readable -> SSI_PFL_WAKE */
    uint64_t chunk;            /* chunk size (power of two) */
    int nregions;
    struct ssi_pfl_region regions[...];
    int nslow;                 /* sorted, disjoint [start, end) host ranges */
    uint64_t slow_start[...];
    uint64_t slow_end[...];
    uint64_t *events;          /* 4 words per event, max_events of them */
    int max_events;
    uint8_t *buf;              /* chunk buffer */
    uint64_t buf_size;
    uint64_t bucket_us[...];   /* upper bounds of the latency buckets but the last */
    int timeout_ms;            /* poll timeout -> SSI_PFL_IDLE */
    uint64_t max_ns;           /* serve at most this long per call -> SSI_PFL_IDLE */
    uint32_t req;              /* last request id */
    int first;                 /* on return: events[first:n] are Python's */
    int n;
    int err;                   /* errno of SSI_PFL_FETCH_ERROR / SSI_PFL_READ_ERROR */
    struct ssi_pfl_stats stats;
};
"""

FUNCTIONS = """
int ssi_pfl_run(struct ssi_pfl *l);
"""

CUSTOMIZATIONS = r"""
#define SSI_PFL_MAX_REGIONS 64
#define SSI_PFL_MAX_SLOW 256
#define SSI_PFL_MAX_WAKE 2
#define SSI_PFL_NBUCKETS 15

#define SSI_PFL_IDLE 0
#define SSI_PFL_WAKE 1
#define SSI_PFL_EVENTS 2
#define SSI_PFL_FETCH_ERROR 3
#define SSI_PFL_READ_ERROR 4

#define SSI_PFL_PROTO_SSIP 0
#define SSI_PFL_PROTO_RAW 1

/* transport/wire/protocol.py: HEADER, VERSION, T.FETCH, T.DATA, Flag.URGENT, MAX_DATA */
#define SSI_PFL_WIRE_HEADER 32
#define SSI_PFL_WIRE_VERSION 1
#define SSI_PFL_WIRE_FETCH 7
#define SSI_PFL_WIRE_DATA 8
#define SSI_PFL_WIRE_URGENT 1
#define SSI_PFL_WIRE_MAX_DATA (32 * 4096)
#define SSI_PFL_PAGE 4096u
#define SSI_PFL_FOLD_MS 10

struct ssi_pfl_region {
    uint64_t base;
    uint64_t size;
    uint64_t gpa;
    int sock;
    int proto;
    uint32_t space;
};

struct ssi_pfl_stats {
    uint64_t faults;
    uint64_t faults_write;
    uint64_t served_fetch;
    uint64_t served_dup;
    uint64_t fetched_bytes;
    uint64_t copied_bytes;
    uint64_t zero_pages;
    uint64_t eexist;
    uint64_t latency_sum_us;
    uint64_t latency_count;
    uint64_t latency_buckets[SSI_PFL_NBUCKETS];
};

struct ssi_pfl {
    int uffd;
    int nwake;
    int wake_fds[SSI_PFL_MAX_WAKE];
    uint64_t chunk;
    int nregions;
    struct ssi_pfl_region regions[SSI_PFL_MAX_REGIONS];
    int nslow;
    uint64_t slow_start[SSI_PFL_MAX_SLOW];
    uint64_t slow_end[SSI_PFL_MAX_SLOW];
    uint64_t *events;
    int max_events;
    uint8_t *buf;
    uint64_t buf_size;
    uint64_t bucket_us[SSI_PFL_NBUCKETS - 1];
    int timeout_ms;
    uint64_t max_ns;
    uint32_t req;
    int first;
    int n;
    int err;
    struct ssi_pfl_stats stats;
};

static int ssi_pfl_send_all(int fd, const uint8_t *p, size_t n)
{
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

static int ssi_pfl_recv_all(int fd, uint8_t *p, size_t n)
{
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

/* One FETCH of len bytes at gpa into l->buf; the zero mask in *mask. 0 or -errno. */
static int ssi_pfl_fetch(struct ssi_pfl *l, const struct ssi_pfl_region *r, uint64_t gpa,
                         uint32_t len, uint32_t *mask)
{
    uint8_t *buf = l->buf;
    int rc;
    *mask = 0;
    if (r->proto == SSI_PFL_PROTO_RAW) {
        uint8_t q[12];
        memcpy(q, &gpa, 8);
        memcpy(q + 8, &len, 4);
        if ((rc = ssi_pfl_send_all(r->sock, q, sizeof q)) < 0)
            return rc;
        return ssi_pfl_recv_all(r->sock, buf, len);
    }
    uint8_t h[SSI_PFL_WIRE_HEADER];
    uint32_t req = l->req = (l->req + 1) ? l->req + 1 : 1;
    uint16_t flags = SSI_PFL_WIRE_URGENT;
    uint32_t zero = 0;
    memcpy(h, "SSIP", 4);
    h[4] = SSI_PFL_WIRE_VERSION;
    h[5] = SSI_PFL_WIRE_FETCH;
    memcpy(h + 6, &flags, 2);
    memcpy(h + 8, &req, 4);
    memcpy(h + 12, &r->space, 4);
    memcpy(h + 16, &gpa, 8);
    memcpy(h + 24, &zero, 4);
    memcpy(h + 28, &len, 4);
    if ((rc = ssi_pfl_send_all(r->sock, h, sizeof h)) < 0)
        return rc;
    /* header and pages in one recvmsg: only this reply can arrive */
    struct iovec iov[2] = {{h, sizeof h}, {buf, len}};
    struct msghdr msg = {.msg_iov = iov, .msg_iovlen = 2};
    ssize_t nb;
    do {
        nb = recvmsg(r->sock, &msg, 0);
    } while (nb < 0 && errno == EINTR);
    if (nb < 0)
        return -errno;
    if (nb == 0)
        return -ECONNRESET;
    if (nb < SSI_PFL_WIRE_HEADER) {
        if ((rc = ssi_pfl_recv_all(r->sock, h + nb, SSI_PFL_WIRE_HEADER - (size_t)nb)) < 0)
            return rc;
        nb = SSI_PFL_WIRE_HEADER;
    }
    uint32_t rid, length, m;
    memcpy(&rid, h + 8, 4);
    memcpy(&length, h + 24, 4);
    memcpy(&m, h + 28, 4);
    uint32_t npages = len / SSI_PFL_PAGE;
    uint32_t full = npages >= 32 ? 0xffffffffu : (1u << npages) - 1;
    uint32_t want = (npages - (uint32_t)__builtin_popcount(m & full)) * SSI_PFL_PAGE;
    size_t got = (size_t)nb - SSI_PFL_WIRE_HEADER;
    /* an ERROR frame or anything unexpected: Python drops the connection and asks again */
    if (memcmp(h, "SSIP", 4) || h[4] != SSI_PFL_WIRE_VERSION || h[5] != SSI_PFL_WIRE_DATA
            || rid != req || length != want || got > length)
        return -EPROTO;
    if (got < length && (rc = ssi_pfl_recv_all(r->sock, buf + got, length - got)) < 0)
        return rc;
    if (m & full) {  /* pages arrived packed: move each to its place, last first */
        uint64_t pos = length;
        for (int i = (int)npages - 1; i >= 0; i--) {
            if (m >> i & 1)
                continue;
            pos -= SSI_PFL_PAGE;
            if (pos != (uint64_t)i * SSI_PFL_PAGE)
                memmove(buf + (uint64_t)i * SSI_PFL_PAGE, buf + pos, SSI_PFL_PAGE);
        }
    }
    *mask = m & full;
    return 0;
}

/* UFFDIO_COPY (src != NULL) or UFFDIO_ZEROPAGE of [dst, dst+len): 0, or -errno for Python
   (EAGAIN: a layout event is pending; anything else is Python's to report). EEXIST: finish
   page by page and wake, as pager.engine does. */
static int ssi_pfl_install(struct ssi_pfl *l, uint64_t dst, const uint8_t *src, uint64_t len)
{
    struct ssi_pfl_stats *st = &l->stats;
    int64_t done;
    int err = 0;
    if (src) {
        struct uffdio_copy c = {.dst = dst, .src = (uint64_t)(uintptr_t)src, .len = len};
        if (ioctl(l->uffd, UFFDIO_COPY, &c) == 0) {
            st->copied_bytes += len;
            return 0;
        }
        err = errno;
        done = c.copy;
    } else {
        struct uffdio_zeropage z = {.range = {.start = dst, .len = len}};
        if (ioctl(l->uffd, UFFDIO_ZEROPAGE, &z) == 0) {
            st->zero_pages += len / SSI_PFL_PAGE;
            return 0;
        }
        err = errno;
        done = z.zeropage;
    }
    if (done <= 0 && err != EEXIST)
        return -err;
    if (done < 0)
        done = 0;
    /* the kernel stopped at a page already present */
    if (src)
        st->copied_bytes += (uint64_t)done;
    else
        st->zero_pages += (uint64_t)done / SSI_PFL_PAGE;
    st->eexist++;
    for (uint64_t off = (uint64_t)done; off < len; off += SSI_PFL_PAGE) {
        int rc;
        if (src) {
            struct uffdio_copy c = {.dst = dst + off, .src = (uint64_t)(uintptr_t)(src + off),
                                    .len = SSI_PFL_PAGE};
            rc = ioctl(l->uffd, UFFDIO_COPY, &c);
            if (rc == 0)
                st->copied_bytes += SSI_PFL_PAGE;
        } else {
            struct uffdio_zeropage z = {.range = {.start = dst + off, .len = SSI_PFL_PAGE}};
            rc = ioctl(l->uffd, UFFDIO_ZEROPAGE, &z);
            if (rc == 0)
                st->zero_pages++;
        }
        if (rc < 0 && errno != EEXIST)
            return -errno;
    }
    struct uffdio_range w = {.start = dst + (uint64_t)done, .len = len - (uint64_t)done};
    if (ioctl(l->uffd, UFFDIO_WAKE, &w) < 0)
        return -errno;
    return 0;
}

/* Install a fetched chunk: runs of written pages copied, never-written ones zero pages. */
static int ssi_pfl_install_chunk(struct ssi_pfl *l, uint64_t start, uint64_t len, uint32_t mask)
{
    if (!mask)
        return ssi_pfl_install(l, start, l->buf, len);
    uint64_t npages = len / SSI_PFL_PAGE;
    uint64_t i = 0;
    while (i < npages) {
        int zero = mask >> i & 1;
        uint64_t j = i + 1;
        while (j < npages && (int)(mask >> j & 1) == zero)
            j++;
        uint64_t off = i * SSI_PFL_PAGE;
        int rc = ssi_pfl_install(l, start + off, zero ? NULL : l->buf + off,
                                 (j - i) * SSI_PFL_PAGE);
        if (rc < 0)
            return rc;
        i = j;
    }
    return 0;
}

static const struct ssi_pfl_region *ssi_pfl_find(const struct ssi_pfl *l, uint64_t addr)
{
    for (int i = 0; i < l->nregions; i++) {
        const struct ssi_pfl_region *r = &l->regions[i];
        if (addr - r->base < r->size)
            return r;
    }
    return NULL;
}

static int ssi_pfl_is_slow(const struct ssi_pfl *l, uint64_t start, uint64_t end)
{
    int lo = 0, hi = l->nslow;  /* first range ending after start */
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (l->slow_end[mid] <= start)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < l->nslow && l->slow_start[lo] < end;
}

static void ssi_pfl_observe(struct ssi_pfl *l, uint64_t t0)
{
    uint64_t us = (ssi_now_ns() - t0) / 1000;
    int b = 0;
    while (b < SSI_PFL_NBUCKETS - 1 && l->bucket_us[b] < us)
        b++;
    l->stats.latency_buckets[b]++;
    l->stats.latency_sum_us += us;
    l->stats.latency_count++;
}

/* Serve events[i] if it is an ordinary fault: 1 served, 0 Python's, -errno fetch failed. */
static int ssi_pfl_fault(struct ssi_pfl *l, int i, uint64_t t0, uint64_t *done_s,
                         uint64_t *done_e, int *ndone)
{
    const uint64_t *w = l->events + 4 * i;
    if (w[0] != UFFD_EVENT_PAGEFAULT
            || (w[1] & (UFFD_PAGEFAULT_FLAG_WP | UFFD_PAGEFAULT_FLAG_MINOR)))
        return 0;
    uint64_t addr = w[2];
    const struct ssi_pfl_region *r = ssi_pfl_find(l, addr);
    if (!r || r->sock < 0)
        return 0;
    struct ssi_pfl_stats *st = &l->stats;
    for (int k = 0; k < *ndone; k++) {
        if (done_s[k] <= addr && addr < done_e[k]) {
            /* installed by an earlier fault of this batch: that copy woke this one too */
            st->faults++;
            st->faults_write += !!(w[1] & UFFD_PAGEFAULT_FLAG_WRITE);
            st->served_dup++;
            return 1;
        }
    }
    uint64_t start = addr - (addr - r->base) % l->chunk;
    uint64_t len = r->base + r->size - start;
    if (len > l->chunk)
        len = l->chunk;
    if (len > l->buf_size || (r->proto == SSI_PFL_PROTO_SSIP && len > SSI_PFL_WIRE_MAX_DATA)
            || ssi_pfl_is_slow(l, start, start + len))
        return 0;
    uint32_t mask;
    int rc = ssi_pfl_fetch(l, r, r->gpa + (start - r->base), (uint32_t)len, &mask);
    if (rc < 0)
        return rc;
    st->fetched_bytes += len;
    if (ssi_pfl_install_chunk(l, start, len, mask) < 0)
        return 0;  /* Python fetches again and reports, defers or ends the client */
    st->faults++;
    st->faults_write += !!(w[1] & UFFD_PAGEFAULT_FLAG_WRITE);
    st->served_fetch++;
    ssi_pfl_observe(l, t0);
    done_s[*ndone] = start;
    done_e[*ndone] = start + len;
    (*ndone)++;
    return 1;
}

int ssi_pfl_run(struct ssi_pfl *l)
{
    uint64_t entered = ssi_now_ns();
    struct pollfd p[1 + SSI_PFL_MAX_WAKE];
    int np = 1 + (l->nwake < SSI_PFL_MAX_WAKE ? l->nwake : SSI_PFL_MAX_WAKE);
    uint64_t done_s[SSI_READ_MAX], done_e[SSI_READ_MAX];
    int max_events = l->max_events < SSI_READ_MAX ? l->max_events : SSI_READ_MAX;
    int served = 0;
    l->first = l->n = 0;
    l->err = 0;
    for (;;) {
        p[0].fd = l->uffd;
        p[0].events = POLLIN;
        for (int k = 1; k < np; k++) {
            p[k].fd = l->wake_fds[k - 1];
            p[k].events = POLLIN;
        }
        /* once faults were served, return soon after they stop, so Python folds the counters
           (metrics lag by at most SSI_PFL_FOLD_MS idle, max_ns busy) */
        int r = poll(p, (nfds_t)np, served && l->timeout_ms > SSI_PFL_FOLD_MS ? SSI_PFL_FOLD_MS
                                                                          : l->timeout_ms);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return SSI_PFL_IDLE;
        for (int k = 1; k < np; k++)
            if (p[k].revents)
                return SSI_PFL_WAKE;
        int n = ssi_uffd_read(l->uffd, l->events, max_events);
        if (n < 0) {
            l->err = -n;
            return SSI_PFL_READ_ERROR;
        }
        if (n == 0)
            return SSI_PFL_IDLE;
        uint64_t t0 = ssi_now_ns();
        int ndone = 0;
        for (int i = 0; i < n; i++) {
            int rc = ssi_pfl_fault(l, i, t0, done_s, done_e, &ndone);
            if (rc == 1) {
                served = 1;
                continue;
            }
            l->first = i;
            l->n = n;
            if (rc < 0) {
                l->err = -rc;
                return SSI_PFL_FETCH_ERROR;
            }
            return SSI_PFL_EVENTS;
        }
        if (ssi_now_ns() - entered >= l->max_ns)
            return SSI_PFL_IDLE;
    }
}
"""
