/* fastlane.c - the memory node's fault-lane server loop.
 *
 * A connection that announced itself as a pager's fault lane (HELLO "lane": "fault") is, once
 * authenticated and idle, served by ssi_fl_serve on a thread that does not hold the GIL: it
 * reads FETCH frames, answers them from the spaces' page files and written-page bitmaps
 * exactly as the Python path does (DATA reply, zero mask, only written pages on the wire), and
 * returns as soon as it meets anything else (any other frame type, a flag, length, handle,
 * alignment or range it does not accept, a read error, end of stream), leaving the unconsumed
 * bytes in its input buffer for the Python path, which then answers (or rejects) them as it
 * always does.
 *
 * The bitmaps are read with acquire loads; the node sets a page's bit only after its pwrite
 * returned, so a page whose STORE was acknowledged is never answered as zero. Counters are
 * updated atomically and read by the node's stats at any time.
 *
 * Every wire number and the header layout come from ssip_wire.h (generated from
 * transport/wire/frames.py), the socket helpers from ssip_io.h; the header fields are
 * little-endian, as is every host this builds for (checked below).
 *
 * A TLS node's connection comes with its session (c->ssl, transport/tlsc), moved onto the
 * socket by the Python side before the loop starts and back onto memory BIOs after it
 * returned: the loop reads and writes plaintext through ssip_io.h, and decrypted bytes the
 * loop did not take stay in the session for the Python path.
 */
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>
#include <zlib.h>

#include "ssip_io.h"
#include "ssip_poll.h"
#include "ssip_wire.h"
#include "crc32c.h"
#include "fastlane.h"

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the SSIP header is little-endian: byte swaps are needed on this host"
#endif

_Static_assert(SSIP_MAX_PAGES <= 32, "the zero mask is a u32");

uint64_t ssi_fl_load(uint64_t *counter)
{
    return __atomic_load_n(counter, __ATOMIC_RELAXED);
}

/* A page's checksum, of the kind its store was written with. */
static inline uint32_t page_sum(const struct ssi_fl_space *sp, const uint8_t *page)
{
    if (sp->sum_kind == SSI_FL_SUM_CRC32C)
        return ssi_crc32c(0, page, SSIP_PAGE_SIZE);
    return (uint32_t)crc32(0L, page, SSIP_PAGE_SIZE);
}

/* Read the written pages among npages from gpa, packed, into dst, and check each one's sum.
   Returns the written-page bits (bit i = page i written), or -1 on a read error, a page file
   that ends before a written page (truncated) or a page that fails its checksum: the Python
   path then reads again and answers the error (IO_ERROR or CORRUPT), never the bytes. */
static int64_t read_pages(const struct ssi_fl_space *sp, uint64_t gpa, uint32_t npages,
                          uint8_t *dst, uint32_t *nbytes)
{
    uint64_t first = gpa >> SSIP_PAGE_SHIFT;
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
        want = (j - i) << SSIP_PAGE_SHIFT;
        while (got < want) {
            ssize_t k = pread(sp->fd, dst + pos + got, want - got,
                              (off_t)(gpa + ((uint64_t)i << SSIP_PAGE_SHIFT) + got));
            if (k < 0) {
                if (errno == EINTR)
                    continue;
                return -1;
            }
            if (k == 0)  /* a written page past the end of the file: truncated */
                return -1;
            got += (uint32_t)k;
        }
        for (; i < j; i++, pos += SSIP_PAGE_SIZE)
            if (page_sum(sp, dst + pos) != __atomic_load_n(&sp->sums[first + i], __ATOMIC_ACQUIRE))
                return -1;
    }
    *nbytes = pos;
    return written;
}

/* 0: the frame at inbuf[pos] was a FETCH and is answered; 1: not for this loop (left
   unconsumed); -1: send failed (err set). */
