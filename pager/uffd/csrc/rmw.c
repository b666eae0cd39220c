/* The far-memory workload: C pthreads doing random reads and read-modify-writes over pages,
 * every value checked against a model kept outside the paged memory (no GIL held, so an
 * in-process pager can serve the faults; also the bench's workload).
 *
 * Page p holds two words: a counter, and a tag (0 until first written, then p + 1). Thread t
 * owns the pages with p % nthreads == t: only it writes them, so a read-modify-write must read
 * exactly the model's value (a lost write-back, a stale copy or a page zeroed by mistake show
 * up at once). Reads of any page check the tag and that the counter never goes back (a
 * per-thread last-seen value) nor runs ahead of the model by more than the write in flight.
 * Skew: hot_ops percent of the operations go to the first hot_pages percent of the pages.
 * fill: a write also fills the rest of the page with pseudo-random words derived from the page
 * and its counter (memory that does not compress to nothing, as a guest's does not), checked
 * where no other thread can be writing it: by its owner before each write and on its reads,
 * and whole by ssi_rmw_check. */
#include "ssi_uffd.h"

struct ssi_rmw_arg {
    struct ssi_rmw *w;
    int tid;
    uint64_t *seen;
};

static uint64_t ssi_rmw_next(uint64_t *s)
{
    uint64_t x = *s += 0x9E3779B97F4A7C15ull;  /* splitmix64 */
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

/* Word k (2 .. page/8 - 1) of page p at counter v: filled by ssi_rmw_fill. */
static uint64_t ssi_rmw_fill_seed(uint64_t p, uint64_t v)
{
    return p * 0xD6E8FEB86659FD93ull ^ v;
}

static void ssi_rmw_fill(volatile uint64_t *pg, uint64_t words, uint64_t p, uint64_t v)
{
    uint64_t s = ssi_rmw_fill_seed(p, v);
    for (uint64_t k = 2; k < words; k++)
        pg[k] = ssi_rmw_next(&s);
}

/* Does the fill of page p match counter v (0: never written, nothing to check)? */
static int ssi_rmw_fill_ok(volatile const uint64_t *pg, uint64_t words, uint64_t p, uint64_t v)
{
    uint64_t s = ssi_rmw_fill_seed(p, v);
    for (uint64_t k = 2; v && k < words; k++)
        if (pg[k] != ssi_rmw_next(&s))
            return 0;
    return 1;
}

static void ssi_rmw_bad(struct ssi_rmw *w, uint64_t page)
{
    if (__atomic_fetch_add(&w->errors, 1, __ATOMIC_RELAXED) == 0)
        w->first_bad = (int64_t)page;
}

static void *ssi_rmw_thread(void *p)
{
    struct ssi_rmw_arg *a = p;
    struct ssi_rmw *w = a->w;
    uint64_t s = w->seed * 1000003u + (uint64_t)a->tid;
    uint64_t n = w->npages, hot = n * (uint64_t)w->hot_pages / 100;
    int nt = w->nthreads;
    if (hot == 0)
        hot = 1;
    for (uint64_t i = 0; i < w->ops; i++) {
        uint64_t r = ssi_rmw_next(&s);
        uint64_t page;
        if (!w->hot_ops || hot >= n)
            page = (r >> 8) % n;
        else if (r % 100 < (uint64_t)w->hot_ops)
            page = (r >> 8) % hot;
        else
            page = hot + (r >> 8) % (n - hot);
        volatile uint64_t *pg = (volatile uint64_t *)(uintptr_t)(w->base + page * w->page);
        int write = (int)((r >> 40) % 100) < w->write_pct;
        if (write) {  /* a page this thread owns */
            page -= page % (uint64_t)nt;
            page += (uint64_t)a->tid;
            if (page >= n)
                page = (uint64_t)a->tid;
            pg = (volatile uint64_t *)(uintptr_t)(w->base + page * w->page);
            uint64_t v = pg[0], want = __atomic_load_n(&w->model[page], __ATOMIC_ACQUIRE);
            if (v != want || pg[1] != (want ? page + 1 : 0)
                    || (w->fill && !ssi_rmw_fill_ok(pg, w->page / 8, page, v)))
                ssi_rmw_bad(w, page);
            pg[1] = page + 1;
            if (w->fill)
                ssi_rmw_fill(pg, w->page / 8, page, v + 1);
            pg[0] = v + 1;
            __atomic_store_n(&w->model[page], v + 1, __ATOMIC_RELEASE);
        } else {
            uint64_t v = pg[0], tag = pg[1];
            uint64_t m = __atomic_load_n(&w->model[page], __ATOMIC_ACQUIRE);
            if (v < a->seen[page] || v > m + 1 || tag != (v ? page + 1 : tag)
                    || (w->fill && page % (uint64_t)nt == (uint64_t)a->tid
                        && !ssi_rmw_fill_ok(pg, w->page / 8, page, v)))
                ssi_rmw_bad(w, page);
            a->seen[page] = v;
            w->checksum += v;
        }
        __atomic_fetch_add(&w->done, 1, __ATOMIC_RELAXED);
    }
    return NULL;
}

/* Run the workload to the end (blocking; the GIL is released by cffi). 0 or -errno. */
int ssi_rmw_run(struct ssi_rmw *w)
{
    pthread_t th[SSI_RMW_MAX_THREADS];
    struct ssi_rmw_arg args[SSI_RMW_MAX_THREADS];
    int nt = w->nthreads, rc = 0, started = 0;
    if (nt < 1 || nt > SSI_RMW_MAX_THREADS || !w->npages || !w->page)
        return -EINVAL;
    for (int i = 0; i < nt; i++) {
        args[i].w = w;
        args[i].tid = i;
        args[i].seen = calloc(w->npages, sizeof(uint64_t));
        if (!args[i].seen) {
            rc = -ENOMEM;
            break;
        }
        if (pthread_create(&th[i], NULL, ssi_rmw_thread, &args[i]) != 0) {
            free(args[i].seen);
            rc = -EAGAIN;
            break;
        }
        started++;
    }
    for (int i = 0; i < started; i++) {
        pthread_join(th[i], NULL);
        free(args[i].seen);
    }
    return rc;
}

/* After the run: pages whose content differs from the model (first in *first_bad). */
uint64_t ssi_rmw_check(struct ssi_rmw *w)
{
    uint64_t bad = 0;
    for (uint64_t p = 0; p < w->npages; p++) {
        volatile uint64_t *pg = (volatile uint64_t *)(uintptr_t)(w->base + p * w->page);
        if (pg[0] != w->model[p] || pg[1] != (w->model[p] ? p + 1 : 0)
                || (w->fill && !ssi_rmw_fill_ok(pg, w->page / 8, p, w->model[p]))) {
            if (!bad)
                w->first_bad = (int64_t)p;
            bad++;
        }
    }
    return bad;
}
