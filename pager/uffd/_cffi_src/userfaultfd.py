"""linux/userfaultfd.h: structs, event kinds, feature / ioctl / mode bits, and thin C helpers.

Every constant is ``...`` in the cdef: its value comes from the header the extension is compiled
against. Values newer than that header (Debian 12 ships Linux 6.1's) are defined in
``csrc/ssi_uffd.h`` under ``#ifndef`` from the kernel UAPI (include/uapi/linux/userfaultfd.h,
Linux 6.8+), and ``SSI_HAS_<NAME>`` says whether the build header had them (1) or the fallback
was used (0); ``NEWER`` lists them. Whether the *running* kernel supports them is detected at
run time (UFFDIO_API features, the ioctl mask UFFDIO_REGISTER returns), never assumed from these
flags.

The helpers (``csrc/uffd.c``) put the ioctl argument struct on the C stack, so one cffi call
does one ioctl with no Python allocation, and they are safe to call from several threads at once.
"""

# constants whose value is read from the header at build time
CONSTANTS = [
    "UFFD_API", "UFFDIO",
    # what the build header's kernel offered (run-time detection decides what is used)
    "UFFD_API_REGISTER_MODES", "UFFD_API_FEATURES", "UFFD_API_IOCTLS", "UFFD_API_RANGE_IOCTLS",
    "UFFD_API_RANGE_IOCTLS_BASIC",
    "UFFD_USER_MODE_ONLY",
    "USERFAULTFD_IOC", "USERFAULTFD_IOC_NEW",
    # event kinds and page-fault flags
    "UFFD_EVENT_PAGEFAULT", "UFFD_EVENT_FORK", "UFFD_EVENT_REMAP", "UFFD_EVENT_REMOVE",
    "UFFD_EVENT_UNMAP",
    "UFFD_PAGEFAULT_FLAG_WRITE", "UFFD_PAGEFAULT_FLAG_WP", "UFFD_PAGEFAULT_FLAG_MINOR",
    # features
    "UFFD_FEATURE_PAGEFAULT_FLAG_WP", "UFFD_FEATURE_EVENT_FORK", "UFFD_FEATURE_EVENT_REMAP",
    "UFFD_FEATURE_EVENT_REMOVE", "UFFD_FEATURE_MISSING_HUGETLBFS", "UFFD_FEATURE_MISSING_SHMEM",
    "UFFD_FEATURE_EVENT_UNMAP", "UFFD_FEATURE_SIGBUS", "UFFD_FEATURE_THREAD_ID",
    "UFFD_FEATURE_MINOR_HUGETLBFS", "UFFD_FEATURE_MINOR_SHMEM", "UFFD_FEATURE_EXACT_ADDRESS",
    "UFFD_FEATURE_WP_HUGETLBFS_SHMEM", "UFFD_FEATURE_WP_UNPOPULATED", "UFFD_FEATURE_POISON",
    "UFFD_FEATURE_WP_ASYNC", "UFFD_FEATURE_MOVE",
    # ioctl numbers (bit positions in the ioctl masks) and request codes
    "_UFFDIO_REGISTER", "_UFFDIO_UNREGISTER", "_UFFDIO_WAKE", "_UFFDIO_COPY",
    "_UFFDIO_ZEROPAGE", "_UFFDIO_MOVE", "_UFFDIO_WRITEPROTECT", "_UFFDIO_CONTINUE",
    "_UFFDIO_POISON", "_UFFDIO_API",
    "UFFDIO_API", "UFFDIO_REGISTER", "UFFDIO_UNREGISTER", "UFFDIO_WAKE", "UFFDIO_COPY",
    "UFFDIO_ZEROPAGE", "UFFDIO_MOVE", "UFFDIO_WRITEPROTECT", "UFFDIO_CONTINUE",
    "UFFDIO_POISON",
    # modes
    "UFFDIO_REGISTER_MODE_MISSING", "UFFDIO_REGISTER_MODE_WP", "UFFDIO_REGISTER_MODE_MINOR",
    "UFFDIO_COPY_MODE_DONTWAKE", "UFFDIO_COPY_MODE_WP",
    "UFFDIO_ZEROPAGE_MODE_DONTWAKE",
    "UFFDIO_WRITEPROTECT_MODE_WP", "UFFDIO_WRITEPROTECT_MODE_DONTWAKE",
    "UFFDIO_CONTINUE_MODE_DONTWAKE", "UFFDIO_CONTINUE_MODE_WP",
    "UFFDIO_POISON_MODE_DONTWAKE",
    "UFFDIO_MOVE_MODE_DONTWAKE", "UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES",
]

