/* ssi_uffd.h - the C side of pager.uffd._uffd_cffi: userfaultfd helpers, mman, the toucher,
 * the shared page installer and the fault loop. This header is the extension's preamble (cffi
 * set_source); the cdef of the project's own declarations is read from the headers it
 * includes (ssi_rmw.h, ssi_fmbase.h, ssi_install.h, ssi_pfl.h), the rest are the
 * TYPES/FUNCTIONS strings of the _cffi_src modules. Every helper returns -errno on failure.
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

#include "ssi_rmw.h"
#include "ssi_fmbase.h"
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

#include "ssi_install.h"
#include "ssi_pfl.h"

/* farmem.c, for fmbase.c too (C only: not in the cffi cdef) */
struct iovec;
int ssi_fm_sendv(int sock, struct iovec *v, int n);

#endif /* SSI_UFFD_H */
