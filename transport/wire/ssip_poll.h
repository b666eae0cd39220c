/* ssip_poll.h - adaptive polling helpers shared by the pager's C fault loop and the memory
 * node's C fault lane (transport/polling.py says what the window is for). */
#ifndef SSIP_POLL_H
#define SSIP_POLL_H

#include <errno.h>
#include <limits.h>
#include <sched.h>
#include <stdint.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>

#define SSIP_POLL_PREEMPTED_NS 100000u        /* 100 µs between two reads: preempted */
#define SSIP_POLL_BACKOFF_MIN_NS 1000000u     /* first back-off after a preemption */
#define SSIP_POLL_BACKOFF_MAX_NS 1000000000u  /* longest back-off */
#define SSIP_POLL_UNCOUNTED LONG_MIN          /* a window's switch count, not taken yet */

static inline uint64_t ssip_mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Between two non-blocking reads of a polling window (k counts them from 1): every fourth
 * yields, so a thread that must run for the next event to come (on a small host: the guest's
 * vCPU, the client's faulting thread) gets the CPU; the others pause. */
static inline void ssip_poll_relax(unsigned k)
{
    if (k % 4 == 0)
        sched_yield();
#if defined(__x86_64__) || defined(__i386__)
    else
        __builtin_ia32_pause();
#endif
}

/* Whether polling may start now: a window (window > 0) and no back-off in force. */
static inline int ssip_poll_allowed(uint64_t window, uint64_t skip_until, uint64_t now)
{
    return window && now >= skip_until;
}

/* The calling thread's involuntary context switches so far (-1: not known). A yield that let
 * another thread run counts one, and so does a preemption; time the host took the whole vCPU
 * away (steal) does not, as the guest kernel switched nothing. */
static inline long ssip_thread_preemptions(void)
{
    struct rusage r;
    return getrusage(RUSAGE_THREAD, &r) ? -1 : r.ru_nivcsw;
}

/* Whether a polling window should end: it is over, or this thread was just preempted (a gap
 * between two reads far longer than one read, and the thread's involuntary switches rose:
 * a yield let a CPU-bound thread run for its time slice). A yielding thread stays runnable
 * and loses the wakeup preemption a sleeping one gets, so on a busy host it would wait whole
 * time slices for its own events: after a preemption polling backs off (no spinning for 1 ms,
 * doubling to 1 s while it repeats, reset by a window that ends in data). A long gap with no
 * switch is the vCPU stolen by its host: no other thread wanted this CPU, so the window goes
 * on. ``*prev`` is the last read's time; ``*switches`` the thread's switches when the window
 * was first checked (SSIP_POLL_UNCOUNTED before: the first check takes it, so a window served
 * by its first read costs no system call for it; a count that cannot be read backs off on
 * every long gap, as before). */
static inline int ssip_poll_over(uint64_t start, uint64_t window, uint64_t *prev,
                                 uint64_t *skip_until, uint64_t *backoff, long *switches)
{
    uint64_t now = ssip_mono_ns();
    uint64_t gap = now - *prev;
    *prev = now;
    if (*switches == SSIP_POLL_UNCOUNTED)
        *switches = ssip_thread_preemptions();
    else if (gap > SSIP_POLL_PREEMPTED_NS) {
        long seen = ssip_thread_preemptions();
        if (seen < 0 || seen != *switches) {
            *backoff = *backoff ? (*backoff * 2 > SSIP_POLL_BACKOFF_MAX_NS
                                   ? SSIP_POLL_BACKOFF_MAX_NS : *backoff * 2)
                                : SSIP_POLL_BACKOFF_MIN_NS;
            *skip_until = now + *backoff;
            return 1;
        }
    }
    return now - start >= window;
}

/* The window's own adaptation (the halt-polling rule of Linux's cpuidle-haltpoll and KVM):
 * ``idle`` is the time from the previous event to the one that just came. An event that came
 * after the window had ended but within ``max`` would have been caught by a longer window:
 * double it (up to ``max``); an idle time longer than ``max`` means the events stopped: halve it
 * (down to ``base``). A lane that sees every few faults of a busy guest (one replica among
 * several) thus spins over its gaps, and an idle one goes back to ``base`` and sleeps. */
static inline void ssip_poll_adapt(uint64_t *window, uint64_t base, uint64_t max,
                                   uint64_t idle)
{
    if (!base || max <= base)
        return;
    if (idle > max)
        *window = *window / 2 > base ? *window / 2 : base;
    else if (idle > *window)
        *window = *window * 2 < max ? *window * 2 : max;
}

/* recvmsg with adaptive polling: non-blocking reads from ``start`` until ``window`` has passed
 * (or a preemption ended it), then a blocking read. What recvmsg returned (-1: errno). */
static inline ssize_t ssip_recvmsg_polling(int fd, struct msghdr *msg, uint64_t start,
                                           uint64_t window, uint64_t *skip_until,
                                           uint64_t *backoff)
{
    ssize_t n;
    uint64_t prev = ssip_mono_ns();
    if (prev - start < window && ssip_poll_allowed(window, *skip_until, prev)) {
        unsigned k = 1;
        long switches = SSIP_POLL_UNCOUNTED;
        do {
            n = recvmsg(fd, msg, MSG_DONTWAIT);
            if (n >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
                *backoff = 0;
                return n;
            }
            ssip_poll_relax(k++);
        } while (!ssip_poll_over(start, window, &prev, skip_until, backoff, &switches));
    }
    do {
        n = recvmsg(fd, msg, 0);
    } while (n < 0 && errno == EINTR);
    return n;
}

#endif /* SSIP_POLL_H */
