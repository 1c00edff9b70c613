/*
 * The service manager's readiness protocol (sd_notify(3)): one datagram of newline-separated
 * assignments ("READY=1", "STOPPING=1", "WATCHDOG=1", "STATUS=...") sent to the AF_UNIX datagram socket
 * named by $NOTIFY_SOCKET. Node has no datagram Unix sockets, so this is the one call it needs; the
 * protocol (what to send, when) lives in TypeScript (cli/sd-notify.ts). libsystemd is not linked: it
 * is one sendto(), and the addon must build where libsystemd-dev is absent.
 * Runs on the main thread and never blocks (MSG_DONTWAIT: a full socket buffer is EAGAIN, reported).
 */
#include <errno.h>
#include <stddef.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "addon.h"
#include "convert.h"
#include "errors.h"

/*
 * notifySend(socketPath, message): one datagram to socketPath, a filesystem path, or an abstract
 * address when it starts with '@' (as $NOTIFY_SOCKET may). runs on the main thread
 */
static napi_value notify_send_js(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  struct sockaddr_un addr;
  char path[sizeof addr.sun_path + 1];
  char message[4096];
  if (!mmb_args(env, info, 2, argv) ||
      !mmb_arg_cstring(env, argv[0], "socketPath", path, sizeof path, ENAMETOOLONG, "sendto") ||
      !mmb_arg_cstring(env, argv[1], "message", message, sizeof message, EMSGSIZE, "sendto"))
    return NULL;

  size_t len = strlen(path);
  if (len > sizeof addr.sun_path) return mmb_throw_errno(env, ENAMETOOLONG, "sendto");
  memset(&addr, 0, sizeof addr);
  addr.sun_family = AF_UNIX;
  memcpy(addr.sun_path, path, len);
  /* An abstract address: a leading NUL instead of '@', and no terminating NUL counted in its length. */
  if (path[0] == '@') addr.sun_path[0] = '\0';
  socklen_t addrlen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len);

  int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return mmb_throw_errno(env, errno, "socket");
  ssize_t sent;
  do sent = sendto(fd, message, strlen(message), MSG_NOSIGNAL | MSG_DONTWAIT, (struct sockaddr *)&addr, addrlen);
  while (sent < 0 && errno == EINTR);
  int err = errno;
  close(fd);
  if (sent < 0) return mmb_throw_errno(env, err, "sendto");
  return NULL;
}

bool mmb_init_notify(napi_env env, napi_value exports) {
  static const mmb_method methods[] = {
      {"notifySend", notify_send_js},
  };
  return mmb_export_methods(env, exports, methods, MMB_COUNT(methods));
}
