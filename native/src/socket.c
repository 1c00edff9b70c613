/*
 * Unix stream sockets: listen, connect, accept (with the peer's credentials and pidfd), socketpair,
 * shutdown; and the pidfd calls that go with a peer (pidfd_send_signal, pidfd_open).
 * Every socket the addon creates is SOCK_CLOEXEC | SOCK_NONBLOCK. Every function runs on the main
 * thread and never blocks. Data and descriptors move through scm.c.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stddef.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include "addon.h"
#include "convert.h"
#include "errors.h"

#define SOCK_FLAGS (SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK)

/* Reads a filesystem socket path into addr; returns the address length, 0 on error. main thread */
static socklen_t socket_path(napi_env env, napi_value v, struct sockaddr_un *addr, const char *syscall) {
  memset(addr, 0, sizeof *addr);
  addr->sun_family = AF_UNIX;
  if (!mmb_arg_cstring(env, v, "path", addr->sun_path, sizeof addr->sun_path, ENAMETOOLONG, syscall))
    return 0;
  return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + strlen(addr->sun_path) + 1);
}

/* Closes fd without disturbing the errno we are about to report. runs on the main thread */
static void close_keep_errno(int fd) {
  int saved = errno;
  close(fd);
  errno = saved;
}

/* getsockopt(SO_PEERCRED); -1 with errno set on failure. runs on the main thread */
static int peer_cred(int fd, struct ucred *cred) {
  socklen_t len = sizeof *cred;
  return getsockopt(fd, SOL_SOCKET, SO_PEERCRED, cred, &len);
}

/* Linux 6.5; bookworm's headers (6.1) lack it. The value is the same on every architecture. */
#ifndef SO_PEERPIDFD
#define SO_PEERPIDFD 77
#endif

/*
 * getsockopt(SO_PEERPIDFD): a pidfd (always O_CLOEXEC, the kernel's choice) for the process that
 * connected (or made the socketpair). Returns 0 and sets *out to the pidfd, or to -1 when there is
 * none to be had: the kernel lacks SO_PEERPIDFD (ENOPROTOOPT), or the peer has already exited and
 * been reaped (EINVAL, ESRCH before Linux 6.16) or never had a pid (ENODATA). Returns -1 with errno
 * set on a real failure (EMFILE, ENFILE, ENOMEM, EBADF, ENOTSOCK), which the caller reports.
 * runs on the main thread
 */
static int peer_pidfd(int fd, int *out) {
  int pidfd = -1;
  socklen_t len = sizeof pidfd;
  *out = -1;
  if (getsockopt(fd, SOL_SOCKET, SO_PEERPIDFD, &pidfd, &len) == 0) {
    *out = pidfd;
    return 0;
  }
  if (errno == ENOPROTOOPT || errno == EINVAL || errno == ESRCH || errno == ENODATA) return 0;
  return -1;
}

/* Sets obj.pid/uid/gid. runs on the main thread */
static bool set_cred(napi_env env, napi_value obj, const struct ucred *cred) {
  return mmb_set_number(env, obj, "pid", cred->pid) && mmb_set_number(env, obj, "uid", cred->uid) &&
         mmb_set_number(env, obj, "gid", cred->gid);
}

/*
 * Creates, binds and starts a listening socket whose file must never exist with looser permissions
 * than `mode`. bind() creates the file with the socket inode's mode minus the umask, so the inode gets
 * `mode` first with fchmod() (Linux honours this; unlike umask() it is not process-wide, so no other
 * thread's files are affected): the file is born with `mode`, or tighter where the umask removed bits.
 * Those bits are added back before listen() lets anyone in: with fchmodat() relative to `dir_fd` (the
 * directory the caller checked, see listenAt), or by path for plain socketListen. If a step after
 * bind() fails, the file is removed again. An existing file fails with EADDRINUSE (bind never follows
 * or replaces one); removing a stale socket is the caller's decision. runs on the main thread
 */
static napi_value listen_common(napi_env env, int dir_fd, const char *name, const struct sockaddr_un *addr,
                                socklen_t addrlen, int64_t backlog, int64_t mode) {
  int fd = socket(AF_UNIX, SOCK_FLAGS, 0);
  if (fd < 0) return mmb_throw_errno(env, errno, "socket");

  const char *failed;
  struct stat st;
  if (fchmod(fd, (mode_t)mode) < 0) {
    failed = "fchmod";
    goto fail;
  }
  if (bind(fd, (const struct sockaddr *)addr, addrlen) < 0) {
    failed = "bind";
    goto fail;
  }
  if (fstatat(dir_fd, name, &st, AT_SYMLINK_NOFOLLOW) < 0) {
    failed = "fstatat";
    goto fail_unlink;
  }
  if ((st.st_mode & 07777) != (mode_t)mode && fchmodat(dir_fd, name, (mode_t)mode, 0) < 0) {
    failed = "fchmodat";
    goto fail_unlink;
  }
  if (listen(fd, (int)backlog) < 0) {
    failed = "listen";
    goto fail_unlink;
  }
  return mmb_new_fd(env, fd);

fail_unlink: {
  int saved = errno;
  unlinkat(dir_fd, name, 0);
  errno = saved;
}
fail:
  close_keep_errno(fd);
  return mmb_throw_errno(env, errno, failed);
}

