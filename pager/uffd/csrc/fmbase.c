/* The far-memory baseline of `bench farmem`: the scheme ssi-pager's far memory follows, with
 * nothing else around it, as a bound on what a userspace pager of that scheme can do on a host.
 *
 * Everything is in the workload's own process and in C: no memory node (the store is an array
 * in this process, a store is a memcpy by pread), no socket, no Python, FIFO replacement. Two
 * threads, as the scheme wants them:
 * - the fault thread: a missing fault installs the page from the store with UFFDIO_COPY,
 *   write-protected (a write miss: writable and dirty), once the resident count is under the
 *   limit; a write-protect fault on a clean page marks it dirty and clears the protection;
 * - the evictor, from 95% of the limit down to 85% in batches, each in the race-free order:
 *   write-protect the dirty victims (clean ones were never un-protected), pread them from the
 *   memfd into the store, punch the batch out of the memfd, mark it absent, UFFDIO_WAKE.
 * A fault on a page of the batch being evicted is left alone: the wake after the punch makes
 * the thread fault again as a missing page, which gets the stored copy. One mutex orders the
 * two threads (the fault thread holds it from its state check to its un-protect).
 *
 * remote = 1 puts the store behind TCP loopback, as a memory node on the same host would be:
 * a fetch is a request and a 4 KiB reply on the fault thread's connection, a write-back is the
 * batch's pages sent on the evictor's own connection and one ack before the punch; two threads
 * of this process serve the two connections (no second process, no framing beyond a page
 * number: still a bound on what a pager with a node on the same host can do).
 *
 * all_dirty = 1 drops the dirty tracking: pages are installed writable (no write-protect
 * faults) and every victim is written back (write-protected first, as the order wants). */
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "ssip_io.h"
#include "ssi_uffd.h"

#define FMB_PAGE 4096ull
#define FMB_READ 16
#define FMB_LAST (1ull << 63)  /* a store header's flag: the batch's last page, ack it */

enum { FMB_ABSENT, FMB_CLEAN, FMB_DIRTY, FMB_EVICTING };

/* One reader's polling state (ssip_poll.h): the window, and its back-off after a preemption. */
struct fmb_poll {
    uint64_t window, skip_until, backoff;
};

struct fmb_priv {
    pthread_t fault, evict;
    int started;
    pthread_mutex_t lock;
    pthread_cond_t need, room;
    uint8_t *state;   /* per page */
    uint8_t *store;   /* the pages' stored copies (zeros until stored) */
    uint32_t *fifo;   /* resident pages in install order: a ring of npages */
    uint64_t head, tail, resident;
    uint64_t high, low;
    int stop;
    /* remote: lane[0] the fault thread's connection, lane[1] the evictor's; srv[] their
       other ends, served by server[] */
    int lane[2], srv[2];
    pthread_t server[2];
    int servers;
    struct fmb_poll fetch_poll, ack_poll;  /* the fault thread's, the evictor's */
    uint8_t *fetched;  /* a fetch's reply */
    uint8_t *outbuf;   /* a batch's pages on their way to the store */
};

