/*
 * uv_poll handles: watch an fd for readiness on the Node event loop and call back into JS.
 * Everything here runs on the main thread (the loop's thread); the uv callbacks too.
 *
 * Lifetime of a `struct poll` record. Two things must both be over before it is freed:
 *   - the uv handle: uv_close() was called and its close callback ran (`uv_closed`),
 *   - the JS handle object: its napi_wrap finalizer ran (`finalized`).
 * While the watch is open the record holds a strong reference to the JS handle object, as Node does
 * for its own handles, so a forgotten handle keeps firing rather than silently stopping; pollClose()
 * drops that reference and the callback's. If the object is nevertheless finalized while open (this
 * happens at environment teardown), the finalizer closes the watch itself.
 *
 * Environment teardown (a Worker exiting, or the main environment being freed): each open watch also
 * holds an async cleanup hook. At teardown the hook closes the watch, and the hook is removed only
 * from the uv close callback, so Node keeps running the loop until every close callback has run.
 * Without that, a close callback could run after Node has unloaded this addon (it does so when a
 * Worker that loaded it exits) and jump into unmapped code. The close callback makes no N-API call
 * other than removing that hook.
 */
#include <stdlib.h>
#include <uv.h>

#include "addon.h"
#include "convert.h"
#include "errors.h"

struct poll {
  uv_poll_t handle; /* handle.data points back here */
  napi_env env;
  napi_ref callback; /* strong while open */
  napi_ref self;     /* strong while open: the JS handle object */
  napi_async_context async_context;
  napi_async_cleanup_hook_handle cleanup; /* registered while the uv handle is open */
  bool closing;   /* uv_close() called (or the handle never got initialized) */
  bool uv_closed; /* uv close callback ran (or no handle to close) */
  bool finalized; /* the JS object is gone (or was never wrapped) */
};

static const napi_type_tag poll_tag = {0x6d6d622d706f6c6cULL, 0x2d68616e646c652dULL};

#define ALL_EVENTS (UV_READABLE | UV_WRITABLE | UV_DISCONNECT | UV_PRIORITIZED)

/* Frees the record once both halves are done. runs on the main thread */
static void maybe_free(struct poll *p) {
  if (p->uv_closed && p->finalized) free(p);
}

/* runs on the main thread (uv close callback) */
static void on_uv_close(uv_handle_t *handle) {
  struct poll *p = handle->data;
  napi_async_cleanup_hook_handle cleanup = p->cleanup;
  p->cleanup = NULL;
  p->uv_closed = true;
  maybe_free(p);
  /* Last: at teardown this tells Node the addon's code is no longer needed by this handle. */
  if (cleanup != NULL) napi_remove_async_cleanup_hook(cleanup);
}

/*
 * Stops the watch and lets go of everything JS: the callback, the strong self reference and the
 * async context. Idempotent. runs on the main thread
 */
static void poll_close(napi_env env, struct poll *p) {
  if (p->closing) return;
  p->closing = true;
  uv_poll_stop(&p->handle);
  uv_close((uv_handle_t *)&p->handle, on_uv_close);
  if (p->callback != NULL) napi_delete_reference(env, p->callback);
  if (p->self != NULL) napi_delete_reference(env, p->self);
  if (p->async_context != NULL) napi_async_destroy(env, p->async_context);
  p->callback = p->self = NULL;
  p->async_context = NULL;
}

/* runs on the main thread, as an async cleanup hook during environment teardown */
static void poll_teardown(napi_async_cleanup_hook_handle hook, void *arg) {
  (void)hook;
  struct poll *p = arg;
  poll_close(p->env, p);
}

/* runs on the main thread, after the JS handle object was collected (or at env teardown) */
static void poll_finalize(napi_env env, void *data, void *hint) {
  (void)hint;
  struct poll *p = data;
  poll_close(env, p);
  p->finalized = true;
  maybe_free(p);
}

/*
 * The uv_poll callback: calls callback(status, events) with `this` = the handle object.
 * napi_make_callback with the handle's async context makes this a proper top-level callback:
 * async_hooks see it, and process.nextTick / promise jobs queued by the callback run right after it.
 * An exception thrown by the callback is reported as an uncaught exception.
 * runs on the main thread (libuv loop)
 */
static void on_poll(uv_poll_t *handle, int status, int events) {
  struct poll *p = handle->data;
  if (p->closing) return;
  napi_env env = p->env;

  napi_handle_scope scope;
  if (napi_open_handle_scope(env, &scope) != napi_ok) return;
  napi_value fn, self, argv[2], result;
  if (napi_get_reference_value(env, p->callback, &fn) == napi_ok &&
      napi_get_reference_value(env, p->self, &self) == napi_ok &&
      napi_create_int32(env, status, &argv[0]) == napi_ok &&
      napi_create_int32(env, events, &argv[1]) == napi_ok) {
    napi_status rc = napi_make_callback(env, p->async_context, self, fn, 2, argv, &result);
    if (rc == napi_pending_exception) {
      napi_value error;
      if (napi_get_and_clear_last_exception(env, &error) == napi_ok) napi_fatal_exception(env, error);
    }
  }
  napi_close_handle_scope(env, scope);
}

/* Validates a uv event mask: libuv asserts (aborts the process) on unknown bits. main thread */
static bool arg_events(napi_env env, napi_value v, int *events) {
  int64_t value;
  if (!mmb_arg_int64(env, v, 0, ALL_EVENTS, "events", &value)) return false;
  if ((value & ~(int64_t)ALL_EVENTS) != 0) {
    mmb_throw_range(env, "events has bits other than POLL_READABLE, POLL_WRITABLE, POLL_DISCONNECT");
    return false;
  }
  *events = (int)value;
  return true;
}

