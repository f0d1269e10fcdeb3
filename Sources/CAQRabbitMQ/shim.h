// Headers and small shims for rabbitmq-c. Only what Swift cannot reach directly lives here.
#ifndef CAQ_RABBITMQ_SHIM_H
#define CAQ_RABBITMQ_SHIM_H

#include <sys/time.h> /* amqp.h uses struct timeval without including it (0.11) */
#include <stdint.h>
#include <string.h>

/* rabbitmq-c 0.12 moved its headers to <rabbitmq-c/...>; the old names now only emit a
 * deprecation #warning. Debian 12 and Ubuntu 22.04 ship 0.11, Homebrew ships 0.15+. */
#if __has_include(<rabbitmq-c/amqp.h>)
#include <rabbitmq-c/amqp.h>
#include <rabbitmq-c/framing.h>
#include <rabbitmq-c/tcp_socket.h>
#include <rabbitmq-c/ssl_socket.h>
#else
#include <amqp.h>
#include <amqp_framing.h>
#include <amqp_tcp_socket.h>
#include <amqp_ssl_socket.h>
#endif

#if defined(__linux__)
#include <sys/prctl.h>
#endif

/* Names the calling thread for ps/top/perf (prctl is variadic; the kernel keeps 15 bytes). */
static inline void aq_set_thread_name(const char *name) {
#if defined(__linux__)
    (void)prctl(PR_SET_NAME, (unsigned long)name, 0UL, 0UL, 0UL);
#else
    (void)name;
#endif
}

/* amqp_login_with_properties is C-variadic, which Swift cannot call. This wrapper fixes the
 * SASL method to PLAIN. It can go when rabbitmq-c grows a non-variadic login. */
static inline amqp_rpc_reply_t aq_amqp_login_plain(amqp_connection_state_t state,
                                                    const char *vhost, int channel_max,
                                                    int frame_max, int heartbeat,
                                                    const amqp_table_t *properties,
                                                    const char *user, const char *password) {
    return amqp_login_with_properties(state, vhost, channel_max, frame_max, heartbeat, properties,
                                      AMQP_SASL_METHOD_PLAIN, user, password);
}

/* SASL EXTERNAL (client certificate authentication): same reason as above. */
static inline amqp_rpc_reply_t aq_amqp_login_external(amqp_connection_state_t state,
                                                       const char *vhost, int channel_max,
                                                       int frame_max, int heartbeat,
                                                       const amqp_table_t *properties,
                                                       const char *identity) {
    return amqp_login_with_properties(state, vhost, channel_max, frame_max, heartbeat, properties,
                                      AMQP_SASL_METHOD_EXTERNAL, identity);
}

/* The library version this module was compiled against (the macro is a string expression). */
static inline uint32_t aq_amqp_version_number(void) { return amqp_version_number(); }

/* The bytes rabbitmq-c's amqp_basic_publish puts on the wire, encoded into `buf`: the
 * basic.publish method frame, the content header frame and the body in frames of at most
 * `frame_max` bytes, so that one send() carries them (amqp_basic_publish makes a send() per frame:
 * three system calls for a small message). Returns the length, or a negative rabbitmq-c status
 * (AMQP_STATUS_NO_MEMORY when `cap` is too small, or what rabbitmq-c's encoders return, such as
 * AMQP_STATUS_TABLE_TOO_BIG): nothing is sent then, and the caller uses amqp_basic_publish. */
static inline long aq_encode_publish(uint8_t *buf, size_t cap, amqp_channel_t channel,
                                     amqp_basic_publish_t *method, amqp_basic_properties_t *props,
                                     const uint8_t *body, size_t body_len, size_t frame_max) {
    size_t o = 0;
    if (frame_max < 4096 || cap < 16) return AMQP_STATUS_NO_MEMORY;
#define AQ_PUT8(v) (buf[o++] = (uint8_t)(v))
#define AQ_PUT16(v) do { uint16_t aq_v = (uint16_t)(v); buf[o++] = (uint8_t)(aq_v >> 8); buf[o++] = (uint8_t)aq_v; } while (0)
#define AQ_PUT32(v) do { uint32_t aq_w = (uint32_t)(v); buf[o++] = (uint8_t)(aq_w >> 24); buf[o++] = (uint8_t)(aq_w >> 16); \
                         buf[o++] = (uint8_t)(aq_w >> 8); buf[o++] = (uint8_t)aq_w; } while (0)
#define AQ_PUT_AT32(at, v) do { uint32_t aq_x = (uint32_t)(v); buf[(at)] = (uint8_t)(aq_x >> 24); buf[(at) + 1] = (uint8_t)(aq_x >> 16); \
                               buf[(at) + 2] = (uint8_t)(aq_x >> 8); buf[(at) + 3] = (uint8_t)aq_x; } while (0)
    /* Method frame: type, channel, size, method id, arguments, frame end. */
    size_t limit = cap < frame_max ? cap : frame_max;
    AQ_PUT8(AMQP_FRAME_METHOD); AQ_PUT16(channel); size_t size_at = o; o += 4;
    AQ_PUT32(AMQP_BASIC_PUBLISH_METHOD);
    amqp_bytes_t out = { limit - o - 1, buf + o };
    int n = amqp_encode_method(AMQP_BASIC_PUBLISH_METHOD, method, out);
    if (n < 0) return n == AMQP_STATUS_BAD_AMQP_DATA ? AMQP_STATUS_NO_MEMORY : n;
    o += (size_t)n;
    AQ_PUT_AT32(size_at, 4 + n);
    AQ_PUT8(AMQP_FRAME_END);
    /* Content header frame: class, weight, body size, properties. */
    if (cap - o < 7 + 12 + 1) return AMQP_STATUS_NO_MEMORY;
    size_t header_start = o;
    AQ_PUT8(AMQP_FRAME_HEADER); AQ_PUT16(channel); size_at = o; o += 4;
    AQ_PUT16(AMQP_BASIC_CLASS); AQ_PUT16(0);
    AQ_PUT32((uint64_t)body_len >> 32); AQ_PUT32(body_len & 0xFFFFFFFFu);
    size_t header_limit = cap - header_start < frame_max ? cap - header_start : frame_max;
    out.bytes = buf + o; out.len = header_limit - (o - header_start) - 1;
    n = amqp_encode_properties(AMQP_BASIC_CLASS, props, out);
    if (n < 0) return n == AMQP_STATUS_BAD_AMQP_DATA ? AMQP_STATUS_NO_MEMORY : n;
    o += (size_t)n;
    AQ_PUT_AT32(size_at, 12 + n);
    AQ_PUT8(AMQP_FRAME_END);
    /* Body frames. */
    size_t chunk_max = frame_max - 8, sent = 0;
    while (sent < body_len) {
        size_t chunk = body_len - sent < chunk_max ? body_len - sent : chunk_max;
        if (cap - o < chunk + 8) return AMQP_STATUS_NO_MEMORY;
        AQ_PUT8(AMQP_FRAME_BODY); AQ_PUT16(channel); AQ_PUT32(chunk);
        memcpy(buf + o, body + sent, chunk);
        o += chunk; sent += chunk;
        AQ_PUT8(AMQP_FRAME_END);
    }
#undef AQ_PUT8
#undef AQ_PUT16
#undef AQ_PUT32
#undef AQ_PUT_AT32
    return (long)o;
}

#endif
