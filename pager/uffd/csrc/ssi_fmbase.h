/* ssi_fmbase.h - the far-memory baseline of `bench farmem` (fmbase.c).
 * Part of ssi_uffd.h (include that); also the cffi cdef of pager.uffd._uffd_cffi,
 * read by pager/uffd/_cffi_src, so every declaration here exists once. */
#ifndef SSI_FMBASE_H
#define SSI_FMBASE_H

struct ssi_fmb {
    uint64_t base;          /* registered range (MISSING|WP), offset 0 of memfd */
    uint64_t npages;        /* 4 KiB pages */
    int uffd;
    int memfd;
    uint64_t limit_pages;   /* resident limit */
    int poll_us;            /* polling window of every reader, uffd and sockets (0: block) */
    int batch;              /* victims per eviction batch */
    int remote;             /* 1: the store is behind TCP loopback (a thread serving it) */
    int all_dirty;          /* 1: no dirty tracking: installed writable, every victim stored */
    /* counters */
    uint64_t missing;
    uint64_t wp;
    uint64_t evicted;
    uint64_t written_back;
    uint64_t waits;         /* faults that waited for room under the limit */
    int error;              /* first errno a thread met (0: none) */
    void *priv;
};
int ssi_fmb_start(struct ssi_fmb *b);
void ssi_fmb_stop(struct ssi_fmb *b);

#endif /* SSI_FMBASE_H */
