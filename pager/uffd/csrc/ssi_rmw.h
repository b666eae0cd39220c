/* ssi_rmw.h - the far-memory workload (rmw.c).
 * Part of ssi_uffd.h (include that); also the cffi cdef of pager.uffd._uffd_cffi,
 * read by pager/uffd/_cffi_src, so every declaration here exists once. */
#ifndef SSI_RMW_H
#define SSI_RMW_H

/* rmw.c: the far-memory workload (random reads and read-modify-writes checked against a model) */
#define SSI_RMW_MAX_THREADS 64
struct ssi_rmw {
    uint64_t base;      /* first page */
    uint64_t npages;
    uint64_t page;      /* bytes per page */
    uint64_t ops;       /* operations per thread */
    uint64_t seed;
    int nthreads;
    int write_pct;      /* percent of operations that are read-modify-writes */
    int hot_pages;      /* skew: hot_ops percent of operations on the first hot_pages percent */
    int hot_ops;        /* 0: uniform */
    uint64_t *model;    /* npages counters, outside the paged memory */
    uint64_t done;
    uint64_t errors;
    int64_t first_bad;
    uint64_t checksum;
    int fill;                           /* writes fill the page (rmw.c) */
};
int ssi_rmw_run(struct ssi_rmw *w);
uint64_t ssi_rmw_check(struct ssi_rmw *w);

#endif /* SSI_RMW_H */
