/*
 * VFIO and iommufd ioctls for the vfio-like client (clients/vfio/).
 *
 * Deliberately thin: TypeScript packs every structure (clients/vfio/structs.ts, laid out per the kernel
 * uAPI headers and checked against them by test/vfio-structs.test.ts); C only issues the ioctl. What C
 * does check is what memory safety and "no arbitrary ioctls" need:
 *
 *   - the request number must be one of the whitelist below (EPERM otherwise), and each is only reachable
 *     through the entry point matching its argument kind (an int, a pointer to an s32, a sized struct);
 *   - the descriptor must be of the kind the request is meant for: a container (/dev/vfio/vfio), a group
 *     (/dev/vfio/N), a device (anon_inode:[vfio-device] from VFIO_GROUP_GET_DEVICE_FD, or a cdev
 *     /dev/vfio/devices/vfioN) or an iommufd (/dev/iommu); anything else is ENOTTY. VFIO reuses numbers
 *     across fd kinds (VFIO_IOMMU_MAP_DMA on a device fd is VFIO_DEVICE_PCI_HOT_RESET), and other drivers
 *     may give them other meanings, so a number alone does not say what the kernel will do;
 *   - a struct argument's leading size word (argsz for VFIO, size for iommufd) must be at least the
 *     kernel's minimum for that request and at most the buffer's length, because the kernel writes up to
 *     that many bytes back (INFO ioctls fill capability chains up to argsz);
 *   - flag bits that would make the kernel follow a user pointer C has not validated are refused
 *     (VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP, VFIO_DEVICE_BIND_FLAG_TOKEN, IOMMU_HWPT_FAULT_ID_VALID), and so
 *     are flags outside a request's allowed set (VFIO_DEVICE_FEATURE may only GET or PROBE the MIGRATION
 *     feature, never SET a device state): EINVAL;
 *   - a size word above the largest size C knows is refused where a later kernel appends pointer
 *     members (IOMMU_HWPT_ALLOC, IOMMU_GET_HW_INFO, the dirty-tracking structs): EINVAL;
 *   - the pointers the kernel follows are filled in here with the address of a second buffer C checked
 *     is large enough: IOMMU_IOAS_IOVA_RANGES.allowed_iovas (num_iovas entries, written),
 *     IOMMU_GET_HW_INFO.data_uptr (data_len bytes, written), IOMMU_HWPT_ALLOC.data_uptr (data_len bytes,
 *     read; only in a struct large enough to have it), VFIO_IOMMU_DIRTY_PAGES' bitmap.data (bitmap.size
 *     bytes, written, only with FLAG_GET_BITMAP) and IOMMU_HWPT_GET_DIRTY_BITMAP.data (one bit per
 *     page_size of length, in 64-bit words, written; page_size must be a power of two).
 *
 * The host virtual addresses inside VFIO_IOMMU_MAP_DMA.vaddr and IOMMU_IOAS_MAP.user_va are the caller's
 * to choose (they come from GuestMemory's mappings): the kernel pins and maps those pages of this process
 * for a device, which is the purpose of the call, and it never writes through them on our behalf.
 *
 * Every ioctl goes through the addon's ioctl gate (ioctl_gate.h), and so do its errors: code, errno,
 * syscall = "ioctl" and request = the request's name ("VFIO_IOMMU_MAP_DMA"), so a failure says which
 * ioctl failed; a refusal by the checks above has the same shape.
 *
 * The iommufd header (<linux/iommufd.h>) and the VFIO cdev ioctls (VFIO_DEVICE_BIND_IOMMUFD, ...) are
 * missing from Debian bookworm's linux-libc-dev 6.1. Their numbers are defined here from Linux's
 * include/uapi/linux/iommufd.h and include/uapi/linux/vfio.h (IOMMUFD_TYPE ';', IOMMUFD_CMD_BASE 0x80;
 * VFIO_BASE + 18, 19, 20), and checked against the system headers at compile time when those have them.
 *
 * One number, two requests: VFIO_BASE + 17 is VFIO_IOMMU_DIRTY_PAGES on a container and
 * VFIO_DEVICE_FEATURE on a device. The whitelist is therefore looked up by number *and* descriptor kind.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/vfio.h>
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

#if defined(__has_include)
#if __has_include(<linux/iommufd.h>)
#include <linux/iommufd.h>
#define MMB_HAVE_IOMMUFD_H 1
#endif
#endif

/* ---- request numbers not in every system header ---------------------------------------------- */

