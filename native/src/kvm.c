/*
 * KVM ioctls for the kvm-like client (clients/kvm/).
 *
 * Deliberately thin. TypeScript packs and unpacks the structs (clients/kvm/abi.ts; test/kvm.test.ts
 * compares its offsets with these headers through gcc) and makes every decision. C only
 *   - opens /dev/kvm,
 *   - performs an ioctl from a short whitelist (`requests` below: the ones the client uses) through the
 *     addon's ioctl gate (ioctl_gate.h: EPERM outside the table, EINVAL through the wrong entry point),
 *     checking that a struct buffer is exactly _IOC_SIZE(request) bytes, so the kernel never reads or
 *     writes past it,
 *   - runs KVM_RUN on a libuv worker thread (it blocks until the guest exits) and kicks it out with a
 *     signal (kvmKick),
 *   - fills the one struct that holds a pointer (kvm_dirty_log) itself,
 *   - enables the dirty ring (KVM_ENABLE_CAP of exactly the two ring capabilities: other capabilities'
 *     arguments can be pointers) and harvests a ring's entries with the memory ordering the ring needs.
 * Anything else is refused with EPERM before any syscall: the gate passes nothing outside its tables.
 *
 * Errors have the gate's shape (code, errno, syscall = "ioctl", request = the request's name,
 * "KVM_SET_USER_MEMORY_REGION"), and the message names it.
 *
 * File descriptors: /dev/kvm is opened O_CLOEXEC; the kernel creates VM and vCPU fds O_CLOEXEC.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "addon.h"
#include "async_work.h"
#include "convert.h"
#include "errors.h"
#include "ioctl_gate.h"
#include "mapping.h"

#define REQ(nr, kind, size) {#nr, nr, MMB_IOCTL_##kind, 0, size, false}

/* The whitelist. KVM_RUN, KVM_GET_DIRTY_LOG and KVM_ENABLE_CAP have their own functions below. */
static const struct mmb_ioctl requests[] = {
    REQ(KVM_GET_API_VERSION, VALUE, 0),
    REQ(KVM_CHECK_EXTENSION, VALUE, 0),
    REQ(KVM_GET_VCPU_MMAP_SIZE, VALUE, 0),
    REQ(KVM_CREATE_VM, NEW_FD, 0),
    REQ(KVM_CREATE_VCPU, NEW_FD, 0),
    REQ(KVM_SET_USER_MEMORY_REGION, EXACT, sizeof(struct kvm_userspace_memory_region)),
    REQ(KVM_GET_REGS, EXACT, sizeof(struct kvm_regs)),
    REQ(KVM_SET_REGS, EXACT, sizeof(struct kvm_regs)),
    REQ(KVM_GET_SREGS, EXACT, sizeof(struct kvm_sregs)),
    REQ(KVM_SET_SREGS, EXACT, sizeof(struct kvm_sregs)),
    REQ(KVM_RESET_DIRTY_RINGS, VALUE, 0),
    REQ(KVM_GET_DIRTY_LOG, OWN, 0),
    REQ(KVM_ENABLE_CAP, OWN, 0),
    /* EINTR is the kick: returned, never retried. */
    {"KVM_RUN", KVM_RUN, MMB_IOCTL_OWN, 0, 0, true},
};

/* KVM does not tell its descriptors apart: a number means one request on /dev/kvm, VM and vCPU fds. */
static const struct mmb_ioctl_family kvm_family = {"KVM", requests, MMB_COUNT(requests), sizeof requests[0], NULL};

/* The entry of a request C issues itself (in the table above). runs on any thread */
static const struct mmb_ioctl *own(unsigned long nr) { return mmb_ioctl_find(&kvm_family, nr, -1); }

/* kvmOpen() -> fd of /dev/kvm, O_RDWR | O_CLOEXEC. runs on the main thread */
static napi_value kvm_open_js(napi_env env, napi_callback_info info) {
  (void)info;
  int fd;
  do fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
  while (fd < 0 && errno == EINTR);
  if (fd < 0) return mmb_throw_errno(env, errno, "open");
  return mmb_new_fd(env, fd);
}

