/* The toucher: C pthreads that touch, fill or verify memory without holding the GIL (a thread
 * that faults on registered memory while holding the GIL would block a Python handler), and the
 * background syscall thread. Content pattern: the 64-bit word at byte offset o of the address
 * space is ssi_pattern_word(seed, o). */
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <time.h>
#include <sys/wait.h>

#include "ssi_uffd.h"

uint64_t ssi_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

uint64_t ssi_pattern_word(uint64_t seed, uint64_t offset)
{
    uint64_t x = (offset >> 3) + seed * 0x9E3779B97F4A7C15ull + 1;
    x ^= x >> 31; x *= 0xBF58476D1CE4E5B9ull; x ^= x >> 29;
    return x;
}

void ssi_pattern_fill(void *buf, uint64_t len, uint64_t seed, uint64_t origin)
{
    uint64_t *w = buf;
    for (uint64_t i = 0; i < len / 8; i++)
        w[i] = ssi_pattern_word(seed, origin + i * 8);
}

int64_t ssi_pattern_check(const void *buf, uint64_t len, uint64_t seed, uint64_t origin)
{
    const volatile uint64_t *w = buf;
    for (uint64_t i = 0; i < len / 8; i++)
        if (w[i] != ssi_pattern_word(seed, origin + i * 8))
            return (int64_t)(i * 8);
    return -1;
}

void ssi_pattern_fill_at(uint64_t addr, uint64_t len, uint64_t seed, uint64_t origin)
{
    ssi_pattern_fill((void *)(uintptr_t)addr, len, seed, origin);
}

int64_t ssi_pattern_check_at(uint64_t addr, uint64_t len, uint64_t seed, uint64_t origin)
{
    return ssi_pattern_check((const void *)(uintptr_t)addr, len, seed, origin);
}

static void *ssi_touch_thread(void *p)
{
    struct ssi_touch_arg *arg = p;
    struct ssi_touch *t = arg->t;
    int me = arg->index;
    if (t->cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(t->cpu + me, &set);
        pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
    }
    uint64_t sum = 0;
    for (uint64_t i = (uint64_t)me; i < t->naccess; i += (uint64_t)t->nthreads) {
        uint64_t idx = t->perm ? t->perm[i] : i;
        uint64_t off = idx * t->step;
        uint64_t span = t->length - off < t->step ? t->length - off : t->step;
        volatile uint64_t *w = (volatile uint64_t *)(uintptr_t)(t->base + off);
        uint64_t t0 = ssi_now_ns(), t1;
        switch (t->op) {
        case SSI_TOUCH_READ:
            sum += *w;
            t1 = ssi_now_ns();
            break;
        case SSI_TOUCH_WRITE:
            *w = ssi_pattern_word(t->seed, t->origin + off);
            t1 = ssi_now_ns();
            break;
        case SSI_TOUCH_FILL:
            *w = ssi_pattern_word(t->seed, t->origin + off);
            t1 = ssi_now_ns();
            ssi_pattern_fill((void *)(uintptr_t)(t->base + off), span, t->seed, t->origin + off);
            break;
        default: {  /* SSI_TOUCH_VERIFY */
            sum += *w;
            t1 = ssi_now_ns();
            int64_t bad = ssi_pattern_check((const void *)(uintptr_t)(t->base + off), span,
                                            t->seed, t->origin + off);
            if (bad >= 0) {
                int64_t at = (int64_t)off + bad;
                __atomic_add_fetch(&t->mismatches, 1, __ATOMIC_RELAXED);
                int64_t cur = __atomic_load_n(&t->first_bad, __ATOMIC_RELAXED);
                while ((cur < 0 || at < cur) &&
                       !__atomic_compare_exchange_n(&t->first_bad, &cur, at, 0,
                                                    __ATOMIC_RELAXED, __ATOMIC_RELAXED))
                    ;
            }
        }
        }
        if (t->lat_ns)
            t->lat_ns[i] = t1 - t0;
        __atomic_add_fetch(&t->done, 1, __ATOMIC_RELAXED);
    }
    __atomic_add_fetch(&t->checksum, sum, __ATOMIC_RELAXED);
    if (__atomic_sub_fetch(&t->running, 1, __ATOMIC_ACQ_REL) == 0)
        __atomic_store_n(&t->finished, 1, __ATOMIC_RELEASE);
    return NULL;
}