/* socketListen(path, backlog, mode) -> listening fd (see listen_common). runs on the main thread */
static napi_value socket_listen_js(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  struct sockaddr_un addr;
  socklen_t addrlen;
  int64_t backlog, mode;
  if (!mmb_args(env, info, 3, argv) || (addrlen = socket_path(env, argv[0], &addr, "bind")) == 0 ||
      !mmb_arg_int64(env, argv[1], 0, INT32_MAX, "backlog", &backlog) ||
      !mmb_arg_int64(env, argv[2], 0, 07777, "mode", &mode))
    return NULL;
  return listen_common(env, AT_FDCWD, addr.sun_path, &addr, addrlen, backlog, mode);
}

/*
 * socketListenAt(dirFd, name, backlog, mode) -> listening fd: the socket `name` (one path component)
 * inside the directory open as `dirFd` (an O_PATH descriptor will do), bound through
 * /proc/self/fd/DIRFD/NAME (Linux has no bindat) and given its mode with fchmodat(dirFd), so nothing
 * resolves a path the caller did not check. runs on the main thread
 */
static napi_value socket_listen_at_js(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  int dir_fd;
  char name[sizeof ((struct sockaddr_un *)0)->sun_path];
  int64_t backlog, mode;
  if (!mmb_args(env, info, 4, argv) || !mmb_arg_fd(env, argv[0], &dir_fd) ||
      !mmb_arg_cstring(env, argv[1], "name", name, sizeof name, ENAMETOOLONG, "bind") ||
      !mmb_arg_int64(env, argv[2], 0, INT32_MAX, "backlog", &backlog) ||
      !mmb_arg_int64(env, argv[3], 0, 07777, "mode", &mode))
    return NULL;
  if (strchr(name, '/') != NULL || strcmp(name, ".") == 0 || strcmp(name, "..") == 0)
    return mmb_throw_errno(env, EINVAL, "bind");

  struct sockaddr_un addr;
  memset(&addr, 0, sizeof addr);
  addr.sun_family = AF_UNIX;
  int n = snprintf(addr.sun_path, sizeof addr.sun_path, "/proc/self/fd/%d/%s", dir_fd, name);
  if (n < 0 || (size_t)n >= sizeof addr.sun_path) return mmb_throw_errno(env, ENAMETOOLONG, "bind");
  socklen_t addrlen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + (size_t)n + 1);
  return listen_common(env, dir_fd, name, &addr, addrlen, backlog, mode);
}

/*
 * socketConnect(path) -> connected fd. A Unix stream connect never goes "in progress": it either
 * completes or fails at once (EAGAIN when the listener's backlog is full). runs on the main thread
 */
static napi_value socket_connect_js(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  struct sockaddr_un addr;
  socklen_t addrlen;
  if (!mmb_args(env, info, 1, argv) || (addrlen = socket_path(env, argv[0], &addr, "connect")) == 0)
    return NULL;

  int fd = socket(AF_UNIX, SOCK_FLAGS, 0);
  if (fd < 0) return mmb_throw_errno(env, errno, "socket");
  if (connect(fd, (struct sockaddr *)&addr, addrlen) < 0) {
    close_keep_errno(fd);
    return mmb_throw_errno(env, errno, "connect");
  }
  return mmb_new_fd(env, fd);
}

/*
 * socketAccept(fd) -> {fd, pid, uid, gid, pidfd} or null when nothing is pending. pidfd is the peer's
 * (see peer_pidfd), -1 when there is none; the caller owns it. A connection the peer aborted before we
 * got to it is skipped, as libuv does. If the pidfd cannot be made for lack of descriptors (EMFILE),
 * the connection is closed and the error thrown: a caller that cannot afford a pidfd cannot afford
 * the connection. runs on the main thread
 */
static napi_value socket_accept_js(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int listen_fd;
  if (!mmb_args(env, info, 1, argv) || !mmb_arg_fd(env, argv[0], &listen_fd)) return NULL;

  int fd;
  do fd = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
  while (fd < 0 && (errno == EINTR || errno == ECONNABORTED));

  napi_value result;
  if (fd < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
    CHECK(napi_get_null(env, &result));
    return result;
  }
  if (fd < 0) return mmb_throw_errno(env, errno, "accept4");

  struct ucred cred;
  int pidfd;
  if (peer_cred(fd, &cred) < 0 || peer_pidfd(fd, &pidfd) < 0) {
    close_keep_errno(fd);
    return mmb_throw_errno(env, errno, "getsockopt");
  }
  if (napi_create_object(env, &result) != napi_ok || !mmb_set_number(env, result, "fd", fd) ||
      !set_cred(env, result, &cred) || !mmb_set_number(env, result, "pidfd", pidfd)) {
    close(fd);
    if (pidfd >= 0) close(pidfd);
    mmb_throw_napi(env, napi_generic_failure, "building the accept result");
    return NULL;
  }
  return result;
}

