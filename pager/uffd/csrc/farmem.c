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
 * ignores listed units it does not hold. */
#include <sched.h>

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
