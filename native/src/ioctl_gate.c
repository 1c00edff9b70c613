/* The ioctl gate (see ioctl_gate.h): request tables, descriptor kinds, the call, the error shape. */
#include "ioctl_gate.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>

#include "convert.h"
#include "errors.h"

/* runs on any thread */
const struct mmb_ioctl *mmb_ioctl_entry(const struct mmb_ioctl_family *f, size_t i) {
  return (const struct mmb_ioctl *)((const char *)f->table + i * f->stride);
}

/* runs on any thread */
const struct mmb_ioctl *mmb_ioctl_find(const struct mmb_ioctl_family *f, unsigned long nr, int fd) {
  unsigned kind = f->fd_kind != NULL ? f->fd_kind(fd) : 0;
  const struct mmb_ioctl *first = NULL;
  for (size_t i = 0; i < f->count; i++) {
    const struct mmb_ioctl *r = mmb_ioctl_entry(f, i);
    if (r->nr != nr) continue;
    if (r->fds == 0 || (r->fds & kind) != 0) return r;
    if (first == NULL) first = r;
  }
  return first;
}

/* runs on any thread */
bool mmb_ioctl_fd_ok(const struct mmb_ioctl_family *f, const struct mmb_ioctl *r, int fd) {
  if (r->fds == 0 || f->fd_kind == NULL) return true;
  return (f->fd_kind(fd) & r->fds) != 0;
}

/* runs on the main thread */
const struct mmb_ioctl *mmb_ioctl_lookup(napi_env env, const struct mmb_ioctl_family *f, napi_value request, int fd,
                                         enum mmb_ioctl_entry entry) {
  int64_t nr;
  if (!mmb_arg_int64(env, request, 0, UINT32_MAX, "request", &nr)) return NULL;
  const struct mmb_ioctl *r = mmb_ioctl_find(f, (unsigned long)nr, fd);
  if (r == NULL || r->arg == MMB_IOCTL_OWN) {
    mmb_ioctl_refuse(env, (unsigned long)nr);
    return NULL;
  }
  bool is_struct = r->arg == MMB_IOCTL_EXACT || r->arg == MMB_IOCTL_SIZED;
  if (is_struct != (entry == MMB_ENTRY_STRUCT)) {
    mmb_throw_ioctl(env, EINVAL, r->name);
    return NULL;
  }
  return r;
}

/* runs on any thread, no JS access */
int mmb_ioctl_call(const struct mmb_ioctl_family *f, const struct mmb_ioctl *r, int fd, unsigned long arg) {
  if (!mmb_ioctl_fd_ok(f, r, fd)) return -ENOTTY;
  int rc;
  do rc = ioctl(fd, r->nr, arg);
  while (rc < 0 && errno == EINTR && !r->interruptible);
  return rc < 0 ? -errno : rc;
}

/* runs on the main thread */
napi_value mmb_ioctl_error(napi_env env, int err, const char *name) {
  napi_value error = mmb_errno_error(env, err, "ioctl");
  if (error == NULL) return NULL;
  const char *code = strerrorname_np(err);
  const char *desc = strerrordesc_np(err);
  char msg[256];
  snprintf(msg, sizeof msg, "ioctl %s failed: %s (%s)", name, desc ? desc : "Unknown error", code ? code : "UNKNOWN");
  napi_value js_msg, js_name;
  if (napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &js_msg) != napi_ok ||
      napi_create_string_utf8(env, name, NAPI_AUTO_LENGTH, &js_name) != napi_ok ||
      napi_set_named_property(env, error, "message", js_msg) != napi_ok ||
      napi_set_named_property(env, error, "request", js_name) != napi_ok)
    return NULL;
  return error;
}

/* runs on the main thread */
napi_value mmb_throw_ioctl(napi_env env, int err, const char *name) {
  napi_value error = mmb_ioctl_error(env, err, name);
  if (error == NULL)
    mmb_throw_napi(env, napi_generic_failure, "creating an ioctl error");
  else
    napi_throw(env, error);
  return NULL;
}

/* runs on the main thread */
napi_value mmb_ioctl_refuse(napi_env env, unsigned long nr) {
  char name[64];
  snprintf(name, sizeof name, "0x%lx (not allowed)", nr);
  return mmb_throw_ioctl(env, EPERM, name);
}
