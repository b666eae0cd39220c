"""The toucher: C pthreads that touch, fill or verify memory without holding the GIL.

Page faults on userfaultfd-registered memory block the faulting thread until the handler
resolves them; if that thread held the GIL, a Python handler could never run. The toucher
threads and the background syscall thread are plain pthreads started from C, so Python can serve
the faults (or read the events) meanwhile.

Content pattern: the 64-bit word at byte offset ``o`` of the address space (relative offset plus
``origin``) is ``ssi_pattern_word(seed, o)``; ``ssi_pattern_fill`` / ``ssi_pattern_check`` apply
it to a buffer so sources and checks agree without Python loops.
"""

TYPES = """
#define SSI_TOUCH_READ ...
#define SSI_TOUCH_WRITE ...
#define SSI_TOUCH_FILL ...
#define SSI_TOUCH_VERIFY ...
#define SSI_ORDER_SEQ ...
#define SSI_ORDER_RANDOM ...
#define SSI_TOUCH_MAX_THREADS ...

struct ssi_touch {
    uint64_t base;        /* first byte touched */
    uint64_t length;      /* bytes */
    uint64_t step;        /* bytes between accesses, usually the page size */
    uint64_t seed;        /* content pattern seed */
    uint64_t origin;      /* offset of base in the pattern's address space */
    int op;               /* SSI_TOUCH_* */
    int order;            /* SSI_ORDER_* */
    int nthreads;         /* 1..SSI_TOUCH_MAX_THREADS */
    int cpu;              /* -1: no pinning; else pin thread i to cpu + i */
    uint64_t *lat_ns;     /* NULL or naccess slots: latency of the first access of each step */
    uint64_t naccess;     /* accesses planned (set by start) */
    uint64_t done;        /* accesses done */
    uint64_t mismatches;  /* steps whose content differed from the pattern (VERIFY) */
    int64_t first_bad;    /* lowest byte offset (from base) of a mismatching word, or -1 */
    uint64_t checksum;    /* sum of words read (READ), so reads are not optimised away */
    int finished;         /* set when every thread has returned */
    int err;              /* errno of a failed start */
    ...;
};

#define SSI_BG_MADVISE ...
#define SSI_BG_MUNMAP ...
#define SSI_BG_MREMAP ...
#define SSI_BG_FORK_READ ...
#define SSI_BG_READ ...

struct ssi_bg {
    int op;               /* SSI_BG_* */
    uint64_t a, b, c, d;  /* arguments (see ssi_bg_start) */
    int64_t result;       /* return value, or -errno */
    int finished;
    ...;
};
"""

FUNCTIONS = """
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
"""
