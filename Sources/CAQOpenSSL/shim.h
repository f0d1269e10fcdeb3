// OpenSSL's libcrypto for HMAC-SHA256, SHA-256, random bytes and constant-time comparison: the vetted implementation (assembly, SHA
// extensions where the CPU has them) that libcurl already loads, so signing adds no library.
// Only the one-shot calls that OpenSSL 3 does not deprecate are used.
#ifndef CAQ_OPENSSL_SHIM_H
#define CAQ_OPENSSL_SHIM_H

#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/core_names.h>
#include <openssl/params.h>
#include <openssl/rand.h>
#include <openssl/crypto.h>

/* An HMAC-SHA256 context keyed once: the key's inner and outer digest states are computed here,
 * so each message afterwards costs only its own compressions. OSSL_PARAM arrays are awkward from
 * Swift, hence the shim. NULL on failure. */
static inline EVP_MAC_CTX *aq_hmac_sha256_new(const void *key, size_t key_length) {
    EVP_MAC *mac = EVP_MAC_fetch(NULL, "HMAC", NULL);
    if (mac == NULL) return NULL;
    EVP_MAC_CTX *ctx = EVP_MAC_CTX_new(mac);
    EVP_MAC_free(mac); /* the context keeps its own reference */
    if (ctx == NULL) return NULL;
    char digest[] = "SHA256";
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, digest, 0),
        OSSL_PARAM_construct_end(),
    };
    if (EVP_MAC_init(ctx, (const unsigned char *)key, key_length, params) != 1) {
        EVP_MAC_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}

/* HMAC-SHA256 of `a` followed by `b` with the context's key (re-initialised with it, as
 * EVP_MAC_init does for a NULL key). Writes 32 bytes; 1 on success. */
static inline int aq_hmac_sha256(EVP_MAC_CTX *ctx, const void *a, size_t a_length, const void *b, size_t b_length,
                                 unsigned char *out) {
    size_t written = 0;
    if (EVP_MAC_init(ctx, NULL, 0, NULL) != 1) return 0;
    if (a_length > 0 && EVP_MAC_update(ctx, (const unsigned char *)a, a_length) != 1) return 0;
    if (b_length > 0 && EVP_MAC_update(ctx, (const unsigned char *)b, b_length) != 1) return 0;
    return EVP_MAC_final(ctx, out, &written, 32) == 1 && written == 32;
}

#endif
