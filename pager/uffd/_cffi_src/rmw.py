"""The far-memory workload (csrc/rmw.c): pthreads doing random reads and read-modify-writes
over pages, each value checked against a model outside the paged memory."""

TYPES = """
#define SSI_RMW_MAX_THREADS ...
struct ssi_rmw {
    uint64_t base;
    uint64_t npages;
    uint64_t page;
    uint64_t ops;
    uint64_t seed;
    int nthreads;
    int write_pct;
    int hot_pages;
    int hot_ops;
    uint64_t *model;
    uint64_t done;
    uint64_t errors;
    int64_t first_bad;
    uint64_t checksum;
    int fill;
};
"""

FUNCTIONS = """
int ssi_rmw_run(struct ssi_rmw *w);
uint64_t ssi_rmw_check(struct ssi_rmw *w);
"""
