/*
 * The peer of bench/translate.ts: guest-physical to host address translation in C, the same algorithm as
 * the vhost-like client's GuestMemory (clients/memory.ts) on the same table and the same lookups:
 *
 *   - the table: two sorted arrays of region starts and (exclusive) ends, and each region's host address;
 *   - a lookup tries the region of the last hit first, then binary-searches the arrays;
 *   - the whole range [gpa, gpa + len) must lie inside the region found (else it is a miss), and the
 *     result is the host address of gpa (a pointer, where the TypeScript side returns a view).
 *
 * Regions: N regions of SIZE bytes, one every STRIDE bytes from 4 GiB (the gaps are holes). Lookups: L
 * addresses drawn with xorshift32 from SEED, exactly as bench/translate.ts draws them: 'random' picks a
 * region and an 8-byte-aligned offset for each lookup; 'local' keeps one region for 16 lookups in a row
 * (a descriptor chain in one buffer). Host addresses are computed, never dereferenced: no memory is mapped
 * or touched, on either side.
 *
 *   translate REGIONS SIZE STRIDE LOOKUPS random|local SEED PASSES LEN
 *
 * Prints {"gpa_checksum":N,"checksum":N,"misses":N,"ns":[per pass...]}; gpa_checksum lets the caller
 * check that both sides looked up the same addresses.
 * Build: cc -O2 -Wall -Wextra -o translate translate.c
 */
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define BASE 0x100000000ull

static uint64_t *starts, *ends;
static uintptr_t *hva;
static size_t count, last_hit;

static uint32_t seed;
static uint32_t xorshift32(void) {
  seed ^= seed << 13;
  seed ^= seed >> 17;
  seed ^= seed << 5;
  return seed;
}

/* The host address of [gpa, gpa + len), or NULL when no one region holds all of it. */
static inline void *translate(uint64_t gpa, uint64_t len) {
  size_t i = last_hit;
  if (!(i < count && gpa >= starts[i] && gpa < ends[i])) {
    size_t lo = 0, hi = count; /* [lo, hi) */
    for (;;) {
      if (lo >= hi) return NULL;
      size_t mid = lo + (hi - lo) / 2;
      if (gpa < starts[mid]) hi = mid;
      else if (gpa >= ends[mid]) lo = mid + 1;
      else {
        i = mid;
        break;
      }
    }
    last_hit = i;
  }
  if (gpa + len > ends[i]) return NULL;
  return (void *)(hva[i] + (uintptr_t)(gpa - starts[i]));
}

/* CPU time of this thread: a busy machine's preemptions count against neither side (bench/translate.ts
 * times its passes in CPU time too). */
static uint64_t now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

int main(int argc, char **argv) {
  if (argc != 9) {
    fprintf(stderr, "usage: translate REGIONS SIZE STRIDE LOOKUPS random|local SEED PASSES LEN\n");
    return 2;
  }
  count = strtoull(argv[1], NULL, 0);
  uint64_t size = strtoull(argv[2], NULL, 0), stride = strtoull(argv[3], NULL, 0);
  size_t lookups = strtoull(argv[4], NULL, 0);
  int local = !strcmp(argv[5], "local");
  seed = (uint32_t)strtoul(argv[6], NULL, 0);
  int passes = atoi(argv[7]);
  uint64_t len = strtoull(argv[8], NULL, 0);
  if (count == 0 || size < len + 8 || stride < size || lookups == 0 || passes <= 0 || seed == 0) {
    fprintf(stderr, "translate: bad arguments\n");
    return 2;
  }
  starts = malloc(count * sizeof *starts);
  ends = malloc(count * sizeof *ends);
  hva = malloc(count * sizeof *hva);
  uint64_t *gpas = malloc(lookups * sizeof *gpas);
  if (!starts || !ends || !hva || !gpas) return 1;
  for (size_t i = 0; i < count; i++) {
    starts[i] = BASE + i * stride;
    ends[i] = starts[i] + size;
    hva[i] = (uintptr_t)0x7f0000000000ull + (uintptr_t)(i * size);
  }
  uint64_t gpa_checksum = 0;
  uint32_t region = 0;
  uint32_t slots = (uint32_t)((size - len) / 8);
  for (size_t k = 0; k < lookups; k++) {
    if (!local || k % 16 == 0) region = xorshift32() % (uint32_t)count;
    uint64_t gpa = starts[region] + (uint64_t)(xorshift32() % slots) * 8;
    gpas[k] = gpa;
    gpa_checksum += gpa >> 3;
  }
  uint64_t checksum = 0, misses = 0;
  printf("{\"ns\":[");
  for (int p = 0; p < passes; p++) {
    last_hit = 0;
    uint64_t t0 = now_ns();
    for (size_t k = 0; k < lookups; k++) {
      void *h = translate(gpas[k], len);
      if (h) checksum += (uintptr_t)h & 0xffff;
      else misses++;
    }
    uint64_t t1 = now_ns();
    printf("%s%" PRIu64, p ? "," : "", t1 - t0);
  }
  printf("],\"gpa_checksum\":%" PRIu64 ",\"checksum\":%" PRIu64 ",\"misses\":%" PRIu64 "}\n", gpa_checksum, checksum, misses);
  return 0;
}
