/*
 * The addon's modules. Each module adds its functions to `exports` and returns false with a JS
 * exception pending if it cannot. All of them run on the main (JS) thread, at module load.
 */
#ifndef MMB_ADDON_H
#define MMB_ADDON_H

#include <node_api.h>
#include <stdbool.h>
#include <stddef.h>

typedef struct {
  const char *name;
  napi_callback fn;
} mmb_method;

bool mmb_export_methods(napi_env env, napi_value exports, const mmb_method *methods, size_t count);

bool mmb_init_constants(napi_env env, napi_value exports); /* constants.c */
bool mmb_init_memfd(napi_env env, napi_value exports);     /* memfd.c: memfd, seals, fstat, dup, close */
bool mmb_init_mapping(napi_env env, napi_value exports);   /* mapping.c: mmap, munmap, mlock */
bool mmb_init_eventfd(napi_env env, napi_value exports);   /* eventfd.c */
bool mmb_init_socket(napi_env env, napi_value exports);    /* socket.c: listen, connect, accept */
bool mmb_init_scm(napi_env env, napi_value exports);       /* scm.c: sendmsg/recvmsg with fds */
bool mmb_init_poll(napi_env env, napi_value exports);      /* poll.c: uv_poll handles */
bool mmb_init_kvm(napi_env env, napi_value exports);       /* kvm.c: /dev/kvm, memslots, vCPUs */
bool mmb_init_vfio(napi_env env, napi_value exports);      /* vfio.c: VFIO type1 and iommufd ioctls */
bool mmb_init_bitmap(napi_env env, napi_value exports);    /* bitmap.c: atomic dirty bitmaps in shared memory */
bool mmb_init_notify(napi_env env, napi_value exports);    /* notify.c: sd_notify datagrams */

#define MMB_COUNT(a) (sizeof(a) / sizeof((a)[0]))

#endif
