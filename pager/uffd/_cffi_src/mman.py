"""sys/mman.h and memfd: mapping memory at a known address for the binding's users and tests.

Python's ``mmap`` module hides the address and cannot mremap to a fixed place; these calls
release the GIL and return plain addresses.
"""

INCLUDES = """
#include <sys/mman.h>
"""

TYPES = """
#define PROT_NONE ...
#define PROT_READ ...
#define PROT_WRITE ...
#define MAP_SHARED ...
#define MAP_PRIVATE ...
#define MAP_ANONYMOUS ...
#define MAP_FIXED ...
#define MAP_NORESERVE ...
#define MAP_POPULATE ...
#define MAP_HUGETLB ...
#define MADV_DONTNEED ...
#define MADV_REMOVE ...
#define MADV_NOHUGEPAGE ...
#define MREMAP_MAYMOVE ...
#define MREMAP_FIXED ...
#define MFD_CLOEXEC ...
#define MFD_HUGETLB ...
"""

FUNCTIONS = """
uint64_t ssi_mmap(uint64_t addr, uint64_t length, int prot, int flags, int fd, int64_t offset);
int ssi_munmap(uint64_t addr, uint64_t length);
int ssi_madvise(uint64_t addr, uint64_t length, int advice);
uint64_t ssi_mremap(uint64_t old, uint64_t old_len, uint64_t new_len, int flags, uint64_t new);
int ssi_memfd_create(const char *name, unsigned int flags);
int ssi_errno(void);
"""

CUSTOMIZATIONS = """
#ifndef MFD_CLOEXEC
#define MFD_CLOEXEC 0x0001U
#endif
#ifndef MFD_HUGETLB
#define MFD_HUGETLB 0x0004U
#endif

/* mmap/mremap return the address, or (uint64_t)-errno (values above -4096 are errors). */
static uint64_t ssi_mmap(uint64_t addr, uint64_t length, int prot, int flags, int fd,
                         int64_t offset)
{
    void *p = mmap((void *)(uintptr_t)addr, length, prot, flags, fd, (off_t)offset);
    return p == MAP_FAILED ? (uint64_t)(-(int64_t)errno) : (uint64_t)(uintptr_t)p;
}

static int ssi_munmap(uint64_t addr, uint64_t length)
{
    return munmap((void *)(uintptr_t)addr, length) < 0 ? -errno : 0;
}

static int ssi_madvise(uint64_t addr, uint64_t length, int advice)
{
    return madvise((void *)(uintptr_t)addr, length, advice) < 0 ? -errno : 0;
}

static uint64_t ssi_mremap(uint64_t old, uint64_t old_len, uint64_t new_len, int flags,
                           uint64_t new)
{
    void *p = mremap((void *)(uintptr_t)old, old_len, new_len, flags, (void *)(uintptr_t)new);
    return p == MAP_FAILED ? (uint64_t)(-(int64_t)errno) : (uint64_t)(uintptr_t)p;
}

static int ssi_memfd_create(const char *name, unsigned int flags)
{
    int fd = (int)syscall(__NR_memfd_create, name, flags);
    return fd < 0 ? -errno : fd;
}

static int ssi_errno(void)
{
    return errno;
}
"""
