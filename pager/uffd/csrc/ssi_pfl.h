/* ssi_pfl.h - the fault loop (faultloop.c).
 * Part of ssi_uffd.h (include that); also the cffi cdef of pager.uffd._uffd_cffi,
 * read by pager/uffd/_cffi_src, so every declaration here exists once. */
#ifndef SSI_PFL_H
#define SSI_PFL_H

/* ---- the fault loop (faultloop.c) ---- */
#define SSI_PFL_MAX_REGIONS 64
#define SSI_PFL_MAX_SLOW 256
#define SSI_PFL_MAX_WAKE 2
#define SSI_PFL_NBUCKETS 15
#define SSI_PFL_MAX_FETCH (2u << 20)  /* largest fetch C serves (a 2 MiB page); more: Python */
#define SSI_PFL_MAX_EVICT 64
#define SSI_PFL_MAX_DIRTY 256
#define SSI_PFL_MAX_VICTIMS 1024  /* units of one eviction batch (write faults there: Python) */
#define SSI_PFL_MAX_WPD 4096     /* units C un-protected for a write, not yet taken */
#define SSI_PFL_MAX_WATCH 16
#define SSI_PFL_MAX_LANES 64
#define SSI_PFL_BY_EXTENT (-2)  /* a region's lane: each extent's own, in its ext[] table */

#define SSI_PFL_IDLE 0
#define SSI_PFL_WAKE 1
#define SSI_PFL_EVENTS 2
#define SSI_PFL_FETCH_ERROR 3
#define SSI_PFL_READ_ERROR 4

#define SSI_PFL_PROTO_SSIP 0
#define SSI_PFL_PROTO_RAW 1

/* A connection the loop fetches on: a memory node's fault lane for one space. */
struct ssi_pfl_lane {
    int sock;           /* socket; -1: faults routed here go to Python */
    int proto;          /* SSI_PFL_PROTO_* */
    uint32_t space;     /* the space's handle on that connection */
    void *ssl;          /* that socket's TLS session (SSL *, transport/tlsc); NULL: plain */
};

struct ssi_pfl_region {
    uint64_t base;      /* host address */
    uint64_t size;      /* bytes */
    uint64_t gpa;       /* offset of base in the region's space */
    uint64_t page_size; /* the region's page size */
    int lane;           /* index in lanes[] serving every extent; -1: faults here go to
                           Python; SSI_PFL_BY_EXTENT: ext[] names each extent's lane */
    uint32_t next;      /* entries of ext[] */
    const int16_t *ext; /* lane of extent (gpa >> ext_shift) + i, -1: Python's */
};

struct ssi_pfl_stats {
    uint64_t faults;
    uint64_t faults_write;
    uint64_t served_fetch;
    uint64_t served_dup;
    uint64_t fetched_bytes;
    uint64_t faults_wp;                 /* far memory: write-protect faults read, and those */
    uint64_t wp_dirty;                  /* C resolved (unit dirty, protection cleared) */
    uint64_t latency_sum_us;
    uint64_t latency_count;
    uint64_t latency_buckets[SSI_PFL_NBUCKETS];
};

