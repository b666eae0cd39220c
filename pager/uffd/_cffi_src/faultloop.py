"""cdef of the fault engine's per-fault loop in C (``ssi_pfl_run``, ``csrc/faultloop.c``, which
says what it serves and what it returns to Python). The struct layouts are in
``csrc/ssi_uffd.h``; the wire constants come from ``transport/wire/ssip_wire.h``."""

TYPES = """
#define SSI_PFL_MAX_REGIONS ...
#define SSI_PFL_MAX_SLOW ...
#define SSI_PFL_MAX_WAKE ...
#define SSI_PFL_NBUCKETS ...
#define SSI_PFL_MAX_FETCH ...
#define SSI_PFL_MAX_EVICT ...
#define SSI_PFL_MAX_DIRTY ...
#define SSI_PFL_MAX_VICTIMS ...
#define SSI_PFL_MAX_WPD ...
#define SSI_PFL_MAX_WATCH ...
#define SSI_PFL_MAX_LANES ...
#define SSI_PFL_BY_EXTENT ...

#define SSI_PFL_IDLE ...
#define SSI_PFL_WAKE ...
#define SSI_PFL_EVENTS ...
#define SSI_PFL_FETCH_ERROR ...
#define SSI_PFL_READ_ERROR ...

#define SSI_PFL_PROTO_SSIP ...
#define SSI_PFL_PROTO_RAW ...

struct ssi_fm_store {
    uint64_t off;
    uint64_t gpa;
    uint64_t len;
};

struct ssi_pfl_lane {
    int sock;
    int proto;
    uint32_t space;
    void *ssl;
};

struct ssi_pfl_region {
    uint64_t base;
    uint64_t size;
    uint64_t gpa;
    uint64_t page_size;
    int lane;
    uint32_t next;
    const int16_t *ext;
};

struct ssi_pfl_stats {
    uint64_t faults;
    uint64_t faults_write;
    uint64_t served_fetch;
    uint64_t served_dup;
    uint64_t fetched_bytes;
    uint64_t faults_wp;
    uint64_t wp_dirty;
    uint64_t latency_sum_us;
    uint64_t latency_count;
    uint64_t latency_buckets[...];
};

struct ssi_pfl {
    int uffd;
    int nwake;
    int wake_fds[...];
    uint64_t chunk;
    int nregions;
    struct ssi_pfl_region regions[...];
    int nlanes;
    struct ssi_pfl_lane lanes[...];
    int ext_shift;
    const uint64_t *route_gen;
    uint64_t route_gen_seen;
    int err_lane;
    int nslow;
    uint64_t slow_start[...];
    uint64_t slow_end[...];
    uint64_t *events;
    int max_events;
    uint8_t *buf;
    uint64_t buf_size;
    uint64_t bucket_us[...];
    int timeout_ms;
    uint64_t max_ns;
    uint64_t poll_ns;
    uint64_t last_event_ns;
    uint64_t poll_skip_until;
    uint64_t poll_backoff_ns;
    uint32_t req;
    int first;
    int n;
    int err;
    struct ssi_pfl_stats stats;
    struct ssi_install_log log;
    int farmem;
    int64_t budget;
    uint64_t evict_start[...];
    uint64_t evict_end[...];
    int ndirty;
    uint64_t dirty[...];
    int fm_lock;
    int nvictims;
    uint64_t victims[...];
    int nwpd;
    uint64_t wpd[...];
    int nwatch;
    uint32_t watch_next;
    uint64_t watch[...];
};
"""

FUNCTIONS = """
int ssi_pfl_run(struct ssi_pfl *l);
int ssi_pfl_wp_fault(struct ssi_pfl *l, uint64_t start, uint64_t len);
int ssi_pfl_set_victims(struct ssi_pfl *l, const uint64_t *starts, int n);
int ssi_pfl_take_wp(struct ssi_pfl *l, uint64_t *out, int max);
int ssi_pfl_fm_busy(struct ssi_pfl *l, uint64_t start);
int ssi_fm_write_back(int memfd, int sock, void *ssl, uint32_t space,
                      struct ssi_fm_store *st, int n, uint8_t *buf, uint64_t buf_size,
                      uint32_t *req, int timeout_ms);
int ssi_fm_punch(int memfd, const uint64_t *offs, const uint64_t *lens, int n, int *failed);
int ssi_fm_wake(int uffd, const uint64_t *addrs, const uint64_t *lens, int n);
int ssi_fm_protect(int uffd, const uint64_t *addrs, const uint64_t *lens, int n, int *err);
"""
