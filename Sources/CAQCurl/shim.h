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