/*
 * kvmIoctlInt(fd, request, arg) -> the ioctl's non-negative result (a new fd for KVM_CREATE_VM and
 * KVM_CREATE_VCPU). `arg` is an integer in [0, 2^32 - 1]. runs on the main thread
 */
static napi_value kvm_ioctl_int_js(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int fd;
  int64_t arg;
  if (!mmb_args(env, info, 3, argv) || !mmb_arg_fd(env, argv[0], &fd)) return NULL;
  const struct mmb_ioctl *req = mmb_ioctl_lookup(env, &kvm_family, argv[1], fd, MMB_ENTRY_INT);
  if (req == NULL || !mmb_arg_int64(env, argv[2], 0, UINT32_MAX, "arg", &arg)) return NULL;
  int rc = mmb_ioctl_call(&kvm_family, req, fd, (unsigned long)arg);
  if (rc < 0) return mmb_throw_ioctl(env, -rc, req->name);
  if (req->arg == MMB_IOCTL_NEW_FD) return mmb_new_fd(env, rc);
  napi_value result;
  CHECK(napi_create_int32(env, rc, &result));
  return result;
}

/*
 * kvmIoctl(fd, request, buf) -> the ioctl's result. `buf` (a Uint8Array) must be exactly the size of
 * the request's struct; the kernel reads it (_IOW), fills it (_IOR) or both. runs on the main thread
 */
static napi_value kvm_ioctl_js(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int fd;
  uint8_t *data;
  size_t len;
  if (!mmb_args(env, info, 3, argv) || !mmb_arg_fd(env, argv[0], &fd)) return NULL;
  const struct mmb_ioctl *req = mmb_ioctl_lookup(env, &kvm_family, argv[1], fd, MMB_ENTRY_STRUCT);
  if (req == NULL || !mmb_arg_bytes(env, argv[2], "buf", &data, &len)) return NULL;
  if (len != req->size || data == NULL) {
    char msg[128];
    snprintf(msg, sizeof msg, "%s takes a buffer of exactly %zu bytes, got %zu", req->name, req->size, len);
    return mmb_throw_range(env, msg);
  }
  int rc = mmb_ioctl_call(&kvm_family, req, fd, (unsigned long)(uintptr_t)data);
  if (rc < 0) return mmb_throw_ioctl(env, -rc, req->name);
  napi_value result;
  CHECK(napi_create_int32(env, rc, &result));
  return result;
}

/*
 * kvmGetDirtyLog(vmFd, slot, pages, bitmap): KVM_GET_DIRTY_LOG of memslot `slot` into `bitmap`, one
 * bit per page, little-endian 64-bit words. The kernel writes ALIGN(npages, 64) / 8 bytes, where
 * npages is the slot's size in pages: `pages` must be that (TypeScript knows its slots), and `bitmap`
 * at least that long. runs on the main thread
 */
static napi_value kvm_get_dirty_log_js(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  int fd;
  int64_t slot, pages;
  uint8_t *data;
  size_t len;
  if (!mmb_args(env, info, 4, argv) || !mmb_arg_fd(env, argv[0], &fd) ||
      !mmb_arg_int64(env, argv[1], 0, UINT32_MAX, "slot", &slot) ||
      !mmb_arg_int64(env, argv[2], 1, MMB_MAX_SAFE_INTEGER, "pages", &pages) ||
      !mmb_arg_bytes(env, argv[3], "bitmap", &data, &len))
    return NULL;
  uint64_t need = (((uint64_t)pages + 63) / 64) * 8;
  if (data == NULL || len < need) {
    char msg[128];
    snprintf(msg, sizeof msg, "the dirty bitmap of %lld pages needs %llu bytes, got %zu", (long long)pages,
             (unsigned long long)need, len);
    return mmb_throw_range(env, msg);
  }
  struct kvm_dirty_log log;
  memset(&log, 0, sizeof log);
  log.slot = (uint32_t)slot;
  log.dirty_bitmap = data;
  int rc = mmb_ioctl_call(&kvm_family, own(KVM_GET_DIRTY_LOG), fd, (unsigned long)(uintptr_t)&log);
  if (rc < 0) return mmb_throw_ioctl(env, -rc, "KVM_GET_DIRTY_LOG");
  return NULL;
}