/* include/uapi/linux/iommufd.h: IOMMUFD_TYPE is ';', commands start at IOMMUFD_CMD_BASE = 0x80. */
#define MMB_IOMMUFD_TYPE ';'
#define MMB_IOMMU_DESTROY _IO(MMB_IOMMUFD_TYPE, 0x80)
#define MMB_IOMMU_IOAS_ALLOC _IO(MMB_IOMMUFD_TYPE, 0x81)
#define MMB_IOMMU_IOAS_IOVA_RANGES _IO(MMB_IOMMUFD_TYPE, 0x84)
#define MMB_IOMMU_IOAS_MAP _IO(MMB_IOMMUFD_TYPE, 0x85)
#define MMB_IOMMU_IOAS_UNMAP _IO(MMB_IOMMUFD_TYPE, 0x86)
/* Linux 6.7+: HWPT allocation (a nesting parent, docs/ioas.md; dirty tracking), the IOMMU's capabilities. */
#define MMB_IOMMU_HWPT_ALLOC _IO(MMB_IOMMUFD_TYPE, 0x89)
#define MMB_IOMMU_GET_HW_INFO _IO(MMB_IOMMUFD_TYPE, 0x8a)
#define MMB_IOMMU_HWPT_SET_DIRTY_TRACKING _IO(MMB_IOMMUFD_TYPE, 0x8b)
#define MMB_IOMMU_HWPT_GET_DIRTY_BITMAP _IO(MMB_IOMMUFD_TYPE, 0x8c)
/* enum iommufd_hwpt_alloc_flags, iommufd_hwpt_set_dirty_tracking_flags, iommufd_hwpt_get_dirty_bitmap_flags */
#define MMB_IOMMU_HWPT_ALLOC_NEST_PARENT (1u << 0)
#define MMB_IOMMU_HWPT_ALLOC_DIRTY_TRACKING (1u << 1)
#define MMB_IOMMU_HWPT_DIRTY_TRACKING_ENABLE 1u
#define MMB_IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR 1u
/* include/uapi/linux/vfio.h (Linux 6.6+): the VFIO device cdev ioctls. */
#define MMB_VFIO_DEVICE_BIND_IOMMUFD _IO(VFIO_TYPE, VFIO_BASE + 18)
#define MMB_VFIO_DEVICE_ATTACH_IOMMUFD_PT _IO(VFIO_TYPE, VFIO_BASE + 19)
#define MMB_VFIO_DEVICE_DETACH_IOMMUFD_PT _IO(VFIO_TYPE, VFIO_BASE + 20)
#define MMB_VFIO_DEVICE_BIND_FLAG_TOKEN (1u << 0)

/* linux/vfio.h (bookworm's 6.1 has both): the dirty-page log of a type1 container, and device features. */
_Static_assert(offsetof(struct vfio_iommu_type1_dirty_bitmap_get, bitmap) == 16, "dirty_bitmap_get.bitmap");
_Static_assert(sizeof(struct vfio_iommu_type1_dirty_bitmap) + sizeof(struct vfio_iommu_type1_dirty_bitmap_get) == 48, "dirty bitmap");
_Static_assert(offsetof(struct vfio_bitmap, data) == 16, "vfio_bitmap.data");
#define MMB_DIRTY_PAGES_FLAGS \
  (VFIO_IOMMU_DIRTY_PAGES_FLAG_START | VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP | VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP)
/* GET or PROBE of VFIO_DEVICE_FEATURE_MIGRATION (feature index 1): never SET (a device state change). */
#define MMB_FEATURE_MIGRATION_FLAGS (VFIO_DEVICE_FEATURE_MIGRATION | VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_PROBE)

#ifdef MMB_HAVE_IOMMUFD_H
_Static_assert(MMB_IOMMU_DESTROY == IOMMU_DESTROY, "IOMMU_DESTROY");
_Static_assert(MMB_IOMMU_IOAS_ALLOC == IOMMU_IOAS_ALLOC, "IOMMU_IOAS_ALLOC");
_Static_assert(MMB_IOMMU_IOAS_IOVA_RANGES == IOMMU_IOAS_IOVA_RANGES, "IOMMU_IOAS_IOVA_RANGES");
_Static_assert(MMB_IOMMU_IOAS_MAP == IOMMU_IOAS_MAP, "IOMMU_IOAS_MAP");
_Static_assert(MMB_IOMMU_IOAS_UNMAP == IOMMU_IOAS_UNMAP, "IOMMU_IOAS_UNMAP");
#ifdef IOMMU_HWPT_GET_DIRTY_BITMAP
_Static_assert(MMB_IOMMU_HWPT_SET_DIRTY_TRACKING == IOMMU_HWPT_SET_DIRTY_TRACKING, "IOMMU_HWPT_SET_DIRTY_TRACKING");
_Static_assert(MMB_IOMMU_HWPT_GET_DIRTY_BITMAP == IOMMU_HWPT_GET_DIRTY_BITMAP, "IOMMU_HWPT_GET_DIRTY_BITMAP");
_Static_assert(offsetof(struct iommu_hwpt_get_dirty_bitmap, data) == 40, "iommu_hwpt_get_dirty_bitmap.data");
#endif
_Static_assert(offsetof(struct iommu_ioas_iova_ranges, allowed_iovas) == 16, "allowed_iovas");
_Static_assert(offsetof(struct iommu_ioas_iova_ranges, num_iovas) == 8, "num_iovas");
_Static_assert(sizeof(struct iommu_iova_range) == 16, "iommu_iova_range");
#ifdef IOMMU_GET_HW_INFO
_Static_assert(MMB_IOMMU_HWPT_ALLOC == IOMMU_HWPT_ALLOC, "IOMMU_HWPT_ALLOC");
_Static_assert(MMB_IOMMU_GET_HW_INFO == IOMMU_GET_HW_INFO, "IOMMU_GET_HW_INFO");
_Static_assert(offsetof(struct iommu_hw_info, data_uptr) == 16, "iommu_hw_info.data_uptr");
_Static_assert(offsetof(struct iommu_hwpt_alloc, data_uptr) == 32, "iommu_hwpt_alloc.data_uptr");
#endif
#endif
#ifdef VFIO_DEVICE_BIND_IOMMUFD
_Static_assert(MMB_VFIO_DEVICE_BIND_IOMMUFD == VFIO_DEVICE_BIND_IOMMUFD, "VFIO_DEVICE_BIND_IOMMUFD");
_Static_assert(MMB_VFIO_DEVICE_ATTACH_IOMMUFD_PT == VFIO_DEVICE_ATTACH_IOMMUFD_PT, "ATTACH_IOMMUFD_PT");
_Static_assert(MMB_VFIO_DEVICE_DETACH_IOMMUFD_PT == VFIO_DEVICE_DETACH_IOMMUFD_PT, "DETACH_IOMMUFD_PT");
#endif

