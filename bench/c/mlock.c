/*
 * The peer of bench/pinning.ts: pins a memfd the way a C VMM would, with one mmap(MAP_SHARED) of the whole
 * file and one mlock(2) of all of it, and reports how long that took; then munlock + munmap. The memfd is
 * the very one the broker's vfio-like client pins, inherited as fd 3.
 *
 *   mlock SIZE PASSES
 *
 * Prints {"pin_ns":[...],"unpin_ns":[...],"vmlck_kb":N}: per pass, mmap + mlock, and munlock + munmap;
 * vmlck_kb is VmLck from /proc/self/status while the first pass held the lock (the kernel's own count).
 * Build: cc -O2 -Wall -Wextra -o mlock mlock.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static uint64_t now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static long vmlck_kb(void) {
  FILE *f = fopen("/proc/self/status", "r");
  char line[256];
  long kb = -1;
  if (!f) return -1;
  while (fgets(line, sizeof line, f)) {
    if (!strncmp(line, "VmLck:", 6)) kb = strtol(line + 6, NULL, 10);
  }
  fclose(f);
  return kb;
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: mlock SIZE PASSES (the memfd is fd 3)\n");
    return 2;
  }
  size_t size = strtoull(argv[1], NULL, 0);
  int passes = atoi(argv[2]);
  if (size == 0 || passes <= 0) return 2;
  uint64_t *pin = calloc((size_t)passes, sizeof *pin), *unpin = calloc((size_t)passes, sizeof *unpin);
  long locked = -1;
  for (int p = 0; p < passes; p++) {
    uint64_t t0 = now_ns();
    void *m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, 3, 0);
    if (m == MAP_FAILED) {
      fprintf(stderr, "mlock: mmap: %s\n", strerror(errno));
      return 1;
    }
    if (mlock(m, size) < 0) {
      fprintf(stderr, "mlock: mlock: %s (needs CAP_IPC_LOCK or RLIMIT_MEMLOCK of %zu bytes)\n", strerror(errno), size);
      return 1;
    }
    uint64_t t1 = now_ns();
    if (p == 0) locked = vmlck_kb();
    uint64_t t2 = now_ns();
    munlock(m, size);
    munmap(m, size);
    uint64_t t3 = now_ns();
    pin[p] = t1 - t0;
    unpin[p] = t3 - t2;
  }
  printf("{\"pin_ns\":[");
  for (int p = 0; p < passes; p++) printf("%s%" PRIu64, p ? "," : "", pin[p]);
  printf("],\"unpin_ns\":[");
  for (int p = 0; p < passes; p++) printf("%s%" PRIu64, p ? "," : "", unpin[p]);
  printf("],\"vmlck_kb\":%ld}\n", locked);
  return 0;
}