/* ---- the dirty ring ------------------------------------------------------------------------ */

/*
 * kvmEnableDirtyRing(vmFd, cap, bytes): KVM_ENABLE_CAP of KVM_CAP_DIRTY_LOG_RING or
 * KVM_CAP_DIRTY_LOG_RING_ACQ_REL with args[0] = the ring size in bytes per vCPU (a power of two the
 * kernel checks: at least a page, at most what KVM_CHECK_EXTENSION answered; before any vCPU exists).
 * Any other capability is refused with EPERM. runs on the main thread
 */
static napi_value kvm_enable_dirty_ring_js(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int fd;
  int64_t cap, bytes;
  if (!mmb_args(env, info, 3, argv) || !mmb_arg_fd(env, argv[0], &fd) ||
      !mmb_arg_int64(env, argv[1], 0, UINT32_MAX, "cap", &cap) ||
      !mmb_arg_int64(env, argv[2], 0, UINT32_MAX, "bytes", &bytes))
    return NULL;
  if (cap != KVM_CAP_DIRTY_LOG_RING && cap != KVM_CAP_DIRTY_LOG_RING_ACQ_REL) return mmb_ioctl_refuse(env, KVM_ENABLE_CAP);
  struct kvm_enable_cap ec;
  memset(&ec, 0, sizeof ec);
  ec.cap = (uint32_t)cap;
  ec.args[0] = (uint64_t)bytes;
  int rc = mmb_ioctl_call(&kvm_family, own(KVM_ENABLE_CAP), fd, (unsigned long)(uintptr_t)&ec);
  if (rc < 0) return mmb_throw_ioctl(env, -rc, "KVM_ENABLE_CAP");
  return NULL;
}

/*
 * kvmDirtyRingHarvest(ring, entries, fetch, out) -> the number of entries harvested: reads the
 * kvm_dirty_gfn entries of a vCPU's ring (a Mapping of `entries` * 16 bytes of the vCPU fd at
 * KVM_DIRTY_LOG_PAGE_OFFSET pages; `entries` a power of two) from index `fetch` on, while they are
 * published (flags has KVM_DIRTY_GFN_F_DIRTY, loaded with acquire ordering), copying each into `out`
 * (16 bytes per entry, at most out.length / 16) and handing it back to the kernel (flags =
 * KVM_DIRTY_GFN_F_RESET, stored with release ordering). The caller advances its fetch index by the
 * result and calls KVM_RESET_DIRTY_RINGS. runs on the main thread; the vCPU may be running meanwhile
 */
static napi_value kvm_dirty_ring_harvest_js(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  int64_t entries, fetch;
  uint8_t *out, *base;
  size_t out_len;
  if (!mmb_args(env, info, 4, argv) ||
      !mmb_arg_int64(env, argv[1], 1, 1 << 24, "entries", &entries) ||
      !mmb_arg_int64(env, argv[2], 0, UINT32_MAX, "fetch", &fetch) ||
      !mmb_arg_bytes(env, argv[3], "out", &out, &out_len))
    return NULL;
  if ((entries & (entries - 1)) != 0) return mmb_throw_range(env, "entries must be a power of two");
  if (!mmb_mapping_range(env, argv[0], 0, (uint64_t)entries * sizeof(struct kvm_dirty_gfn), "kvmDirtyRingHarvest", &base))
    return NULL;
  struct kvm_dirty_gfn *ring = (struct kvm_dirty_gfn *)base;
  size_t max = out_len / sizeof(struct kvm_dirty_gfn);
  uint32_t index = (uint32_t)fetch;
  size_t n = 0;
  for (; n < max && n < (size_t)entries; n++, index++) {
    struct kvm_dirty_gfn *e = &ring[index & (uint32_t)(entries - 1)];
    if ((__atomic_load_n(&e->flags, __ATOMIC_ACQUIRE) & KVM_DIRTY_GFN_F_DIRTY) == 0) break;
    memcpy(out + n * sizeof *e, e, sizeof *e);
    __atomic_store_n(&e->flags, KVM_DIRTY_GFN_F_RESET, __ATOMIC_RELEASE);
  }
  napi_value result;
  CHECK(napi_create_uint32(env, (uint32_t)n, &result));
  return result;
}

