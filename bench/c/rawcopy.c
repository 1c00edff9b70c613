/*
 * The peer of bench/migration.ts: the same bytes over the same loopback, with nothing but the copy, the
 * way `cat FILE > /dev/tcp/HOST/PORT` into a listener that keeps them in memory would do it.
 *
 *   rawcopy recv SIZE [discard]
 *                            listens on 127.0.0.1 (a free port, printed as {"port":N}), accepts one
 *                            connection, read()s SIZE bytes straight into a MAP_SHARED memfd of SIZE
 *                            bytes (guest memory at the destination; with `discard`, into one reused
 *                            1 MiB buffer: the transport alone), answers one byte, prints
 *                            {"bytes":N,"ns":N} (from accept to the last byte) and exits.
 *   rawcopy send PORT SIZE   mmaps fd 3 (the source's memfd, inherited) read-only, connects, write()s its
 *                            SIZE bytes in 1 MiB calls, waits for the receiver's byte, prints
 *                            {"bytes":N,"ns":N} (from connect to that byte: every byte in place there).
 *
 * Build: cc -O2 -Wall -Wextra -o rawcopy rawcopy.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static void die(const char *what) {
  fprintf(stderr, "rawcopy: %s: %s\n", what, strerror(errno));
  exit(1);
}

static int recv_side(uint64_t size, int discard) {
  int ls = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (ls < 0) die("socket");
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = 0, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  if (bind(ls, (struct sockaddr *)&a, sizeof a) < 0 || listen(ls, 1) < 0) die("bind/listen");
  socklen_t len = sizeof a;
  if (getsockname(ls, (struct sockaddr *)&a, &len) < 0) die("getsockname");
  uint8_t *mem;
  if (discard) {
    mem = malloc(1u << 20);
    if (mem == NULL) die("malloc");
  } else {
    int mfd = memfd_create("rawcopy-dest", MFD_CLOEXEC);
    if (mfd < 0 || ftruncate(mfd, (off_t)size) < 0) die("memfd");
    mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
    if (mem == MAP_FAILED) die("mmap");
  }
  printf("{\"port\":%d}\n", ntohs(a.sin_port));
  fflush(stdout);
  int s = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
  if (s < 0) die("accept");
  uint64_t t0 = now_ns(), done = 0;
  while (done < size) {
    ssize_t n = read(s, discard ? mem : mem + done, size - done > (1u << 20) ? (1u << 20) : size - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) die("read");
    done += (uint64_t)n;
  }
  uint64_t t1 = now_ns();
  char ack = 1;
  if (write(s, &ack, 1) != 1) die("write ack");
  printf("{\"bytes\":%" PRIu64 ",\"ns\":%" PRIu64 "}\n", done, t1 - t0);
  return 0;
}

static int send_side(int port, uint64_t size) {
  const uint8_t *src = mmap(NULL, size, PROT_READ, MAP_SHARED, 3, 0);
  if (src == MAP_FAILED) die("mmap fd 3");
  int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (s < 0) die("socket");
  int one = 1;
  setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  uint64_t t0 = now_ns();
  if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) die("connect");
  uint64_t done = 0;
  while (done < size) {
    ssize_t n = write(s, src + done, size - done > (1u << 20) ? (1u << 20) : size - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) die("write");
    done += (uint64_t)n;
  }
  char ack;
  if (read(s, &ack, 1) != 1) die("read ack");
  uint64_t t1 = now_ns();
  printf("{\"bytes\":%" PRIu64 ",\"ns\":%" PRIu64 "}\n", done, t1 - t0);
  return 0;
}

int main(int argc, char **argv) {
  if ((argc == 3 || argc == 4) && !strcmp(argv[1], "recv")) return recv_side(strtoull(argv[2], NULL, 10), argc == 4 && !strcmp(argv[3], "discard"));
  if (argc == 4 && !strcmp(argv[1], "send")) return send_side(atoi(argv[2]), strtoull(argv[3], NULL, 10));
  fprintf(stderr, "usage: rawcopy recv SIZE [discard] | rawcopy send PORT SIZE (fd 3: the memfd to send)\n");
  return 2;
}