# (name, value from the kernel UAPI) for what a 6.1 header lacks; each guarded by #ifndef
NEWER = [
    ("UFFD_FEATURE_WP_UNPOPULATED", "(1<<13)"),          # Linux 6.4
    ("UFFD_FEATURE_POISON", "(1<<14)"),                  # Linux 6.6
    ("UFFD_FEATURE_WP_ASYNC", "(1<<15)"),                # Linux 6.7
    ("UFFD_FEATURE_MOVE", "(1<<16)"),                    # Linux 6.8
    ("_UFFDIO_MOVE", "(0x05)"),
    ("_UFFDIO_POISON", "(0x08)"),
    ("UFFDIO_CONTINUE_MODE_WP", "((__u64)1<<1)"),        # Linux 6.3
    ("UFFDIO_POISON_MODE_DONTWAKE", "((__u64)1<<0)"),
    ("UFFDIO_MOVE_MODE_DONTWAKE", "((__u64)1<<0)"),
    ("UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES", "((__u64)1<<1)"),
    ("USERFAULTFD_IOC", "0xAA"),                         # /dev/userfaultfd, Linux 6.1
    ("USERFAULTFD_IOC_NEW", "_IO(USERFAULTFD_IOC, 0x00)"),
    ("UFFD_USER_MODE_ONLY", "1"),                        # Linux 5.11
]

TYPES = """
struct uffdio_api { uint64_t api; uint64_t features; uint64_t ioctls; };
struct uffdio_range { uint64_t start; uint64_t len; };
struct uffdio_register { struct uffdio_range range; uint64_t mode; uint64_t ioctls; };
struct uffdio_copy { uint64_t dst; uint64_t src; uint64_t len; uint64_t mode; int64_t copy; };
struct uffdio_zeropage { struct uffdio_range range; uint64_t mode; int64_t zeropage; };
struct uffdio_writeprotect { struct uffdio_range range; uint64_t mode; };
struct uffdio_continue { struct uffdio_range range; uint64_t mode; int64_t mapped; };
struct uffdio_poison { struct uffdio_range range; uint64_t mode; int64_t updated; };
struct uffdio_move { uint64_t dst; uint64_t src; uint64_t len; uint64_t mode; int64_t move; };
struct uffd_msg {
    uint8_t event;
    uint8_t reserved1;
    uint16_t reserved2;
    uint32_t reserved3;
    union {
        struct { uint64_t flags; uint64_t address; union { uint32_t ptid; } feat; } pagefault;
        struct { uint32_t ufd; } fork;
        struct { uint64_t from; uint64_t to; uint64_t len; } remap;
        struct { uint64_t start; uint64_t end; } remove;
        struct { uint64_t reserved1; uint64_t reserved2; uint64_t reserved3; } reserved;
    } arg;
    ...;  /* __attribute__((packed)): the compiler gives the alignment */
};
""" + "".join(f"#define {name} ...\n" for name in CONSTANTS) + "".join(
    f"static const int SSI_HAS_{name.lstrip('_')};\n" for name, _ in NEWER) + """
static const int SSI_HAS_STRUCT_UFFDIO_POISON;
static const int SSI_HAS_STRUCT_UFFDIO_MOVE;
/* words per decoded event in ssi_uffd_read()'s output */
#define SSI_EVENT_WORDS ...
#define SSI_READ_MAX ...
"""

FUNCTIONS = """
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
"""
