/* Work off the event loop, settled as a promise (see async_work.h). */
#include "async_work.h"

#include <errno.h>
#include <stdio.h>

#include "errors.h"

/* runs on the main thread */
void mmb_async_reject_pending(napi_env env, napi_deferred deferred) {
  napi_value error;
  if (napi_get_and_clear_last_exception(env, &error) == napi_ok) napi_reject_deferred(env, deferred, error);
}

/* runs on a worker thread, no JS access */
static void execute(napi_env env, void *data) {
  (void)env;
  struct mmb_async *a = data;
  a->execute(a);
}

/* runs on the main thread, after execute (or instead of it, when cancelled) */
static void complete(napi_env env, napi_status status, void *data) {
  struct mmb_async *a = data;
  if (status == napi_cancelled) a->err = ECANCELED;
  bool reject = false;
  napi_value value = a->settle(env, a, &reject);
  if (value != NULL) {
    if (reject)
      napi_reject_deferred(env, a->deferred, value);
    else
      napi_resolve_deferred(env, a->deferred, value);
  }
  napi_delete_async_work(env, a->work);
  a->release(env, a);
}

/* runs on the main thread */
bool mmb_async_queue(napi_env env, struct mmb_async *a, const char *name) {
  napi_value js_name;
  napi_status status = napi_create_string_utf8(env, name, NAPI_AUTO_LENGTH, &js_name);
  if (status == napi_ok) status = napi_create_async_work(env, NULL, js_name, execute, complete, a, &a->work);
  if (status == napi_ok) {
    status = napi_queue_async_work(env, a->work);
    if (status != napi_ok) napi_delete_async_work(env, a->work);
  }
  if (status == napi_ok) return true;
  napi_deferred deferred = a->deferred;
  a->release(env, a);
  char what[96];
  snprintf(what, sizeof what, "queueing %s", name);
  mmb_throw_napi(env, status, what);
  mmb_async_reject_pending(env, deferred);
  return false;
}
