/*
 * Mappings: mmap(2) exposed as an external ArrayBuffer, munmap(2) that detaches it, and
 * mlock(2)/munlock(2) on a libuv worker thread.
 *
 * Lifetime of a `struct mapping` record. It is shared, and counted in `refs`, by
 *   - the Mapping object's napi_wrap (released by wrap_finalize),
 *   - the external ArrayBuffer (released by buffer_finalize, which Node calls on the main thread once
 *     the ArrayBuffer has been collected or detached),
 *   - each queued mlock/munlock (released in its complete callback),
 *   - mmap_js itself while it builds the objects.
 * `refs` and `busy` are only touched on the main thread, so they need no atomics. The memory is
 * unmapped by munmap() (which detaches the buffer first and refuses while `busy`), or otherwise when
 * the last reference goes: by then no JS object can reach the memory and no worker is using it.
 * `addr` and `length` never change; a worker reads them only while `busy` keeps munmap() away.
 */
#include <errno.h>
#include <linux/magic.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/vfs.h>
#include <unistd.h>

#include "addon.h"
#include "async_work.h"
#include "convert.h"
#include "errors.h"
#include "mapping.h"

struct mapping {
  uint8_t *addr;
  size_t length;
  unsigned refs;
  unsigned busy; /* mlock/munlock works queued or running */
  bool mapped;
};

/* Distinguishes our Mapping objects from anything else that carries a napi_wrap. */
static const napi_type_tag mapping_tag = {0x6d6d622d6d617070ULL, 0x696e672d7461672dULL};

/* runs on the main thread */
static void mapping_release(struct mapping *m) {
  if (--m->refs > 0) return;
  if (m->mapped) munmap(m->addr, m->length);
  free(m);
}

/* runs on the main thread, when Node releases the ArrayBuffer's backing store */
static void buffer_finalize(napi_env env, void *data, void *hint) {
  (void)env;
  (void)data;
  mapping_release(hint);
}

/* runs on the main thread, after the Mapping object has been collected */
static void wrap_finalize(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  mapping_release(data);
}

/*
 * Unmaps now: detach first, so that JS can never reach the memory after it is gone.
 * Returns false with an exception pending if the buffer cannot be detached (nothing is unmapped then).
 * runs on the main thread
 */
static bool unmap_now(napi_env env, struct mapping *m, napi_value buffer) {
  CHECK_BOOL(napi_detach_arraybuffer(env, buffer));
  if (munmap(m->addr, m->length) < 0) {
    /* Only possible for arguments the kernel rejects; leave `mapped` set so the last release
     * retries. The buffer is already detached, so JS cannot reach the memory either way. */
    mmb_throw_errno(env, errno, "munmap");
    return false;
  }
  m->mapped = false;
  return true;
}

/* Builds the Mapping object around an existing ArrayBuffer. runs on the main thread */
static napi_value make_mapping_object(napi_env env, struct mapping *m, napi_value buffer) {
  napi_value obj, address, length;
  CHECK(napi_create_object(env, &obj));
  CHECK(napi_create_double(env, (double)(uintptr_t)m->addr, &address));
  CHECK(napi_create_double(env, (double)m->length, &length));
  const napi_property_descriptor props[] = {
      {"buffer", NULL, NULL, NULL, NULL, buffer, napi_enumerable, NULL},
      {"address", NULL, NULL, NULL, NULL, address, napi_enumerable, NULL},
      {"length", NULL, NULL, NULL, NULL, length, napi_enumerable, NULL},
  };
  CHECK(napi_define_properties(env, obj, MMB_COUNT(props), props));
  CHECK(napi_type_tag_object(env, obj, &mapping_tag));
  CHECK(napi_wrap(env, obj, m, wrap_finalize, NULL, NULL));
  m->refs++;
  return obj;
}

