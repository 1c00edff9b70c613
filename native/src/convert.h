/*
 * Conversion between JS values and C for napi_callbacks. All functions run on the main (JS) thread.
 *
 * TypeScript validates policy; these helpers only make sure that what reaches a syscall is the type
 * and range C needs for memory safety: numbers must be integers (TypeError otherwise) inside the
 * target range (RangeError otherwise). Each returns false with a JS exception pending on failure.
 */
#ifndef MMB_CONVERT_H
#define MMB_CONVERT_H

#include <node_api.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* 2^53 - 1: the largest integer a JS number holds exactly. */
#define MMB_MAX_SAFE_INTEGER 9007199254740991LL

/* Fetches exactly `n` arguments (missing ones read as undefined). */
bool mmb_args(napi_env env, napi_callback_info info, size_t n, napi_value *argv);

/* An integer number in [min, max]. `what` names the argument in messages. */
bool mmb_arg_int64(napi_env env, napi_value v, int64_t min, int64_t max, const char *what,
                   int64_t *out);
/* A file descriptor: an integer in [0, INT_MAX]. */
bool mmb_arg_fd(napi_env env, napi_value v, int *out);
/* An int-sized flag word (any int32 value, or a uint32 value that fits in 32 bits). */
bool mmb_arg_flags(napi_env env, napi_value v, const char *what, int *out);
/* A size or offset: an integer in [0, 2^53 - 1]. */
bool mmb_arg_size(napi_env env, napi_value v, const char *what, uint64_t *out);
bool mmb_arg_bool(napi_env env, napi_value v, const char *what, bool *out);
/*
 * A Uint8Array (Buffer included). `data` points at its first byte (NULL for an empty or detached
 * view). The pointer is valid only until control returns to JS.
 */
bool mmb_arg_bytes(napi_env env, napi_value v, const char *what, uint8_t **data, size_t *len);
/*
 * A non-empty string without NUL characters, UTF-8 encoded and NUL-terminated into buf. If it does
 * not fit, throws the errno-style error (`toolong_errno`, `syscall`) the kernel would have raised.
 */
bool mmb_arg_cstring(napi_env env, napi_value v, const char *what, char *buf, size_t bufsize,
                     int toolong_errno, const char *syscall);

/* Sets obj[name] = number (writable, as with plain assignment). */
bool mmb_set_number(napi_env env, napi_value obj, const char *name, double value);
/*
 * Hands a descriptor the addon just created to JS as a number. If that fails, the descriptor is
 * closed (nobody else could) and NULL is returned with an exception pending.
 */
napi_value mmb_new_fd(napi_env env, int fd);

#endif
