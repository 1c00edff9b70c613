/* KVM ioctls. Filled in by the kvm-like client work; registered from addon.c. */
#include "addon.h"

/* runs on the main thread, at module load */
bool mmb_init_kvm(napi_env env, napi_value exports) {
  (void)env;
  (void)exports;
  return true;
}
