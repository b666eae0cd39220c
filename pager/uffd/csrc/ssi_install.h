/* ssi_install.h - the page installer (install.c).
 * Part of ssi_uffd.h (include that); also the cffi cdef of pager.uffd._uffd_cffi,
 * read by pager/uffd/_cffi_src, so every declaration here exists once. */
#ifndef SSI_INSTALL_H
#define SSI_INSTALL_H

/* ---- the page installer (install.c): the one implementation of UFFDIO_COPY/ZEROPAGE,
 * EEXIST and zero masks, used by the C fault loop and by the Python path ---- */
#define SSI_WIRE_PAGE SSIP_PAGE_SIZE  /* the zero mask's granule */
#define SSI_RES_COPY 0      /* installed with UFFDIO_COPY */
#define SSI_RES_ZERO 1      /* installed with UFFDIO_ZEROPAGE */
#define SSI_RES_EEXIST 2    /* found present (someone else installed it) */

struct ssi_res {            /* one resident chunk */
    uint64_t addr;
    uint64_t len;
    uint64_t how;           /* SSI_RES_* */
};

struct ssi_install_log {
    uint64_t copied_bytes;  /* counters, added to */
    uint64_t zero_pages;
    uint64_t eexist;
    uint64_t lost;          /* bytes installed with no room left in res (caller's bug) */
    uint32_t nres;          /* res[0:nres] filled; the caller drains and resets it */
    uint32_t max_res;
    struct ssi_res *res;
};

int ssi_install(int uffd, uint64_t dst, uint64_t src, uint64_t len, const uint64_t *zero_mask,
                uint64_t page_size, uint64_t mode, struct ssi_install_log *log);

#endif /* SSI_INSTALL_H */
