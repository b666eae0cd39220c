/* tlsc.h - the C TLS layer of the lanes (see tlsc.c; tlsc/__init__.py is the Python side).
 * An SSL handle is passed to the C loops as a pointer (ssip_io.h's struct ssip_conn). */
#ifndef SSI_TLSC_H
#define SSI_TLSC_H

#include <stddef.h>
#include <stdint.h>

#define SSI_TLS_WANT (-11)  /* the operation needs more bytes (memory BIOs) or timed out */

/* A TLS 1.3 context with this host's certificate and key, verifying the peer's against the
   CA (mutual: a server requires the client's). NULL with a message in err on failure. */
void *ssi_tls_ctx_new(int server, const char *ca, const char *cert, const char *key,
                      char *err, size_t errlen);
void ssi_tls_ctx_free(void *ctx);
/* A session on ctx: on the socket fd (fd >= 0), or on memory BIOs (fd < 0: feed/drain). */
void *ssi_tls_new(void *ctx, int fd);
void ssi_tls_free(void *ssl);
/* Handshake step: 1 done, SSI_TLS_WANT, -EINTR (a signal: call again), or -1 (ssi_tls_error
   says why). */
int ssi_tls_handshake(void *ssl);
/* Plaintext: bytes done (> 0), 0 at the end of the stream, SSI_TLS_WANT, or -errno (-EINTR:
   a signal, call again; -EPROTO: a TLS error, ssi_tls_error says which). */
int ssi_tls_read(void *ssl, uint8_t *buf, int n);
int ssi_tls_write(void *ssl, const uint8_t *buf, int n);
int ssi_tls_pending(void *ssl);
/* Memory BIOs: ciphertext in (received), ciphertext out (to send), ciphertext not yet read. */
int ssi_tls_feed(void *ssl, const uint8_t *buf, int n);
int ssi_tls_drain(void *ssl, uint8_t *buf, int n);
int ssi_tls_buffered(void *ssl);
/* Move a memory-BIO session onto the socket fd (-1 if ciphertext is still buffered either
   way), and back onto fresh memory BIOs. */
int ssi_tls_to_fd(void *ssl, int fd);
int ssi_tls_to_mem(void *ssl);
/* Why the last call on ssl failed (the peer's alert, a certificate check), into buf. */
void ssi_tls_error(void *ssl, char *buf, size_t n);

#endif /* SSI_TLSC_H */
