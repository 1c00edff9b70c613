/*
 * The peers of bench/ioas.ts: the work of a guest IOMMU's map + unmap pairs done directly, on the same
 * pages of the same memfd (inherited as fd 3, mapped MAP_SHARED) that the broker's soft vfio-like client
 * pins, with no broker in between.
 *
 *   ioas-floor direct PAIRS BATCH WINDOW
 *     The batched loop: per step, mlock(2) BATCH pages one call each, then munlock(2) the BATCH pages the
 *     step before locked; pages cycle through the first WINDOW pages. What the soft client's work would be
 *     with one syscall per mapping.
 *   ioas-floor peer PAIRS WINDOW
 *     The unbatched floor: a peer process (fork) at the other end of a Unix socket pair does the work on
 *     request, one round trip each: "map page p" -> mlock, reply; "unmap page p" -> munlock, reply. A
 *     synchronous map and a synchronous unmap per pair: one round trip plus the peer's own work, twice.
 *
 * Prints {"mode":...,"pairs":N,"samples_ns_per_pair":[...]}: one sample per chunk of pairs (PAIRS / 20,
 * at least 1). The caller pins it to CPUs with taskset (the forked peer inherits that).
 * Build: cc -O2 -Wall -Wextra -o ioas-floor ioas-floor.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096ul

static uint64_t now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static void die(const char *what) {
  fprintf(stderr, "ioas-floor: %s: %s\n", what, strerror(errno));
  exit(1);
}

static void lock_page(char *base, unsigned long p, int lock) {
  if ((lock ? mlock(base + p * PAGE, PAGE) : munlock(base + p * PAGE, PAGE)) < 0) die(lock ? "mlock" : "munlock");
}

static void print(const char *mode, unsigned long pairs, const double *samples, int n) {
  printf("{\"mode\":\"%s\",\"pairs\":%lu,\"samples_ns_per_pair\":[", mode, pairs);
  for (int i = 0; i < n; i++) printf("%s%.1f", i ? "," : "", samples[i]);
  printf("]}\n");
}

struct cmd {
  uint32_t lock;
  uint32_t page;
};

static void full_write(int fd, const void *p, size_t n) {
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) die("write");
    p = (const char *)p + w;
    n -= (size_t)w;
  }
}

static int full_read(int fd, void *p, size_t n) {
  while (n > 0) {
    ssize_t r = read(fd, p, n);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) die("read");
    if (r == 0) return 0;
    p = (char *)p + r;
    n -= (size_t)r;
  }
  return 1;
}

int main(int argc, char **argv) {
  if (argc < 4) {
    fprintf(stderr, "usage: ioas-floor direct PAIRS BATCH WINDOW | peer PAIRS WINDOW (the memfd is fd 3)\n");
    return 2;
  }
  int direct = strcmp(argv[1], "direct") == 0;
  unsigned long pairs = strtoul(argv[2], NULL, 0);
  unsigned long batch = direct ? strtoul(argv[3], NULL, 0) : 1;
  unsigned long window = strtoul(argv[direct ? 4 : 3], NULL, 0);
  if (pairs == 0 || batch == 0 || window < 2 * batch) return 2;
  char *base = mmap(NULL, window * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, 3, 0);
  if (base == MAP_FAILED) die("mmap");
  int nsamples = 20;
  unsigned long chunk = pairs / (unsigned long)nsamples;
  if (chunk < batch) chunk = batch;
  chunk -= chunk % batch;
  double *samples = calloc((size_t)nsamples, sizeof *samples);
  int n = 0;

  if (direct) {
    unsigned long step = 0;
    for (unsigned long done = 0; done < pairs && n < nsamples;) {
      uint64_t t0 = now_ns();
      for (unsigned long k = 0; k < chunk; k += batch, step++) {
        unsigned long first = (step * batch) % window;
        for (unsigned long i = 0; i < batch; i++) lock_page(base, (first + i) % window, 1);
        if (step > 0) {
          unsigned long prev = ((step - 1) * batch) % window;
          for (unsigned long i = 0; i < batch; i++) lock_page(base, (prev + i) % window, 0);
        }
      }
      samples[n++] = (double)(now_ns() - t0) / (double)chunk;
      done += chunk;
    }
    unsigned long last = ((step - 1) * batch) % window;
    for (unsigned long i = 0; i < batch; i++) lock_page(base, (last + i) % window, 0);
    print("direct", pairs, samples, n);
    return 0;
  }

  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) die("socketpair");
  pid_t child = fork();
  if (child < 0) die("fork");
  if (child == 0) {
    close(sv[0]);
    struct cmd c;
    char ok = 1;
    while (full_read(sv[1], &c, sizeof c)) {
      lock_page(base, c.page, (int)c.lock);
      full_write(sv[1], &ok, 1);
    }
    _exit(0);
  }
  close(sv[1]);
  unsigned long page = 0;
  for (unsigned long done = 0; done < pairs && n < nsamples;) {
    uint64_t t0 = now_ns();
    for (unsigned long k = 0; k < chunk; k++, page = (page + 1) % window) {
      char ok;
      struct cmd c = {1, (uint32_t)page};
      full_write(sv[0], &c, sizeof c);
      if (!full_read(sv[0], &ok, 1)) die("peer");
      c.lock = 0;
      full_write(sv[0], &c, sizeof c);
      if (!full_read(sv[0], &ok, 1)) die("peer");
    }
    samples[n++] = (double)(now_ns() - t0) / (double)chunk;
    done += chunk;
  }
  close(sv[0]);
  waitpid(child, NULL, 0);
  print("peer", pairs, samples, n);
  return 0;
}
