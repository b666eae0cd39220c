/* The page installer: the one implementation of "put these bytes at this address" for both fault
 * paths (the C fault loop calls it directly, the Python path through cffi).
 *
 * Kernel rules (linux/fs/userfaultfd.c):
 * - UFFDIO_COPY / ZEROPAGE stop with EEXIST at a page already present (readahead or an earlier
 *   fault filled it): the rest is finished page by page, then the range is woken (no waiter was).
 * - EAGAIN while a layout event is pending, ESRCH once the mm is gone, ...: returned as -errno
 *   for the caller's policy (defer and retry, end the client); nothing is retried here.
 *
 * Every resident range is appended to log->res (merged with the previous entry when contiguous
 * and installed the same way), so the caller knows residency exactly. */
#include "ssip_wire.h"
#include "ssi_uffd.h"

static void ssi_res_add(struct ssi_install_log *g, uint64_t addr, uint64_t len, uint64_t how)
{
    if (!len)
        return;
    if (g->nres) {
        struct ssi_res *p = &g->res[g->nres - 1];
        if (p->how == how && p->addr + p->len == addr) {
            p->len += len;
            return;
        }
    }
    if (g->nres >= g->max_res) {
        g->lost += len;
        return;
    }
    g->res[g->nres].addr = addr;
    g->res[g->nres].len = len;
    g->res[g->nres].how = how;
    g->nres++;
}

/* One ioctl: COPY of [dst, dst+len) from src (src != NULL) or ZEROPAGE. 0 or -errno;
   *done = bytes the kernel filled (also on failure). */
static int ssi_fill(int uffd, uint64_t dst, const uint8_t *src, uint64_t len, uint64_t mode,
                    int64_t *done)
{
    int rc;
    if (src) {
        struct uffdio_copy c = {.dst = dst, .src = (uint64_t)(uintptr_t)src, .len = len,
                                .mode = mode};
        rc = ioctl(uffd, UFFDIO_COPY, &c);
        *done = rc == 0 ? (int64_t)len : c.copy;
    } else {
        struct uffdio_zeropage z = {.range = {.start = dst, .len = len}};
        rc = ioctl(uffd, UFFDIO_ZEROPAGE, &z);
        *done = rc == 0 ? (int64_t)len : z.zeropage;
    }
    if (*done < 0)
        *done = 0;
    return rc == 0 ? 0 : -errno;
}

static void ssi_count(struct ssi_install_log *g, uint64_t dst, const uint8_t *src, uint64_t len,
                      uint64_t page)
{
    if (src)
        g->copied_bytes += len;
    else
        g->zero_pages += len / page;
    ssi_res_add(g, dst, len, src ? SSI_RES_COPY : SSI_RES_ZERO);
}

/* One run of one kind; EEXIST finished page by page and woken. */
static int ssi_install_run(int uffd, uint64_t dst, const uint8_t *src, uint64_t len,
                           uint64_t page, uint64_t mode, struct ssi_install_log *g)
{
    int64_t done;
    int rc = ssi_fill(uffd, dst, src, len, mode, &done);
    ssi_count(g, dst, src, (uint64_t)done, page);
    if (rc == 0)
        return 0;
    if (rc != -EEXIST && done == 0)
        return rc;
    /* the kernel stopped at a page already present (or a changing mapping) */
    g->eexist++;
    for (uint64_t off = (uint64_t)done; off < len; off += page) {
        int64_t one;
        rc = ssi_fill(uffd, dst + off, src ? src + off : NULL, page, mode, &one);
        if (rc == 0)
            ssi_count(g, dst + off, src ? src + off : NULL, page, page);
        else if (rc == -EEXIST)
            ssi_res_add(g, dst + off, page, SSI_RES_EEXIST);
        else
            return rc;
    }
    struct uffdio_range w = {.start = dst + (uint64_t)done, .len = len - (uint64_t)done};
    return ioctl(uffd, UFFDIO_WAKE, &w) < 0 ? -errno : 0;
}

static int ssi_bit(const uint64_t *mask, uint64_t i)
{
    return (int)(mask[i / 64] >> (i % 64) & 1);
}

/* Install len bytes at dst: address src holds them (0: all zero pages). Bit i of zero_mask (NULL:
   none) says wire page i (SSIP_PAGE_SIZE bytes) was never written: those become zero pages.
   A huge page (page_size > SSIP_PAGE_SIZE) or a write-protected copy (mode has
   UFFDIO_COPY_MODE_WP) has no zero-page ioctl: its never-written parts are zeroed in src and
   the whole is copied (src 0: copied from fresh anonymous memory, logged as copies). 0, or -errno (what was installed before the error is in the log). */
int ssi_install(int uffd, uint64_t dst, uint64_t src, uint64_t len, const uint64_t *zero_mask,
                uint64_t page_size, uint64_t mode, struct ssi_install_log *log)
{
    uint8_t *s = (uint8_t *)(uintptr_t)src;
    if (!page_size || page_size % SSIP_PAGE_SIZE || len % page_size || dst % page_size)
        return -EINVAL;
    int whole = page_size > SSIP_PAGE_SIZE || (mode & UFFDIO_COPY_MODE_WP);
    if (!s && !whole)
        return ssi_install_run(uffd, dst, NULL, len, page_size, 0, log);
    if (!s) {  /* no zero-page ioctl here: copy from fresh anonymous memory (reads as zeros) */
        void *z = mmap(NULL, len, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (z == MAP_FAILED)
            return -errno;
        int rc = ssi_install_run(uffd, dst, z, len, page_size, mode, log);
        munmap(z, len);
        return rc;
    }
    uint64_t n = len / SSIP_PAGE_SIZE;
    int any = 0;
    for (uint64_t w = 0; zero_mask && w < (n + 63) / 64 && !any; w++)
        any = zero_mask[w] != 0;
    if (!any)
        return ssi_install_run(uffd, dst, s, len, page_size, mode, log);
    if (whole) {
        for (uint64_t i = 0; i < n; i++)
            if (ssi_bit(zero_mask, i))
                memset(s + i * SSIP_PAGE_SIZE, 0, SSIP_PAGE_SIZE);
        return ssi_install_run(uffd, dst, s, len, page_size, mode, log);
    }
    for (uint64_t i = 0; i < n;) {
        int zero = ssi_bit(zero_mask, i);
        uint64_t j = i + 1;
        while (j < n && ssi_bit(zero_mask, j) == zero)
            j++;
        uint64_t off = i * SSIP_PAGE_SIZE;
        int rc = ssi_install_run(uffd, dst + off, zero ? NULL : s + off,
                                 (j - i) * SSIP_PAGE_SIZE, page_size, mode, log);
        if (rc < 0)
            return rc;
        i = j;
    }
    return 0;
}
