/* Far memory in the C fault loop: write-protect faults resolved without Python.
 *
 * A client under a resident limit has every unit installed write-protected; the first write
 * to a clean unit raises a write-protect fault. The loop (faultloop.c) hands such a fault here:
 * the unit's protection is cleared (which wakes the writer) and its start is listed in l->wpd,
 * which Python takes (FaultLoop.take_wp_dirty) and marks dirty in its state.
 *
 * The evictor thread must never see a unit as clean that C made writable: before it
 * write-protects a batch, it publishes the batch's units (ssi_pfl_set_victims, sorted starts)
 * under l->fm_lock, the lock this file holds from its check to its list entry. So C either
 * un-protected a unit before the publication (its entry is in wpd, which the evictor takes
 * after its write-protect and before it decides what is clean), or it sees the unit published
 * and leaves the fault to Python (which waits for the evictor's wake). The set is cleared
 * after the batch's last wake. A fault read after its unit was evicted un-protects a hole (no
 * page: nothing to clear) and wakes the thread, which faults again as a missing page; Python
 * ignores listed units it does not hold.
 *
 * Eviction's I/O is here too (pager/engine/evict.py decides and keeps the state): a batch's
 * dirty stretches read with pread and written to the node pipelined on one connection
 * (ssi_fm_write_back), the acked runs punched (ssi_fm_punch) and, after Python forgot them,
 * woken (ssi_fm_wake): three calls per batch instead of several per unit. */
#include <sched.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "ssip_io.h"
#include "ssip_wire.h"
#include "ssi_uffd.h"

static void ssi_fm_lock(struct ssi_pfl *l)
{
    for (unsigned k = 0; __atomic_exchange_n(&l->fm_lock, 1, __ATOMIC_ACQUIRE); k++)
        while (__atomic_load_n(&l->fm_lock, __ATOMIC_RELAXED)) {
            if (k++ > 64)
                sched_yield();  /* the holder was preempted: let it run */
        }
}

static void ssi_fm_unlock(struct ssi_pfl *l)
{
    __atomic_store_n(&l->fm_lock, 0, __ATOMIC_RELEASE);
}

static int ssi_fm_is_victim(const struct ssi_pfl *l, uint64_t start)
{
    int lo = 0, hi = l->nvictims;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (l->victims[mid] < start)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < l->nvictims && l->victims[lo] == start;
}

/* A write-protect fault in the unit [start, start + len): 1 resolved (protection cleared,
   writer woken, unit listed dirty), 0 Python's (a unit of the evictor's batch, the list full,
   the ioctl refused: a layout event pending). */
int ssi_pfl_wp_fault(struct ssi_pfl *l, uint64_t start, uint64_t len)
{
    int rc = 0;
    ssi_fm_lock(l);
    if (l->nwpd < SSI_PFL_MAX_WPD && !ssi_fm_is_victim(l, start)) {
        struct uffdio_writeprotect w = {.range = {start, len}, .mode = 0};
        if (ioctl(l->uffd, UFFDIO_WRITEPROTECT, &w) == 0) {
            l->wpd[l->nwpd++] = start;
            rc = 1;
        }
    }
    ssi_fm_unlock(l);
    return rc;
}

/* Is the unit at start in the evictor's batch (a missing fault there waits for its wake)? */
int ssi_pfl_fm_busy(struct ssi_pfl *l, uint64_t start)
{
    ssi_fm_lock(l);
    int busy = ssi_fm_is_victim(l, start);
    ssi_fm_unlock(l);
    return busy;
}

/* The evictor's batch: n sorted unit starts (0 clears it). -EINVAL if more than fit. */
int ssi_pfl_set_victims(struct ssi_pfl *l, const uint64_t *starts, int n)
{
    if (n < 0 || n > SSI_PFL_MAX_VICTIMS)
        return -EINVAL;
    ssi_fm_lock(l);
    memcpy(l->victims, starts, (size_t)n * sizeof *starts);
    l->nvictims = n;
    ssi_fm_unlock(l);
    return 0;
}