/* ---- KVM_RUN off the event loop, and kicking a vCPU out of it ------------------------------ */

/*
 * A kick is this signal sent to the worker thread inside KVM_RUN (the way QEMU's SIG_IPI kicks a vCPU
 * thread): its handler does nothing, it is installed without SA_RESTART, so KVM_RUN returns EINTR. It is
 * sent only while the thread is between the two `runs_lock` sections of run_execute, so a kick can never
 * interrupt other work the libuv pool runs on that thread later. A kick that comes before the thread
 * enters KVM_RUN is caught by kvm_run.immediate_exit, which the caller sets first (KVM_CAP_IMMEDIATE_EXIT).
 * A real-time signal: Node, libuv and V8 use none of them (glibc keeps its own below SIGRTMIN).
 */
#define MMB_SIG_KICK (SIGRTMIN + 6)

struct run_work {
  struct mmb_async base; /* first; base.err: errno of KVM_RUN, 0 when the guest exited to user space */
  int key;               /* the caller's vCPU fd, which kvmKick names */
  int fd;                /* our own dup of the vCPU fd: the vCPU stays alive and addressed even if JS closes its fd */
  pthread_t thread;      /* valid while linked in `runs` */
  struct run_work *next;
};

/* Works whose thread is inside (or about to enter) KVM_RUN. */
static pthread_mutex_t runs_lock = PTHREAD_MUTEX_INITIALIZER;
static struct run_work *runs;

/* runs on a worker thread, in signal context: nothing to do, the point is the EINTR */
static void kick_handler(int sig) { (void)sig; }

/* Installs the kick handler once. Returns 0 or an errno. runs on the main thread */
static int install_kick_handler(void) {
  static bool installed = false;
  if (installed) return 0;
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = kick_handler;
  sigemptyset(&sa.sa_mask);
  if (sigaction(MMB_SIG_KICK, &sa, NULL) < 0) return errno;
  installed = true;
  return 0;
}

/* runs on a worker thread, no JS access */
static void run_execute(struct mmb_async *a) {
  struct run_work *w = (struct run_work *)a;
  sigset_t kick;
  sigemptyset(&kick);
  sigaddset(&kick, MMB_SIG_KICK);
  pthread_sigmask(SIG_UNBLOCK, &kick, NULL);

  pthread_mutex_lock(&runs_lock);
  w->thread = pthread_self();
  w->next = runs;
  runs = w;
  pthread_mutex_unlock(&runs_lock);

  /* EINTR is not retried: a kick (or any signal) hands control back to JS, which decides. */
  int rc = mmb_ioctl_call(&kvm_family, own(KVM_RUN), w->fd, 0);
  a->err = rc < 0 ? -rc : 0;

  /* Unlinked under the lock: once this returns no kick can target this thread (a kick sent before it
   * has been delivered by now: a pending unblocked signal is handled before any syscall returns). */
  pthread_mutex_lock(&runs_lock);
  for (struct run_work **p = &runs; *p != NULL; p = &(*p)->next)
    if (*p == w) {
      *p = w->next;
      break;
    }
  pthread_mutex_unlock(&runs_lock);
}

