/*
 * The one ioctl gate of the addon: every ioctl any module issues (kvm.c, vfio.c) goes through here.
 *
 * A device family (KVM; VFIO and iommufd) is a table of the requests it allows, each with the kind of
 * argument it takes and the kinds of descriptor it is meant for. The gate
 *   - refuses a request number that is not in the family's table with EPERM, before any syscall;
 *   - refuses a request used through an entry point of the wrong argument kind with EINVAL;
 *   - refuses a descriptor of a kind the request is not meant for with ENOTTY (families whose numbers
 *     mean other things on other fds say what kind an fd is);
 *   - issues the ioctl, retrying EINTR unless the request is interruptible (KVM_RUN: a kick hands control
 *     back to JS);
 *   - turns a failure into the one ioctl error shape:
 *       code    = errno name ("EINVAL"),
 *       errno   = negative errno (-22),
 *       syscall = "ioctl",
 *       request = the request's name ("VFIO_IOMMU_MAP_DMA"; "0x5413 (not allowed)" for a refused number),
 *       message = "ioctl VFIO_IOMMU_MAP_DMA failed: Invalid argument (EINVAL)".
 * What a family checks beyond that (exact struct sizes for KVM; VFIO's size words, flags and pointers)
 * stays in its module, which then calls mmb_ioctl_call.
 */
#ifndef MMB_IOCTL_GATE_H
#define MMB_IOCTL_GATE_H

#include <node_api.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum mmb_ioctl_arg {
  MMB_IOCTL_VALUE,   /* the argument is an integer */
  MMB_IOCTL_NEW_FD,  /* the argument is an integer; the result is a new fd */
  MMB_IOCTL_S32_PTR, /* the argument points to an __s32 the caller gives as an integer */
  MMB_IOCTL_EXACT,   /* the argument points to a struct of exactly `size` bytes (_IOC_SIZE of the number) */
  MMB_IOCTL_SIZED,   /* the argument points to a struct whose first __u32 is its size (argsz / size) */
  MMB_IOCTL_OWN,     /* C builds the argument itself in a dedicated function (a pointer the kernel follows) */
};

/* One allowed request. A family's table may embed it as the first member of a larger entry. */
struct mmb_ioctl {
  const char *name;
  unsigned long nr;
  enum mmb_ioctl_arg arg;
  unsigned fds;       /* the family's descriptor kinds it is meant for (bits); 0: any descriptor */
  size_t size;        /* MMB_IOCTL_EXACT: the struct's size */
  bool interruptible; /* EINTR is returned to the caller instead of retried */
};

struct mmb_ioctl_family {
  const char *name;
  const void *table; /* entries of `stride` bytes, each starting with a struct mmb_ioctl */
  size_t count;
  size_t stride;
  /* The kind of descriptor `fd` is (bits matching mmb_ioctl.fds; 0: none of the family's). NULL: the
   * family does not tell its descriptors apart. Must not touch JS: it runs on worker threads too. */
  unsigned (*fd_kind)(int fd);
};

/* Which entry points a request may come through. */
enum mmb_ioctl_entry {
  MMB_ENTRY_INT,    /* an integer argument: VALUE, NEW_FD, S32_PTR */
  MMB_ENTRY_STRUCT, /* a buffer: EXACT, SIZED */
};

/* The family's i-th entry. runs on any thread */
const struct mmb_ioctl *mmb_ioctl_entry(const struct mmb_ioctl_family *f, size_t i);

/*
 * The entry for request `nr` on descriptor `fd`: the one meant for that descriptor's kind when there is
 * one (a number may mean different requests on different kinds), else the first with that number (whose
 * descriptor check then fails with ENOTTY), else NULL. runs on any thread
 */
const struct mmb_ioctl *mmb_ioctl_find(const struct mmb_ioctl_family *f, unsigned long nr, int fd);

/*
 * Reads a request number argument (an integer in [0, 2^32 - 1]) and finds its entry for `fd` through
 * entry point `entry`: EPERM for a number not in the table or one C builds itself (MMB_IOCTL_OWN),
 * EINVAL for the wrong entry point. Returns NULL with the exception pending. runs on the main thread
 */
const struct mmb_ioctl *mmb_ioctl_lookup(napi_env env, const struct mmb_ioctl_family *f, napi_value request, int fd,
                                         enum mmb_ioctl_entry entry);

/* Whether `fd` is of a kind `r` is meant for. runs on any thread */
bool mmb_ioctl_fd_ok(const struct mmb_ioctl_family *f, const struct mmb_ioctl *r, int fd);

/*
 * Issues `r` on `fd` with `arg` after the descriptor check: the ioctl's result (>= 0), or a negative
 * errno (-ENOTTY when the descriptor is of the wrong kind). EINTR is retried unless r->interruptible.
 * runs on any thread, no JS access
 */
int mmb_ioctl_call(const struct mmb_ioctl_family *f, const struct mmb_ioctl *r, int fd, unsigned long arg);

/* Builds (does not throw) the ioctl error for errno `err` and request `name`. NULL if N-API fails. */
napi_value mmb_ioctl_error(napi_env env, int err, const char *name);

/* Throws it. Always returns NULL so callers can `return mmb_throw_ioctl(...)`. */
napi_value mmb_throw_ioctl(napi_env env, int err, const char *name);

/* Throws the EPERM of a request number no table allows. Always returns NULL. */
napi_value mmb_ioctl_refuse(napi_env env, unsigned long nr);

#endif