/* ---- the whitelist ------------------------------------------------------------------------------ */

/*
 * What kind of descriptor a request is meant for (bits of mmb_ioctl.fds). Argument kinds: MMB_IOCTL_VALUE
 * and MMB_IOCTL_S32_PTR (an __s32 fd) through vfioIoctlInt, MMB_IOCTL_SIZED (argsz / size first) through
 * vfioIoctl and vfioIoctlAsync, MMB_IOCTL_OWN (a device name string) through vfioGroupGetDeviceFd.
 */
enum fd_kind {
  FD_CONTAINER = 1 << 0, /* /dev/vfio/vfio */
  FD_GROUP = 1 << 1,     /* /dev/vfio/N */
  FD_DEVICE = 1 << 2,    /* anon_inode:[vfio-device], /dev/vfio/devices/vfioN */
  FD_IOMMUFD = 1 << 3,   /* /dev/iommu */
};

/* How C sizes the buffer behind a pointer it fills in (struct request.bound). */
enum bound_rule {
  BOUND_NONE,   /* no pointer */
  BOUND_COUNT,  /* count (a __u32 or __u64 at count_off) * elem_size bytes */
  BOUND_BITMAP, /* IOMMU_HWPT_GET_DIRTY_BITMAP: one bit per page_size (u64 at 32) of length (u64 at 24), whole u64 words */
};

struct request {
  struct mmb_ioctl io; /* first: the gate's view (name, number, argument kind, enum fd_kind bits) */
  uint32_t minsz;     /* MMB_IOCTL_SIZED: the kernel's minimum size for the request */
  uint32_t maxsz;     /* MMB_IOCTL_SIZED: the largest size word accepted (0: up to the buffer) */
  int flags_off;      /* MMB_IOCTL_SIZED: offset of a __u32 flags word to check, or -1 */
  uint32_t forbidden; /* flag bits that make the kernel follow a pointer C did not validate */
  uint32_t allowed;   /* if not 0: the only flag bits accepted */
  bool async;         /* may run on a worker thread (vfioIoctlAsync) */
  int ptr_off;        /* a __u64 pointer field C fills with the data buffer's address, or -1 */
  uint32_t ptr_flag;  /* the pointer is used only when flags has this bit (0: always) */
  uint32_t ptr_minsz; /* ...and only in a struct this large (a smaller one has no pointer field: the kernel
                         follows nothing; a GET_BITMAP that short is the kernel's EINVAL) */
  enum bound_rule bound;
  int count_off;      /* BOUND_COUNT: its element count */
  int count_size;     /* 4 or 8 */
  uint32_t elem_size; /* bytes per element */
};

#define NOPTR -1, 0, 0, BOUND_NONE, 0, 0, 0

