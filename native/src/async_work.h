/*
 * Work off the event loop, settled as a promise: the one napi_async_work helper of the addon (mlock /
 * munlock in mapping.c, KVM_RUN in kvm.c, the pinning VFIO ioctls in vfio.c).
 *
 * A module embeds `struct mmb_async` as the first member of its own work record and fills the three
 * callbacks. `execute` runs on a libuv worker thread with no JS access and records its outcome in `err`
 * (0 or an errno) and the record's own fields. Back on the main thread `settle` is called (with `err`
 * set to ECANCELED if the work never ran) and returns the promise's value, setting *reject for an error;
 * a NULL return leaves the promise pending (N-API failed: there is no JS caller to throw to). `release`
 * runs last, always, and frees the record.
 */
#ifndef MMB_ASYNC_WORK_H
#define MMB_ASYNC_WORK_H

#include <node_api.h>
#include <stdbool.h>

struct mmb_async {
  void (*execute)(struct mmb_async *a);                              /* worker thread, no JS access */
  napi_value (*settle)(napi_env env, struct mmb_async *a, bool *reject); /* main thread */
  void (*release)(napi_env env, struct mmb_async *a);                /* main thread, last */
  int err;
  napi_deferred deferred;
  napi_async_work work;
};

/* Rejects `deferred` with the pending JS exception (the argument checks' failure). runs on the main thread */
void mmb_async_reject_pending(napi_env env, napi_deferred deferred);

/*
 * Queues `a` (its deferred and callbacks set) under the resource name `name`. On failure rejects the
 * promise with the N-API error, calls `release` and returns false; the caller must not touch `a` then.
 * runs on the main thread
 */
bool mmb_async_queue(napi_env env, struct mmb_async *a, const char *name);

#endif
