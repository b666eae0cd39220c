/* ssi_uffd.h - the C side of pager.uffd._uffd_cffi: userfaultfd helpers, mman, the toucher,
 * the shared page installer and the fault loop. This header is the extension's preamble (cffi
 * set_source); the matching cdef declarations are the TYPES/FUNCTIONS strings in
 * the _cffi_src modules. Every helper returns -errno on failure.
 *
 * Constants newer than the build's linux/userfaultfd.h (Debian 12 ships Linux 6.1's) are
 * defined here from the kernel UAPI (Linux 6.8+) under #ifndef; SSI_HAS_<NAME> says whether the
 * build header had them (1) or the fallback was used (0). */
#ifndef SSI_UFFD_H
#define SSI_UFFD_H

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <linux/userfaultfd.h>

#include "ssip_wire.h"

#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1<<13)
#define SSI_HAS_UFFD_FEATURE_WP_UNPOPULATED 0
#else
#define SSI_HAS_UFFD_FEATURE_WP_UNPOPULATED 1
#endif
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1<<14)
#define SSI_HAS_UFFD_FEATURE_POISON 0
#else
#define SSI_HAS_UFFD_FEATURE_POISON 1
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1<<15)
#define SSI_HAS_UFFD_FEATURE_WP_ASYNC 0
#else
#define SSI_HAS_UFFD_FEATURE_WP_ASYNC 1
#endif
#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1<<16)
#define SSI_HAS_UFFD_FEATURE_MOVE 0
#else
#define SSI_HAS_UFFD_FEATURE_MOVE 1
#endif
#ifndef _UFFDIO_MOVE
#define _UFFDIO_MOVE (0x05)
#define SSI_HAS_UFFDIO_MOVE 0
#else
#define SSI_HAS_UFFDIO_MOVE 1
#endif
#ifndef _UFFDIO_POISON
#define _UFFDIO_POISON (0x08)
#define SSI_HAS_UFFDIO_POISON 0
#else
#define SSI_HAS_UFFDIO_POISON 1
#endif
#ifndef UFFDIO_CONTINUE_MODE_WP
#define UFFDIO_CONTINUE_MODE_WP ((__u64)1<<1)
#define SSI_HAS_UFFDIO_CONTINUE_MODE_WP 0
#else
#define SSI_HAS_UFFDIO_CONTINUE_MODE_WP 1
#endif
#ifndef UFFDIO_POISON_MODE_DONTWAKE
#define UFFDIO_POISON_MODE_DONTWAKE ((__u64)1<<0)
#define SSI_HAS_UFFDIO_POISON_MODE_DONTWAKE 0
#else
#define SSI_HAS_UFFDIO_POISON_MODE_DONTWAKE 1
#endif
#ifndef UFFDIO_MOVE_MODE_DONTWAKE
#define UFFDIO_MOVE_MODE_DONTWAKE ((__u64)1<<0)
#define SSI_HAS_UFFDIO_MOVE_MODE_DONTWAKE 0
#else
#define SSI_HAS_UFFDIO_MOVE_MODE_DONTWAKE 1
#endif
#ifndef UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES
#define UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES ((__u64)1<<1)
#define SSI_HAS_UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES 0
#else
#define SSI_HAS_UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES 1
#endif
#ifndef USERFAULTFD_IOC
#define USERFAULTFD_IOC 0xAA
#define SSI_HAS_USERFAULTFD_IOC 0
#else
#define SSI_HAS_USERFAULTFD_IOC 1
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(USERFAULTFD_IOC, 0x00)
#define SSI_HAS_USERFAULTFD_IOC_NEW 0
#else
#define SSI_HAS_USERFAULTFD_IOC_NEW 1
#endif
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#define SSI_HAS_UFFD_USER_MODE_ONLY 0
#else
#define SSI_HAS_UFFD_USER_MODE_ONLY 1
#endif
#ifndef UFFDIO_POISON
struct uffdio_poison {
    struct uffdio_range range;
    __u64 mode;
    __s64 updated;
};
#define UFFDIO_POISON _IOWR(UFFDIO, _UFFDIO_POISON, struct uffdio_poison)
#define SSI_HAS_STRUCT_UFFDIO_POISON 0
#else
#define SSI_HAS_STRUCT_UFFDIO_POISON 1
#endif
#ifndef UFFDIO_MOVE
struct uffdio_move {
    __u64 dst;
    __u64 src;
    __u64 len;
    __u64 mode;
    __s64 move;
};
#define UFFDIO_MOVE _IOWR(UFFDIO, _UFFDIO_MOVE, struct uffdio_move)
#define SSI_HAS_STRUCT_UFFDIO_MOVE 0
#else
#define SSI_HAS_STRUCT_UFFDIO_MOVE 1
#endif


