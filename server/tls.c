/* tls.c: the SSL_CTX for HTTPS listeners (see http.h).
 *
 * Built once at startup, before the event loop runs, then shared read-only
 * by every TLS connection of the loop thread: TLS 1.2 and 1.3 only,
 * forward-secret AEAD suites, no compression, renegotiation or session
 * tickets, ALPN http/1.1.
 */
#include "server/http.h"

#include <stdio.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

/* TLS 1.2 suites: ECDHE key exchange (forward secrecy) with AES-GCM or
 * ChaCha20-Poly1305 only; TLS 1.3 suites are all AEAD already. */
#define TLS12_CIPHERS "ECDHE+AESGCM:ECDHE+CHACHA20"
#define TLS13_SUITES "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
#define TLS_GROUPS "X25519:prime256v1:secp384r1"

/* Writes "what: OpenSSL's reason" into err and empties OpenSSL's error
 * queue, so a later, unrelated failure does not report this one. */
static void tls_error(char *err, size_t errlen, const char *what, const char *file)
{
    unsigned long e = ERR_peek_last_error();
    char reason[256] = "unknown error";
    if (e)
        ERR_error_string_n(e, reason, sizeof reason);
    if (file)
        snprintf(err, errlen, "%s %s: %s", what, file, reason);
    else
        snprintf(err, errlen, "%s: %s", what, reason);
    ERR_clear_error();
}

/* ALPN: we speak only HTTP/1.1; a client offering only h2 gets no ALPN
 * answer and may still fall back to HTTP/1.1. */
static int tls_alpn_select(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                           const unsigned char *in, unsigned int inlen, void *arg)
{
    static const unsigned char h11[] = {8, 'h', 't', 't', 'p', '/', '1', '.', '1'};
    (void)ssl;
    (void)arg;
    unsigned char *sel = NULL;
    if (SSL_select_next_proto(&sel, outlen, h11, sizeof h11, in, inlen) != OPENSSL_NPN_NEGOTIATED)
        return SSL_TLSEXT_ERR_NOACK;
    *out = sel;
    return SSL_TLSEXT_ERR_OK;
}

struct ssl_ctx_st *http_tls_ctx_create(const char *cert_file, const char *key_file, char *err,
                                       size_t errlen)
{
    SSL_CTX *ctx = NULL;
    if (!cert_file || !key_file) {
        snprintf(err, errlen, "TLS needs both a certificate and a key file");
        return NULL;
    }
    ERR_clear_error();
    ctx = SSL_CTX_new(TLS_server_method());
    if (!ctx) {
        tls_error(err, errlen, "cannot create the TLS context", NULL);
        goto fail;
    }
    if (!SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION)) {
        tls_error(err, errlen, "cannot set the minimum TLS version", NULL);
        goto fail;
    }
    /* Compression leaks secrets (CRIME); client-initiated renegotiation
     * is a CPU DoS; tickets would need key rotation we do not do. */
    SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION |
                                 SSL_OP_CIPHER_SERVER_PREFERENCE | SSL_OP_NO_TICKET);
    SSL_CTX_set_num_tickets(ctx, 0);
    SSL_CTX_set_session_id_context(ctx, (const unsigned char *)"inferd", 6);
    if (!SSL_CTX_set_cipher_list(ctx, TLS12_CIPHERS)) {
        tls_error(err, errlen, "cannot set the TLS 1.2 cipher list", NULL);
        goto fail;
    }
    if (!SSL_CTX_set_ciphersuites(ctx, TLS13_SUITES)) {
        tls_error(err, errlen, "cannot set the TLS 1.3 cipher suites", NULL);
        goto fail;
    }
    if (!SSL_CTX_set1_groups_list(ctx, TLS_GROUPS)) {
        tls_error(err, errlen, "cannot set the key exchange groups", NULL);
        goto fail;
    }
    if (SSL_CTX_use_certificate_chain_file(ctx, cert_file) != 1) {
        tls_error(err, errlen, "cannot load the certificate chain from", cert_file);
        goto fail;
    }
    if (SSL_CTX_use_PrivateKey_file(ctx, key_file, SSL_FILETYPE_PEM) != 1) {
        tls_error(err, errlen, "cannot load the private key from", key_file);
        goto fail;
    }
    if (SSL_CTX_check_private_key(ctx) != 1) {
        char what[512];
        snprintf(what, sizeof what, "the private key in %s does not match the certificate in",
                 key_file);
        tls_error(err, errlen, what, cert_file);
        goto fail;
    }
    SSL_CTX_set_alpn_select_cb(ctx, tls_alpn_select, NULL);
    return ctx;

fail:
    SSL_CTX_free(ctx);
    return NULL;
}

void http_tls_ctx_destroy(struct ssl_ctx_st *ctx)
{
    SSL_CTX_free(ctx);
}
