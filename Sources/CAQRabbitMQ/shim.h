// Headers and small shims for rabbitmq-c. Only what Swift cannot reach directly lives here.
#ifndef CAQ_RABBITMQ_SHIM_H
#define CAQ_RABBITMQ_SHIM_H

#include <sys/time.h> /* amqp.h uses struct timeval without including it (0.11) */
#include <stdint.h>

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

#endif