/*
 * Wraps memory that is already mapped at [addr, addr + length) into a Mapping object, which from then
 * on owns it. On failure returns NULL with an exception pending, and the memory is unmapped (now, or by
 * the buffer's finalizer if a buffer was created). runs on the main thread.
 *
 * A mapping longer than the runtime's largest ArrayBuffer (4 GiB on Node 20) fails with Node's own
 * ERR_BUFFER_TOO_LARGE error.
 */
static napi_value wrap_new_mapping(napi_env env, void *addr, size_t length) {
  struct mapping *m = calloc(1, sizeof *m);
  if (m == NULL) {
    munmap(addr, length);
    return mmb_throw_errno(env, ENOMEM, "mmap");
  }
  m->addr = addr;
  m->length = length;
  m->mapped = true;
  /* One reference for this function and one pre-granted to the buffer's finalizer. Whether or not
   * Node calls that finalizer when creation fails (Node 20 does, for an oversized buffer), the record
   * is never freed twice; if Node never calls it, these few bytes leak and nothing else does. */
  m->refs = 2;

  napi_value buffer;
  napi_status status = napi_create_external_arraybuffer(env, addr, length, buffer_finalize, m, &buffer);
  if (status != napi_ok) {
    /* No ArrayBuffer exists, so nothing in JS can reach the memory. */
    munmap(addr, length);
    m->mapped = false;
    mapping_release(m);
    mmb_throw_napi(env, status, "napi_create_external_arraybuffer");
    return NULL;
  }

  napi_value obj = make_mapping_object(env, m, buffer);
  if (obj == NULL) {
    /* Unmap now if the buffer can be detached; otherwise the buffer's finalizer will. Either way
     * the caller sees the original exception. */
    napi_value pending = NULL;
    bool has_pending = false;
    napi_is_exception_pending(env, &has_pending);
    if (has_pending) napi_get_and_clear_last_exception(env, &pending);
    if (napi_detach_arraybuffer(env, buffer) == napi_ok && munmap(addr, length) == 0) m->mapped = false;
    if (pending != NULL) napi_throw(env, pending);
  }
  mapping_release(m); /* this function's reference */
  return obj;
}

/* mmap(fd, offset, length, prot, flags) -> Mapping. runs on the main thread. */
static napi_value mmap_js(napi_env env, napi_callback_info info) {
  napi_value argv[5];
  int fd, prot, flags;
  uint64_t offset, length;
  if (!mmb_args(env, info, 5, argv) || !mmb_arg_fd(env, argv[0], &fd) ||
      !mmb_arg_size(env, argv[1], "offset", &offset) ||
      !mmb_arg_size(env, argv[2], "length", &length) || !mmb_arg_flags(env, argv[3], "prot", &prot) ||
      !mmb_arg_flags(env, argv[4], "flags", &flags))
    return NULL;
  if (length == 0) return mmb_throw_errno(env, EINVAL, "mmap");

  void *addr = mmap(NULL, length, prot, flags, fd, (off_t)offset);
  if (addr == MAP_FAILED) return mmb_throw_errno(env, errno, "mmap");
  return wrap_new_mapping(env, addr, length);
}

/*
 * mmapChunked(fd, offset, length, prot, flags, chunk[, align]) -> Mapping[]: `length` bytes of `fd`
 * mapped at one contiguous range of addresses starting at a multiple of `align`, as consecutive Mappings
 * of at most `chunk` bytes each (a multiple of the page size and of `align`). A KVM memslot or a VFIO DMA
 * mapping needs one contiguous host range for a whole region, and a JS ArrayBuffer cannot be longer than
 * 4 GiB on Node 20.
 *
 * The range is first reserved with an inaccessible anonymous mapping, then each chunk is mapped over
 * its part with MAP_FIXED: the addresses replaced are our own reservation, never anyone else's. The
 * reservation is `align` - page bytes longer than needed and trimmed at both ends, so the range starts
 * on an `align` boundary: a hugetlbfs file (an MFD_HUGETLB memfd) can only be mapped at an address
 * aligned to its huge page size (EINVAL otherwise), and anything else gets huge mappings (THP, KVM's
 * large EPT entries) only where the address and the file offset agree modulo the huge page size.
 * `align` is a power of two, at least the page size (the default). For a hugetlbfs file it is raised to
 * the file's huge page size (fstatfs f_bsize), and `offset`, `length` and `chunk` must be multiples of
 * it (EINVAL): the kernel rounds a hugetlbfs mapping's length up to a whole huge page, and MAP_FIXED
 * would then replace addresses past our reservation. Each chunk is an ordinary Mapping
 * (munmap it, or let it be collected); unmapping every chunk releases the whole range. runs on the main
 * thread.
 */
