/* fastlane.h - the memory node's C fault lane (see fastlane.c, and fastlane.py for the Python
 * side). The wire constants and the header layout come from ssip_wire.h only. */
#ifndef SSI_FASTLANE_H
#define SSI_FASTLANE_H

#include <stdint.h>

#define SSI_FL_MAX_SPACES 16  /* handles a connection may open and still be served in C */
#define SSI_FL_HANDBACK 1     /* met a frame it does not serve: Python takes over */
#define SSI_FL_EOF 2          /* the peer closed */
#define SSI_FL_ERROR 3        /* recv/send failed: err holds errno */
#define SSI_FL_SUM_CRC32 0    /* zlib's crc32: stores written before crc32c */
#define SSI_FL_SUM_CRC32C 1   /* CRC32C (crc32c.h): stores made since */

struct ssi_fl_space {
    int fd;                   /* the space's page file; -1: not served here */
    const uint8_t *bits;      /* written-page bitmap, bit p = page p written */
    uint64_t nbits;           /* bits the bitmap holds */
    const uint32_t *sums;     /* checksum of each written page (the store's .sums file) */
    int sum_kind;             /* SSI_FL_SUM_*: how the store computed them */
    uint64_t fetched_pages;   /* pages answered (written or zero) */
    uint64_t zero_pages;      /* pages answered as never written */
};

struct ssi_fl_conn {
    int fd;                   /* the connection's socket (a dup owned by the caller) */
    void *ssl;                /* its TLS session on fd (SSL *, transport/tlsc); NULL: plain */
    int nspaces;              /* handles 1..nspaces */
    uint64_t max_space_bytes; /* gpa + length limit, as the Python session checks */
    struct ssi_fl_space spaces[SSI_FL_MAX_SPACES];
    uint8_t *inbuf;           /* input buffer */
    uint32_t in_cap;
    uint32_t pos;             /* unconsumed bytes are inbuf[pos:end] on return */
    uint32_t end;
    uint8_t *out;             /* reply buffer, header + the largest DATA payload */
    uint32_t out_cap;
    int err;                  /* errno of a failed recv/send (SSI_FL_ERROR) */
    uint64_t poll_ns;         /* adaptive polling: recv without blocking at least this long
                                 after the last frame before a blocking recv (0: off) */
    uint64_t poll_max_ns;     /* the window grows up to this while frames keep coming just
                                 after it (ssip_poll_adapt; <= poll_ns: fixed window) */
    uint64_t poll_win_ns;     /* the window now, between the two (the loop's own) */
    uint64_t poll_skip_until; /* no polling before (back-off, ssip_poll.h) */
    uint64_t poll_backoff_ns;
    uint64_t fetch_ok;        /* FETCH requests answered */
};

/* Serve FETCH frames on c->fd until anything else arrives; returns SSI_FL_*. */
int ssi_fl_serve(struct ssi_fl_conn *c);
/* Make a running ssi_fl_serve return (shuts the socket down). */
void ssi_fl_stop(struct ssi_fl_conn *c);
/* A counter of the structs above, read while the loop may update it. */
uint64_t ssi_fl_load(uint64_t *counter);

#endif /* SSI_FASTLANE_H */
