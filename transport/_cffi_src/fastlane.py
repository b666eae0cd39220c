"""The memory node's fault-lane server loop in C.

A connection that announced itself as a pager's fault lane (HELLO ``"lane": "fault"``) is, once
authenticated and idle, served by `ssi_fl_serve` on a thread that does not hold the GIL: it
reads FETCH frames, answers them from the spaces' page files and written-page bitmaps exactly as
the Python path does (DATA reply, zero mask, only written pages on the wire), and returns as
soon as it meets anything else (any other frame type, a flag, length, handle, alignment or
range it does not accept, a read error, end of stream), leaving the unconsumed bytes in its
input buffer for the Python path, which then answers (or rejects) them as it always does.

The bitmaps are read with acquire loads; the node sets a page's bit only after its pwrite
returned, so a page whose STORE was acknowledged is never answered as zero. Counters are
updated atomically and read by the node's stats at any time.
"""

INCLUDES = """
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/types.h>
"""

TYPES = """
#define SSI_FL_MAX_SPACES ...
#define SSI_FL_HANDBACK ...
#define SSI_FL_EOF ...
#define SSI_FL_ERROR ...

struct ssi_fl_space {
    int fd;                   /* the space's page file; -1: not served here */
    const uint8_t *bits;      /* written-page bitmap, bit p = page p written */
    uint64_t nbits;           /* bits the bitmap holds */
    uint64_t fetched_pages;   /* pages answered (written or zero) */
    uint64_t zero_pages;      /* pages answered as never written */
};

struct ssi_fl_conn {
    int fd;                   /* the connection's socket (a dup owned by the caller) */
    int nspaces;              /* handles 1..nspaces */
    uint64_t max_space_bytes; /* gpa + length limit, as the Python session checks */
    struct ssi_fl_space spaces[...];
    uint8_t *inbuf;           /* input buffer */
    uint32_t in_cap;
    uint32_t pos;             /* unconsumed bytes are inbuf[pos:end] on return */
    uint32_t end;
    uint8_t *out;             /* reply buffer, header + the largest DATA payload */
    uint32_t out_cap;
    int err;                  /* errno of a failed recv/send (SSI_FL_ERROR) */
    uint64_t fetch_ok;        /* FETCH requests answered */
};
"""

FUNCTIONS = """
int ssi_fl_serve(struct ssi_fl_conn *c);
void ssi_fl_stop(struct ssi_fl_conn *c);
uint64_t ssi_fl_load(uint64_t *counter);
"""

