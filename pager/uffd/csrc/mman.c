/* sys/mman.h and memfd for the binding's users and tests: plain addresses, GIL released. */
#include "ssi_uffd.h"

/* mmap/mremap return the address, or (uint64_t)-errno (values above -4096 are errors). */
uint64_t ssi_mmap(uint64_t addr, uint64_t length, int prot, int flags, int fd,
                         int64_t offset)
{
    void *p = mmap((void *)(uintptr_t)addr, length, prot, flags, fd, (off_t)offset);
    return p == MAP_FAILED ? (uint64_t)(-(int64_t)errno) : (uint64_t)(uintptr_t)p;
}

int ssi_munmap(uint64_t addr, uint64_t length)
{
    return munmap((void *)(uintptr_t)addr, length) < 0 ? -errno : 0;
}

int ssi_madvise(uint64_t addr, uint64_t length, int advice)
{
    return madvise((void *)(uintptr_t)addr, length, advice) < 0 ? -errno : 0;
}

uint64_t ssi_mremap(uint64_t old, uint64_t old_len, uint64_t new_len, int flags,
                           uint64_t new)
{
    void *p = mremap((void *)(uintptr_t)old, old_len, new_len, flags, (void *)(uintptr_t)new);
    return p == MAP_FAILED ? (uint64_t)(-(int64_t)errno) : (uint64_t)(uintptr_t)p;
}

int ssi_memfd_create(const char *name, unsigned int flags)
{
    int fd = (int)syscall(__NR_memfd_create, name, flags);
    return fd < 0 ? -errno : fd;
}

int ssi_errno(void)
{
    return errno;
}

/* Free [off, off+len) of a shmem/memfd file (FALLOC_FL_PUNCH_HOLE | KEEP_SIZE): the pages leave
   the page cache and read as holes; mappings of them fault again. 0 or -errno. */
int ssi_punch_hole(int fd, int64_t off, int64_t len)
{
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) < 0
               ? -errno : 0;
}
