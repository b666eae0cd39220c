/* tlsc.c - TLS 1.3 for the lanes' C loops, on OpenSSL.
 *
 * This layer owns every SSL session of a lane connection for its whole life: Python never
 * holds ciphertext state. A pager's blocking lane does its handshake here on its socket and
 * reads/writes plaintext through ssi_tls_read/ssi_tls_write; its C fault loop gets the same
 * handle (ssip_io.h). A memory node runs each TLS connection on memory BIOs fed by its
 * asyncio protocol (ssi_tls_feed/ssi_tls_drain) and, while the node's C fault lane serves the
 * connection, on the socket itself (ssi_tls_to_fd, back with ssi_tls_to_mem). Read-ahead
 * stays off, so a session on a socket never reads past the record it decrypts, and no
 * session tickets are issued (no post-handshake records to meet in a fault loop).
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include "tlsc.h"

static void put_error(char *err, size_t errlen, const char *what)
{
    unsigned long e = ERR_peek_last_error();
    char reason[256] = "";
    if (e)
        ERR_error_string_n(e, reason, sizeof reason);
    snprintf(err, errlen, "%s%s%s", what, e ? ": " : "", reason);
    ERR_clear_error();
}

void *ssi_tls_ctx_new(int server, const char *ca, const char *cert, const char *key,
                      char *err, size_t errlen)
{
    SSL_CTX *ctx = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
    if (!ctx) {
        put_error(err, errlen, "cannot make a TLS context");
        return NULL;
    }
    SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
    SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION);
    SSL_CTX_set_options(ctx, SSL_OP_IGNORE_UNEXPECTED_EOF | SSL_OP_NO_TICKET);
    SSL_CTX_set_mode(ctx, SSL_MODE_AUTO_RETRY);
    SSL_CTX_set_read_ahead(ctx, 0);
    if (server)
        SSL_CTX_set_num_tickets(ctx, 0);
    if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1) {
        put_error(err, errlen, cert);
        goto fail;
    }
    if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1
            || SSL_CTX_check_private_key(ctx) != 1) {
        put_error(err, errlen, key);
        goto fail;
    }
    if (SSL_CTX_load_verify_locations(ctx, ca, NULL) != 1) {
        put_error(err, errlen, ca);
        goto fail;
    }
    /* peers are the cluster CA's, addressed by IP: the chain is checked, not a host name */
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
    return ctx;
fail:
    SSL_CTX_free(ctx);
    return NULL;
}

void ssi_tls_ctx_free(void *ctx)
{
    SSL_CTX_free((SSL_CTX *)ctx);
}

static int set_mem(SSL *ssl)
{
    BIO *r = BIO_new(BIO_s_mem()), *w = BIO_new(BIO_s_mem());
    if (!r || !w) {
        BIO_free(r);
        BIO_free(w);
        return -1;
    }
    BIO_set_mem_eof_return(r, -1);  /* empty: "want read", not end of stream */
    SSL_set_bio(ssl, r, w);
    return 0;
}

void *ssi_tls_new(void *ctx, int fd)
{
    SSL *ssl = SSL_new((SSL_CTX *)ctx);
    if (!ssl)
        return NULL;
    if (fd >= 0 ? SSL_set_fd(ssl, fd) != 1 : set_mem(ssl) < 0) {
        SSL_free(ssl);
        return NULL;
    }
    if (SSL_is_server(ssl))  /* the context's method says the side */
        SSL_set_accept_state(ssl);
    else
        SSL_set_connect_state(ssl);
    return ssl;
}

void ssi_tls_free(void *ssl)
{
    SSL_free((SSL *)ssl);
}

int ssi_tls_handshake(void *p)
{
    SSL *ssl = p;
    ERR_clear_error();
    errno = 0;
    int k = SSL_do_handshake(ssl);
    if (k == 1)
        return 1;
    int e = SSL_get_error(ssl, k);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
        return errno == EINTR ? -EINTR : SSI_TLS_WANT;
    return -1;  /* the error queue stays for ssi_tls_error */
}

static int io_result(SSL *ssl, int k)
{
    if (k > 0)
        return k;
    int e = SSL_get_error(ssl, k);
    if (e == SSL_ERROR_ZERO_RETURN)
        return 0;
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)  /* a signal: the caller retries */
        return errno == EINTR ? -EINTR : SSI_TLS_WANT;
    if (e == SSL_ERROR_SYSCALL && !ERR_peek_error())
        return errno ? (errno == EAGAIN ? SSI_TLS_WANT : -errno) : 0;
    return -EPROTO;  /* the queue stays for ssi_tls_error */
}

int ssi_tls_read(void *p, uint8_t *buf, int n)
{
    ERR_clear_error();
    errno = 0;
    return io_result(p, SSL_read((SSL *)p, buf, n));
}

int ssi_tls_write(void *p, const uint8_t *buf, int n)
{
    ERR_clear_error();
    errno = 0;
    return io_result(p, SSL_write((SSL *)p, buf, n));
}

int ssi_tls_pending(void *p)
{
    return SSL_pending((SSL *)p);
}

int ssi_tls_feed(void *p, const uint8_t *buf, int n)
{
    return BIO_write(SSL_get_rbio((SSL *)p), buf, n);
}

int ssi_tls_drain(void *p, uint8_t *buf, int n)
{
    int k = BIO_read(SSL_get_wbio((SSL *)p), buf, n);
    return k > 0 ? k : 0;
}

int ssi_tls_buffered(void *p)
{
    SSL *ssl = p;
    return (int)BIO_ctrl_pending(SSL_get_rbio(ssl)) + (int)BIO_ctrl_pending(SSL_get_wbio(ssl));
}

int ssi_tls_to_fd(void *p, int fd)
{
    SSL *ssl = p;
    if (ssi_tls_buffered(ssl))
        return -1;
    return SSL_set_fd(ssl, fd) == 1 ? 0 : -1;
}

int ssi_tls_to_mem(void *p)
{
    return set_mem((SSL *)p);
}

void ssi_tls_error(void *p, char *buf, size_t n)
{
    SSL *ssl = p;
    unsigned long e = ERR_peek_last_error();
    long v = ssl ? SSL_get_verify_result(ssl) : X509_V_OK;
    char reason[256] = "";
    if (e)
        ERR_error_string_n(e, reason, sizeof reason);
    else
        snprintf(reason, sizeof reason, "%s", errno ? strerror(errno) : "connection closed");
    if (v != X509_V_OK)
        snprintf(buf, n, "%s (certificate: %s)", reason, X509_verify_cert_error_string(v));
    else
        snprintf(buf, n, "%s", reason);
    ERR_clear_error();
}
