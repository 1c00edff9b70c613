#include "convert.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "errors.h"

/* runs on the main thread */
bool mmb_args(napi_env env, napi_callback_info info, size_t n, napi_value *argv) {
  size_t argc = n;
  CHECK_BOOL(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < n) {
    napi_value undef;
    CHECK_BOOL(napi_get_undefined(env, &undef));
    for (size_t i = argc; i < n; i++) argv[i] = undef;
  }
  return true;
}

/* runs on the main thread */
bool mmb_arg_int64(napi_env env, napi_value v, int64_t min, int64_t max, const char *what,
                   int64_t *out) {
  char msg[128];
  napi_valuetype type;
  CHECK_BOOL(napi_typeof(env, v, &type));
  double d;
  if (type == napi_number) CHECK_BOOL(napi_get_value_double(env, v, &d));
  if (type != napi_number || !isfinite(d) || d != trunc(d)) {
    snprintf(msg, sizeof msg, "%s must be an integer", what);
    mmb_throw_type(env, msg);
    return false;
  }
  /* Compare as doubles first: casting an out-of-range double to int64 is undefined behaviour. */
  if (d < (double)min || d > (double)max) {
    snprintf(msg, sizeof msg, "%s is out of range: %.17g", what, d);
    mmb_throw_range(env, msg);
    return false;
  }
  int64_t value;
  CHECK_BOOL(napi_get_value_int64(env, v, &value));
  if (value < min || value > max) { /* only reachable at the rounded edges of int64 */
    snprintf(msg, sizeof msg, "%s is out of range", what);
    mmb_throw_range(env, msg);
    return false;
  }
  *out = value;
  return true;
}

/* runs on the main thread */
bool mmb_arg_fd(napi_env env, napi_value v, int *out) {
  int64_t value;
  if (!mmb_arg_int64(env, v, 0, INT_MAX, "fd", &value)) return false;
  *out = (int)value;
  return true;
}

/* runs on the main thread */
bool mmb_arg_flags(napi_env env, napi_value v, const char *what, int *out) {
  int64_t value;
  if (!mmb_arg_int64(env, v, INT32_MIN, UINT32_MAX, what, &value)) return false;
  *out = (int)(uint32_t)value;
  return true;
}

/* runs on the main thread */
bool mmb_arg_size(napi_env env, napi_value v, const char *what, uint64_t *out) {
  int64_t value;
  if (!mmb_arg_int64(env, v, 0, MMB_MAX_SAFE_INTEGER, what, &value)) return false;
  *out = (uint64_t)value;
  return true;
}

/* runs on the main thread */
bool mmb_arg_bool(napi_env env, napi_value v, const char *what, bool *out) {
  napi_valuetype type;
  CHECK_BOOL(napi_typeof(env, v, &type));
  if (type != napi_boolean) {
    char msg[128];
    snprintf(msg, sizeof msg, "%s must be a boolean", what);
    mmb_throw_type(env, msg);
    return false;
  }
  CHECK_BOOL(napi_get_value_bool(env, v, out));
  return true;
}

/* runs on the main thread */
bool mmb_arg_bytes(napi_env env, napi_value v, const char *what, uint8_t **data, size_t *len) {
  char msg[128];
  bool is_typed = false;
  CHECK_BOOL(napi_is_typedarray(env, v, &is_typed));
  napi_typedarray_type type = napi_int8_array;
  size_t length = 0;
  void *ptr = NULL;
  if (is_typed) CHECK_BOOL(napi_get_typedarray_info(env, v, &type, &length, &ptr, NULL, NULL));
  if (!is_typed || type != napi_uint8_array) {
    snprintf(msg, sizeof msg, "%s must be a Uint8Array", what);
    mmb_throw_type(env, msg);
    return false;
  }
  *data = length > 0 ? ptr : NULL;
  *len = length;
  return true;
}

/* runs on the main thread */
bool mmb_arg_cstring(napi_env env, napi_value v, const char *what, char *buf, size_t bufsize,
                     int toolong_errno, const char *syscall) {
  char msg[128];
  napi_valuetype type;
  CHECK_BOOL(napi_typeof(env, v, &type));
  if (type != napi_string) {
    snprintf(msg, sizeof msg, "%s must be a string", what);
    mmb_throw_type(env, msg);
    return false;
  }
  size_t needed;
  CHECK_BOOL(napi_get_value_string_utf8(env, v, NULL, 0, &needed));
  if (needed + 1 > bufsize) {
    mmb_throw_errno(env, toolong_errno, syscall);
    return false;
  }
  size_t copied;
  CHECK_BOOL(napi_get_value_string_utf8(env, v, buf, bufsize, &copied));
  if (copied == 0 || strlen(buf) != copied) {
    snprintf(msg, sizeof msg, "%s must be a non-empty string without NUL characters", what);
    mmb_throw_type(env, msg);
    return false;
  }
  return true;
}

/* runs on the main thread */
bool mmb_set_number(napi_env env, napi_value obj, const char *name, double value) {
  napi_value v;
  CHECK_BOOL(napi_create_double(env, value, &v));
  CHECK_BOOL(napi_set_named_property(env, obj, name, v));
  return true;
}

/* runs on the main thread */
napi_value mmb_new_fd(napi_env env, int fd) {
  napi_value v;
  napi_status status = napi_create_int32(env, fd, &v);
  if (status != napi_ok) {
    close(fd);
    mmb_throw_napi(env, status, "napi_create_int32");
    return NULL;
  }
  return v;
}