CUSTOMIZATIONS = r"""
#define SSI_FL_MAX_SPACES 16
#define SSI_FL_HANDBACK 1
#define SSI_FL_EOF 2
#define SSI_FL_ERROR 3

#define SSI_FL_HDR 32
#define SSI_FL_PAGE_SHIFT 12
#define SSI_FL_PAGE 4096u
#define SSI_FL_MAX_DATA (32u * SSI_FL_PAGE)
#define SSI_FL_VERSION 1
#define SSI_FL_FETCH 7
#define SSI_FL_DATA 8
#define SSI_FL_URGENT 1

struct ssi_fl_space {
    int fd;
    const uint8_t *bits;
    uint64_t nbits;
    uint64_t fetched_pages;
    uint64_t zero_pages;
};

struct ssi_fl_conn {
    int fd;
    int nspaces;
    uint64_t max_space_bytes;
    struct ssi_fl_space spaces[SSI_FL_MAX_SPACES];
    uint8_t *inbuf;
    uint32_t in_cap;
    uint32_t pos;
    uint32_t end;
    uint8_t *out;
    uint32_t out_cap;
    int err;
    uint64_t fetch_ok;
};

static uint32_t ssi_fl_le32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t ssi_fl_le64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

uint64_t ssi_fl_load(uint64_t *counter)
{
    return __atomic_load_n(counter, __ATOMIC_RELAXED);
}

static int ssi_fl_send_all(int fd, const uint8_t *p, size_t n)
{
    while (n) {
        ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

/* Read the written pages among npages from gpa, packed, into dst. Returns the written-page
   bits (bit i = page i written) or -1 with errno on a read error. */
static int64_t ssi_fl_read(const struct ssi_fl_space *sp, uint64_t gpa, uint32_t npages,
                           uint8_t *dst, uint32_t *nbytes)
{
    uint64_t first = gpa >> SSI_FL_PAGE_SHIFT;
    uint32_t written = 0, i = 0, pos = 0;
    for (i = 0; i < npages; i++) {
        uint64_t p = first + i;
        uint8_t b = __atomic_load_n(&sp->bits[p >> 3], __ATOMIC_ACQUIRE);
        written |= (uint32_t)((b >> (p & 7)) & 1) << i;
    }
    i = 0;
    while (i < npages) {
        uint32_t j = i, want, got = 0;
        if (!(written >> i & 1)) {
            i++;
            continue;
        }
        while (j < npages && (written >> j & 1))
            j++;
        want = (j - i) << SSI_FL_PAGE_SHIFT;
        while (got < want) {
            ssize_t k = pread(sp->fd, dst + pos + got, want - got,
                              (off_t)(gpa + ((uint64_t)i << SSI_FL_PAGE_SHIFT) + got));
            if (k < 0) {
                if (errno == EINTR)
                    continue;
                return -1;
            }
            if (k == 0) {  /* past the end of the file: zeros, as the Python path does */
                memset(dst + pos + got, 0, want - got);
                break;
            }
            got += (uint32_t)k;
        }
        pos += want;
        i = j;
    }
    *nbytes = pos;
    return written;
}

/* 0: the frame at inbuf[pos] was a FETCH and is answered; 1: not for this loop (left
   unconsumed); -1: send failed (err set). */
static int ssi_fl_frame(struct ssi_fl_conn *c)
{
    const uint8_t *h = c->inbuf + c->pos;
    uint32_t flags, handle, length, want, npages, nbytes = 0, full;
    uint64_t gpa;
    int64_t written;
    struct ssi_fl_space *sp;
    uint8_t *o = c->out;

    if (memcmp(h, "SSIP", 4) != 0 || h[4] != SSI_FL_VERSION || h[5] != SSI_FL_FETCH)
        return 1;
    flags = (uint32_t)h[6] | (uint32_t)h[7] << 8;
    handle = ssi_fl_le32(h + 12);
    gpa = ssi_fl_le64(h + 16);
    length = ssi_fl_le32(h + 24);
    want = ssi_fl_le32(h + 28);
    if ((flags & ~(uint32_t)SSI_FL_URGENT) || length || handle == 0
        || handle > (uint32_t)c->nspaces)
        return 1;
    sp = &c->spaces[handle - 1];
    if (sp->fd < 0 || ((gpa | want) & (SSI_FL_PAGE - 1)) || want == 0
        || want > SSI_FL_MAX_DATA || want > c->max_space_bytes
        || gpa > c->max_space_bytes - want || SSI_FL_HDR + want > c->out_cap)
        return 1;
    npages = want >> SSI_FL_PAGE_SHIFT;
    if ((gpa >> SSI_FL_PAGE_SHIFT) + npages > sp->nbits)
        return 1;
    written = ssi_fl_read(sp, gpa, npages, o + SSI_FL_HDR, &nbytes);
    if (written < 0)
        return 1;  /* the Python path reads again and reports the error */
    full = npages == 32 ? 0xffffffffu : ((1u << npages) - 1);
    full &= ~(uint32_t)written;  /* the zero mask */
    memcpy(o, "SSIP", 4);
    o[4] = SSI_FL_VERSION;
    o[5] = SSI_FL_DATA;
    o[6] = o[7] = 0;
    memcpy(o + 8, h + 8, 4);       /* request id */
    memset(o + 12, 0, 4);          /* space 0 */
    memcpy(o + 16, &gpa, 8);
    memcpy(o + 24, &nbytes, 4);
    memcpy(o + 28, &full, 4);
    c->pos += SSI_FL_HDR;
    /* counted before the reply leaves, so a client that saw it also sees it in the stats
       (the Python path counts when it queues the reply) */
    __atomic_fetch_add(&sp->fetched_pages, npages, __ATOMIC_RELAXED);
    if (full)
        __atomic_fetch_add(&sp->zero_pages, (uint64_t)__builtin_popcount(full),
                           __ATOMIC_RELAXED);
    __atomic_fetch_add(&c->fetch_ok, 1, __ATOMIC_RELAXED);
    if (ssi_fl_send_all(c->fd, o, SSI_FL_HDR + nbytes) < 0) {
        c->err = errno;
        return -1;
    }
    return 0;
}

int ssi_fl_serve(struct ssi_fl_conn *c)
{
    int rc, flags = fcntl(c->fd, F_GETFL);
    if (flags >= 0 && (flags & O_NONBLOCK))
        fcntl(c->fd, F_SETFL, flags & ~O_NONBLOCK);
    c->err = 0;
    for (;;) {
        ssize_t n;
        while (c->end - c->pos >= SSI_FL_HDR) {
            int r = ssi_fl_frame(c);
            if (r) {
                rc = r > 0 ? SSI_FL_HANDBACK : SSI_FL_ERROR;
                goto out;
            }
        }
        if (c->pos == c->end) {
            c->pos = c->end = 0;
        } else if (c->pos) {
            memmove(c->inbuf, c->inbuf + c->pos, c->end - c->pos);
            c->end -= c->pos;
            c->pos = 0;
        }
        n = recv(c->fd, c->inbuf + c->end, c->in_cap - c->end, 0);
        if (n > 0) {
            c->end += (uint32_t)n;
        } else if (n == 0) {
            rc = SSI_FL_EOF;
            break;
        } else if (errno != EINTR) {
            c->err = errno;
            rc = SSI_FL_ERROR;
            break;
        }
    }
out:
    if (flags >= 0 && (flags & O_NONBLOCK))
        fcntl(c->fd, F_SETFL, flags);
    return rc;
}

void ssi_fl_stop(struct ssi_fl_conn *c)
{
    shutdown(c->fd, SHUT_RDWR);
}
"""
