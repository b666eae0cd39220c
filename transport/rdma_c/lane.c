/* lane.c - the RDMA fault path (fetch, store) over either backend; every wire number comes
 * from ssip_wire.h. */
#include "ssip_rdma.h"
#include "rdma_util.h"
#include "ssip_wire.h"

#include <errno.h>
#include <string.h>

_Static_assert(SSIP_R_MSG == SSIP_HEADER_SIZE + SSIP_MAX_CONTROL, "SSIP_R_MSG");

static void put_header(struct ssip_header *h, uint8_t type, uint16_t flags, uint32_t req,
                       uint32_t space, uint64_t gpa, uint32_t length, uint32_t arg)
{
    memcpy(h->magic, SSIP_MAGIC, 4);
    h->version = SSIP_VERSION;
    h->type = type;
    h->flags = flags;
    h->request_id = req;
    h->space = space;
    h->gpa = gpa;
    h->length = length;
    h->arg = arg;
}

/* Wait for the reply to request req: 0 and *h filled when it is of type want with no
 * payload; its length (> 0) when it is anything else (left in reply for the caller); -errno */
static int await_reply(struct ssip_rconn *c, uint32_t req, uint8_t want, struct ssip_header *h,
                       uint8_t *reply, size_t cap, int timeout_ms, char *err, size_t errlen)
{
    int n = ssip_r_recv(c, reply, cap, timeout_ms, err, errlen);
    if (n < 0)
        return n;
    if ((size_t)n < SSIP_HEADER_SIZE)
        return ssip_r_fail(err, errlen, -EPROTO, "RDMA peer sent a %d-byte message, "
                           "shorter than a frame header", n);
    memcpy(h, reply, sizeof *h);
    if (memcmp(h->magic, SSIP_MAGIC, 4) || h->version != SSIP_VERSION)
        return ssip_r_fail(err, errlen, -EPROTO, "RDMA peer sent a corrupt frame header");
    if ((size_t)n != SSIP_HEADER_SIZE + h->length)
        return ssip_r_fail(err, errlen, -EPROTO, "RDMA message of %d bytes holds a frame "
                           "of %u", n, (unsigned)(SSIP_HEADER_SIZE + h->length));
    if (h->type == want && h->request_id == req && h->length == 0)
        return 0;
    if (h->type != SSIP_T_ERROR)
        return ssip_r_fail(err, errlen, -EPROTO, "expected reply type %u to request %u, got "
                           "type %u to request %u", want, req, h->type, h->request_id);
    return n;
}

int ssip_r_fetch(struct ssip_rconn *c, uint32_t request_id, uint32_t space, uint64_t gpa,
                 uint32_t nbytes, uint64_t raddr, uint32_t rkey, uint8_t *dst,
                 uint32_t *mask, uint8_t *reply, size_t cap, int timeout_ms,
                 char *err, size_t errlen)
{
    struct ssip_header h;
    uint32_t npages = nbytes >> SSIP_PAGE_SHIFT;
    if (!nbytes || nbytes > SSIP_MAX_DATA || nbytes & (SSIP_PAGE_SIZE - 1)
        || nbytes > ssip_r_window(c))
        return ssip_r_fail(err, errlen, -EINVAL, "fetch of %u bytes: use whole pages, at "
                           "most %u bytes", nbytes, SSIP_MAX_DATA);
    put_header(&h, SSIP_T_FETCH, SSIP_FLAG_URGENT, request_id, space, gpa, 0, nbytes);
    int rc = ssip_r_send(c, &h, sizeof h, timeout_ms, err, errlen);
    if (rc < 0)
        return rc;
    rc = await_reply(c, request_id, SSIP_T_DATA, &h, reply, cap, timeout_ms, err, errlen);
    if (rc)
        return rc;
    uint32_t zero = h.arg;
    if (npages < 32)
        zero &= (1u << npages) - 1;
    size_t staged = (size_t)(npages - (uint32_t)__builtin_popcount(zero)) * SSIP_PAGE_SIZE;
    if (staged) {
        rc = ssip_r_read(c, staged, raddr, rkey, timeout_ms, err, errlen);
        if (rc < 0)
            return rc;
    }
    const uint8_t *src = ssip_r_buffer(c, 0);
    for (uint32_t i = 0; i < npages; i++) {
        if (zero >> i & 1)
            continue;
        memcpy(dst + (size_t)i * SSIP_PAGE_SIZE, src, SSIP_PAGE_SIZE);
        src += SSIP_PAGE_SIZE;
    }
    *mask = zero;
    return 0;
}

int ssip_r_store(struct ssip_rconn *c, uint32_t request_id, uint32_t space, uint64_t gpa,
                 const uint8_t *src, uint32_t nbytes, uint64_t raddr, uint32_t rkey,
                 uint8_t *reply, size_t cap, int timeout_ms, char *err, size_t errlen)
{
    struct ssip_header h;
    if (!nbytes || nbytes > SSIP_MAX_DATA || nbytes & (SSIP_PAGE_SIZE - 1)
        || nbytes > ssip_r_window(c))
        return ssip_r_fail(err, errlen, -EINVAL, "store of %u bytes: use whole pages, at "
                           "most %u bytes", nbytes, SSIP_MAX_DATA);
    memcpy(ssip_r_buffer(c, 0), src, nbytes);
    int rc = ssip_r_write(c, nbytes, raddr, rkey, timeout_ms, err, errlen);
    if (rc < 0)
        return rc;
    put_header(&h, SSIP_T_STORE, SSIP_R_STAGED, request_id, space, gpa, 0, nbytes);
    rc = ssip_r_send(c, &h, sizeof h, timeout_ms, err, errlen);
    if (rc < 0)
        return rc;
    return await_reply(c, request_id, SSIP_T_STORED, &h, reply, cap, timeout_ms, err, errlen);
}
