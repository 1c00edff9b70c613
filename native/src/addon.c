/* Module registration: one exports object assembled from the per-concern files. */
#include "addon.h"

#include "errors.h"

/* runs on the main thread, at module load */
bool mmb_export_methods(napi_env env, napi_value exports, const mmb_method *methods, size_t count) {
  for (size_t i = 0; i < count; i++) {
    napi_value fn;
    CHECK_BOOL(napi_create_function(env, methods[i].name, NAPI_AUTO_LENGTH, methods[i].fn, NULL, &fn));
    CHECK_BOOL(napi_set_named_property(env, exports, methods[i].name, fn));
  }
  return true;
}

/* runs on the main thread, at module load (once per Node environment: main thread or worker) */
static napi_value init(napi_env env, napi_value exports) {
  if (!mmb_init_constants(env, exports) || !mmb_init_memfd(env, exports) ||
      !mmb_init_mapping(env, exports) || !mmb_init_eventfd(env, exports) ||
      !mmb_init_socket(env, exports) || !mmb_init_scm(env, exports) || !mmb_init_poll(env, exports) ||
      !mmb_init_kvm(env, exports) || !mmb_init_vfio(env, exports) || !mmb_init_bitmap(env, exports) ||
      !mmb_init_notify(env, exports))
    return NULL;
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