/* Minimum sizes are the kernel's `minsz` (offsetofend of the last field it always reads). */
static const struct request requests[] = {
    /* container (/dev/vfio/vfio) */
    {{"VFIO_GET_API_VERSION", VFIO_GET_API_VERSION, MMB_IOCTL_VALUE, FD_CONTAINER, 0, false}, 0, 0, -1, 0, 0, false, NOPTR},
    {{"VFIO_CHECK_EXTENSION", VFIO_CHECK_EXTENSION, MMB_IOCTL_VALUE, FD_CONTAINER, 0, false}, 0, 0, -1, 0, 0, false, NOPTR},
    {{"VFIO_SET_IOMMU", VFIO_SET_IOMMU, MMB_IOCTL_VALUE, FD_CONTAINER, 0, false}, 0, 0, -1, 0, 0, false, NOPTR},
    {{"VFIO_IOMMU_GET_INFO", VFIO_IOMMU_GET_INFO, MMB_IOCTL_SIZED, FD_CONTAINER, 0, false}, 16, 0, -1, 0, 0, false, NOPTR},
    {{"VFIO_IOMMU_MAP_DMA", VFIO_IOMMU_MAP_DMA, MMB_IOCTL_SIZED, FD_CONTAINER, 0, false}, 32, 0, -1, 0, 0, true, NOPTR},
    {{"VFIO_IOMMU_UNMAP_DMA", VFIO_IOMMU_UNMAP_DMA, MMB_IOCTL_SIZED, FD_CONTAINER, 0, false}, 24, 0, 4, VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP, 0, true, NOPTR},
    /* START / STOP: the 8-byte header; GET_BITMAP: header + vfio_iommu_type1_dirty_bitmap_get, whose
     * bitmap.data (at 40) C points at `data` after checking bitmap.size (at 32) fits in it. */
    {{"VFIO_IOMMU_DIRTY_PAGES", VFIO_IOMMU_DIRTY_PAGES, MMB_IOCTL_SIZED, FD_CONTAINER, 0, false}, 8, 48, 4, 0, MMB_DIRTY_PAGES_FLAGS, false,
     40, VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP, 48, BOUND_COUNT, 32, 8, 1},
    /* group (/dev/vfio/N) */
    {{"VFIO_GROUP_GET_STATUS", VFIO_GROUP_GET_STATUS, MMB_IOCTL_SIZED, FD_GROUP, 0, false}, 8, 0, -1, 0, 0, false, NOPTR},
    {{"VFIO_GROUP_SET_CONTAINER", VFIO_GROUP_SET_CONTAINER, MMB_IOCTL_S32_PTR, FD_GROUP, 0, false}, 0, 0, -1, 0, 0, false, NOPTR},
    {{"VFIO_GROUP_GET_DEVICE_FD", VFIO_GROUP_GET_DEVICE_FD, MMB_IOCTL_OWN, FD_GROUP, 0, false}, 0, 0, -1, 0, 0, false, NOPTR},
    {{"VFIO_GROUP_UNSET_CONTAINER", VFIO_GROUP_UNSET_CONTAINER, MMB_IOCTL_VALUE, FD_GROUP, 0, false}, 0, 0, -1, 0, 0, false, NOPTR},
    /* device (from VFIO_GROUP_GET_DEVICE_FD, or /dev/vfio/devices/vfioN) */
    {{"VFIO_DEVICE_GET_INFO", VFIO_DEVICE_GET_INFO, MMB_IOCTL_SIZED, FD_DEVICE, 0, false}, 16, 0, -1, 0, 0, false, NOPTR},
    {{"VFIO_DEVICE_GET_REGION_INFO", VFIO_DEVICE_GET_REGION_INFO, MMB_IOCTL_SIZED, FD_DEVICE, 0, false}, 32, 0, -1, 0, 0, false, NOPTR},
    {{"VFIO_DEVICE_RESET", VFIO_DEVICE_RESET, MMB_IOCTL_VALUE, FD_DEVICE, 0, false}, 0, 0, -1, 0, 0, false, NOPTR},
    /* GET / PROBE of the MIGRATION feature only (a __u64 of flags in data[]); SET would change the device's state. */
    {{"VFIO_DEVICE_FEATURE", VFIO_DEVICE_FEATURE, MMB_IOCTL_SIZED, FD_DEVICE, 0, false}, 8, 16, 4, 0, MMB_FEATURE_MIGRATION_FLAGS, false, NOPTR},
    {{"VFIO_DEVICE_BIND_IOMMUFD", MMB_VFIO_DEVICE_BIND_IOMMUFD, MMB_IOCTL_SIZED, FD_DEVICE, 0, false}, 16, 0, 4, MMB_VFIO_DEVICE_BIND_FLAG_TOKEN, 0, false, NOPTR},
    {{"VFIO_DEVICE_ATTACH_IOMMUFD_PT", MMB_VFIO_DEVICE_ATTACH_IOMMUFD_PT, MMB_IOCTL_SIZED, FD_DEVICE, 0, false}, 12, 0, -1, 0, 0, false, NOPTR},
    {{"VFIO_DEVICE_DETACH_IOMMUFD_PT", MMB_VFIO_DEVICE_DETACH_IOMMUFD_PT, MMB_IOCTL_SIZED, FD_DEVICE, 0, false}, 8, 0, -1, 0, 0, false, NOPTR},
    /* iommufd (/dev/iommu) */
    {{"IOMMU_DESTROY", MMB_IOMMU_DESTROY, MMB_IOCTL_SIZED, FD_IOMMUFD, 0, false}, 8, 0, -1, 0, 0, false, NOPTR},
    {{"IOMMU_IOAS_ALLOC", MMB_IOMMU_IOAS_ALLOC, MMB_IOCTL_SIZED, FD_IOMMUFD, 0, false}, 12, 0, -1, 0, 0, false, NOPTR},
    {{"IOMMU_IOAS_IOVA_RANGES", MMB_IOMMU_IOAS_IOVA_RANGES, MMB_IOCTL_SIZED, FD_IOMMUFD, 0, false}, 32, 0, -1, 0, 0, false, 16, 0, 0, BOUND_COUNT, 8, 4, 16},
    {{"IOMMU_IOAS_MAP", MMB_IOMMU_IOAS_MAP, MMB_IOCTL_SIZED, FD_IOMMUFD, 0, false}, 40, 0, -1, 0, 0, true, NOPTR},
    {{"IOMMU_IOAS_UNMAP", MMB_IOMMU_IOAS_UNMAP, MMB_IOCTL_SIZED, FD_IOMMUFD, 0, false}, 24, 0, -1, 0, 0, true, NOPTR},
    /* A nesting parent or dirty tracking; the kernel reads data_len bytes of driver data through data_uptr
     * (at 32, in a struct of 40 bytes or more): C points it at a checked buffer. fault_id (48 bytes, read
     * only with FAULT_ID_VALID) is refused. */
    {{"IOMMU_HWPT_ALLOC", MMB_IOMMU_HWPT_ALLOC, MMB_IOCTL_SIZED, FD_IOMMUFD, 0, false}, 24, 40, 4, 0, MMB_IOMMU_HWPT_ALLOC_NEST_PARENT | MMB_IOMMU_HWPT_ALLOC_DIRTY_TRACKING, false,
     32, 0, 40, BOUND_COUNT, 28, 4, 1},
    /* flags must be 0; data_uptr (at 16) gets `data`, data_len (at 12) bytes of it. Up to out_capabilities. */
    {{"IOMMU_GET_HW_INFO", MMB_IOMMU_GET_HW_INFO, MMB_IOCTL_SIZED, FD_IOMMUFD, 0, false}, 32, 40, 4, UINT32_MAX, 0, false, 16, 0, 0, BOUND_COUNT, 12, 4, 1},
    {{"IOMMU_HWPT_SET_DIRTY_TRACKING", MMB_IOMMU_HWPT_SET_DIRTY_TRACKING, MMB_IOCTL_SIZED, FD_IOMMUFD, 0, false}, 16, 16, 4, 0, MMB_IOMMU_HWPT_DIRTY_TRACKING_ENABLE, false, NOPTR},
    {{"IOMMU_HWPT_GET_DIRTY_BITMAP", MMB_IOMMU_HWPT_GET_DIRTY_BITMAP, MMB_IOCTL_SIZED, FD_IOMMUFD, 0, false}, 48, 48, 8, 0, MMB_IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR, false,
     40, 0, 0, BOUND_BITMAP, 0, 0, 0},
};