/* runs on the main thread, after run_execute */
static napi_value run_settle(napi_env env, struct mmb_async *a, bool *reject) {
  napi_value value = NULL;
  *reject = a->err != 0 && a->err != EINTR;
  if (*reject)
    value = mmb_ioctl_error(env, a->err, "KVM_RUN");
  else
    napi_get_boolean(env, a->err == 0, &value);
  return value;
}

/* runs on the main thread, last */
static void run_release(napi_env env, struct mmb_async *a) {
  (void)env;
  struct run_work *w = (struct run_work *)a;
  close(w->fd);
  free(w);
}

/*
 * kvmKick(vcpuFd) -> the number of threads signalled: interrupts a KVM_RUN of that vCPU in progress
 * (its promise then resolves false). Set kvm_run.immediate_exit before calling it, so that a KVM_RUN
 * about to start returns at once too. runs on the main thread
 */
static napi_value kvm_kick_js(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int fd;
  if (!mmb_args(env, info, 1, argv) || !mmb_arg_fd(env, argv[0], &fd)) return NULL;
  int count = 0, err = 0;
  pthread_mutex_lock(&runs_lock);
  for (struct run_work *w = runs; w != NULL; w = w->next) {
    if (w->key != fd) continue;
    int rc = pthread_kill(w->thread, MMB_SIG_KICK);
    if (rc == 0)
      count++;
    else
      err = rc;
  }
  pthread_mutex_unlock(&runs_lock);
  if (err != 0) return mmb_throw_errno(env, err, "pthread_kill");
  napi_value result;
  CHECK(napi_create_int32(env, count, &result));
  return result;
}

/*
 * kvmRun(vcpuFd) -> Promise<boolean>: KVM_RUN on a libuv worker thread. Resolves true when the guest
 * exited to user space (read the exit from the vCPU's kvm_run mapping), false when KVM_RUN returned
 * EINTR (a kick, immediate_exit, or another signal); other failures reject with the ioctl error.
 * runs on the main thread; the ioctl runs in run_execute.
 */
static napi_value kvm_run_js(napi_env env, napi_callback_info info) {
  napi_value promise, argv[1];
  napi_deferred deferred;
  CHECK(napi_create_promise(env, &deferred, &promise));
  int fd;
  if (!mmb_args(env, info, 1, argv) || !mmb_arg_fd(env, argv[0], &fd)) {
    mmb_async_reject_pending(env, deferred);
    return promise;
  }
  int handler_err = install_kick_handler();
  int own_fd = handler_err != 0 ? -1 : fcntl(fd, F_DUPFD_CLOEXEC, 0);
  struct run_work *w = own_fd < 0 ? NULL : calloc(1, sizeof *w);
  if (w == NULL) {
    int err = handler_err != 0 ? handler_err : own_fd < 0 ? errno : ENOMEM;
    if (own_fd >= 0) close(own_fd);
    napi_value error = mmb_ioctl_error(env, err, "KVM_RUN");
    if (error != NULL) napi_reject_deferred(env, deferred, error);
    return promise;
  }
  w->base = (struct mmb_async){.execute = run_execute, .settle = run_settle, .release = run_release, .deferred = deferred};
  w->key = fd;
  w->fd = own_fd;
  mmb_async_queue(env, &w->base, "KVM_RUN");
  return promise;
}

/* ---- constants -------------------------------------------------------------------------------- */

#define KCONST(name) {#name, (double)(name)}

