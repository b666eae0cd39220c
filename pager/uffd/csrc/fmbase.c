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
#include <time.h>

#include "ssi_uffd.h"

#define FMB_PAGE 4096ull
#define FMB_READ 16
#define FMB_LAST (1ull << 63)  /* a store header's flag: the batch's last page, ack it */

enum { FMB_ABSENT, FMB_CLEAN, FMB_DIRTY, FMB_EVICTING };

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
    uint8_t *fetched;  /* a fetch's reply */
    uint8_t *outbuf;   /* a batch's pages on their way to the store */
};

/* All len bytes read (is_read) or written on a connection, spinning poll_us on an empty
   socket before blocking in poll(); 0, or -1 at EOF or on an error. The store's threads end at
   the EOF ssi_fmb_stop makes once the fault thread and the evictor are gone, so a batch being
   stored when the stop comes is still acked. */
static int fmb_io(int fd, void *buf, size_t len, int is_read, int poll_us)
{
    uint8_t *p = buf;
    struct timespec t0 = {0}, t;
    int spinning = 0;
    while (len) {
        ssize_t n = is_read ? recv(fd, p, len, MSG_DONTWAIT)
                            : send(fd, p, len, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n > 0) {
            p += n;
            len -= (size_t)n;
            spinning = 0;
            continue;
        }
        if (n == 0 || (errno != EAGAIN && errno != EINTR))
            return -1;
        clock_gettime(CLOCK_MONOTONIC, &t);
        if (!spinning) {
            spinning = 1;
            t0 = t;
        }
        if ((t.tv_sec - t0.tv_sec) * 1000000 + (t.tv_nsec - t0.tv_nsec) / 1000 >= poll_us) {
            struct pollfd pfd = {.fd = fd, .events = is_read ? POLLIN : POLLOUT};
            poll(&pfd, 1, 50);
            spinning = 0;
        }
    }
    return 0;
}

