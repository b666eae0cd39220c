/* ssip_rdma.h - the RDMA data path of ssi-pager, in C (cffi module transport.rdma_c).
 *
 * One connection = one RC queue pair with its own event channel, protection domain,
 * completion channel, completion queue and registered buffers (see verbs_conn.h). Every call
 * that can wait takes a timeout in milliseconds and waits with poll(2) on a file descriptor
 * (the rdma_cm event channel, the completion channel), so no call blocks longer than asked
 * and none holds the Python GIL (cffi releases it around every call).
 *
 * Return values: >= 0 on success, -errno on failure with a message in err[errlen]:
 * -ETIMEDOUT (deadline), -ECONNRESET (the peer disconnected), -ECONNREFUSED (rejected),
 * -EBUSY (a connect request this node refused), -EACCES (remote access error), -EIO (a work
 * completion failed), -EPROTO (the peer broke the SSIP frame rules), -ENODEV (no device).
 *
 * Two backends implement the same functions: verbs_setup.c (connection setup) and
 * verbs_data.c (data path) over libibverbs/librdmacm (production), and loopback.c, a TEST
 * DOUBLE over TCP sockets on this machine (no RDMA here); the frame logic in lane.c is shared
 * by both. The cdef is this header minus its preprocessor lines. */
#ifndef SSIP_RDMA_H
#define SSIP_RDMA_H
#include <stddef.h>
#include <stdint.h>

struct ssip_rconn;
struct ssip_rlisten;
struct ssip_rreq;

/* header flag of a STORE whose pages were RDMA-written into the node's buffer 1 (its arg is
 * the byte count, the frame carries no payload); the largest SEND/RECV message (a header and
 * a control message: checked against ssip_wire.h in lane.c) */
enum { SSIP_R_STAGED = 0x8000, SSIP_R_MSG = 65568 };

/* backend: "verbs" or "loopback" (the test double) */
const char *ssip_r_backend(void);
/* RDMA device names, space separated, in names[cap]: the count, or -errno */
int ssip_r_devices(char *names, size_t cap, char *err, size_t errlen);

/* memory node side */
int ssip_r_listen(const char *host, int port, int backlog, struct ssip_rlisten **out,
                  char *err, size_t errlen);
/* wait up to timeout_ms for a connect request (*out; -ETIMEDOUT when none came) */
int ssip_r_get_request(struct ssip_rlisten *l, int timeout_ms, struct ssip_rreq **out,
                       char *err, size_t errlen);
/* answer a request (always consumed): admit = 0 rejects it (-EBUSY); else, within
 * timeout_ms, *out is an established connection with its own PD and two registered buffers
 * of window bytes: buffer 0 the peer may RDMA READ, buffer 1 it may RDMA WRITE. */
int ssip_r_accept(struct ssip_rreq *r, int timeout_ms, size_t window, int admit,
                  struct ssip_rconn **out, char *err, size_t errlen);
void ssip_r_listen_close(struct ssip_rlisten *l);

/* pager side: a connection whose buffer 0 (window bytes) is the local READ target and WRITE
 * source (no remote access to it) */
int ssip_r_connect(const char *host, int port, int timeout_ms, size_t window,
                   struct ssip_rconn **out, char *err, size_t errlen);

/* registered buffer 0 or 1 and its size; the keys a peer needs to reach this side's buffers */
uint8_t *ssip_r_buffer(struct ssip_rconn *c, int which);
size_t ssip_r_window(struct ssip_rconn *c);
void ssip_r_keys(struct ssip_rconn *c, uint64_t *read_addr, uint32_t *read_rkey,
                 uint64_t *write_addr, uint32_t *write_rkey);

/* one message (SEND/RECV, at most SSIP_R_MSG bytes) */
int ssip_r_send(struct ssip_rconn *c, const void *msg, size_t len, int timeout_ms,
                char *err, size_t errlen);
/* the next message into out[cap]: its length, or -errno (-ECONNRESET: peer left) */
int ssip_r_recv(struct ssip_rconn *c, void *out, size_t cap, int timeout_ms,
                char *err, size_t errlen);
/* one-sided: RDMA READ len bytes from (raddr, rkey) into buffer 0 / WRITE buffer 0 there */
int ssip_r_read(struct ssip_rconn *c, size_t len, uint64_t raddr, uint32_t rkey,
                int timeout_ms, char *err, size_t errlen);
int ssip_r_write(struct ssip_rconn *c, size_t len, uint64_t raddr, uint32_t rkey,
                 int timeout_ms, char *err, size_t errlen);

/* The fault path (lane.c). fetch: FETCH nbytes at gpa, wait for DATA, RDMA READ the staged
 * pages and scatter them into dst by the zero mask (*mask). store: copy src into buffer 0,
 * RDMA WRITE it to (raddr, rkey), SEND a staged STORE, wait for STORED. Both return 0 when
 * done, or the length (> 0) of any other reply (an ERROR frame) left in reply[cap] for the
 * caller to decode, or -errno. */
int ssip_r_fetch(struct ssip_rconn *c, uint32_t request_id, uint32_t space, uint64_t gpa,
                 uint32_t nbytes, uint64_t raddr, uint32_t rkey, uint8_t *dst,
                 uint32_t *mask, uint8_t *reply, size_t cap, int timeout_ms,
                 char *err, size_t errlen);
int ssip_r_store(struct ssip_rconn *c, uint32_t request_id, uint32_t space, uint64_t gpa,
                 const uint8_t *src, uint32_t nbytes, uint64_t raddr, uint32_t rkey,
                 uint8_t *reply, size_t cap, int timeout_ms, char *err, size_t errlen);

/* disconnect (if still connected) and free the QP, CQ, channels, MRs and PD, in that order */
void ssip_r_close(struct ssip_rconn *c);

#endif /* SSIP_RDMA_H */