/* A non-empty string of decimal digits. runs on any thread */
static bool is_number(const char *p) {
  if (*p == '\0') return false;
  for (; *p; p++)
    if (*p < '0' || *p > '9') return false;
  return true;
}

/*
 * The kind of VFIO or iommufd descriptor `fd` is, from what the kernel shows in /proc/self/fd (0 for
 * anything else). runs on any thread (no JS access)
 */
static unsigned fd_kind(int fd) {
  char link[64], target[128];
  snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
  ssize_t n = readlink(link, target, sizeof target - 1);
  if (n < 0) return 0;
  target[n] = '\0';
  if (strcmp(target, "/dev/vfio/vfio") == 0) return FD_CONTAINER;
  if (strcmp(target, "/dev/iommu") == 0) return FD_IOMMUFD;
  if (strcmp(target, "anon_inode:[vfio-device]") == 0) return FD_DEVICE;
  if (strncmp(target, "/dev/vfio/devices/vfio", 22) == 0 && is_number(target + 22)) return FD_DEVICE;
  if (strncmp(target, "/dev/vfio/", 10) == 0) {
    const char *group = target + 10;
    if (strncmp(group, "noiommu-", 8) == 0) group += 8;
    if (is_number(group)) return FD_GROUP;
  }
  return 0;
}

static unsigned fd_kind(int fd);

static const struct mmb_ioctl_family vfio_family = {"VFIO", requests, MMB_COUNT(requests), sizeof requests[0], fd_kind};

/* The gate's lookup (EPERM outside the whitelist, EINVAL through the wrong entry point), as a VFIO entry. runs on the main thread */
static const struct request *arg_request(napi_env env, napi_value v, int fd, enum mmb_ioctl_entry entry) {
  return (const struct request *)mmb_ioctl_lookup(env, &vfio_family, v, fd, entry);
}

/* Reads a native-endian __u32 at `off` (unaligned-safe). runs on any thread */
static uint32_t get_u32(const uint8_t *p, int off) {
  uint32_t v;
  memcpy(&v, p + off, sizeof v);
  return v;
}

/* Reads a native-endian __u64 at `off` (unaligned-safe). runs on any thread */
static uint64_t get_u64(const uint8_t *p, int off) {
  uint64_t v;
  memcpy(&v, p + off, sizeof v);
  return v;
}

/*
 * What is wrong with a struct argument for its entry (an errno), or 0: length, leading size word (minimum,
 * maximum), forbidden and allowed flags. runs on any thread
 */
static int struct_error(const struct request *r, const uint8_t *arg, size_t len) {
  if (len < r->minsz || len > UINT32_MAX) return EINVAL;
  uint32_t size = get_u32(arg, 0);
  if (size < r->minsz || size > len || (r->maxsz != 0 && size > r->maxsz)) return EINVAL;
  if (r->flags_off >= 0) {
    uint32_t flags = get_u32(arg, r->flags_off);
    if ((flags & r->forbidden) != 0 || (r->allowed != 0 && (flags & ~r->allowed) != 0)) return EINVAL;
  }
  return 0;
}

