/* VFIO ioctls. Filled in by the vfio-like client work; registered from addon.c. */
#include "addon.h"

/* runs on the main thread, at module load */
bool mmb_init_vfio(napi_env env, napi_value exports) {
  (void)env;
  (void)exports;
  return true;
}