static napi_value mmap_chunked_js(napi_env env, napi_callback_info info) {
  napi_value argv[7];
  int fd, prot, flags;
  uint64_t offset, length, chunk, align;
  napi_valuetype align_type;
  if (!mmb_args(env, info, 7, argv) || !mmb_arg_fd(env, argv[0], &fd) ||
      !mmb_arg_size(env, argv[1], "offset", &offset) ||
      !mmb_arg_size(env, argv[2], "length", &length) || !mmb_arg_flags(env, argv[3], "prot", &prot) ||
      !mmb_arg_flags(env, argv[4], "flags", &flags) || !mmb_arg_size(env, argv[5], "chunk", &chunk))
    return NULL;
  long page = sysconf(_SC_PAGESIZE);
  CHECK(napi_typeof(env, argv[6], &align_type));
  if (align_type == napi_undefined)
    align = (uint64_t)page;
  else if (!mmb_arg_size(env, argv[6], "align", &align))
    return NULL;
  if (length == 0 || chunk == 0 || chunk % (uint64_t)page != 0 || (flags & MAP_FIXED) != 0 ||
      align < (uint64_t)page || (align & (align - 1)) != 0)
    return mmb_throw_errno(env, EINVAL, "mmap");
  struct statfs sfs;
  if (fstatfs(fd, &sfs) < 0) return mmb_throw_errno(env, errno, "fstatfs");
  if ((unsigned long)sfs.f_type == HUGETLBFS_MAGIC) {
    uint64_t huge = (uint64_t)sfs.f_bsize;
    if (huge == 0 || offset % huge != 0 || length % huge != 0 || chunk % huge != 0) return mmb_throw_errno(env, EINVAL, "mmap");
    if (align < huge) align = huge;
  }
  if (chunk % align != 0 || length > SIZE_MAX - align) return mmb_throw_errno(env, EINVAL, "mmap");

  size_t slack = (size_t)(align - (uint64_t)page);
  uint8_t *reserved = mmap(NULL, length + slack, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (reserved == MAP_FAILED) return mmb_throw_errno(env, errno, "mmap");
  uint8_t *base = (uint8_t *)(((uintptr_t)reserved + slack) & ~(uintptr_t)(align - 1));
  /* Give back the slack on both sides (page-sized pieces of our own reservation). */
  if (base > reserved) munmap(reserved, (size_t)(base - reserved));
  if (reserved + length + slack > base + length) munmap(base + length, (size_t)(reserved + length + slack - (base + length)));

  size_t count = (size_t)((length + chunk - 1) / chunk);
  for (size_t i = 0; i < count; i++) {
    uint64_t off = (uint64_t)i * chunk;
    size_t n = (size_t)(length - off < chunk ? length - off : chunk);
    if (mmap(base + off, n, prot, flags | MAP_FIXED, fd, (off_t)(offset + off)) == MAP_FAILED) {
      int err = errno;
      munmap(base, length);
      return mmb_throw_errno(env, err, "mmap");
    }
  }

  napi_value array;
  if (napi_create_array_with_length(env, count, &array) != napi_ok) {
    munmap(base, length);
    return mmb_throw_errno(env, ENOMEM, "mmap");
  }
  for (size_t i = 0; i < count; i++) {
    uint64_t off = (uint64_t)i * chunk;
    size_t n = (size_t)(length - off < chunk ? length - off : chunk);
    napi_value obj = wrap_new_mapping(env, base + off, n);
    napi_status status = obj == NULL ? napi_pending_exception : napi_set_element(env, array, (uint32_t)i, obj);
    if (status != napi_ok) {
      /* Chunk i is unmapped (wrap_new_mapping failed) or owned by its object; earlier chunks belong to
       * their Mapping objects and are unmapped when collected. Only the chunks after i are ours. */
      if (length > off + n) munmap(base + off + n, length - off - n);
      if (obj != NULL) mmb_throw_napi(env, status, "napi_set_element");
      return NULL;
    }
  }
  return array;
}

/*
 * Finds the record behind a Mapping object; TypeError for anything else.
 * runs on the main thread
 */
static struct mapping *unwrap_mapping(napi_env env, napi_value v) {
  napi_valuetype type;
  bool tagged = false;
  if (napi_typeof(env, v, &type) != napi_ok) return NULL;
  if (type == napi_object && napi_check_object_type_tag(env, v, &mapping_tag, &tagged) != napi_ok)
    return NULL;
  if (!tagged) {
    mmb_throw_type(env, "mapping must be a Mapping returned by mmap()");
    return NULL;
  }
  void *data;
  NAPI_CALL_RET(env, napi_unwrap(env, v, &data), NULL);
  return data;
}

/* runs on the main thread */
bool mmb_mapping_range(napi_env env, napi_value v, uint64_t offset, uint64_t length, const char *syscall, uint8_t **addr) {
  struct mapping *m = unwrap_mapping(env, v);
  if (m == NULL) return false;
  if (!m->mapped) {
    mmb_throw_errno(env, EINVAL, syscall);
    return false;
  }
  if (offset > m->length || length > m->length - offset) {
    mmb_throw_errno(env, ERANGE, syscall);
    return false;
  }
  *addr = m->addr + offset;
  return true;
}

/* munmap(mapping): detach the buffer, then unmap. runs on the main thread */
static napi_value munmap_js(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (!mmb_args(env, info, 1, argv)) return NULL;
  struct mapping *m = unwrap_mapping(env, argv[0]);
  if (m == NULL) return NULL;
  if (!m->mapped) return mmb_throw_errno(env, EINVAL, "munmap");
  if (m->busy > 0) return mmb_throw_errno(env, EBUSY, "munmap");

  /* `buffer` is a non-writable, non-configurable own property: it is the buffer mmap_js made. */
  napi_value buffer;
  bool detached;
  CHECK(napi_get_named_property(env, argv[0], "buffer", &buffer));
  CHECK(napi_is_detached_arraybuffer(env, buffer, &detached));
  /* Detached by someone else (ArrayBuffer.prototype.transfer, from Node 22): the memory may live
   * on in another ArrayBuffer, so only the last release (when that one is gone) may unmap it. */
  if (detached) return mmb_throw_errno(env, EBUSY, "munmap");
  unmap_now(env, m, buffer);
  return NULL;
}

/* ---- mlock / munlock ------------------------------------------------------------------------ */

struct lock_work {
  struct mmb_async base; /* first: the record is freed through it */
  struct mapping *m;
  size_t offset;
  size_t length;
  bool lock; /* mlock, else munlock */
};

/* runs on a worker thread, no JS access */
static void lock_execute(struct mmb_async *a) {
  struct lock_work *w = (struct lock_work *)a;
  uint8_t *start = w->m->addr + w->offset;
  int rc = w->lock ? mlock(start, w->length) : munlock(start, w->length);
  a->err = rc < 0 ? errno : 0;
}

/* runs on the main thread, after lock_execute */
static napi_value lock_settle(napi_env env, struct mmb_async *a, bool *reject) {
  struct lock_work *w = (struct lock_work *)a;
  napi_value value = NULL;
  *reject = a->err != 0;
  if (a->err == 0)
    napi_get_undefined(env, &value);
  else
    value = mmb_errno_error(env, a->err, w->lock ? "mlock" : "munlock");
  return value;
}

/* runs on the main thread, last */
static void lock_release(napi_env env, struct mmb_async *a) {
  (void)env;
  struct lock_work *w = (struct lock_work *)a;
  if (w->m != NULL) {
    w->m->busy--;
    mapping_release(w->m);
  }
  free(w);
}

/*
 * mlock/munlock(mapping, offset, length) -> Promise<void>. Validation failures reject the promise
 * (TypeError / RangeError for bad arguments, EINVAL if already unmapped, ERANGE if the range is not
 * inside the mapping). runs on the main thread; the syscall runs in lock_execute.
 */
static napi_value lock_js(napi_env env, napi_callback_info info, bool lock) {
  const char *syscall = lock ? "mlock" : "munlock";
  napi_value promise, argv[3];
  napi_deferred deferred;
  CHECK(napi_create_promise(env, &deferred, &promise));

  uint64_t offset, length;
  struct mapping *m = NULL;
  if (!mmb_args(env, info, 3, argv) || (m = unwrap_mapping(env, argv[0])) == NULL ||
      !mmb_arg_size(env, argv[1], "offset", &offset) || !mmb_arg_size(env, argv[2], "length", &length)) {
    mmb_async_reject_pending(env, deferred);
    return promise;
  }
  /* The one check C needs for memory safety: the range must lie inside this live mapping. */
  int err = 0;
  if (!m->mapped)
    err = EINVAL;
  else if (offset > m->length || length > m->length - offset)
    err = ERANGE;
  if (err != 0) {
    mmb_throw_errno(env, err, syscall);
    mmb_async_reject_pending(env, deferred);
    return promise;
  }

  struct lock_work *w = calloc(1, sizeof *w);
  if (w == NULL) {
    mmb_throw_errno(env, ENOMEM, syscall);
    mmb_async_reject_pending(env, deferred);
    return promise;
  }
  w->base = (struct mmb_async){.execute = lock_execute, .settle = lock_settle, .release = lock_release, .deferred = deferred};
  w->offset = offset;
  w->length = length;
  w->lock = lock;
  /* The work holds the mapping (a reference, and `busy` keeps munmap away) until it is released. */
  w->m = m;
  m->busy++;
  m->refs++;
  mmb_async_queue(env, &w->base, syscall);
  return promise;
}

/* runs on the main thread */
static napi_value mlock_js(napi_env env, napi_callback_info info) { return lock_js(env, info, true); }
/* runs on the main thread */
static napi_value munlock_js(napi_env env, napi_callback_info info) { return lock_js(env, info, false); }

/*
 * fstatfs(fd) -> {type, bsize}: the filesystem of an open file: f_type (HUGETLBFS_MAGIC, TMPFS_MAGIC, ...)
 * and f_bsize, which hugetlbfs sets to its huge page size. What mmapChunked checks, for TypeScript to
 * know a backing's page size before mapping. runs on the main thread
 */
static napi_value fstatfs_js(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int fd;
  if (!mmb_args(env, info, 1, argv) || !mmb_arg_fd(env, argv[0], &fd)) return NULL;
  struct statfs sfs;
  if (fstatfs(fd, &sfs) < 0) return mmb_throw_errno(env, errno, "fstatfs");
  napi_value obj;
  CHECK(napi_create_object(env, &obj));
  if (!mmb_set_number(env, obj, "type", (double)(unsigned long)sfs.f_type) || !mmb_set_number(env, obj, "bsize", (double)sfs.f_bsize))
    return NULL;
  return obj;
}

/* runs on the main thread, at module load */
bool mmb_init_mapping(napi_env env, napi_value exports) {
  static const mmb_method methods[] = {
      {"mmap", mmap_js},       {"mmapChunked", mmap_chunked_js}, {"munmap", munmap_js},
      {"mlock", mlock_js},     {"munlock", munlock_js},          {"fstatfs", fstatfs_js}};
  return mmb_export_methods(env, exports, methods, MMB_COUNT(methods));
}
