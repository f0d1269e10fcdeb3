// Headers and typed shims for libcurl. curl_easy_setopt/curl_multi_setopt/curl_easy_getinfo are
// C-variadic, which Swift cannot call; these wrappers give each argument type its own entry point
// (after swift-corelibs-foundation's CFURLSessionInterface).
#ifndef CAQ_CURL_SHIM_H
#define CAQ_CURL_SHIM_H

#include <curl/curl.h>

static inline CURLcode aq_curl_easy_setopt_long(CURL *handle, CURLoption option, long value) {
    return curl_easy_setopt(handle, option, value);
}
static inline CURLcode aq_curl_easy_setopt_ptr(CURL *handle, CURLoption option, const void *value) {
    return curl_easy_setopt(handle, option, value);
}
static inline CURLcode aq_curl_easy_setopt_off_t(CURL *handle, CURLoption option, curl_off_t value) {
    return curl_easy_setopt(handle, option, value);
}
typedef size_t (*aq_curl_data_callback)(char *ptr, size_t size, size_t nmemb, void *userdata);
static inline CURLcode aq_curl_easy_setopt_data_callback(CURL *handle, CURLoption option,
                                                         aq_curl_data_callback value) {
    return curl_easy_setopt(handle, option, value);
}
static inline CURLMcode aq_curl_multi_setopt_long(CURLM *handle, CURLMoption option, long value) {
    return curl_multi_setopt(handle, option, value);
}
static inline CURLMcode aq_curl_multi_setopt_ptr(CURLM *handle, CURLMoption option, void *value) {
    return curl_multi_setopt(handle, option, value);
}
typedef int (*aq_curl_socket_callback)(CURL *easy, curl_socket_t s, int what, void *clientp, void *socketp);
static inline CURLMcode aq_curl_multi_setopt_socket_callback(CURLM *handle, aq_curl_socket_callback value) {
    return curl_multi_setopt(handle, CURLMOPT_SOCKETFUNCTION, value);
}
typedef int (*aq_curl_timer_callback)(CURLM *multi, long timeout_ms, void *clientp);
static inline CURLMcode aq_curl_multi_setopt_timer_callback(CURLM *handle, aq_curl_timer_callback value) {
    return curl_multi_setopt(handle, CURLMOPT_TIMERFUNCTION, value);
}
/* Lets the caller decide, per resolved address, whether a connection may be opened at all. */
typedef curl_socket_t (*aq_curl_opensocket_callback)(void *clientp, curlsocktype purpose,
                                                     struct curl_sockaddr *address);
static inline CURLcode aq_curl_easy_setopt_opensocket(CURL *handle, aq_curl_opensocket_callback value) {
    return curl_easy_setopt(handle, CURLOPT_OPENSOCKETFUNCTION, value);
}
/* CURLMsg's `data` is a union; these read it without Swift union gymnastics. */
static inline CURLcode aq_curl_msg_result(const CURLMsg *msg) { return msg->data.result; }
static inline CURLcode aq_curl_easy_getinfo_long(CURL *handle, CURLINFO info, long *value) {
    return curl_easy_getinfo(handle, info, value);
}
static inline CURLcode aq_curl_easy_getinfo_double(CURL *handle, CURLINFO info, double *value) {
    return curl_easy_getinfo(handle, info, value);
}
static inline CURLcode aq_curl_easy_getinfo_ptr(CURL *handle, CURLINFO info, void *value) {
    return curl_easy_getinfo(handle, info, value);
}

#endif