/* Start the threads; returns 0 or -errno (nothing left running on failure). */
int ssi_touch_start(struct ssi_touch *t)
{
    if (t->step == 0 || t->step % 8 || t->base % 8 || t->nthreads < 1 ||
        t->nthreads > SSI_TOUCH_MAX_THREADS)
        return -(t->err = EINVAL);
    t->naccess = (t->length + t->step - 1) / t->step;
    t->done = t->mismatches = t->checksum = 0;
    t->first_bad = -1;
    t->finished = 0;
    t->joined = 0;
    t->perm = NULL;
    if (t->order == SSI_ORDER_RANDOM && t->naccess > 1) {
        t->perm = malloc(sizeof(uint64_t) * t->naccess);
        if (!t->perm)
            return -(t->err = ENOMEM);
        uint64_t x = t->seed * 0x9E3779B97F4A7C15ull + 0x2545F4914F6CDD1Dull;
        for (uint64_t i = 0; i < t->naccess; i++)
            t->perm[i] = i;
        for (uint64_t i = t->naccess - 1; i > 0; i--) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            uint64_t j = x % (i + 1), tmp = t->perm[i];
            t->perm[i] = t->perm[j]; t->perm[j] = tmp;
        }
    }
    t->running = t->nthreads;
    for (int i = 0; i < t->nthreads; i++) {
        t->args[i].t = t;
        t->args[i].index = i;
        int rc = pthread_create(&t->threads[i], NULL, ssi_touch_thread, &t->args[i]);
        if (rc) {
            /* threads already started run to completion; account for the missing ones */
            for (int k = i; k < t->nthreads; k++)
                if (__atomic_sub_fetch(&t->running, 1, __ATOMIC_ACQ_REL) == 0)
                    __atomic_store_n(&t->finished, 1, __ATOMIC_RELEASE);
            for (int k = 0; k < i; k++)
                pthread_join(t->threads[k], NULL);
            free(t->perm);
            t->perm = NULL;
            t->joined = 1;
            return -(t->err = rc);
        }
    }
    return 0;
}

static int ssi_wait_flag(int *flag, int64_t timeout_ns)
{
    uint64_t deadline = timeout_ns < 0 ? 0 : ssi_now_ns() + (uint64_t)timeout_ns;
    struct timespec nap = { 0, 20000 };
    while (!__atomic_load_n(flag, __ATOMIC_ACQUIRE)) {
        if (timeout_ns >= 0 && ssi_now_ns() >= deadline)
            return 0;
        nanosleep(&nap, NULL);
    }
    return 1;
}

/* Wait up to timeout_ns (<0: forever); 1 and threads joined when finished, 0 on timeout. */
int ssi_touch_wait(struct ssi_touch *t, int64_t timeout_ns)
{
    if (!ssi_wait_flag(&t->finished, timeout_ns))
        return 0;
    if (!t->joined) {
        for (int i = 0; i < t->nthreads; i++)
            pthread_join(t->threads[i], NULL);
        free(t->perm);
        t->perm = NULL;
        t->joined = 1;
    }
    return 1;
}

static void *ssi_bg_thread(void *p)
{
    struct ssi_bg *b = p;
    int64_t r = 0;
    switch (b->op) {
    case SSI_BG_MADVISE:
        r = madvise((void *)(uintptr_t)b->a, b->b, (int)b->c) < 0 ? -errno : 0;
        break;
    case SSI_BG_MUNMAP:
        r = munmap((void *)(uintptr_t)b->a, b->b) < 0 ? -errno : 0;
        break;
    case SSI_BG_MREMAP: {
        int flags = MREMAP_MAYMOVE | (b->d ? MREMAP_FIXED : 0);
        void *q = mremap((void *)(uintptr_t)b->a, b->b, b->c, flags, (void *)(uintptr_t)b->d);
        r = q == MAP_FAILED ? -errno : (int64_t)(uintptr_t)q;
        break;
    }
    case SSI_BG_FORK_READ: {
        pid_t pid = fork();
        if (pid == 0) {
            unsigned char v = *(volatile unsigned char *)(uintptr_t)b->a;
            _exit(v == (unsigned char)b->b ? 0 : 1);
        }
        if (pid < 0) {
            r = -errno;
            break;
        }
        int status = 0;
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
            ;
        r = status;
        break;
    }
    case SSI_BG_READ:
        r = *(volatile unsigned char *)(uintptr_t)b->a;
        break;
    default:
        r = -EINVAL;
    }
    b->result = r;
    __atomic_store_n(&b->finished, 1, __ATOMIC_RELEASE);
    return NULL;
}

int ssi_bg_start(struct ssi_bg *b)
{
    b->finished = 0;
    b->joined = 0;
    b->result = 0;
    int rc = pthread_create(&b->thread, NULL, ssi_bg_thread, b);
    if (rc) {
        b->joined = 1;
        return -rc;
    }
    return 0;
}

int ssi_bg_wait(struct ssi_bg *b, int64_t timeout_ns)
{
    if (!ssi_wait_flag(&b->finished, timeout_ns))
        return 0;
    if (!b->joined) {
        pthread_join(b->thread, NULL);
        b->joined = 1;
    }
    return 1;
}
