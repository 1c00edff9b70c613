#include "errors.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <uv.h>

/* runs on the main thread */
void mmb_throw_napi(napi_env env, napi_status status, const char *what) {
  bool pending = false;
  if (napi_is_exception_pending(env, &pending) == napi_ok && pending) return;

  const napi_extended_error_info *info = NULL;
  const char *detail = NULL;
  if (napi_get_last_error_info(env, &info) == napi_ok && info != NULL) detail = info->error_message;

  char msg[256];
  snprintf(msg, sizeof msg, "N-API call failed (status %d%s%s): %s", (int)status,
           detail ? ", " : "", detail ? detail : "", what);
  napi_throw_error(env, NULL, msg);
}

/* runs on the main thread */
static napi_value make_error(napi_env env, const char *code, int neg_errno, const char *desc,
                             const char *syscall) {
  char msg[256];
  snprintf(msg, sizeof msg, "%s failed: %s (%s)", syscall, desc, code);

  napi_value js_code, js_msg, js_errno, js_syscall, error;
  if (napi_create_string_utf8(env, code, NAPI_AUTO_LENGTH, &js_code) != napi_ok ||
      napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &js_msg) != napi_ok ||
      napi_create_int32(env, neg_errno, &js_errno) != napi_ok ||
      napi_create_string_utf8(env, syscall, NAPI_AUTO_LENGTH, &js_syscall) != napi_ok ||
      napi_create_error(env, js_code, js_msg, &error) != napi_ok ||
      napi_set_named_property(env, error, "errno", js_errno) != napi_ok ||
      napi_set_named_property(env, error, "syscall", js_syscall) != napi_ok)
    return NULL;
  return error;
}

/* runs on the main thread */
napi_value mmb_errno_error(napi_env env, int err, const char *syscall) {
  const char *code = strerrorname_np(err);
  const char *desc = strerrordesc_np(err);
  if (code == NULL) code = "UNKNOWN";
  return make_error(env, code, -err, desc ? desc : "Unknown error", syscall);
}

/* runs on the main thread */
napi_value mmb_throw_errno(napi_env env, int err, const char *syscall) {
  napi_value error = mmb_errno_error(env, err, syscall);
  if (error == NULL)
    mmb_throw_napi(env, napi_generic_failure, "creating an errno error");
  else
    napi_throw(env, error);
  return NULL;
}

/* runs on the main thread */
napi_value mmb_throw_uv(napi_env env, int uv_err, const char *syscall) {
  napi_value error = make_error(env, uv_err_name(uv_err), uv_err, uv_strerror(uv_err), syscall);
  if (error == NULL)
    mmb_throw_napi(env, napi_generic_failure, "creating a libuv error");
  else
    napi_throw(env, error);
  return NULL;
}

/* runs on the main thread */
napi_value mmb_throw_type(napi_env env, const char *msg) {
  napi_throw_type_error(env, NULL, msg);
  return NULL;
}

/* runs on the main thread */
napi_value mmb_throw_range(napi_env env, const char *msg) {
  napi_throw_range_error(env, NULL, msg);
  return NULL;
}