/* The store's end of the fault thread's connection: a page number in, the page out. */
static void *fmb_serve_fetch(void *arg)
{
    struct ssi_fmb *b = arg;
    struct fmb_priv *s = b->priv;
    uint64_t p;
    while (fmb_io(s->srv[0], &p, sizeof(p), 1, b->poll_us) == 0) {
        if (p >= b->npages
                || fmb_io(s->srv[0], s->store + p * FMB_PAGE, FMB_PAGE, 0, b->poll_us) < 0)
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
    uint64_t h;
    while (fmb_io(s->srv[1], &h, sizeof(h), 1, b->poll_us) == 0) {
        uint64_t p = h & ~FMB_LAST;
        if (p >= b->npages
                || fmb_io(s->srv[1], s->store + p * FMB_PAGE, FMB_PAGE, 1, b->poll_us) < 0)
            break;
        if ((h & FMB_LAST) && fmb_io(s->srv[1], &h, sizeof(h), 0, b->poll_us) < 0)
            break;
    }
    return NULL;
}

static void fmb_fail(struct ssi_fmb *b, int err)
{
    int zero = 0;
    __atomic_compare_exchange_n(&b->error, &zero, err, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
}

static int fmb_wp(struct ssi_fmb *b, uint64_t addr, uint64_t len, int protect)
{
    struct uffdio_writeprotect w = {
        .range = {.start = addr, .len = len},
        .mode = protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0,
    };
    return ioctl(b->uffd, UFFDIO_WRITEPROTECT, &w) < 0 ? -errno : 0;
}

static void fmb_wake(struct ssi_fmb *b, uint64_t addr, uint64_t len)
{
    struct uffdio_range r = {.start = addr, .len = len};
    if (ioctl(b->uffd, UFFDIO_WAKE, &r) < 0)
        fmb_fail(b, errno);
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
        fmb_wake(b, addr, FMB_PAGE);
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
        if (fmb_io(s->lane[0], &p, sizeof(p), 0, b->poll_us) < 0
                || fmb_io(s->lane[0], src, FMB_PAGE, 1, b->poll_us) < 0) {
            fmb_fail(b, EPIPE);
            return;
        }
    }
    struct uffdio_copy c = {
        .dst = addr, .src = (uint64_t)(uintptr_t)src, .len = FMB_PAGE,
        .mode = write || b->all_dirty ? 0 : UFFDIO_COPY_MODE_WP,
    };
    if (ioctl(b->uffd, UFFDIO_COPY, &c) < 0 && errno != EEXIST)
        fmb_fail(b, errno);
    pthread_mutex_lock(&s->lock);
    s->state[p] = write || b->all_dirty ? FMB_DIRTY : FMB_CLEAN;
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
        int rc = fmb_wp(b, b->base + p * FMB_PAGE, FMB_PAGE, 0);  /* also wakes the writer */
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
    struct uffd_msg msgs[FMB_READ];
    struct timespec t0 = {0}, t;
    int spinning = 0;
    while (!__atomic_load_n(&s->stop, __ATOMIC_RELAXED)) {
        ssize_t n = read(b->uffd, msgs, sizeof(msgs));
        if (n < 0) {
            if (errno != EAGAIN && errno != EINTR) {
                fmb_fail(b, errno);
                break;
            }
            clock_gettime(CLOCK_MONOTONIC, &t);
            if (!spinning) {
                spinning = 1;
                t0 = t;
            }
            if ((t.tv_sec - t0.tv_sec) * 1000000 + (t.tv_nsec - t0.tv_nsec) / 1000
                    >= b->poll_us) {
                struct pollfd pfd = {.fd = b->uffd, .events = POLLIN};
                poll(&pfd, 1, 50);
                spinning = 0;
            }
            continue;
        }
        spinning = 0;
        for (ssize_t i = 0; i < n / (ssize_t)sizeof(msgs[0]); i++) {
            if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
                continue;
            uint64_t addr = msgs[i].arg.pagefault.address & ~(FMB_PAGE - 1);
            uint64_t flags = msgs[i].arg.pagefault.flags;
            if (addr < b->base || addr >= b->base + b->npages * FMB_PAGE)
                continue;
            uint64_t p = (addr - b->base) / FMB_PAGE;
            if (flags & UFFD_PAGEFAULT_FLAG_WP)
                fmb_wp_fault(b, s, p);
            else
                fmb_missing(b, s, p, !!(flags & UFFD_PAGEFAULT_FLAG_WRITE));
        }
    }
    return NULL;
}

static int fmb_cmp(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

/* One batch of victims, already marked evicting; dirty[i] says victim i needs a write-back. */
static void fmb_evict_batch(struct ssi_fmb *b, struct fmb_priv *s, uint32_t *v, int n)
{
    for (int i = 0; i < n; i++) {
        uint64_t p = v[i] & 0x7fffffffu;
        if (!(v[i] & 0x80000000u))
            continue;  /* clean: protected since its install */
        int rc = fmb_wp(b, b->base + p * FMB_PAGE, FMB_PAGE, 1);
        if (rc < 0)
            fmb_fail(b, -rc);
    }
    int dirty = 0;
    uint64_t hdr[n];
    struct iovec iov[2 * n];
    for (int i = 0; i < n; i++) {
        uint64_t p = v[i] & 0x7fffffffu;
        if (!(v[i] & 0x80000000u))
            continue;
        uint8_t *to = b->remote ? s->outbuf + (size_t)dirty * FMB_PAGE : s->store + p * FMB_PAGE;
        if (pread(b->memfd, to, FMB_PAGE, (off_t)(p * FMB_PAGE)) != (ssize_t)FMB_PAGE)
            fmb_fail(b, EIO);
        hdr[dirty] = p;
        iov[2 * dirty] = (struct iovec){.iov_base = &hdr[dirty], .iov_len = sizeof(hdr[0])};
        iov[2 * dirty + 1] = (struct iovec){.iov_base = to, .iov_len = FMB_PAGE};
        dirty++;
    }
    b->written_back += (uint64_t)dirty;
    if (b->remote && dirty) {  /* sent in one go, acked once, before any punch */
        hdr[dirty - 1] |= FMB_LAST;
        uint64_t ack;
        for (int k = 0; k < 2 * dirty; k += 64) {
            int left = 2 * dirty - k;
            struct msghdr m = {.msg_iov = iov + k, .msg_iovlen = left < 64 ? left : 64};
            size_t want = 0;
            for (size_t j = 0; j < m.msg_iovlen; j++)
                want += m.msg_iov[j].iov_len;
            ssize_t sent = sendmsg(s->lane[1], &m, MSG_NOSIGNAL);
            if (sent < 0) {
                fmb_fail(b, errno);
                return;
            }
            if ((size_t)sent == want)
                continue;
            /* the rest of a short send, iovec by iovec */
            for (size_t j = 0; j < m.msg_iovlen; j++) {
                size_t len = m.msg_iov[j].iov_len;
                if ((size_t)sent >= len) {
                    sent -= (ssize_t)len;
                    continue;
                }
                uint8_t *rest = (uint8_t *)m.msg_iov[j].iov_base + sent;
                if (fmb_io(s->lane[1], rest, len - (size_t)sent, 0, b->poll_us) < 0) {
                    fmb_fail(b, EPIPE);
                    return;
                }
                sent = 0;
            }
        }
        if (fmb_io(s->lane[1], &ack, sizeof(ack), 1, b->poll_us) < 0) {
            fmb_fail(b, EPIPE);
            return;
        }
    }
    for (int i = 0; i < n; i++) {
        uint64_t p = v[i] & 0x7fffffffu;
        if (fallocate(b->memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                      (off_t)(p * FMB_PAGE), FMB_PAGE) < 0)
            fmb_fail(b, errno);
    }
    pthread_mutex_lock(&s->lock);
    for (int i = 0; i < n; i++)
        s->state[v[i] & 0x7fffffffu] = FMB_ABSENT;
    s->resident -= (uint64_t)n;
    pthread_cond_broadcast(&s->room);
    pthread_mutex_unlock(&s->lock);
    for (int i = 0; i < n; i++)
        fmb_wake(b, b->base + (uint64_t)(v[i] & 0x7fffffffu) * FMB_PAGE, FMB_PAGE);
    b->evicted += (uint64_t)n;
}

static void *fmb_evict_thread(void *arg)
{
    struct ssi_fmb *b = arg;
    struct fmb_priv *s = b->priv;
    uint32_t *v = malloc(sizeof(uint32_t) * (size_t)b->batch);
    if (!v) {
        fmb_fail(b, ENOMEM);
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
                v[n++] = p | (s->state[p] == FMB_DIRTY ? 0x80000000u : 0);
                s->state[p] = FMB_EVICTING;
            }
            if (!n)
                break;
            pthread_mutex_unlock(&s->lock);
            qsort(v, (size_t)n, sizeof(v[0]), fmb_cmp);
            fmb_evict_batch(b, s, v, n);
            pthread_mutex_lock(&s->lock);
        }
    }
    pthread_mutex_unlock(&s->lock);
    free(v);
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