/* The kvmConstants object: values straight from linux/kvm.h. runs on the main thread, at module load */
static bool init_constants(napi_env env, napi_value exports) {
  const struct {
    const char *name;
    double value;
  } table[] = {
      KCONST(KVM_API_VERSION),
      KCONST(KVM_GET_API_VERSION),
      KCONST(KVM_CREATE_VM),
      KCONST(KVM_CHECK_EXTENSION),
      KCONST(KVM_GET_VCPU_MMAP_SIZE),
      KCONST(KVM_CREATE_VCPU),
      KCONST(KVM_SET_USER_MEMORY_REGION),
      KCONST(KVM_GET_DIRTY_LOG),
      KCONST(KVM_RUN),
      KCONST(KVM_GET_REGS),
      KCONST(KVM_SET_REGS),
      KCONST(KVM_GET_SREGS),
      KCONST(KVM_SET_SREGS),
      KCONST(KVM_RESET_DIRTY_RINGS),
      KCONST(KVM_CAP_USER_MEMORY),
      KCONST(KVM_CAP_NR_MEMSLOTS),
      KCONST(KVM_CAP_READONLY_MEM),
      KCONST(KVM_CAP_IMMEDIATE_EXIT),
      KCONST(KVM_CAP_DIRTY_LOG_RING),
      KCONST(KVM_CAP_DIRTY_LOG_RING_ACQ_REL),
      KCONST(KVM_DIRTY_LOG_PAGE_OFFSET),
      KCONST(KVM_DIRTY_GFN_F_DIRTY),
      KCONST(KVM_DIRTY_GFN_F_RESET),
      KCONST(KVM_MEM_LOG_DIRTY_PAGES),
      KCONST(KVM_MEM_READONLY),
      KCONST(KVM_EXIT_UNKNOWN),
      KCONST(KVM_EXIT_IO),
      KCONST(KVM_EXIT_HLT),
      KCONST(KVM_EXIT_MMIO),
      KCONST(KVM_EXIT_SHUTDOWN),
      KCONST(KVM_EXIT_FAIL_ENTRY),
      KCONST(KVM_EXIT_INTR),
      KCONST(KVM_EXIT_INTERNAL_ERROR),
      KCONST(KVM_EXIT_DIRTY_RING_FULL),
      {"sizeof_kvm_userspace_memory_region", sizeof(struct kvm_userspace_memory_region)},
      {"sizeof_kvm_regs", sizeof(struct kvm_regs)},
      {"sizeof_kvm_sregs", sizeof(struct kvm_sregs)},
#if defined(__x86_64__)
      // x86 only: the segment and descriptor-table parts of kvm_sregs (other architectures have neither).
      {"sizeof_kvm_segment", sizeof(struct kvm_segment)},
      {"sizeof_kvm_dtable", sizeof(struct kvm_dtable)},
#endif
      {"sizeof_kvm_dirty_log", sizeof(struct kvm_dirty_log)},
      {"sizeof_kvm_dirty_gfn", sizeof(struct kvm_dirty_gfn)},
      {"offsetof_kvm_run_exit_reason", offsetof(struct kvm_run, exit_reason)},
      {"offsetof_kvm_run_immediate_exit", offsetof(struct kvm_run, immediate_exit)},
  };
  napi_value constants;
  CHECK_BOOL(napi_create_object(env, &constants));
  for (size_t i = 0; i < MMB_COUNT(table); i++)
    if (!mmb_set_number(env, constants, table[i].name, table[i].value)) return false;
  CHECK_BOOL(napi_object_freeze(env, constants));
  CHECK_BOOL(napi_set_named_property(env, exports, "kvmConstants", constants));
  return true;
}

/* runs on the main thread, at module load */
bool mmb_init_kvm(napi_env env, napi_value exports) {
  static const mmb_method methods[] = {
      {"kvmOpen", kvm_open_js},         {"kvmIoctl", kvm_ioctl_js},
      {"kvmIoctlInt", kvm_ioctl_int_js}, {"kvmGetDirtyLog", kvm_get_dirty_log_js},
      {"kvmRun", kvm_run_js},           {"kvmKick", kvm_kick_js},
      {"kvmEnableDirtyRing", kvm_enable_dirty_ring_js}, {"kvmDirtyRingHarvest", kvm_dirty_ring_harvest_js},
  };
  return init_constants(env, exports) && mmb_export_methods(env, exports, methods, MMB_COUNT(methods));
}