struct ssi_pfl {
    int uffd;
    int nwake;
    int wake_fds[SSI_PFL_MAX_WAKE];     /* readable -> SSI_PFL_WAKE */
    uint64_t chunk;                     /* chunk size (power of two) */
    int nregions;
    struct ssi_pfl_region regions[SSI_PFL_MAX_REGIONS];
    int nlanes;
    struct ssi_pfl_lane lanes[SSI_PFL_MAX_LANES];
    int ext_shift;                      /* log2 of an extent (the placement unit) */
    /* routing generation: while *route_gen differs from route_gen_seen (a node failed,
       an extent moved, since the table was built) every fault goes to Python; NULL: none */
    const uint64_t *route_gen;
    uint64_t route_gen_seen;
    int err_lane;                       /* on SSI_PFL_FETCH_ERROR: the lane that failed */
    int nslow;                          /* sorted, disjoint [start, end) host ranges */
    uint64_t slow_start[SSI_PFL_MAX_SLOW];
    uint64_t slow_end[SSI_PFL_MAX_SLOW];
    uint64_t *events;                   /* 4 words per event, max_events of them */
    int max_events;
    uint8_t *buf;                       /* chunk buffer */
    uint64_t buf_size;
    uint64_t bucket_us[SSI_PFL_NBUCKETS - 1];
    int timeout_ms;                     /* poll timeout -> SSI_PFL_IDLE */
    uint64_t max_ns;                    /* serve at most this long per call -> SSI_PFL_IDLE */
    uint64_t poll_ns;                   /* adaptive polling: read without blocking this long
                                           after the last event before poll() (0: off) */
    uint64_t last_event_ns;             /* when the last event was read or served */
    uint64_t poll_skip_until;           /* no polling before (back-off, ssip_poll.h) */
    uint64_t poll_backoff_ns;
    uint32_t req;                       /* last request id */
    int first;                          /* on return: events[first:n] are Python's */
    int n;
    int err;                            /* errno of SSI_PFL_FETCH_ERROR / SSI_PFL_READ_ERROR */
    struct ssi_pfl_stats stats;
    struct ssi_install_log log;         /* install counters and the residency ring */
    /* far memory (a client under a resident limit; all zero otherwise) */
    int farmem;                         /* installs write-protected, within budget */
    int64_t budget;                     /* bytes the loop may still install (Python sets it) */
    /* ranges the evictor is working on (end 0: a free slot), written by the evictor thread
       while the loop runs: published before the punch, cleared after the wake */
    uint64_t evict_start[SSI_PFL_MAX_EVICT];
    uint64_t evict_end[SSI_PFL_MAX_EVICT];
    int ndirty;                         /* chunks installed writable for a write fault */
    uint64_t dirty[SSI_PFL_MAX_DIRTY];
    /* write-protect faults served by C (farmem.c), under fm_lock (a spin lock shared with the
       evictor thread): the units of the evictor's batch (sorted starts, published before it
       write-protects them, cleared after its last wake) are never un-protected by C; every
       unit C un-protects is listed in wpd until Python takes it (dirty from then on) */
    int fm_lock;
    int nvictims;
    uint64_t victims[SSI_PFL_MAX_VICTIMS];
    int nwpd;
    uint64_t wpd[SSI_PFL_MAX_WPD];
    /* sequential streams (readahead on: nwatch > 0): the chunk after each of the last nwatch
       chunks the loop served; a fault there is Python's (its stream detector decides) */
    int nwatch;
    uint32_t watch_next;
    uint64_t watch[SSI_PFL_MAX_WATCH];
};

int ssi_pfl_run(struct ssi_pfl *l);
int ssi_pfl_wp_fault(struct ssi_pfl *l, uint64_t start, uint64_t len);
int ssi_pfl_set_victims(struct ssi_pfl *l, const uint64_t *starts, int n);
int ssi_pfl_take_wp(struct ssi_pfl *l, uint64_t *out, int max);
int ssi_pfl_fm_busy(struct ssi_pfl *l, uint64_t start);

/* ---- far memory's batch I/O (farmem.c) ---- */
/* one dirty stretch of an eviction batch: len bytes at memfd offset off, stored at gpa */
struct ssi_fm_store {
    uint64_t off;
    uint64_t gpa;
    uint64_t len;
};
int ssi_fm_write_back(int memfd, int sock, void *ssl, uint32_t space,
                      struct ssi_fm_store *st, int n, uint8_t *buf, uint64_t buf_size,
                      uint32_t *req, int timeout_ms);
int ssi_fm_punch(int memfd, const uint64_t *offs, const uint64_t *lens, int n, int *failed);
int ssi_fm_wake(int uffd, const uint64_t *addrs, const uint64_t *lens, int n);
int ssi_fm_protect(int uffd, const uint64_t *addrs, const uint64_t *lens, int n, int *err);

#endif /* SSI_PFL_H */
