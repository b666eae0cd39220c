/* The fault engine's per-fault loop (ssi_pfl_run), called from a client's fault thread with
 * the GIL released. Python stays the control plane (pager/uffd/faultloop.py, pager/engine/
 * cloop.py): it gives the loop the region table, the "slow" ranges (REMOVE'd pages, chunks being
 * read ahead), the uffd, the fds that interrupt it, an event buffer and a chunk buffer. The loop
 * polls, reads a batch of events and serves every plain MISSING fault on an ordinary chunk
 * itself: one FETCH, one reply straight into the buffer, then ssi_install (install.c, the same
 * code the Python path calls). It returns as soon as it meets anything else, with the events it
 * has not handled (first .. n) left for Python: layout events, write-protect or minor faults,
 * faults outside the table or on a slow chunk, a fault on the chunk right after one it served
 * lately when Python watches for sequential streams (nwatch), an install that failed, a
 * residency ring too full for another chunk (it returns SSI_PFL_IDLE before reading a batch
 * the ring may not hold), and any fetch error (SSI_PFL_FETCH_ERROR, err_lane naming the lane:
 * Python drops that connection, a cluster marks its node, and serves the fault with retries or
 * from another replica).
 *
 * Routing: the loop fetches on l->lanes[] (one per memory node and space it may read from). A
 * region names its lane, one for all of it (a one-node source), or, per extent of 1 << ext_shift
 * bytes, in ext[] (a cluster: the holder read first); a fault whose extent has no lane, or
 * that arrives after the source bumped *route_gen (holders changed since Python built the
 * table), is Python's.
 *
 * Far memory (l->farmem, a client under a resident limit): installs are write-protected, a
 * write fault's chunk is installed writable and listed in l->dirty; the loop installs at most
 * l->budget bytes (the room Python saw under the limit) and never into a range the evictor
 * thread published in evict_start/evict_end or in its batch (farmem.c): such faults go back
 * to Python. Write-protect faults are resolved in farmem.c (its protocol with the evictor
 * there); those it cannot take are Python's.
 *
 * Wire: SSI_PFL_PROTO_SSIP is the memory node's FETCH/DATA (ssip_wire.h, generated from
 * transport/wire/protocol.py); the DATA reply's arg is the zero mask and only the written pages
 * follow, packed. SSI_PFL_PROTO_RAW is the reference memory node's format used by
 * `bench faults` ({u64 offset, u32 length} -> length raw bytes, nothing zero). */
#include <sys/socket.h>
#include <sys/uio.h>

#include "ssip_io.h"
#include "ssip_poll.h"
#include "ssip_wire.h"
#include "ssi_uffd.h"

#define SSI_PFL_FOLD_MS 10
/* a region's connection (ssip_io.h): its socket, and its TLS session or NULL */
#define SSI_PFL_CONN(r) SSIP_CONN((r)->sock, (r)->ssl)
#define SSI_PFL_MASK_WORDS (SSI_PFL_MAX_FETCH / SSIP_PAGE_SIZE / 64)

_Static_assert(SSIP_MAX_PAGES == 32 && SSIP_MAX_DATA == SSIP_MAX_PAGES * SSIP_PAGE_SIZE
               && SSI_PFL_MAX_FETCH % SSIP_MAX_DATA == 0,
               "a frame's u32 zero mask is one half of a mask[] word");

/* Pages of one DATA reply arrived packed at p (the written ones only, zero mask m): move each
   to its place, last first. */
static void ssi_pfl_unpack(uint8_t *p, uint32_t npages, uint32_t m, uint64_t length)
{
    uint64_t pos = length;
    for (int i = (int)npages - 1; i >= 0 && m; i--) {
        if (m >> i & 1)
            continue;
        pos -= SSIP_PAGE_SIZE;
        if (pos != (uint64_t)i * SSIP_PAGE_SIZE)
            memmove(p + (uint64_t)i * SSIP_PAGE_SIZE, p + pos, SSIP_PAGE_SIZE);
    }
}

static uint32_t ssi_pfl_next_req(struct ssi_pfl *l)
{
    return l->req = (l->req + 1) ? l->req + 1 : 1;
}

