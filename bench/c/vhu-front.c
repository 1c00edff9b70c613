/*
 * A minimal vhost-user front-end in C: the peer of the benchmark (bench/vhost-user.ts). It negotiates like
 * the TypeScript front-end (REPLY_ACK and CONFIGURE_MEM_SLOTS required), then times memory-table updates
 * with blocking sockets and clock_gettime(CLOCK_MONOTONIC):
 *
 *   vhu-front rt --socket PATH [--iterations N] [--warmup N]
 *       one back-end: ADD_MEM_REG (one fd) then REM_MEM_REG (no fd), each waiting for its reply-ack;
 *   vhu-front serial --socket PATH [--socket PATH ...] [--iterations N] [--warmup N]
 *       N back-ends one after the other, as QEMU's memory listener does: one update = ADD_MEM_REG to
 *       each back-end in turn, waiting for each reply-ack; then the same with REM_MEM_REG.
 *
 * Prints one JSON object: {"add_ns":[...],"rem_ns":[...]} (per iteration, nanoseconds).
 * Build: gcc -O2 -Wall -o vhu-front vhu-front.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define GET_FEATURES 1
#define SET_FEATURES 2
#define SET_OWNER 3
#define GET_PROTOCOL_FEATURES 15
#define SET_PROTOCOL_FEATURES 16
#define GET_MAX_MEM_SLOTS 36
#define ADD_MEM_REG 37
#define REM_MEM_REG 38

#define F_VERSION 0x1u
#define F_REPLY 0x4u
#define F_NEED_REPLY 0x8u

#define PF_MQ (1ull << 0)
#define PF_REPLY_ACK (1ull << 3)
#define PF_CONFIG (1ull << 9)
#define PF_MEM_SLOTS (1ull << 15)
#define VHOST_USER_F_PROTOCOL_FEATURES (1ull << 30)
#define VIRTIO_F_VERSION_1 (1ull << 32)

#define MAX_BACKENDS 64

struct hdr {
    uint32_t request, flags, size;
} __attribute__((packed));

struct memreg {
    uint64_t padding, gpa, size, uaddr, mmap_offset;
} __attribute__((packed));

static void die(const char *what) {
    fprintf(stderr, "vhu-front: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void send_msg(int fd, uint32_t req, uint32_t flags, const void *payload, uint32_t size, int pass_fd) {
    char buf[sizeof(struct hdr) + 64];
    struct hdr h = {req, flags, size};
    memcpy(buf, &h, sizeof h);
    if (size) memcpy(buf + sizeof h, payload, size);
    struct iovec iov = {buf, sizeof h + size};
    struct msghdr m = {0};
    char ctl[CMSG_SPACE(sizeof(int))];
    m.msg_iov = &iov;
    m.msg_iovlen = 1;
    if (pass_fd >= 0) {
        memset(ctl, 0, sizeof ctl);
        m.msg_control = ctl;
        m.msg_controllen = sizeof ctl;
        struct cmsghdr *c = CMSG_FIRSTHDR(&m);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &pass_fd, sizeof(int));
    }
    if (sendmsg(fd, &m, MSG_NOSIGNAL) != (ssize_t)(sizeof h + size)) die("sendmsg");
}

static void read_all(int fd, void *p, size_t n) {
    char *c = p;
    while (n > 0) {
        ssize_t r = read(fd, c, n);
        if (r <= 0) {
            if (r == 0) errno = ECONNRESET;
            die("read");
        }
        c += r;
        n -= (size_t)r;
    }
}

/* Reads one reply to `req` and returns its u64 payload. */
static uint64_t reply_u64(int fd, uint32_t req) {
    struct hdr h;
    uint64_t v = 0;
    read_all(fd, &h, sizeof h);
    if (h.request != req || !(h.flags & F_REPLY) || h.size != 8) {
        fprintf(stderr, "vhu-front: unexpected reply %u flags 0x%x size %u to %u\n", h.request, h.flags, h.size, req);
        exit(1);
    }
    read_all(fd, &v, 8);
    return v;
}

static uint64_t get_u64(int fd, uint32_t req) {
    send_msg(fd, req, F_VERSION, NULL, 0, -1);
    return reply_u64(fd, req);
}