static void fmb_fail(struct ssi_fmb *b, int err)
{
    int zero = 0;
    __atomic_compare_exchange_n(&b->error, &zero, err, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
}

/* n bytes from a blocking socket, polling for the first of them over q's window as the lanes
   of ssi-pager and its node do: 0, or -errno (-EPIPE: the other end closed). The store's
   threads end at the end of stream ssi_fmb_stop makes once the fault thread and the evictor
   are gone, so a batch being stored when the stop comes is still acked. */
static int fmb_recv(struct fmb_poll *q, int fd, void *buf, size_t n)
{
    struct iovec v = {.iov_base = buf, .iov_len = n};
    struct msghdr m = {.msg_iov = &v, .msg_iovlen = 1};
    ssize_t k = ssip_recvmsg_polling(fd, &m, ssip_mono_ns(), q->window, &q->skip_until,
                                     &q->backoff);
    if (k <= 0)
        return k < 0 ? -errno : -EPIPE;
    int rc = ssip_recv_all(SSIP_CONN(fd, NULL), (uint8_t *)buf + k, n - (size_t)k);
    return rc == -ECONNRESET ? -EPIPE : rc;
}

/* The store's end of the fault thread's connection: a page number in, the page out. */
static void *fmb_serve_fetch(void *arg)
{
    struct ssi_fmb *b = arg;
    struct fmb_priv *s = b->priv;
    struct fmb_poll q = {.window = (uint64_t)b->poll_us * 1000};
    uint64_t p;
    while (fmb_recv(&q, s->srv[0], &p, sizeof(p)) == 0) {
        if (p >= b->npages
                || ssip_send_all(SSIP_CONN(s->srv[0], NULL), s->store + p * FMB_PAGE,
                                 FMB_PAGE) < 0)
            break;
    }
    return NULL;
}

/* The store's end of the evictor's connection: (page number, page) in, an ack after a
   batch's last. */
static void *fmb_serve_store(void *arg)
{
    struct ssi_fmb *b = arg;
    struct fmb_priv *s = b->priv;
    struct fmb_poll q = {.window = (uint64_t)b->poll_us * 1000};
    struct ssip_conn c = SSIP_CONN(s->srv[1], NULL);
    uint64_t h;
    while (fmb_recv(&q, s->srv[1], &h, sizeof(h)) == 0) {
        uint64_t p = h & ~FMB_LAST;
        if (p >= b->npages || ssip_recv_all(c, s->store + p * FMB_PAGE, FMB_PAGE) < 0)
            break;
        if ((h & FMB_LAST) && ssip_send_all(c, &h, sizeof(h)) < 0)
            break;
    }
    return NULL;
}

static void fmb_missing(struct ssi_fmb *b, struct fmb_priv *s, uint64_t p, int write)
{
    uint64_t addr = b->base + p * FMB_PAGE;
    pthread_mutex_lock(&s->lock);
    if (s->state[p] == FMB_EVICTING) {  /* woken after the punch: faults again */
        pthread_mutex_unlock(&s->lock);
        return;
    }
    if (s->state[p] != FMB_ABSENT) {  /* a stale message: installed already */
        pthread_mutex_unlock(&s->lock);
        int rc = ssi_uffd_range(b->uffd, UFFDIO_WAKE, addr, FMB_PAGE);
        if (rc < 0)
            fmb_fail(b, -rc);
        return;
    }
    if (s->resident >= b->limit_pages)
        b->waits++;
    while (s->resident >= b->limit_pages && !s->stop) {
        pthread_cond_signal(&s->need);
        pthread_cond_wait(&s->room, &s->lock);
    }
    s->resident++;
    if (s->resident >= s->high)
        pthread_cond_signal(&s->need);
    pthread_mutex_unlock(&s->lock);
    /* Only this thread installs, and the evictor takes resident pages only: p stays ours. */
    uint8_t *src = s->store + p * FMB_PAGE;
    if (b->remote) {
        src = s->fetched;
        int rc = ssip_send_all(SSIP_CONN(s->lane[0], NULL), &p, sizeof(p));
        if (rc == 0)
            rc = fmb_recv(&s->fetch_poll, s->lane[0], src, FMB_PAGE);
        if (rc < 0) {
            fmb_fail(b, -rc);
            return;
        }
    }
    int dirty = write || b->all_dirty;
    int64_t rc = ssi_uffd_copy_buf(b->uffd, addr, src, FMB_PAGE,
                                   dirty ? 0 : UFFDIO_COPY_MODE_WP);
    if (rc < 0 && rc != -EEXIST)
        fmb_fail(b, (int)-rc);
    pthread_mutex_lock(&s->lock);
    s->state[p] = dirty ? FMB_DIRTY : FMB_CLEAN;
    s->fifo[s->tail++ % b->npages] = (uint32_t)p;
    pthread_mutex_unlock(&s->lock);
    b->missing++;
}

static void fmb_wp_fault(struct ssi_fmb *b, struct fmb_priv *s, uint64_t p)
{
    pthread_mutex_lock(&s->lock);
    int st = s->state[p];
    if (st == FMB_CLEAN || st == FMB_DIRTY) {
        s->state[p] = FMB_DIRTY;
        /* also wakes the writer */
        int rc = ssi_uffd_writeprotect(b->uffd, b->base + p * FMB_PAGE, FMB_PAGE, 0);
        if (rc < 0)
            fmb_fail(b, -rc);
        b->wp++;
    }  /* evicting or evicted: the evictor's wake makes the writer fault again */
    pthread_mutex_unlock(&s->lock);
}

static void *fmb_fault_thread(void *arg)
{
    struct ssi_fmb *b = arg;
    struct fmb_priv *s = b->priv;
    uint64_t ev[FMB_READ * SSI_EVENT_WORDS];
    uint64_t window = (uint64_t)b->poll_us * 1000, idle_since = 0;
    unsigned k = 1;
    while (!__atomic_load_n(&s->stop, __ATOMIC_RELAXED)) {
        int n = ssi_uffd_read(b->uffd, ev, FMB_READ);
        if (n == 0) {  /* nothing yet: poll over the window, then block (50 ms at a time) */
            uint64_t now = ssip_mono_ns();
            if (!idle_since)
                idle_since = now;
            if (now - idle_since < window) {
                ssip_poll_relax(k++);
                continue;
            }
            n = ssi_uffd_wait_read(b->uffd, ev, FMB_READ, 50);
        }
        if (n < 0) {
            fmb_fail(b, -n);
            break;
        }
        if (n > 0) {
            idle_since = 0;
            k = 1;
        }
        for (int i = 0; i < n; i++) {
            const uint64_t *w = ev + (size_t)i * SSI_EVENT_WORDS;
            uint64_t addr = w[2] & ~(FMB_PAGE - 1);
            if (w[0] != UFFD_EVENT_PAGEFAULT || addr < b->base
                    || addr >= b->base + b->npages * FMB_PAGE)
                continue;
            uint64_t p = (addr - b->base) / FMB_PAGE;
            if (w[1] & UFFD_PAGEFAULT_FLAG_WP)
                fmb_wp_fault(b, s, p);
            else
                fmb_missing(b, s, p, !!(w[1] & UFFD_PAGEFAULT_FLAG_WRITE));
        }
    }
    return NULL;
}

/* One batch of n victims, already marked evicting; dirty[i]: victim i needs a write-back. */
static void fmb_evict_batch(struct ssi_fmb *b, struct fmb_priv *s, const uint32_t *v,
                            const uint8_t *dirty, int n)
{
    uint64_t offs[n], addrs[n], lens[n], dirty_addrs[n], hdr[n];
    struct iovec iov[2 * n];
    int err[n], nd = 0, failed, rc;
    for (int i = 0; i < n; i++) {
        offs[i] = v[i] * FMB_PAGE;
        addrs[i] = b->base + offs[i];
        lens[i] = FMB_PAGE;
        if (dirty[i])  /* a clean one has been protected since its install */
            dirty_addrs[nd++] = addrs[i];
    }
    if (ssi_fm_protect(b->uffd, dirty_addrs, lens, nd, err))
        for (int j = 0; j < nd; j++)
            if (err[j]) {
                fmb_fail(b, -err[j]);
                break;
            }
    for (int i = 0, j = 0; i < n; i++) {
        if (!dirty[i])
            continue;
        uint8_t *to = b->remote ? s->outbuf + (size_t)j * FMB_PAGE : s->store + offs[i];
        if (pread(b->memfd, to, FMB_PAGE, (off_t)offs[i]) != (ssize_t)FMB_PAGE)
            fmb_fail(b, EIO);
        hdr[j] = v[i];
        iov[2 * j] = (struct iovec){.iov_base = &hdr[j], .iov_len = sizeof(hdr[0])};
        iov[2 * j + 1] = (struct iovec){.iov_base = to, .iov_len = FMB_PAGE};
        j++;
    }
    b->written_back += (uint64_t)nd;
    if (b->remote && nd) {  /* sent in one go, acked once, before any punch */
        uint64_t ack;
        hdr[nd - 1] |= FMB_LAST;
        rc = ssi_fm_sendv(s->lane[1], iov, 2 * nd);
        if (rc == 0)
            rc = fmb_recv(&s->ack_poll, s->lane[1], &ack, sizeof(ack));
        if (rc < 0) {
            fmb_fail(b, -rc);
            return;
        }
    }
    rc = ssi_fm_punch(b->memfd, offs, lens, n, &failed);
    if (rc < 0)
        fmb_fail(b, -rc);
    pthread_mutex_lock(&s->lock);
    for (int i = 0; i < n; i++)
        s->state[v[i]] = FMB_ABSENT;
    s->resident -= (uint64_t)n;
    pthread_cond_broadcast(&s->room);
    pthread_mutex_unlock(&s->lock);
    if (ssi_fm_wake(b->uffd, addrs, lens, n))
        fmb_fail(b, EIO);  /* a victim's range gone: the memory stays mapped, so a bug */
    b->evicted += (uint64_t)n;
}

static void *fmb_evict_thread(void *arg)
{
    struct ssi_fmb *b = arg;
    struct fmb_priv *s = b->priv;
    uint32_t *v = malloc(sizeof(uint32_t) * (size_t)b->batch);
    uint8_t *dirty = malloc((size_t)b->batch);
    if (!v || !dirty) {
        fmb_fail(b, ENOMEM);
        free(v);
        free(dirty);
        return NULL;
    }
    pthread_mutex_lock(&s->lock);
    while (!s->stop) {
        if (s->resident < s->high) {
            pthread_cond_wait(&s->need, &s->lock);
            continue;
        }
        while (s->resident > s->low && !s->stop) {
            int n = 0;
            while (n < b->batch && s->head < s->tail && s->resident - (uint64_t)n > s->low) {
                uint32_t p = s->fifo[s->head++ % b->npages];
                dirty[n] = s->state[p] == FMB_DIRTY;
                v[n++] = p;
                s->state[p] = FMB_EVICTING;
            }
            if (!n)
                break;
            pthread_mutex_unlock(&s->lock);
            fmb_evict_batch(b, s, v, dirty, n);
            pthread_mutex_lock(&s->lock);
        }
    }
    pthread_mutex_unlock(&s->lock);
    free(v);
    free(dirty);
    return NULL;
}

/* remote: the two loopback connections and the threads serving the store behind them. */
static int fmb_connect(struct ssi_fmb *b, struct fmb_priv *s)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t alen = sizeof(a);
    int one = 1, rc = 0;
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (ls < 0)
        return -errno;
    if (bind(ls, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(ls, 2) < 0
            || getsockname(ls, (struct sockaddr *)&a, &alen) < 0) {
        rc = -errno;
        goto out;
    }
    for (int i = 0; i < 2; i++) {
        s->lane[i] = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (s->lane[i] < 0 || connect(s->lane[i], (struct sockaddr *)&a, sizeof(a)) < 0
                || (s->srv[i] = accept4(ls, NULL, NULL, SOCK_CLOEXEC)) < 0) {
            rc = -errno;
            goto out;
        }
        setsockopt(s->lane[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        setsockopt(s->srv[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    }
    s->fetched = malloc(FMB_PAGE);
    s->outbuf = malloc((size_t)b->batch * FMB_PAGE);
    if (!s->fetched || !s->outbuf) {
        rc = -ENOMEM;
        goto out;
    }
    if (pthread_create(&s->server[0], NULL, fmb_serve_fetch, b) != 0) {
        rc = -EAGAIN;
        goto out;
    }
    s->servers = 1;
    if (pthread_create(&s->server[1], NULL, fmb_serve_store, b) != 0)
        rc = -EAGAIN;
    else
        s->servers = 2;
out:
    close(ls);
    return rc;
}

/* Start both threads. 0 or -errno. */
int ssi_fmb_start(struct ssi_fmb *b)
{
    if (!b->npages || b->npages > 0x7fffffffu || b->limit_pages < 4 || b->batch < 1)
        return -EINVAL;
    struct fmb_priv *s = calloc(1, sizeof(*s));
    if (!s)
        return -ENOMEM;
    s->state = calloc(b->npages, 1);
    s->store = calloc(b->npages, FMB_PAGE);
    s->fifo = calloc(b->npages, sizeof(uint32_t));
    if (!s->state || !s->store || !s->fifo) {
        free(s->state);
        free(s->store);
        free(s->fifo);
        free(s);
        return -ENOMEM;
    }
    s->high = b->limit_pages * 95 / 100;
    s->low = b->limit_pages * 85 / 100;
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->need, NULL);
    pthread_cond_init(&s->room, NULL);
    s->lane[0] = s->lane[1] = s->srv[0] = s->srv[1] = -1;
    s->fetch_poll.window = s->ack_poll.window = (uint64_t)b->poll_us * 1000;
    b->priv = s;
    if (b->remote) {
        int rc = fmb_connect(b, s);
        if (rc < 0) {
            ssi_fmb_stop(b);
            return rc;
        }
    }
    if (pthread_create(&s->fault, NULL, fmb_fault_thread, b) != 0) {
        ssi_fmb_stop(b);
        return -EAGAIN;
    }
    s->started = 1;
    if (pthread_create(&s->evict, NULL, fmb_evict_thread, b) != 0) {
        ssi_fmb_stop(b);
        return -EAGAIN;
    }
    s->started = 2;
    return 0;
}

/* Stop and join both threads, free the store (the memfd keeps what is resident). */
void ssi_fmb_stop(struct ssi_fmb *b)
{
    struct fmb_priv *s = b->priv;
    if (!s)
        return;
    pthread_mutex_lock(&s->lock);
    s->stop = 1;
    pthread_cond_broadcast(&s->need);
    pthread_cond_broadcast(&s->room);
    pthread_mutex_unlock(&s->lock);
    if (s->started >= 1)
        pthread_join(s->fault, NULL);
    if (s->started >= 2)
        pthread_join(s->evict, NULL);
    for (int i = 0; i < 2; i++)
        if (s->lane[i] >= 0)
            shutdown(s->lane[i], SHUT_RDWR);  /* the store's threads see the end */
    for (int i = 0; i < s->servers; i++)
        pthread_join(s->server[i], NULL);
    for (int i = 0; i < 2; i++) {
        if (s->lane[i] >= 0)
            close(s->lane[i]);
        if (s->srv[i] >= 0)
            close(s->srv[i]);
    }
    free(s->fetched);
    free(s->outbuf);
    free(s->state);
    free(s->store);
    free(s->fifo);
    pthread_mutex_destroy(&s->lock);
    pthread_cond_destroy(&s->need);
    pthread_cond_destroy(&s->room);
    free(s);
    b->priv = NULL;
}