/* Check a DATA header for request req asking npages: its zero mask, or -EPROTO (an ERROR
   frame or anything unexpected: Python drops the connection and asks again). */
static int64_t ssi_pfl_check(const struct ssip_header *h, uint32_t req, uint32_t npages)
{
    uint32_t full = npages >= 32 ? 0xffffffffu : (1u << npages) - 1;
    uint32_t m = h->arg & full;
    uint32_t want = (npages - (uint32_t)__builtin_popcount(m)) * SSIP_PAGE_SIZE;
    if (memcmp(h->magic, SSIP_MAGIC, 4) || h->version != SSIP_VERSION || h->type != SSIP_T_DATA
            || h->request_id != req || h->length != want)
        return -EPROTO;
    return m;
}

static void ssi_pfl_request(struct ssip_header *h, uint32_t req, uint32_t space, uint64_t gpa,
                            uint32_t len)
{
    /* the wire is little-endian, as is every host this runs on (x86-64, arm64) */
    *h = (struct ssip_header){.version = SSIP_VERSION, .type = SSIP_T_FETCH,
                              .flags = SSIP_FLAG_URGENT, .request_id = req, .space = space,
                              .gpa = gpa, .length = 0, .arg = len};
    memcpy(h->magic, SSIP_MAGIC, 4);
}

/* A fetch larger than one frame (a huge page): every FETCH sent at once, the replies taken in
   order, each unpacked in place; zero-mask bits into mask[] (one bit per wire page). */
static int ssi_pfl_fetch_pipelined(struct ssi_pfl *l, const struct ssi_pfl_lane *r,
                                   uint64_t gpa, uint32_t len, uint64_t *mask)
{
    struct ssip_header hs[SSI_PFL_MAX_FETCH / SSIP_MAX_DATA];
    uint32_t nf = (len + SSIP_MAX_DATA - 1) / SSIP_MAX_DATA;
    uint32_t first = 0;
    int rc;
    for (uint32_t f = 0; f < nf; f++) {
        uint32_t req = ssi_pfl_next_req(l), n = len - f * SSIP_MAX_DATA;
        first = f ? first : req;
        ssi_pfl_request(&hs[f], req, r->space, gpa + (uint64_t)f * SSIP_MAX_DATA,
                        n < SSIP_MAX_DATA ? n : SSIP_MAX_DATA);
    }
    if ((rc = ssip_send_all(SSI_PFL_CONN(r), (const uint8_t *)hs, nf * sizeof hs[0])) < 0)
        return rc;
    for (uint32_t f = 0, req = first; f < nf; f++, req = req + 1 ? req + 1 : 1) {
        struct ssip_header h;
        uint32_t npages = hs[f].arg / SSIP_PAGE_SIZE;
        uint8_t *p = l->buf + (uint64_t)f * SSIP_MAX_DATA;
        if ((rc = ssip_recv_all(SSI_PFL_CONN(r), (uint8_t *)&h, sizeof h)) < 0)
            return rc;
        int64_t m = ssi_pfl_check(&h, req, npages);
        if (m < 0)
            return (int)m;
        if (h.length && (rc = ssip_recv_all(SSI_PFL_CONN(r), p, h.length)) < 0)
            return rc;
        ssi_pfl_unpack(p, npages, (uint32_t)m, h.length);
        uint64_t bit = (uint64_t)f * SSIP_MAX_PAGES;  /* frames are whole 32-page groups */
        mask[bit / 64] |= (uint64_t)m << (bit % 64);
    }
    return 0;
}

/* One fetch of len bytes at gpa into l->buf; the zero mask in mask[] (len / 4 KiB bits, the
   caller zeroes it). 0 or -errno. */