static int serve_frame(struct ssi_fl_conn *c)
{
    struct ssip_header h, *r = (struct ssip_header *)c->out;
    uint32_t want, npages, nbytes = 0, zero_mask;
    int64_t written;
    struct ssi_fl_space *sp;

    memcpy(&h, c->inbuf + c->pos, sizeof h);
    if (memcmp(h.magic, SSIP_MAGIC, sizeof h.magic) != 0 || h.version != SSIP_VERSION
        || h.type != SSIP_T_FETCH)
        return 1;
    want = h.arg;
    if ((h.flags & ~(uint32_t)SSIP_FLAG_URGENT) || h.length || h.space == 0
        || h.space > (uint32_t)c->nspaces)
        return 1;
    sp = &c->spaces[h.space - 1];
    if (sp->fd < 0 || ((h.gpa | want) & (SSIP_PAGE_SIZE - 1)) || want == 0
        || want > SSIP_MAX_DATA || want > c->max_space_bytes
        || h.gpa > c->max_space_bytes - want || SSIP_HEADER_SIZE + want > c->out_cap)
        return 1;
    npages = want >> SSIP_PAGE_SHIFT;
    if ((h.gpa >> SSIP_PAGE_SHIFT) + npages > sp->nbits)
        return 1;
    written = read_pages(sp, h.gpa, npages, c->out + SSIP_HEADER_SIZE, &nbytes);
    if (written < 0)
        return 1;  /* the Python path reads again and reports the error */
    zero_mask = npages == 32 ? 0xffffffffu : ((1u << npages) - 1);
    zero_mask &= ~(uint32_t)written;
    memcpy(r->magic, SSIP_MAGIC, sizeof r->magic);
    r->version = SSIP_VERSION;
    r->type = SSIP_T_DATA;
    r->flags = 0;
    r->request_id = h.request_id;
    r->space = 0;
    r->gpa = h.gpa;
    r->length = nbytes;
    r->arg = zero_mask;
    c->pos += SSIP_HEADER_SIZE;
    /* counted before the reply leaves, so a client that saw it also sees it in the stats
       (the Python path counts when it queues the reply) */
    __atomic_fetch_add(&sp->fetched_pages, npages, __ATOMIC_RELAXED);
    if (zero_mask)
        __atomic_fetch_add(&sp->zero_pages, (uint64_t)__builtin_popcount(zero_mask),
                           __ATOMIC_RELAXED);
    __atomic_fetch_add(&c->fetch_ok, 1, __ATOMIC_RELAXED);
    int rc = ssip_send_all(SSIP_CONN(c->fd, c->ssl), c->out, SSIP_HEADER_SIZE + nbytes);
    if (rc < 0) {
        c->err = -rc;
        return -1;
    }
    return 0;
}

/* Adaptive polling: for poll_ns after the last frame, recv without blocking so the next FETCH
 * of a burst is read at once instead of after a thread wakeup; then a blocking recv. The window
 * restarts only when bytes arrive, so an idle lane sleeps; it adapts between poll_ns and
 * poll_max_ns to the gaps between frames (ssip_poll_adapt); the spin yields now and then and
 * backs off when that got it preempted (ssip_poll.h). Returns what recv returned (-1 with
 * errno set). */
static ssize_t recv_polling(struct ssi_fl_conn *c, uint64_t since)
{
    struct iovec iov = {c->inbuf + c->end, c->in_cap - c->end};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    return ssip_conn_recv_polling(SSIP_CONN(c->fd, c->ssl), &msg, since, c->poll_win_ns,
                                  &c->poll_skip_until, &c->poll_backoff_ns);
}

int ssi_fl_serve(struct ssi_fl_conn *c)
{
    uint64_t last = ssip_mono_ns();
    int rc, flags = fcntl(c->fd, F_GETFL);
    if (flags >= 0 && (flags & O_NONBLOCK))
        fcntl(c->fd, F_SETFL, flags & ~O_NONBLOCK);
    c->err = 0;
    if (c->poll_win_ns < c->poll_ns || c->poll_win_ns > c->poll_max_ns)
        c->poll_win_ns = c->poll_ns;
    for (;;) {
        ssize_t n;
        while (c->end - c->pos >= SSIP_HEADER_SIZE) {
            int r = serve_frame(c);
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
        n = recv_polling(c, last);
        if (n > 0) {
            uint64_t now = ssip_mono_ns();
            c->end += (uint32_t)n;
            ssip_poll_adapt(&c->poll_win_ns, c->poll_ns, c->poll_max_ns, now - last);
            last = now;
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
