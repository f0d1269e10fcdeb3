// OpenSSL's libcrypto for HMAC-SHA256 and SHA-256: the vetted implementation (assembly, SHA
// extensions where the CPU has them) that libcurl already loads, so signing adds no library.
// Only the one-shot calls that OpenSSL 3 does not deprecate are used.
#ifndef CAQ_OPENSSL_SHIM_H
#define CAQ_OPENSSL_SHIM_H

#include <openssl/evp.h>
#include <openssl/hmac.h>

#endif