/* Finds the record behind a PollHandle; TypeError for anything else. runs on the main thread */
static struct poll *unwrap_poll(napi_env env, napi_value v) {
  napi_valuetype type;
  bool tagged = false;
  if (napi_typeof(env, v, &type) != napi_ok) return NULL;
  if (type == napi_object && napi_check_object_type_tag(env, v, &poll_tag, &tagged) != napi_ok)
    return NULL;
  if (!tagged) {
    mmb_throw_type(env, "handle must be a PollHandle returned by pollStart()");
    return NULL;
  }
  void *data;
  NAPI_CALL_RET(env, napi_unwrap(env, v, &data), NULL);
  return data;
}

/* Builds the JS side of an initialized, started watch. false with an exception pending. */
static bool attach_js(napi_env env, struct poll *p, int fd, napi_value fn, napi_value *out) {
  napi_value obj, js_fd, name;
  CHECK_BOOL(napi_create_object(env, &obj));
  CHECK_BOOL(napi_create_int32(env, fd, &js_fd));
  const napi_property_descriptor props[] = {
      {"fd", NULL, NULL, NULL, NULL, js_fd, napi_enumerable, NULL}};
  CHECK_BOOL(napi_define_properties(env, obj, MMB_COUNT(props), props));
  CHECK_BOOL(napi_type_tag_object(env, obj, &poll_tag));
  CHECK_BOOL(napi_create_string_utf8(env, "mmb:poll", NAPI_AUTO_LENGTH, &name));
  CHECK_BOOL(napi_async_init(env, obj, name, &p->async_context));
  CHECK_BOOL(napi_create_reference(env, fn, 1, &p->callback));
  CHECK_BOOL(napi_create_reference(env, obj, 1, &p->self));
  CHECK_BOOL(napi_wrap(env, obj, p, poll_finalize, NULL, NULL));
  p->finalized = false; /* from now on the wrapper's finalizer owns this half */
  *out = obj;
  return true;
}

/* pollStart(fd, events, callback) -> PollHandle. runs on the main thread */
static napi_value poll_start_js(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int fd, events;
  napi_valuetype type;
  if (!mmb_args(env, info, 3, argv) || !mmb_arg_fd(env, argv[0], &fd) || !arg_events(env, argv[1], &events))
    return NULL;
  CHECK(napi_typeof(env, argv[2], &type));
  if (type != napi_function) return mmb_throw_type(env, "callback must be a function");

  uv_loop_t *loop;
  CHECK(napi_get_uv_event_loop(env, &loop));

  struct poll *p = calloc(1, sizeof *p);
  if (p == NULL) return mmb_throw_errno(env, ENOMEM, "uv_poll_init");
  p->env = env;
  p->handle.data = p;
  p->finalized = true; /* no wrapper yet */

  int rc = uv_poll_init(loop, &p->handle, fd);
  if (rc < 0) {
    free(p); /* a handle whose init failed was never added to the loop */
    return mmb_throw_uv(env, rc, "uv_poll_init");
  }
  napi_status status = napi_add_async_cleanup_hook(env, poll_teardown, p, &p->cleanup);
  if (status != napi_ok) {
    p->cleanup = NULL;
    poll_close(env, p);
    mmb_throw_napi(env, status, "napi_add_async_cleanup_hook");
    return NULL;
  }
  rc = uv_poll_start(&p->handle, events, on_poll);
  if (rc < 0) {
    poll_close(env, p);
    return mmb_throw_uv(env, rc, "uv_poll_start");
  }

  napi_value obj;
  if (!attach_js(env, p, fd, argv[2], &obj)) {
    poll_close(env, p); /* the wrapper, if any, frees later; else on_uv_close does */
    return NULL;
  }
  return obj;
}

/* pollUpdate(handle, events): 0 pauses the watch (the handle then keeps no loop alive). main thread */
static napi_value poll_update_js(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int events;
  struct poll *p;
  if (!mmb_args(env, info, 2, argv) || (p = unwrap_poll(env, argv[0])) == NULL ||
      !arg_events(env, argv[1], &events))
    return NULL;
  if (p->closing) return mmb_throw_uv(env, UV_EBADF, "uv_poll_start");
  int rc = uv_poll_start(&p->handle, events, on_poll);
  if (rc < 0) return mmb_throw_uv(env, rc, "uv_poll_start");
  return NULL;
}

/* pollRef(handle, ref): uv_ref / uv_unref. A no-op once closed. runs on the main thread */
static napi_value poll_ref_js(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  bool ref;
  struct poll *p;
  if (!mmb_args(env, info, 2, argv) || (p = unwrap_poll(env, argv[0])) == NULL ||
      !mmb_arg_bool(env, argv[1], "ref", &ref))
    return NULL;
  if (p->closing) return NULL;
  if (ref)
    uv_ref((uv_handle_t *)&p->handle);
  else
    uv_unref((uv_handle_t *)&p->handle);
  return NULL;
}

/* pollClose(handle): idempotent; does not close the fd. runs on the main thread */
static napi_value poll_close_js(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  struct poll *p;
  if (!mmb_args(env, info, 1, argv) || (p = unwrap_poll(env, argv[0])) == NULL) return NULL;
  poll_close(env, p);
  return NULL;
}

/* runs on the main thread, at module load */
bool mmb_init_poll(napi_env env, napi_value exports) {
  static const mmb_method methods[] = {
      {"pollStart", poll_start_js}, {"pollUpdate", poll_update_js},
      {"pollRef", poll_ref_js},     {"pollClose", poll_close_js},
  };
  return mmb_export_methods(env, exports, methods, MMB_COUNT(methods));
}