/* Checks a struct argument against its entry, throwing EINVAL. runs on the main thread */
static bool check_struct(napi_env env, const struct request *r, const uint8_t *arg, size_t len) {
  if (struct_error(r, arg, len) == 0) return true;
  mmb_throw_ioctl(env, EINVAL, r->io.name);
  return false;
}

/*
 * For a descriptor of none of the kinds a shared number is meant for, the entry whose checks `arg`
 * passes (the call then ends in ENOTTY), else `r`: the answer does not depend on which request the
 * caller meant. runs on the main thread
 */
static const struct request *entry_for_arg(const struct request *r, int fd, const uint8_t *arg, size_t len) {
  if (mmb_ioctl_fd_ok(&vfio_family, &r->io, fd)) return r;
  for (size_t i = 0; i < MMB_COUNT(requests); i++)
    if (requests[i].io.nr == r->io.nr && requests[i].io.arg == MMB_IOCTL_SIZED && struct_error(&requests[i], arg, len) == 0) return &requests[i];
  return r;
}

/* Whether the request's pointer field is used by this call (see struct request.ptr_flag). */
static bool uses_pointer(const struct request *r, const uint8_t *arg) {
  if (r->bound == BOUND_NONE || get_u32(arg, 0) < r->ptr_minsz) return false;
  return r->ptr_flag == 0 || (get_u32(arg, r->flags_off) & r->ptr_flag) != 0;
}

/*
 * The bytes the kernel may follow the pointer of `arg` for (set *bytes), or false with errno set: EINVAL
 * when the fields make no sense (a page size that is not a power of two, an empty range), ERANGE on
 * overflow. runs on the main thread
 */
static bool pointer_bytes(const struct request *r, const uint8_t *arg, uint64_t *bytes) {
  if (r->bound == BOUND_COUNT) {
    uint64_t count = r->count_size == 8 ? get_u64(arg, r->count_off) : get_u32(arg, r->count_off);
    if (count > UINT64_MAX / r->elem_size) {
      errno = ERANGE;
      return false;
    }
    *bytes = count * r->elem_size;
    return true;
  }
  /* BOUND_BITMAP: iommu_hwpt_get_dirty_bitmap {.., length at 24, page_size at 32, data at 40}. */
  uint64_t length = get_u64(arg, 24), page_size = get_u64(arg, 32);
  if (length == 0 || page_size == 0 || (page_size & (page_size - 1)) != 0) {
    errno = EINVAL;
    return false;
  }
  uint64_t pages = (length - 1) / page_size + 1;
  *bytes = ((pages - 1) / 64 + 1) * 8;
  return true;
}

/* runs on the main thread */
static napi_value make_int(napi_env env, int value) {
  napi_value v;
  CHECK(napi_create_int32(env, value, &v));
  return v;
}

/*
 * vfioOpen(path) -> fd: open(2) O_RDWR | O_CLOEXEC of a VFIO or iommufd node (/dev/vfio/vfio,
 * /dev/vfio/<group>, /dev/vfio/devices/vfioN, /dev/iommu); any other path is EPERM.
 * runs on the main thread
 */
static napi_value open_js(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  char path[256];
  if (!mmb_args(env, info, 1, argv) ||
      !mmb_arg_cstring(env, argv[0], "path", path, sizeof path, ENAMETOOLONG, "open"))
    return NULL;
  if (strncmp(path, "/dev/vfio/", 10) != 0 && strcmp(path, "/dev/iommu") != 0) return mmb_throw_errno(env, EPERM, "open");
  if (strstr(path, "/../") != NULL || strstr(path, "/./") != NULL) return mmb_throw_errno(env, EPERM, "open");
  int fd;
  do fd = open(path, O_RDWR | O_CLOEXEC);
  while (fd < 0 && errno == EINTR);
  if (fd < 0) return mmb_throw_errno(env, errno, "open");
  return mmb_new_fd(env, fd);
}

/*
 * vfioIoctlInt(fd, request, value) -> the ioctl's return value. For the requests whose argument is an
 * int (VFIO_GET_API_VERSION, VFIO_CHECK_EXTENSION, VFIO_SET_IOMMU, VFIO_GROUP_UNSET_CONTAINER,
 * VFIO_DEVICE_RESET) or a pointer to an __s32 (VFIO_GROUP_SET_CONTAINER: the container fd).
 * runs on the main thread
 */
static napi_value ioctl_int_js(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int fd;
  int64_t value;
  if (!mmb_args(env, info, 3, argv) || !mmb_arg_fd(env, argv[0], &fd)) return NULL;
  const struct request *r = arg_request(env, argv[1], fd, MMB_ENTRY_INT);
  if (r == NULL || !mmb_arg_int64(env, argv[2], INT32_MIN, INT32_MAX, "value", &value)) return NULL;
  int32_t s32 = (int32_t)value;
  unsigned long arg = r->io.arg == MMB_IOCTL_S32_PTR ? (unsigned long)(uintptr_t)&s32 : (unsigned long)(uint32_t)s32;
  int rc = mmb_ioctl_call(&vfio_family, &r->io, fd, arg);
  if (rc < 0) return mmb_throw_ioctl(env, -rc, r->io.name);
  return make_int(env, rc);
}