/* Take up to max listed units (those C un-protected) into out; how many. */
int ssi_pfl_take_wp(struct ssi_pfl *l, uint64_t *out, int max)
{
    ssi_fm_lock(l);
    int n = l->nwpd < max ? l->nwpd : max;
    memcpy(out, l->wpd, (size_t)n * sizeof *out);
    memmove(l->wpd, l->wpd + n, (size_t)(l->nwpd - n) * sizeof *out);
    l->nwpd -= n;
    ssi_fm_unlock(l);
    return n;
}

/* -- eviction: a batch's write-back, punch and wake, each one call (no Python per unit) -- */

/* Receive exactly n bytes once some arrive within timeout_ms: 0 or -errno (-ETIMEDOUT). A TLS
   session may hold decrypted bytes already: then there is nothing to wait for. */
static int ssi_fm_recv(struct ssip_conn c, void *buf, size_t n, int timeout_ms)
{
    if (!c.ssl || SSL_pending(c.ssl) <= 0) {
        struct pollfd q = {.fd = c.fd, .events = POLLIN};
        int r;
        while ((r = poll(&q, 1, timeout_ms)) < 0 && errno == EINTR)
            ;
        if (r <= 0)
            return r < 0 ? -errno : -ETIMEDOUT;
    }
    return ssip_recv_all(c, buf, n);
}

#define SSI_FM_SENDV 32  /* plaintext STORE frames per sendmsg */

/* sendmsg all of v[0..n) (blocking socket; a partial send goes on where it stopped): 0 or
   -errno. The iovecs are consumed. (Also the write-back of fmbase.c.) */
int ssi_fm_sendv(int sock, struct iovec *v, int n)
{
    while (n > 0) {
        struct msghdr mh = {.msg_iov = v, .msg_iovlen = (size_t)n};
        ssize_t k = sendmsg(sock, &mh, MSG_NOSIGNAL);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        while (n > 0 && (size_t)k >= v->iov_len) {
            k -= (ssize_t)v->iov_len;
            v++;
            n--;
        }
        if (n > 0) {
            v->iov_base = (uint8_t *)v->iov_base + k;
            v->iov_len -= (size_t)k;
        }
    }
    return 0;
}

/* Read every store's bytes from the memfd (a hole reads as zeros) into buf, one after the
   other, and write them to the node on sock (space handle space; ssl: the socket's TLS
   session, NULL: plaintext): every STORE frame sent,
   then every STORED reply taken, in order. 0 when all were acked; -errno (the connection is
   out of step: drop it), -EPROTO for an ERROR frame or a reply out of step, -EINVAL if buf is
   too small. Nothing is punched here: the caller does, for the runs acked. */
