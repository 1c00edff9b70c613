/*
 * The `constants` object: flag values straight from the system headers, so TypeScript never
 * hard-codes a number that could differ between architectures. Runs on the main thread at load.
 */
#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#include "addon.h"
#include "convert.h"
#include "errors.h"
#include "scm.h"

#define CONSTANT(name) {#name, (double)(name)}

/* runs on the main thread, at module load */
bool mmb_init_constants(napi_env env, napi_value exports) {
  const struct {
    const char *name;
    double value;
  } table[] = {
      CONSTANT(MFD_CLOEXEC),
      CONSTANT(MFD_ALLOW_SEALING),
      CONSTANT(MFD_HUGETLB),
      CONSTANT(F_SEAL_SEAL),
      CONSTANT(F_SEAL_SHRINK),
      CONSTANT(F_SEAL_GROW),
      CONSTANT(F_SEAL_WRITE),
      CONSTANT(F_SEAL_FUTURE_WRITE),
      CONSTANT(PROT_NONE),
      CONSTANT(PROT_READ),
      CONSTANT(PROT_WRITE),
      CONSTANT(MAP_SHARED),
      CONSTANT(MAP_PRIVATE),
      CONSTANT(MAP_NORESERVE),
      CONSTANT(MAP_POPULATE),
      CONSTANT(EFD_CLOEXEC),
      CONSTANT(EFD_NONBLOCK),
      CONSTANT(EFD_SEMAPHORE),
      {"POLL_READABLE", UV_READABLE},
      {"POLL_WRITABLE", UV_WRITABLE},
      {"POLL_DISCONNECT", UV_DISCONNECT},
      CONSTANT(SHUT_RD),
      CONSTANT(SHUT_WR),
      CONSTANT(SHUT_RDWR),
      {"pageSize", (double)sysconf(_SC_PAGESIZE)},
      {"SCM_MAX_FD", MMB_SCM_MAX_FD},
  };

  napi_value constants;
  CHECK_BOOL(napi_create_object(env, &constants));
  for (size_t i = 0; i < MMB_COUNT(table); i++)
    if (!mmb_set_number(env, constants, table[i].name, table[i].value)) return false;
  CHECK_BOOL(napi_object_freeze(env, constants));
  CHECK_BOOL(napi_set_named_property(env, exports, "constants", constants));
  return true;
}