/*
 * vfioIoctl(fd, request, arg, data?) -> the ioctl's return value. `arg` (a Uint8Array) is the packed
 * struct; the kernel reads it and writes its results back into it. `data` is only for requests with a
 * pointer field (IOMMU_IOAS_IOVA_RANGES, IOMMU_GET_HW_INFO, VFIO_IOMMU_DIRTY_PAGES with GET_BITMAP,
 * IOMMU_HWPT_GET_DIRTY_BITMAP): C points the field at `data` after checking it holds what the kernel may
 * write there, and zeroes the field again afterwards. runs on the main thread
 */
static napi_value ioctl_js(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  int fd;
  uint8_t *arg, *data = NULL;
  size_t len, data_len = 0;
  if (!mmb_args(env, info, 4, argv) || !mmb_arg_fd(env, argv[0], &fd)) return NULL;
  const struct request *r = arg_request(env, argv[1], fd, MMB_ENTRY_STRUCT);
  if (r == NULL || !mmb_arg_bytes(env, argv[2], "arg", &arg, &len)) return NULL;
  r = entry_for_arg(r, fd, arg, len);
  if (!check_struct(env, r, arg, len)) return NULL;

  napi_valuetype data_type;
  CHECK(napi_typeof(env, argv[3], &data_type));
  bool has_data = data_type != napi_undefined;
  if (has_data && !mmb_arg_bytes(env, argv[3], "data", &data, &data_len)) return NULL;
  bool pointer = uses_pointer(r, arg);
  if (has_data && !pointer) return mmb_throw_ioctl(env, EINVAL, r->io.name);
  /* data may be left out only when the kernel writes nothing through the pointer (a "how many?" call). */
  uint64_t bytes = 0;
  if (pointer && !pointer_bytes(r, arg, &bytes)) return mmb_throw_ioctl(env, errno, r->io.name);
  if (bytes > data_len) return mmb_throw_ioctl(env, ERANGE, r->io.name);
  /* Checked before the pointer is written, so a refused call leaves none in the caller's buffer. */
  if (!mmb_ioctl_fd_ok(&vfio_family, &r->io, fd)) return mmb_throw_ioctl(env, ENOTTY, r->io.name);
  if (pointer) {
    uint64_t ptr = bytes > 0 ? (uint64_t)(uintptr_t)data : 0;
    memcpy(arg + r->ptr_off, &ptr, sizeof ptr);
  }
  int rc = mmb_ioctl_call(&vfio_family, &r->io, fd, (unsigned long)(uintptr_t)arg);
  if (pointer) memset(arg + r->ptr_off, 0, sizeof(uint64_t));
  if (rc < 0) return mmb_throw_ioctl(env, -rc, r->io.name);
  return make_int(env, rc);
}

/*
 * vfioGroupGetDeviceFd(groupFd, name) -> device fd (VFIO_GROUP_GET_DEVICE_FD with the device's name,
 * "0000:00:01.0" for PCI). The new fd is made close-on-exec. runs on the main thread
 */
static napi_value group_get_device_fd_js(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int fd;
  char name[256];
  const struct mmb_ioctl *r = mmb_ioctl_find(&vfio_family, VFIO_GROUP_GET_DEVICE_FD, -1);
  if (!mmb_args(env, info, 2, argv) || !mmb_arg_fd(env, argv[0], &fd)) return NULL;
  if (!mmb_arg_cstring(env, argv[1], "name", name, sizeof name, ENAMETOOLONG, "ioctl")) {
    /* A name too long is the kernel's ENAMETOOLONG, in the gate's shape; a non-string stays a TypeError. */
    napi_value error, code;
    bool is_errno = false;
    if (napi_get_and_clear_last_exception(env, &error) == napi_ok && napi_get_named_property(env, error, "syscall", &code) == napi_ok) {
      napi_valuetype type;
      is_errno = napi_typeof(env, code, &type) == napi_ok && type == napi_string;
    }
    if (is_errno) return mmb_throw_ioctl(env, ENAMETOOLONG, r->name);
    napi_throw(env, error);
    return NULL;
  }
  int dev = mmb_ioctl_call(&vfio_family, r, fd, (unsigned long)(uintptr_t)name);
  if (dev < 0) return mmb_throw_ioctl(env, -dev, r->name);
  /* The kernel creates it O_CLOEXEC (get_unused_fd_flags(O_CLOEXEC)); make sure of it whatever the version. */
  int fl = fcntl(dev, F_GETFD);
  if (fl < 0 || fcntl(dev, F_SETFD, fl | FD_CLOEXEC) < 0) {
    int err = errno;
    close(dev);
    return mmb_throw_errno(env, err, "fcntl");
  }
  return mmb_new_fd(env, dev);
}

/* ---- the async variant ------------------------------------------------------------------------ */

struct ioctl_work {
  struct mmb_async base; /* first: the record is freed through it */
  const struct request *r;
  int fd;
  uint8_t *copy; /* our own copy of the struct: the JS buffer may be detached meanwhile */
  size_t len;
  int rc;
  napi_ref arg_ref; /* the caller's Uint8Array, to copy the results back into */
};