static int ssi_pfl_fetch(struct ssi_pfl *l, const struct ssi_pfl_lane *r, uint64_t gpa,
                         uint32_t len, uint64_t *mask)
{
    uint8_t *buf = l->buf;
    int rc;
    if (r->proto == SSI_PFL_PROTO_RAW) {
        uint8_t q[12];
        memcpy(q, &gpa, 8);
        memcpy(q + 8, &len, 4);
        if ((rc = ssip_send_all(SSI_PFL_CONN(r), q, sizeof q)) < 0)
            return rc;
        struct iovec v = {buf, len};
        struct msghdr mh = {.msg_iov = &v, .msg_iovlen = 1};
        ssize_t got = ssip_conn_recv_polling(SSI_PFL_CONN(r), &mh, ssip_mono_ns(), l->poll_ns,
                                             &l->poll_skip_until, &l->poll_backoff_ns);
        if (got <= 0)
            return got < 0 ? -errno : -ECONNRESET;
        return ssip_recv_all(SSI_PFL_CONN(r), buf + got, len - (uint32_t)got);
    }
    if (len > SSIP_MAX_DATA)
        return ssi_pfl_fetch_pipelined(l, r, gpa, len, mask);
    uint32_t req = ssi_pfl_next_req(l);
    struct ssip_header h;
    ssi_pfl_request(&h, req, r->space, gpa, len);
    if ((rc = ssip_send_all(SSI_PFL_CONN(r), (const uint8_t *)&h, sizeof h)) < 0)
        return rc;
    /* header and pages in one recvmsg: only this reply can arrive */
    struct iovec iov[2] = {{&h, sizeof h}, {buf, len}};
    struct msghdr msg = {.msg_iov = iov, .msg_iovlen = 2};
    /* adaptive polling: the reply of a fast node arrives within the window, and this
       thread is not put to sleep and woken for it */
    ssize_t nb = ssip_conn_recv_polling(SSI_PFL_CONN(r), &msg, ssip_mono_ns(), l->poll_ns,
                                        &l->poll_skip_until, &l->poll_backoff_ns);
    if (nb < 0)
        return -errno;
    if (nb == 0)
        return -ECONNRESET;
    if ((size_t)nb < sizeof h) {
        if ((rc = ssip_recv_all(SSI_PFL_CONN(r), (uint8_t *)&h + nb, sizeof h - (size_t)nb)) < 0)
            return rc;
        nb = sizeof h;
    }
    uint32_t npages = len / SSIP_PAGE_SIZE;
    int64_t m = ssi_pfl_check(&h, req, npages);
    size_t got = (size_t)nb - sizeof h;
    if (m < 0 || got > h.length)
        return -EPROTO;
    if (got < h.length && (rc = ssip_recv_all(SSI_PFL_CONN(r), buf + got, h.length - got)) < 0)
        return rc;
    ssi_pfl_unpack(buf, npages, (uint32_t)m, h.length);
    mask[0] = (uint64_t)m;
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

/* The lane that serves [gpa, gpa + len) of region r (a fetch is at most one extent long, so
   it spans at most two), or NULL: Python's (no C lane there, the extents on different lanes,
   or the routing changed since Python built the table). A one-node source is one lane for
   every extent (r->lane >= 0). */
static const struct ssi_pfl_lane *ssi_pfl_route(const struct ssi_pfl *l,
                                                const struct ssi_pfl_region *r, uint64_t gpa,
                                                uint64_t len)
{
    if (l->route_gen && __atomic_load_n(l->route_gen, __ATOMIC_ACQUIRE) != l->route_gen_seen)
        return NULL;
    int k = r->lane;
    if (k == SSI_PFL_BY_EXTENT) {
        uint64_t e0 = r->gpa >> l->ext_shift;
        uint64_t first = (gpa >> l->ext_shift) - e0;
        uint64_t last = ((gpa + len - 1) >> l->ext_shift) - e0;
        if (last >= r->next || r->ext[first] != r->ext[last])
            return NULL;
        k = r->ext[first];
    }
    if (k < 0 || k >= l->nlanes || l->lanes[k].sock < 0)
        return NULL;
    return &l->lanes[k];
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

/* Far memory: is [start, end) in a range the evictor is working on? Its wake serves the fault
   (or Python, once the range is forgotten). */
static int ssi_pfl_is_evicting(const struct ssi_pfl *l, uint64_t start, uint64_t end)
{
    for (int k = 0; k < SSI_PFL_MAX_EVICT; k++) {
        uint64_t e = __atomic_load_n(&l->evict_end[k], __ATOMIC_ACQUIRE);
        if (e > start && __atomic_load_n(&l->evict_start[k], __ATOMIC_RELAXED) < end)
            return 1;
    }
    return 0;
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

/* Far memory: a write-protect fault, resolved in farmem.c unless its unit is slow. */
static int ssi_pfl_wp(struct ssi_pfl *l, const struct ssi_pfl_region *r, uint64_t addr)
{
    uint64_t chunk = l->chunk > r->page_size ? l->chunk : r->page_size;
    uint64_t start = addr - (addr - r->base) % chunk;
    uint64_t len = r->base + r->size - start;
    if (len > chunk)
        len = chunk;
    if (ssi_pfl_is_slow(l, start, start + len) || !ssi_pfl_wp_fault(l, start, len))
        return 0;
    l->stats.faults++;
    l->stats.faults_write++;
    l->stats.faults_wp++;
    l->stats.wp_dirty++;
    return 1;
}

/* Serve events[i] if it is an ordinary fault: 1 served, 0 Python's, -errno fetch failed. */
static int ssi_pfl_fault(struct ssi_pfl *l, int i, uint64_t t0, uint64_t *done_s,
                         uint64_t *done_e, int *ndone)
{
    const uint64_t *w = l->events + 4 * i;
    if (w[0] != UFFD_EVENT_PAGEFAULT || (w[1] & UFFD_PAGEFAULT_FLAG_MINOR)
            || (w[1] & UFFD_PAGEFAULT_FLAG_WP && !l->farmem))
        return 0;
    uint64_t addr = w[2];
    const struct ssi_pfl_region *r = ssi_pfl_find(l, addr);
    if (!r)
        return 0;
    if (w[1] & UFFD_PAGEFAULT_FLAG_WP)
        return ssi_pfl_wp(l, r, addr);
    if (r->lane == -1)
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
    uint64_t chunk = l->chunk > r->page_size ? l->chunk : r->page_size;
    uint64_t start = addr - (addr - r->base) % chunk;
    uint64_t len = r->base + r->size - start;
    if (len > chunk)
        len = chunk;
    struct ssi_install_log *g = &l->log;
    /* room in the residency ring for the worst case (every page its own run, plus EEXIST);
       a huge page is copied whole (one run) */
    if (len > l->buf_size || len > SSI_PFL_MAX_FETCH
            || g->max_res - g->nres < 2 * (len / r->page_size) + 2
            || ssi_pfl_is_slow(l, start, start + len))
        return 0;
    for (int k = 0; k < l->nwatch; k++)
        if (l->watch[k] == start)
            return 0;  /* the chunk after one just served: a stream's detector is Python's */
    /* far memory: within the budget, never in a unit being evicted, room to report a dirty
       unit; a write fault installs its unit writable (reported dirty: no WP fault follows) */
    int write = w[1] == UFFD_PAGEFAULT_FLAG_WRITE;
    uint64_t mode = 0;
    if (l->farmem) {
        if ((int64_t)len > l->budget || l->ndirty >= SSI_PFL_MAX_DIRTY
                || ssi_pfl_is_evicting(l, start, start + len) || ssi_pfl_fm_busy(l, start))
            return 0;
        mode = write ? 0 : UFFDIO_COPY_MODE_WP;
    }
    uint64_t gpa = r->gpa + (start - r->base);
    const struct ssi_pfl_lane *c = ssi_pfl_route(l, r, gpa, len);
    if (!c)
        return 0;
    uint64_t mask[SSI_PFL_MASK_WORDS] = {0};
    int rc = ssi_pfl_fetch(l, c, gpa, (uint32_t)len, mask);
    if (rc < 0) {
        l->err_lane = (int)(c - l->lanes);
        return rc;
    }
    st->fetched_bytes += len;
    int any = 0;
    for (uint64_t k = 0; k < (len / SSIP_PAGE_SIZE + 63) / 64; k++)
        any |= mask[k] != 0;
    if (ssi_install(l->uffd, start, (uint64_t)(uintptr_t)l->buf, len, any ? mask : NULL,
                    r->page_size, mode, g) < 0)
        return 0;  /* Python fetches again and reports, defers or ends the client */
    if (l->farmem) {
        l->budget -= (int64_t)len;
        if (write)
            l->dirty[l->ndirty++] = start;
    }
    st->faults++;
    st->faults_write += !!(w[1] & UFFD_PAGEFAULT_FLAG_WRITE);
    st->served_fetch++;
    if (l->nwatch)
        l->watch[l->watch_next++ % (uint32_t)l->nwatch] = start + len;
    ssi_pfl_observe(l, t0);
    done_s[*ndone] = start;
    done_e[*ndone] = start + len;
    (*ndone)++;
    return 1;
}

/* Adaptive polling: for poll_ns after the last event, read the uffd without blocking (its fd
 * is O_NONBLOCK) instead of sleeping in poll(), so the next fault of a burst is seen within one
 * read() rather than after a wakeup. The window is bounded and restarts only on events, so an
 * idle pager blocks in poll() and costs nothing; the spin yields now and then, and backs off
 * when that got it preempted (ssip_poll.h). The interrupting fds are not looked at while
 * spinning: they wait at most one window. Returns the events read, 0 when the window closed,
 * -errno. */
static int ssi_pfl_spin(struct ssi_pfl *l, int max_events)
{
    if (!l->poll_ns)
        return 0;
    uint64_t prev = ssip_mono_ns();
    if (prev - l->last_event_ns >= l->poll_ns
            || !ssip_poll_allowed(l->poll_ns, l->poll_skip_until, prev))
        return 0;
    long switches = SSIP_POLL_UNCOUNTED;
    for (unsigned k = 1;; k++) {
        int n = ssi_uffd_read(l->uffd, l->events, max_events);
        if (n) {
            l->poll_backoff_ns = 0;
            return n;
        }
        if (ssip_poll_over(l->last_event_ns, l->poll_ns, &prev, &l->poll_skip_until,
                           &l->poll_backoff_ns, &switches))
            return 0;
        ssip_poll_relax(k);
    }
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
    l->err_lane = -1;
    /* room in the residency ring for a batch of chunks that each split into single pages */
    uint64_t worst = (uint64_t)max_events * (2 * (l->chunk / SSIP_PAGE_SIZE) + 2);
    for (;;) {
        if (served && (l->log.max_res - l->log.nres < worst
                       || (l->farmem && (l->budget < (int64_t)(max_events * l->chunk)
                                         || l->ndirty + max_events > SSI_PFL_MAX_DIRTY
                                         || __atomic_load_n(&l->nwpd, __ATOMIC_RELAXED)
                                                + max_events > SSI_PFL_MAX_WPD))))
            return SSI_PFL_IDLE;  /* Python drains it (and evicts) and calls again */
        int n = ssi_pfl_spin(l, max_events);
        if (n == 0) {
            p[0].fd = l->uffd;
            p[0].events = POLLIN;
            for (int k = 1; k < np; k++) {
                p[k].fd = l->wake_fds[k - 1];
                p[k].events = POLLIN;
            }
            /* once faults were served, return soon after they stop, so Python folds the
               counters (metrics lag by at most SSI_PFL_FOLD_MS idle, max_ns busy) */
            int r = poll(p, (nfds_t)np, served && l->timeout_ms > SSI_PFL_FOLD_MS
                                            ? SSI_PFL_FOLD_MS : l->timeout_ms);
            if (r < 0 && errno == EINTR)
                continue;
            if (r <= 0)
                return SSI_PFL_IDLE;
            for (int k = 1; k < np; k++)
                if (p[k].revents)
                    return SSI_PFL_WAKE;
            n = ssi_uffd_read(l->uffd, l->events, max_events);
        }
        if (n < 0) {
            l->err = -n;
            return SSI_PFL_READ_ERROR;
        }
        if (n == 0)
            return SSI_PFL_IDLE;
        l->last_event_ns = ssi_now_ns();
        uint64_t t0 = l->last_event_ns;
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
        l->last_event_ns = ssi_now_ns();  /* the window runs from the end of the batch */
        if (l->last_event_ns - entered >= l->max_ns)
            return SSI_PFL_IDLE;
    }
}
