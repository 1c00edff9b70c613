/*
 * Error reporting for the addon. All functions here run on the main (JS) thread.
 *
 * Convention: a failed syscall becomes a JS Error with
 *   code    = errno name ("EINVAL", from strerrorname_np),
 *   errno   = negative errno (-22), as in Node's own fs errors,
 *   syscall = the failing call ("mmap"),
 *   message = "mmap failed: Invalid argument (EINVAL)".
 * A failed N-API call throws a plain Error naming the call; argument misuse throws TypeError or
 * RangeError. Helpers that can fail return false with a JS exception pending; callers then return
 * NULL to JS.
 */
#ifndef MMB_ERRORS_H
#define MMB_ERRORS_H

#include <node_api.h>
#include <stdbool.h>

/* Throw if `call` (an N-API call) did not return napi_ok, then `return ret` from the caller. */
#define NAPI_CALL_RET(env, call, ret)                                    \
  do {                                                                   \
    napi_status mmb_status_ = (call);                                    \
    if (mmb_status_ != napi_ok) {                                        \
      mmb_throw_napi((env), mmb_status_, #call);                         \
      return ret;                                                        \
    }                                                                    \
  } while (0)

/* The common case inside a napi_callback: `env` in scope, return NULL (undefined) on failure. */
#define CHECK(call) NAPI_CALL_RET(env, (call), NULL)
/* Inside helpers that return bool. */
#define CHECK_BOOL(call) NAPI_CALL_RET(env, (call), false)

/* Throws a plain Error for a failed N-API call, unless an exception is already pending. */
void mmb_throw_napi(napi_env env, napi_status status, const char *what);

/* Builds (does not throw) the errno-style error described above. Returns NULL if N-API fails. */
napi_value mmb_errno_error(napi_env env, int err, const char *syscall);

/* Throws the errno-style error. Always returns NULL so callers can `return mmb_throw_errno(...)`. */
napi_value mmb_throw_errno(napi_env env, int err, const char *syscall);

/*
 * Same shape for a libuv error: `uv_err` is libuv's negative code (which on Unix is -errno), the
 * code is uv_err_name's. Always returns NULL.
 */
napi_value mmb_throw_uv(napi_env env, int uv_err, const char *syscall);

napi_value mmb_throw_type(napi_env env, const char *msg);
napi_value mmb_throw_range(napi_env env, const char *msg);

#endif