/* runs on a worker thread, no JS access */
static void ioctl_execute(struct mmb_async *a) {
  struct ioctl_work *w = (struct ioctl_work *)a;
  int rc = mmb_ioctl_call(&vfio_family, &w->r->io, w->fd, (unsigned long)(uintptr_t)w->copy);
  w->rc = rc;
  a->err = rc < 0 ? -rc : 0;
}

/* Copies the kernel's results back into the caller's buffer if it is still there. runs on the main thread */
static void copy_back(napi_env env, struct ioctl_work *w) {
  napi_value arg;
  if (napi_get_reference_value(env, w->arg_ref, &arg) != napi_ok || arg == NULL) return;
  napi_typedarray_type type;
  size_t length;
  void *ptr;
  if (napi_get_typedarray_info(env, arg, &type, &length, &ptr, NULL, NULL) != napi_ok) return;
  if (type == napi_uint8_array && length == w->len && ptr != NULL) memcpy(ptr, w->copy, w->len);
}

/* runs on the main thread, after ioctl_execute */
static napi_value ioctl_settle(napi_env env, struct mmb_async *a, bool *reject) {
  struct ioctl_work *w = (struct ioctl_work *)a;
  napi_value value = NULL;
  *reject = a->err != 0;
  if (*reject) return mmb_ioctl_error(env, a->err, w->r->io.name);
  copy_back(env, w);
  napi_create_int32(env, w->rc, &value);
  return value;
}

/* runs on the main thread, last */
static void ioctl_release(napi_env env, struct mmb_async *a) {
  struct ioctl_work *w = (struct ioctl_work *)a;
  if (w->arg_ref != NULL) napi_delete_reference(env, w->arg_ref);
  free(w->copy);
  free(w);
}

/*
 * vfioIoctlAsync(fd, request, arg) -> Promise<number>: vfioIoctl on a libuv worker thread, for the
 * requests that pin memory and can take seconds (VFIO_IOMMU_MAP_DMA / UNMAP_DMA, IOMMU_IOAS_MAP /
 * UNMAP). C works on a copy of `arg` and copies the kernel's results back into it on completion. Every
 * failure, argument checks included, rejects the promise. runs on the main thread; the ioctl runs in
 * ioctl_execute.
 */
static napi_value ioctl_async_js(napi_env env, napi_callback_info info) {
  napi_value promise, argv[3];
  napi_deferred deferred;
  CHECK(napi_create_promise(env, &deferred, &promise));

  int fd;
  uint8_t *arg;
  size_t len;
  const struct request *r = NULL;
  if (!mmb_args(env, info, 3, argv) || !mmb_arg_fd(env, argv[0], &fd) ||
      (r = arg_request(env, argv[1], fd, MMB_ENTRY_STRUCT)) == NULL || !mmb_arg_bytes(env, argv[2], "arg", &arg, &len) ||
      !check_struct(env, r, arg, len)) {
    mmb_async_reject_pending(env, deferred);
    return promise;
  }
  if (!r->async) {
    mmb_throw_ioctl(env, EINVAL, r->io.name);
    mmb_async_reject_pending(env, deferred);
    return promise;
  }
  struct ioctl_work *w = calloc(1, sizeof *w);
  uint8_t *copy = malloc(len);
  if (w == NULL || copy == NULL) {
    free(w);
    free(copy);
    mmb_throw_ioctl(env, ENOMEM, r->io.name);
    mmb_async_reject_pending(env, deferred);
    return promise;
  }
  memcpy(copy, arg, len);
  w->base = (struct mmb_async){.execute = ioctl_execute, .settle = ioctl_settle, .release = ioctl_release, .deferred = deferred};
  w->r = r;
  w->fd = fd;
  w->copy = copy;
  w->len = len;
  napi_status status = napi_create_reference(env, argv[2], 1, &w->arg_ref);
  if (status != napi_ok) {
    ioctl_release(env, &w->base);
    mmb_throw_napi(env, status, "napi_create_reference");
    mmb_async_reject_pending(env, deferred);
    return promise;
  }
  mmb_async_queue(env, &w->base, r->io.name);
  return promise;
}

/* runs on the main thread, at module load */
static bool export_requests(napi_env env, napi_value exports) {
  napi_value obj;
  CHECK_BOOL(napi_create_object(env, &obj));
  for (size_t i = 0; i < MMB_COUNT(requests); i++)
    if (!mmb_set_number(env, obj, requests[i].io.name, (double)requests[i].io.nr)) return false;
  CHECK_BOOL(napi_object_freeze(env, obj));
  CHECK_BOOL(napi_set_named_property(env, exports, "vfioRequests", obj));
  return true;
}

/* runs on the main thread, at module load */
bool mmb_init_vfio(napi_env env, napi_value exports) {
  static const mmb_method methods[] = {
      {"vfioOpen", open_js},
      {"vfioIoctlInt", ioctl_int_js},
      {"vfioIoctl", ioctl_js},
      {"vfioIoctlAsync", ioctl_async_js},
      {"vfioGroupGetDeviceFd", group_get_device_fd_js},
  };
  return mmb_export_methods(env, exports, methods, MMB_COUNT(methods)) && export_requests(env, exports);
}
