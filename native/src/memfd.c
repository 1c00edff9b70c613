/*
 * Memory objects and plain fd operations: memfd_create, ftruncate, fstat, seals, dup, close.
 * Every function runs on the main thread and performs one syscall.
 */
#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "addon.h"
#include "convert.h"
#include "errors.h"

/* The kernel's limit: "memfd:" + name must fit in NAME_MAX (249 bytes of name). */
#define MEMFD_NAME_MAX 249

/*
 * memfdCreate(name, flags) -> fd. MFD_CLOEXEC is always added: every fd the addon creates is
 * close-on-exec. Runs on the main thread.
 */
static napi_value memfd_create_js(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  char name[MEMFD_NAME_MAX + 1];
  int flags;
  if (!mmb_args(env, info, 2, argv) ||
      !mmb_arg_cstring(env, argv[0], "name", name, sizeof name, EINVAL, "memfd_create") ||
      !mmb_arg_flags(env, argv[1], "flags", &flags))
    return NULL;

  int fd = memfd_create(name, (unsigned)flags | MFD_CLOEXEC);
  if (fd < 0) return mmb_throw_errno(env, errno, "memfd_create");

  return mmb_new_fd(env, fd);
}

/* ftruncate(fd, size). Runs on the main thread. */
static napi_value ftruncate_js(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int fd;
  uint64_t size;
  if (!mmb_args(env, info, 2, argv) || !mmb_arg_fd(env, argv[0], &fd) ||
      !mmb_arg_size(env, argv[1], "size", &size))
    return NULL;

  int rc;
  do rc = ftruncate(fd, (off_t)size);
  while (rc < 0 && errno == EINTR);
  if (rc < 0) return mmb_throw_errno(env, errno, "ftruncate");
  return NULL;
}

/* fstat(fd) -> {size, mode, dev, ino}. Runs on the main thread. */
static napi_value fstat_js(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int fd;
  if (!mmb_args(env, info, 1, argv) || !mmb_arg_fd(env, argv[0], &fd)) return NULL;

  struct stat st;
  if (fstat(fd, &st) < 0) return mmb_throw_errno(env, errno, "fstat");

  napi_value result;
  CHECK(napi_create_object(env, &result));
  if (!mmb_set_number(env, result, "size", (double)st.st_size) ||
      !mmb_set_number(env, result, "mode", (double)st.st_mode) ||
      !mmb_set_number(env, result, "dev", (double)st.st_dev) ||
      !mmb_set_number(env, result, "ino", (double)st.st_ino))
    return NULL;
  return result;
}

/* fcntl(fd, F_ADD_SEALS, seals). Runs on the main thread. */
static napi_value add_seals_js(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int fd, seals;
  if (!mmb_args(env, info, 2, argv) || !mmb_arg_fd(env, argv[0], &fd) ||
      !mmb_arg_flags(env, argv[1], "seals", &seals))
    return NULL;

  if (fcntl(fd, F_ADD_SEALS, seals) < 0) return mmb_throw_errno(env, errno, "fcntl");
  return NULL;
}

/* fcntl(fd, F_GET_SEALS) -> seals. Runs on the main thread. */
static napi_value get_seals_js(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int fd;
  if (!mmb_args(env, info, 1, argv) || !mmb_arg_fd(env, argv[0], &fd)) return NULL;

  int seals = fcntl(fd, F_GET_SEALS);
  if (seals < 0) return mmb_throw_errno(env, errno, "fcntl");

  napi_value result;
  CHECK(napi_create_int32(env, seals, &result));
  return result;
}

/* fcntl(fd, F_DUPFD_CLOEXEC, 0) -> new fd, owned by the caller. Runs on the main thread. */
static napi_value dup_js(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int fd;
  if (!mmb_args(env, info, 1, argv) || !mmb_arg_fd(env, argv[0], &fd)) return NULL;

  int copy = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (copy < 0) return mmb_throw_errno(env, errno, "fcntl");

  return mmb_new_fd(env, copy);
}

/*
 * close(fd). EINTR is success: on Linux the descriptor is released before close() can be
 * interrupted, and retrying could close an fd another thread just received. Runs on the main thread.
 */
static napi_value close_js(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int fd;
  if (!mmb_args(env, info, 1, argv) || !mmb_arg_fd(env, argv[0], &fd)) return NULL;

  if (close(fd) < 0 && errno != EINTR) return mmb_throw_errno(env, errno, "close");
  return NULL;
}

/*
 * seekData(fd, offset, hole) -> offset | -1: lseek(SEEK_DATA), or SEEK_HOLE when `hole`, from `offset`.
 * -1 when there is no data at or after offset (ENXIO). Lets a reader skip the holes of a sparse memfd
 * instead of faulting them in (reading a hole through a shared mapping allocates it). Runs on the main
 * thread.
 */
static napi_value seek_data_js(napi_env env, napi_callback_info info) {
  napi_value argv[3], result;
  int fd;
  uint64_t offset;
  bool hole;
  if (!mmb_args(env, info, 3, argv) || !mmb_arg_fd(env, argv[0], &fd) ||
      !mmb_arg_size(env, argv[1], "offset", &offset) || !mmb_arg_bool(env, argv[2], "hole", &hole))
    return NULL;
  off_t at = lseek(fd, (off_t)offset, hole ? SEEK_HOLE : SEEK_DATA);
  if (at < 0 && errno != ENXIO) return mmb_throw_errno(env, errno, "lseek");
  CHECK(napi_create_double(env, at < 0 ? -1 : (double)at, &result));
  return result;
}

/* runs on the main thread, at module load */
bool mmb_init_memfd(napi_env env, napi_value exports) {
  static const mmb_method methods[] = {
      {"memfdCreate", memfd_create_js}, {"ftruncate", ftruncate_js}, {"fstat", fstat_js},
      {"addSeals", add_seals_js},       {"getSeals", get_seals_js},   {"dup", dup_js},
      {"close", close_js},              {"seekData", seek_data_js},
  };
  return mmb_export_methods(env, exports, methods, MMB_COUNT(methods));
}