static void acked(int fd, uint32_t req, const void *payload, uint32_t size, int pass_fd) {
    send_msg(fd, req, F_VERSION | F_NEED_REPLY, payload, size, pass_fd);
    uint64_t status = reply_u64(fd, req);
    if (status != 0) {
        fprintf(stderr, "vhu-front: request %u refused (%" PRIu64 ")\n", req, status);
        exit(1);
    }
}

static int connect_backend(const char *path) {
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    strncpy(a.sun_path, path, sizeof a.sun_path - 1);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) die(path);
    uint64_t features = get_u64(fd, GET_FEATURES);
    if (!(features & VHOST_USER_F_PROTOCOL_FEATURES)) {
        fprintf(stderr, "vhu-front: %s offers no protocol features\n", path);
        exit(1);
    }
    uint64_t pf = get_u64(fd, GET_PROTOCOL_FEATURES) & (PF_MQ | PF_REPLY_ACK | PF_CONFIG | PF_MEM_SLOTS);
    if ((pf & (PF_REPLY_ACK | PF_MEM_SLOTS)) != (PF_REPLY_ACK | PF_MEM_SLOTS)) {
        fprintf(stderr, "vhu-front: %s lacks REPLY_ACK or CONFIGURE_MEM_SLOTS\n", path);
        exit(1);
    }
    send_msg(fd, SET_PROTOCOL_FEATURES, F_VERSION, &pf, 8, -1);
    (void)get_u64(fd, GET_MAX_MEM_SLOTS);
    acked(fd, SET_OWNER, NULL, 0, -1);
    uint64_t want = (features & VIRTIO_F_VERSION_1) | VHOST_USER_F_PROTOCOL_FEATURES;
    acked(fd, SET_FEATURES, &want, 8, -1);
    return fd;
}

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: vhu-front rt|serial --socket PATH [--socket PATH...] [--iterations N] [--warmup N]\n");
        return 2;
    }
    const char *mode = argv[1];
    const char *sockets[MAX_BACKENDS];
    int n = 0, iterations = 1000, warmup = 100;
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--socket") && i + 1 < argc && n < MAX_BACKENDS) sockets[n++] = argv[++i];
        else if (!strcmp(argv[i], "--iterations") && i + 1 < argc) iterations = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--warmup") && i + 1 < argc) warmup = atoi(argv[++i]);
        else {
            fprintf(stderr, "vhu-front: bad argument %s\n", argv[i]);
            return 2;
        }
    }
    if (n == 0 || iterations <= 0 || (strcmp(mode, "rt") && strcmp(mode, "serial")) || (!strcmp(mode, "rt") && n != 1)) {
        fprintf(stderr, "vhu-front: rt needs one --socket, serial one or more\n");
        return 2;
    }
    int fds[MAX_BACKENDS];
    for (int i = 0; i < n; i++) fds[i] = connect_backend(sockets[i]);

    const uint64_t size = 2ull << 20;
    int mem = memfd_create("vhu-front", MFD_CLOEXEC);
    if (mem < 0) die("memfd_create");
    if (ftruncate(mem, (off_t)size) < 0) die("ftruncate");
    struct memreg r = {0, 0x100000000ull, size, 0x7f0000000000ull + 0x100000000ull, 0};

    uint64_t *add = calloc((size_t)iterations, sizeof *add), *rem = calloc((size_t)iterations, sizeof *rem);
    if (!add || !rem) die("calloc");
    for (int it = -warmup; it < iterations; it++) {
        uint64_t t0 = now_ns();
        for (int i = 0; i < n; i++) acked(fds[i], ADD_MEM_REG, &r, sizeof r, mem);
        uint64_t t1 = now_ns();
        for (int i = 0; i < n; i++) acked(fds[i], REM_MEM_REG, &r, sizeof r, -1);
        uint64_t t2 = now_ns();
        if (it >= 0) {
            add[it] = t1 - t0;
            rem[it] = t2 - t1;
        }
    }
    printf("{\"add_ns\":[");
    for (int i = 0; i < iterations; i++) printf("%s%" PRIu64, i ? "," : "", add[i]);
    printf("],\"rem_ns\":[");
    for (int i = 0; i < iterations; i++) printf("%s%" PRIu64, i ? "," : "", rem[i]);
    printf("]}\n");
    for (int i = 0; i < n; i++) close(fds[i]);
    close(mem);
    free(add);
    free(rem);
    return 0;
}