/* socketPair() -> [fd, fd]. runs on the main thread */
static napi_value socket_pair_js(napi_env env, napi_callback_info info) {
  (void)info;
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_FLAGS, 0, sv) < 0) return mmb_throw_errno(env, errno, "socketpair");

  napi_value result, a, b;
  if (napi_create_array_with_length(env, 2, &result) != napi_ok ||
      napi_create_int32(env, sv[0], &a) != napi_ok || napi_create_int32(env, sv[1], &b) != napi_ok ||
      napi_set_element(env, result, 0, a) != napi_ok || napi_set_element(env, result, 1, b) != napi_ok) {
    close(sv[0]);
    close(sv[1]);
    mmb_throw_napi(env, napi_generic_failure, "building the socketpair result");
    return NULL;
  }
  return result;
}

/* peerCred(fd) -> {pid, uid, gid} as of connect/socketpair time. runs on the main thread */
static napi_value peer_cred_js(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int fd;
  if (!mmb_args(env, info, 1, argv) || !mmb_arg_fd(env, argv[0], &fd)) return NULL;

  struct ucred cred;
  if (peer_cred(fd, &cred) < 0) return mmb_throw_errno(env, errno, "getsockopt");
  napi_value result;
  CHECK(napi_create_object(env, &result));
  if (!set_cred(env, result, &cred)) return NULL;
  return result;
}

/*
 * peerPidfd(fd) -> the peer's pidfd (owned by the caller), or -1 when there is none (see peer_pidfd).
 * For any connected Unix socket, e.g. a client about the server it connected to. runs on the main thread
 */
static napi_value peer_pidfd_js(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int fd, pidfd;
  if (!mmb_args(env, info, 1, argv) || !mmb_arg_fd(env, argv[0], &fd)) return NULL;
  if (peer_pidfd(fd, &pidfd) < 0) return mmb_throw_errno(env, errno, "getsockopt");
  if (pidfd < 0) {
    napi_value result;
    CHECK(napi_create_int32(env, -1, &result));
    return result;
  }
  return mmb_new_fd(env, pidfd);
}

/*
 * pidfdSendSignal(pidfd, signal): pidfd_send_signal(2) with no siginfo and no flags. The process is
 * the one the pidfd was made for, never a later process that reused its pid: once it has exited the
 * call fails with ESRCH. Signal 0 only checks. runs on the main thread
 */
static napi_value pidfd_send_signal_js(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int pidfd;
  int64_t sig;
  if (!mmb_args(env, info, 2, argv) || !mmb_arg_fd(env, argv[0], &pidfd) ||
      !mmb_arg_int64(env, argv[1], 0, 64, "signal", &sig))
    return NULL;
  if (syscall(SYS_pidfd_send_signal, pidfd, (int)sig, NULL, 0) < 0)
    return mmb_throw_errno(env, errno, "pidfd_send_signal");
  return NULL;
}

/*
 * pidfdOpen(pid) -> pidfd (O_CLOEXEC, owned by the caller): pidfd_open(2). Only sound for a child of
 * this process that has not been reaped yet (a pid number of any other process may already belong to
 * someone else by the time it is used). runs on the main thread
 */
static napi_value pidfd_open_js(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int64_t pid;
  if (!mmb_args(env, info, 1, argv) || !mmb_arg_int64(env, argv[0], 1, INT32_MAX, "pid", &pid)) return NULL;
  long fd = syscall(SYS_pidfd_open, (pid_t)pid, 0);
  if (fd < 0) return mmb_throw_errno(env, errno, "pidfd_open");
  return mmb_new_fd(env, (int)fd);
}

/* shutdown(fd, how). runs on the main thread */
static napi_value shutdown_js(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int fd, how;
  if (!mmb_args(env, info, 2, argv) || !mmb_arg_fd(env, argv[0], &fd) ||
      !mmb_arg_flags(env, argv[1], "how", &how))
    return NULL;
  if (shutdown(fd, how) < 0) return mmb_throw_errno(env, errno, "shutdown");
  return NULL;
}

/* runs on the main thread, at module load */
bool mmb_init_socket(napi_env env, napi_value exports) {
  static const mmb_method methods[] = {
      {"socketListen", socket_listen_js}, {"socketListenAt", socket_listen_at_js},
      {"socketConnect", socket_connect_js},
      {"socketAccept", socket_accept_js}, {"socketPair", socket_pair_js},
      {"peerCred", peer_cred_js},         {"shutdown", shutdown_js},
      {"peerPidfd", peer_pidfd_js},       {"pidfdSendSignal", pidfd_send_signal_js},
      {"pidfdOpen", pidfd_open_js},
  };
  return mmb_export_methods(env, exports, methods, MMB_COUNT(methods));
}
