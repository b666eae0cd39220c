/* ssip_poll.h - adaptive polling helpers shared by the pager's C fault loop and the memory
 * node's C fault lane (transport/polling.py says what the window is for). */
#ifndef SSIP_POLL_H
#define SSIP_POLL_H

#include <sched.h>
#include <stdint.h>
#include <time.h>

static inline uint64_t ssip_mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Between two non-blocking reads of a polling window (k counts them from 1): every fourth
 * gives the CPU to any runnable thread (on a small host, the guest's), the others pause. */
static inline void ssip_poll_relax(unsigned k)
{
    if (k % 4 == 0)
        sched_yield();
#if defined(__x86_64__) || defined(__i386__)
    else
        __builtin_ia32_pause();
#endif
}

#endif /* SSIP_POLL_H */
