/*
 * Dirty bitmaps in shared memory: bit i of a bitmap is page i of a region (1 bit per 4 KiB page), in
 * little-endian 64-bit words, as KVM's dirty log lays them out. Several processes set bits in the same
 * memfd at once, so every update is an atomic read-modify-write on a 64-bit word, and get-and-clear
 * never loses a bit set concurrently: a word is read with a plain load and, only when non-zero, swapped
 * with zero atomically (a bit set after the load is either in the swapped value or stays for next time).
 * All functions run on the main thread, on a live Mapping of the bitmap; ranges are checked against it.
 */
#include <errno.h>
#include <stdint.h>
#include <string.h>

#include "addon.h"
#include "convert.h"
#include "errors.h"
#include "mapping.h"

/* bitmapSet(mapping, firstBit, count): atomically sets bits [firstBit, firstBit + count). runs on the main thread */
static napi_value bitmap_set_js(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  uint64_t first, count;
  if (!mmb_args(env, info, 3, argv) || !mmb_arg_size(env, argv[1], "firstBit", &first) ||
      !mmb_arg_size(env, argv[2], "count", &count))
    return NULL;
  if (count == 0) return NULL;
  uint64_t firstWord = first / 64, lastWord = (first + count - 1) / 64;
  uint8_t *base;
  if (!mmb_mapping_range(env, argv[0], firstWord * 8, (lastWord - firstWord + 1) * 8, "bitmapSet", &base)) return NULL;
  uint64_t *w = (uint64_t *)(void *)base;
  for (uint64_t i = firstWord; i <= lastWord; i++) {
    uint64_t lo = i == firstWord ? first % 64 : 0;
    uint64_t hi = i == lastWord ? (first + count - 1) % 64 : 63; /* inclusive */
    uint64_t mask = (hi == 63 ? ~0ULL : ((1ULL << (hi + 1)) - 1)) & ~((1ULL << lo) - 1);
    __atomic_fetch_or(&w[i - firstWord], mask, __ATOMIC_RELEASE);
  }
  return NULL;
}

/* bitmapOr(mapping, byteOffset, src): atomically ORs src (whole 64-bit words) into the bitmap. runs on the main thread */
static napi_value bitmap_or_js(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  uint64_t offset;
  uint8_t *src;
  size_t len;
  if (!mmb_args(env, info, 3, argv) || !mmb_arg_size(env, argv[1], "byteOffset", &offset) ||
      !mmb_arg_bytes(env, argv[2], "src", &src, &len))
    return NULL;
  if (offset % 8 != 0 || len % 8 != 0) return mmb_throw_errno(env, EINVAL, "bitmapOr");
  uint8_t *base;
  if (!mmb_mapping_range(env, argv[0], offset, len, "bitmapOr", &base)) return NULL;
  uint64_t *dst = (uint64_t *)(void *)base;
  for (size_t i = 0; i < len / 8; i++) {
    uint64_t v;
    memcpy(&v, src + i * 8, 8);
    if (v != 0) __atomic_fetch_or(&dst[i], v, __ATOMIC_RELEASE);
  }
  return NULL;
}

/*
 * bitmapFetchClear(mapping, byteOffset, length, dst) -> bits: clears [byteOffset, byteOffset + length)
 * of the bitmap and ORs what was set into dst (a Uint8Array of at least `length` bytes, not shared with
 * the bitmap). Returns the number of bits that were set. runs on the main thread
 */
/*
 * The arguments of bitmapFetchClear and bitmapTake, (mapping, byteOffset, length, dst): a word-aligned
 * range of the bitmap and a destination at least as long. Sets *words to the range, *out to dst and *n to
 * the number of 64-bit words; false with a JS exception pending when anything is wrong.
 */
static bool collect_args(napi_env env, napi_callback_info info, const char *name, uint64_t **words, uint8_t **out, uint64_t *n) {
  napi_value argv[4];
  uint64_t offset, length;
  size_t outLen;
  if (!mmb_args(env, info, 4, argv) || !mmb_arg_size(env, argv[1], "byteOffset", &offset) ||
      !mmb_arg_size(env, argv[2], "length", &length) || !mmb_arg_bytes(env, argv[3], "dst", out, &outLen))
    return false;
  if (offset % 8 != 0 || length % 8 != 0 || outLen < length) {
    mmb_throw_errno(env, EINVAL, name);
    return false;
  }
  uint8_t *base;
  if (!mmb_mapping_range(env, argv[0], offset, length, name, &base)) return false;
  *words = (uint64_t *)(void *)base;
  *n = length / 8;
  return true;
}

