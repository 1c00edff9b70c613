/*
 * sendmsg(2)/recvmsg(2) with descriptors (SCM_RIGHTS). Both run on the main thread and never
 * block: MSG_DONTWAIT is passed on every call, whatever the fd's own flags.
 *
 * Receiving follows the usual SCM_RIGHTS hygiene: MSG_CMSG_CLOEXEC so a received fd can never leak
 * into a child, a control buffer bounded by the caller's maxFds, every control message walked, and
 * MSG_CTRUNC checked. A received descriptor is either handed to JS in the result or closed here,
 * on every path.
 */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "addon.h"
#include "convert.h"
#include "errors.h"
#include "scm.h"

/* Room for the largest control message we send or accept, aligned for struct cmsghdr. */
union control {
  struct cmsghdr align;
  char buf[CMSG_SPACE(sizeof(int) * MMB_SCM_MAX_FD)];
};

/* runs on the main thread */
static void close_all(const int *fds, size_t n) {
  for (size_t i = 0; i < n; i++) close(fds[i]);
}

/*
 * sendmsg(fd, data, fds) -> bytes sent, or null when the socket buffer is full (nothing sent).
 * runs on the main thread
 *
 * The fds ride in one SCM_RIGHTS message attached to the first byte sent, so a call carrying fds
 * must carry at least one byte: a stream socket silently drops the descriptors of a 0-byte send.
 * The caller keeps ownership of its fds (the kernel passes duplicates).
 */
static napi_value sendmsg_js(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int fd;
  if (!mmb_args(env, info, 3, argv) || !mmb_arg_fd(env, argv[0], &fd)) return NULL;

  bool is_array;
  uint32_t nfds;
  CHECK(napi_is_array(env, argv[2], &is_array));
  if (!is_array) return mmb_throw_type(env, "fds must be an array");
  CHECK(napi_get_array_length(env, argv[2], &nfds));
  if (nfds > MMB_SCM_MAX_FD) return mmb_throw_errno(env, E2BIG, "sendmsg");

  union control control;
  memset(&control, 0, sizeof control);
  struct msghdr msg = {0};
  if (nfds > 0) {
    msg.msg_control = control.buf;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
    unsigned char *slot = CMSG_DATA(cmsg);
    for (uint32_t i = 0; i < nfds; i++) {
      napi_value element;
      int one;
      CHECK(napi_get_element(env, argv[2], i, &element));
      if (!mmb_arg_fd(env, element, &one)) return NULL;
      memcpy(slot + i * sizeof(int), &one, sizeof one);
    }
  }

  /* Read the data pointer last: napi_get_element above may run JS (getters) that could detach it. */
  uint8_t *data;
  size_t len;
  if (!mmb_arg_bytes(env, argv[1], "data", &data, &len)) return NULL;
  if (nfds > 0 && len == 0) return mmb_throw_errno(env, EINVAL, "sendmsg");

  struct iovec iov = {.iov_base = data, .iov_len = len};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;

  ssize_t n;
  do n = sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
  while (n < 0 && errno == EINTR);

  napi_value result;
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
    CHECK(napi_get_null(env, &result));
    return result;
  }
  if (n < 0) return mmb_throw_errno(env, errno, "sendmsg");
  CHECK(napi_create_double(env, (double)n, &result));
  return result;
}

/* Builds {bytes, fds, ctrunc}; false with an exception pending on failure. main thread */
static bool make_received(napi_env env, ssize_t bytes, const int *fds, size_t nfds, bool ctrunc,
                          napi_value *out) {
  napi_value result, array, flag;
  CHECK_BOOL(napi_create_object(env, &result));
  if (!mmb_set_number(env, result, "bytes", (double)bytes)) return false;
  CHECK_BOOL(napi_create_array_with_length(env, nfds, &array));
  for (size_t i = 0; i < nfds; i++) {
    napi_value v;
    CHECK_BOOL(napi_create_int32(env, fds[i], &v));
    CHECK_BOOL(napi_set_element(env, array, (uint32_t)i, v));
  }
  CHECK_BOOL(napi_set_named_property(env, result, "fds", array));
  CHECK_BOOL(napi_get_boolean(env, ctrunc, &flag));
  CHECK_BOOL(napi_set_named_property(env, result, "ctrunc", flag));
  *out = result;
  return true;
}

/*
 * recvmsg(fd, buf, maxFds) -> {bytes, fds, ctrunc}, or null when nothing is pending.
 * bytes == 0 is EOF (buf must not be empty, or a 0-byte read would look like EOF).
 * runs on the main thread
 */
static napi_value recvmsg_js(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int fd;
  int64_t max_fds;
  uint8_t *data;
  size_t len;
  if (!mmb_args(env, info, 3, argv) || !mmb_arg_fd(env, argv[0], &fd) ||
      !mmb_arg_int64(env, argv[2], 0, MMB_SCM_MAX_FD, "maxFds", &max_fds) ||
      !mmb_arg_bytes(env, argv[1], "buf", &data, &len))
    return NULL;
  if (len == 0) return mmb_throw_range(env, "buf must not be empty");

  union control control;
  struct iovec iov = {.iov_base = data, .iov_len = len};
  struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
  if (max_fds > 0) {
    /* CMSG_LEN, not CMSG_SPACE: the kernel fits (controllen - header) / sizeof(int) descriptors, and
     * CMSG_SPACE's alignment padding would admit one more than maxFds when maxFds is odd. */
    msg.msg_control = control.buf;
    msg.msg_controllen = CMSG_LEN(sizeof(int) * (size_t)max_fds);
  }

  ssize_t n;
  do n = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
  while (n < 0 && errno == EINTR);

  napi_value result;
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
    CHECK(napi_get_null(env, &result));
    return result;
  }
  if (n < 0) return mmb_throw_errno(env, errno, "recvmsg"); /* nothing was received */

  /* Collect every descriptor from every SCM_RIGHTS message. Other types (SCM_CREDENTIALS,
   * SCM_SECURITY, if someone enabled them on the socket) carry no descriptors and are ignored. */
  int fds[MMB_SCM_MAX_FD];
  size_t nfds = 0;
  for (struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg); cmsg != NULL; cmsg = CMSG_NXTHDR(&msg, cmsg)) {
    if (cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_type != SCM_RIGHTS) continue;
    if (cmsg->cmsg_len < CMSG_LEN(0)) continue;
    size_t count = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    const unsigned char *slot = CMSG_DATA(cmsg);
    for (size_t i = 0; i < count; i++) {
      int one;
      memcpy(&one, slot + i * sizeof(int), sizeof one);
      if (nfds < MMB_SCM_MAX_FD)
        fds[nfds++] = one;
      else
        close(one); /* cannot happen with our buffer size; never leak if it does */
    }
  }

  bool ctrunc = (msg.msg_flags & MSG_CTRUNC) != 0;
  if (ctrunc) {
    /* Some descriptors were dropped by the kernel: the message is unusable as a whole. */
    close_all(fds, nfds);
    nfds = 0;
  }

  if (!make_received(env, n, fds, nfds, ctrunc, &result)) {
    close_all(fds, nfds);
    return NULL;
  }
  return result;
}

/* runs on the main thread, at module load */
bool mmb_init_scm(napi_env env, napi_value exports) {
  static const mmb_method methods[] = {{"sendmsg", sendmsg_js}, {"recvmsg", recvmsg_js}};
  return mmb_export_methods(env, exports, methods, MMB_COUNT(methods));
}
