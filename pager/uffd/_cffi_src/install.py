"""cdef of the page installer (``csrc/install.c``): the one implementation of UFFDIO_COPY /
ZEROPAGE with zero masks and EEXIST, shared by the C fault loop and the Python path, and the
residency log both fill (every resident chunk: address, length, how)."""

TYPES = """
#define SSI_WIRE_PAGE ...
#define SSI_RES_COPY ...
#define SSI_RES_ZERO ...
#define SSI_RES_EEXIST ...

struct ssi_res {
    uint64_t addr;
    uint64_t len;
    uint64_t how;
};

struct ssi_install_log {
    uint64_t copied_bytes;
    uint64_t zero_pages;
    uint64_t eexist;
    uint64_t lost;
    uint32_t nres;
    uint32_t max_res;
    struct ssi_res *res;
};
"""

FUNCTIONS = """
int ssi_install(int uffd, uint64_t dst, uint64_t src, uint64_t len, const uint64_t *zero_mask,
                uint64_t page_size, uint64_t mode, struct ssi_install_log *log);
"""