int ssi_fm_write_back(int memfd, int sock, void *ssl, uint32_t space, struct ssi_fm_store *st,
                      int n, uint8_t *buf, uint64_t buf_size, uint32_t *req, int timeout_ms)
{
    struct ssip_conn c = SSIP_CONN(sock, ssl);
    uint64_t pos = 0;
    uint32_t first = *req + 1 ? *req + 1 : 1, nframes = 0;
    struct ssip_header hv[SSI_FM_SENDV];
    struct iovec v[2 * SSI_FM_SENDV];
    int nq = 0;
    for (int i = 0; i < n; i++) {
        if (st[i].len > buf_size - pos || st[i].len % SSIP_PAGE_SIZE)
            return -EINVAL;
        for (uint64_t got = 0; got < st[i].len;) {
            ssize_t k = pread(memfd, buf + pos + got, st[i].len - got, (off_t)(st[i].off + got));
            if (k < 0 && errno == EINTR)
                continue;
            if (k < 0)
                return -errno;
            if (k == 0) {  /* past the end: zeros (the guest shrank it meanwhile) */
                memset(buf + pos + got, 0, st[i].len - got);
                break;
            }
            got += (uint64_t)k;
        }
        for (uint64_t f = 0; f < st[i].len; f += SSIP_MAX_DATA) {
            uint32_t len = st[i].len - f < SSIP_MAX_DATA ? (uint32_t)(st[i].len - f)
                                                         : SSIP_MAX_DATA;
            *req = *req + 1 ? *req + 1 : 1;
            struct ssip_header h = {.version = SSIP_VERSION, .type = SSIP_T_STORE,
                                    .request_id = *req, .space = space, .gpa = st[i].gpa + f,
                                    .length = len, .arg = 0};
            memcpy(h.magic, SSIP_MAGIC, 4);
            if (c.ssl) {  /* TLS: header and data as two writes of the session */
                int rc = ssip_send_all(c, &h, sizeof h);
                if (rc == 0)
                    rc = ssip_send_all(c, buf + pos + f, len);
                if (rc < 0)
                    return rc;
                nframes++;
                continue;
            }
            /* plaintext: frames queued, SSI_FM_SENDV per sendmsg (the node's loop then
               wakes once for many, and acks them in one write) */
            hv[nq] = h;
            v[2 * nq] = (struct iovec){&hv[nq], sizeof h};
            v[2 * nq + 1] = (struct iovec){buf + pos + f, len};
            nframes++;
            if (++nq == SSI_FM_SENDV) {
                int rc = ssi_fm_sendv(sock, v, 2 * nq);
                if (rc < 0)
                    return rc;
                nq = 0;
            }
        }
        pos += st[i].len;
    }
    if (nq) {
        int rc = ssi_fm_sendv(sock, v, 2 * nq);
        if (rc < 0)
            return rc;
    }
    int err = 0;
    for (uint32_t f = 0, r = first; f < nframes; f++, r = r + 1 ? r + 1 : 1) {
        struct ssip_header h;
        int rc = ssi_fm_recv(c, &h, sizeof h, timeout_ms);
        if (rc < 0)
            return rc;
        if (memcmp(h.magic, SSIP_MAGIC, 4) || h.version != SSIP_VERSION || h.request_id != r)
            return -EPROTO;
        if (h.type == SSIP_T_ERROR) {  /* its message is Python's to read on a retry */
            uint8_t skip[512];
            for (uint32_t left = h.length; left;) {
                uint32_t k = left < sizeof skip ? left : (uint32_t)sizeof skip;
                if ((rc = ssi_fm_recv(c, skip, k, timeout_ms)) < 0)
                    return rc;
                left -= k;
            }
            err = -EPROTO;
        } else if (h.type != SSIP_T_STORED || h.length) {
            return -EPROTO;
        }
    }
    return err;
}

/* Punch n ranges of the memfd (fallocate PUNCH_HOLE|KEEP_SIZE): 0, or -errno of the first
   that failed (its index in *failed; those after it are not punched). */
int ssi_fm_punch(int memfd, const uint64_t *offs, const uint64_t *lens, int n, int *failed)
{
    for (int i = 0; i < n; i++)
        if (fallocate(memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offs[i],
                      (off_t)lens[i]) < 0) {
            *failed = i;
            return -errno;
        }
    return 0;
}

/* UFFDIO_WAKE n ranges; how many failed (a range unmapped meanwhile: nothing waits there). */
int ssi_fm_wake(int uffd, const uint64_t *addrs, const uint64_t *lens, int n)
{
    int bad = 0;
    for (int i = 0; i < n; i++) {
        struct uffdio_range r = {addrs[i], lens[i]};
        bad += ioctl(uffd, UFFDIO_WAKE, &r) < 0;
    }
    return bad;
}

/* UFFDIO_WRITEPROTECT (mode WP) n ranges; err[i]: 0 or -errno of each (EAGAIN: a layout event
   pending). How many failed. */
int ssi_fm_protect(int uffd, const uint64_t *addrs, const uint64_t *lens, int n, int *err)
{
    int bad = 0;
    for (int i = 0; i < n; i++) {
        struct uffdio_writeprotect w = {.range = {addrs[i], lens[i]},
                                        .mode = UFFDIO_WRITEPROTECT_MODE_WP};
        err[i] = ioctl(uffd, UFFDIO_WRITEPROTECT, &w) < 0 ? -errno : 0;
        bad += err[i] != 0;
    }
    return bad;
}
