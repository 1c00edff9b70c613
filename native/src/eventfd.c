/*
 * eventfd(2): a counter the kernel and other processes can signal. Every function runs on the main
 * thread. Reads and writes never block only if the fd is non-blocking (EFD_NONBLOCK), which callers
 * are expected to request: the addon does not change an fd's flags behind the caller's back.
 */
#include <errno.h>
#include <stdint.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "addon.h"
#include "convert.h"
#include "errors.h"

/* eventfd(initval, flags) -> fd. EFD_CLOEXEC is always added. runs on the main thread */
static napi_value eventfd_js(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int64_t initval;
  int flags;
  if (!mmb_args(env, info, 2, argv) || !mmb_arg_int64(env, argv[0], 0, UINT32_MAX, "initval", &initval) ||
      !mmb_arg_flags(env, argv[1], "flags", &flags))
    return NULL;

  int fd = eventfd((unsigned)initval, flags | EFD_CLOEXEC);
  if (fd < 0) return mmb_throw_errno(env, errno, "eventfd");
  return mmb_new_fd(env, fd);
}

/*
 * eventfdRead(fd) -> counter value, or null on EAGAIN. Values above 2^53 lose precision as JS
 * numbers; counters used for signalling never get there. runs on the main thread
 */
static napi_value eventfd_read_js(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int fd;
  if (!mmb_args(env, info, 1, argv) || !mmb_arg_fd(env, argv[0], &fd)) return NULL;

  uint64_t value;
  ssize_t n;
  do n = read(fd, &value, sizeof value);
  while (n < 0 && errno == EINTR);

  napi_value result;
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
    CHECK(napi_get_null(env, &result));
    return result;
  }
  if (n < 0) return mmb_throw_errno(env, errno, "read");
  if (n != sizeof value) return mmb_throw_errno(env, EIO, "read"); /* not an eventfd */
  CHECK(napi_create_double(env, (double)value, &result));
  return result;
}

/* eventfdWrite(fd, value): adds value to the counter. runs on the main thread */
static napi_value eventfd_write_js(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int fd;
  uint64_t value;
  if (!mmb_args(env, info, 2, argv) || !mmb_arg_fd(env, argv[0], &fd) ||
      !mmb_arg_size(env, argv[1], "value", &value))
    return NULL;

  ssize_t n;
  do n = write(fd, &value, sizeof value);
  while (n < 0 && errno == EINTR);
  if (n < 0) return mmb_throw_errno(env, errno, "write");
  if (n != sizeof value) return mmb_throw_errno(env, EIO, "write");
  return NULL;
}

/* runs on the main thread, at module load */
bool mmb_init_eventfd(napi_env env, napi_value exports) {
  static const mmb_method methods[] = {
      {"eventfd", eventfd_js}, {"eventfdRead", eventfd_read_js}, {"eventfdWrite", eventfd_write_js}};
  return mmb_export_methods(env, exports, methods, MMB_COUNT(methods));
}