#ifndef MFD_CLOEXEC
#define MFD_CLOEXEC 0x0001U
#endif
#ifndef MFD_HUGETLB
#define MFD_HUGETLB 0x0004U
#endif

/* ---- userfaultfd helpers (uffd.c) ---- */
#define SSI_EVENT_WORDS 4   /* words per decoded event in ssi_uffd_read()'s output */
#define SSI_READ_MAX 256

int ssi_uffd_open(int flags);
int ssi_uffd_open_dev(int flags);
int ssi_uffd_api(int fd, uint64_t features, struct uffdio_api *out);
int ssi_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls);
int ssi_uffd_range(int fd, unsigned long request, uint64_t start, uint64_t len);
int64_t ssi_uffd_copy(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode);
int64_t ssi_uffd_copy_buf(int fd, uint64_t dst, const void *src, uint64_t len, uint64_t mode);
int64_t ssi_uffd_zeropage(int fd, uint64_t start, uint64_t len, uint64_t mode);
int ssi_uffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode);
int64_t ssi_uffd_continue(int fd, uint64_t start, uint64_t len, uint64_t mode);
int64_t ssi_uffd_poison(int fd, uint64_t start, uint64_t len, uint64_t mode);
int64_t ssi_uffd_move(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode);
int ssi_uffd_read(int fd, uint64_t *out, int max_events);
int ssi_uffd_wait_read(int fd, uint64_t *out, int max_events, int timeout_ms);
uint64_t ssi_addr(const void *p);

/* ---- mman (mman.c): addresses, or (uint64_t)-errno for mmap/mremap ---- */
uint64_t ssi_mmap(uint64_t addr, uint64_t length, int prot, int flags, int fd, int64_t offset);
int ssi_munmap(uint64_t addr, uint64_t length);
int ssi_madvise(uint64_t addr, uint64_t length, int advice);
uint64_t ssi_mremap(uint64_t old, uint64_t old_len, uint64_t new_len, int flags, uint64_t new);
int ssi_memfd_create(const char *name, unsigned int flags);
int ssi_punch_hole(int fd, int64_t off, int64_t len);

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
int ssi_errno(void);

/* ---- the toucher (toucher.c) ---- */
#define SSI_TOUCH_READ 0
#define SSI_TOUCH_WRITE 1
#define SSI_TOUCH_FILL 2
#define SSI_TOUCH_VERIFY 3
#define SSI_ORDER_SEQ 0
#define SSI_ORDER_RANDOM 1
#define SSI_TOUCH_MAX_THREADS 64

struct ssi_touch;
struct ssi_touch_arg {
    struct ssi_touch *t;
    int index;
};

struct ssi_touch {
    uint64_t base, length, step, seed, origin;
    int op, order, nthreads, cpu;
    uint64_t *lat_ns;
    uint64_t naccess, done, mismatches;
    int64_t first_bad;
    uint64_t checksum;
    int finished, err;
    /* private */
    uint64_t *perm;
    int running;
    int joined;
    pthread_t threads[SSI_TOUCH_MAX_THREADS];
    struct ssi_touch_arg args[SSI_TOUCH_MAX_THREADS];
};

#define SSI_BG_MADVISE 0    /* madvise(a, b, c) */
#define SSI_BG_MUNMAP 1     /* munmap(a, b) */
#define SSI_BG_MREMAP 2     /* mremap(a, b, c, MREMAP_MAYMOVE|(d ? MREMAP_FIXED : 0), d) */
#define SSI_BG_FORK_READ 3  /* fork; child reads byte at a, exits 0 if it equals b; wait status */
#define SSI_BG_READ 4       /* read byte at a */

struct ssi_bg {
    int op;
    uint64_t a, b, c, d;
    int64_t result;
    int finished;
    pthread_t thread;
    int joined;
};

int ssi_touch_start(struct ssi_touch *t);
int ssi_touch_wait(struct ssi_touch *t, int64_t timeout_ns);
int ssi_bg_start(struct ssi_bg *b);
int ssi_bg_wait(struct ssi_bg *b, int64_t timeout_ns);
uint64_t ssi_pattern_word(uint64_t seed, uint64_t offset);
void ssi_pattern_fill(void *buf, uint64_t len, uint64_t seed, uint64_t origin);
int64_t ssi_pattern_check(const void *buf, uint64_t len, uint64_t seed, uint64_t origin);
void ssi_pattern_fill_at(uint64_t addr, uint64_t len, uint64_t seed, uint64_t origin);
int64_t ssi_pattern_check_at(uint64_t addr, uint64_t len, uint64_t seed, uint64_t origin);
uint64_t ssi_now_ns(void);

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

#endif /* SSI_UFFD_H */