static napi_value bitmap_fetch_clear_js(napi_env env, napi_callback_info info) {
  uint64_t *w;
  uint8_t *out;
  uint64_t n;
  if (!collect_args(env, info, "bitmapFetchClear", &w, &out, &n)) return NULL;
  uint64_t bits = 0;
  for (uint64_t i = 0; i < n; i++) {
    uint64_t v = __atomic_load_n(&w[i], __ATOMIC_RELAXED);
    if (v == 0) continue;
    v = __atomic_exchange_n(&w[i], 0, __ATOMIC_ACQ_REL);
    uint64_t o;
    memcpy(&o, out + i * 8, 8);
    o |= v;
    memcpy(out + i * 8, &o, 8);
    bits += (uint64_t)__builtin_popcountll(v);
  }
  napi_value result;
  CHECK(napi_create_double(env, (double)bits, &result));
  return result;
}

/*
 * The collection loop of bitmapTake: ORs every non-zero word of w[0..n) into out and zeroes it, skipping
 * all-zero cache lines (a sparse bitmap costs one read pass and never touches the destination's pages).
 * Compiled twice: with the POPCNT instruction where the CPU has it, and portable. Runs on the main thread.
 */
#define TAKE_BODY                                                                           \
  uint64_t bits = 0, i = 0;                                                                 \
  for (; i + 8 <= n; i += 8) {                                                              \
    if ((w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7]) == 0) \
      continue;                                                                             \
    for (uint64_t j = i; j < i + 8; j++) {                                                  \
      uint64_t v = w[j];                                                                    \
      if (v == 0) continue;                                                                 \
      uint64_t o;                                                                           \
      memcpy(&o, out + j * 8, 8);                                                           \
      o |= v;                                                                               \
      memcpy(out + j * 8, &o, 8);                                                           \
      w[j] = 0;                                                                             \
      bits += (uint64_t)__builtin_popcountll(v);                                            \
    }                                                                                       \
  }                                                                                         \
  for (; i < n; i++) {                                                                      \
    uint64_t v = w[i];                                                                      \
    if (v == 0) continue;                                                                   \
    uint64_t o;                                                                             \
    memcpy(&o, out + i * 8, 8);                                                             \
    o |= v;                                                                                 \
    memcpy(out + i * 8, &o, 8);                                                             \
    w[i] = 0;                                                                               \
    bits += (uint64_t)__builtin_popcountll(v);                                              \
  }                                                                                         \
  return bits;

#if defined(__x86_64__)
__attribute__((target("popcnt"))) static uint64_t take_popcnt(uint64_t *w, uint8_t *out, uint64_t n) { TAKE_BODY }
#endif
static uint64_t take_portable(uint64_t *w, uint8_t *out, uint64_t n) { TAKE_BODY }

static uint64_t take_words(uint64_t *w, uint8_t *out, uint64_t n) {
#if defined(__x86_64__)
  if (__builtin_cpu_supports("popcnt")) return take_popcnt(w, out, n);
#endif
  return take_portable(w, out, n);
}

/*
 * bitmapTake(mapping, byteOffset, length, dst) -> bits: ORs [byteOffset, byteOffset + length) of the
 * bitmap into dst and zeroes it, with plain loads and stores. Only for a half of a double-buffered bitmap
 * that no writer touches any more (the broker retired it and every writer acked the flush): then nothing
 * can race, and this runs at memory speed where an atomic swap per word cannot. Returns the number of
 * bits that were set. runs on the main thread
 */
static napi_value bitmap_take_js(napi_env env, napi_callback_info info) {
  uint64_t *w;
  uint8_t *out;
  uint64_t n;
  if (!collect_args(env, info, "bitmapTake", &w, &out, &n)) return NULL;
  uint64_t bits = take_words(w, out, n);
  napi_value result;
  CHECK(napi_create_double(env, (double)bits, &result));
  return result;
}

/* runs on the main thread, at module load */
bool mmb_init_bitmap(napi_env env, napi_value exports) {
  static const mmb_method methods[] = {{"bitmapSet", bitmap_set_js},
                                       {"bitmapOr", bitmap_or_js},
                                       {"bitmapFetchClear", bitmap_fetch_clear_js},
                                       {"bitmapTake", bitmap_take_js}};
  return mmb_export_methods(env, exports, methods, MMB_COUNT(methods));
}
