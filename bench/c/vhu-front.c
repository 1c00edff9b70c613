/*
 * A minimal vhost-user front-end in C: the peer of the benchmarks (bench/vhost-user.ts, bench/ioas-vhost-user.ts).
 * It negotiates like the TypeScript front-end (REPLY_ACK and CONFIGURE_MEM_SLOTS required for the memory
 * table modes), then times with blocking sockets and clock_gettime(CLOCK_MONOTONIC):
 *
 *   vhu-front rt --socket PATH [--iterations N] [--warmup N]
 *       one back-end: ADD_MEM_REG (one fd) then REM_MEM_REG (no fd), each waiting for its reply-ack;
 *   vhu-front serial --socket PATH [--socket PATH ...] [--iterations N] [--warmup N]
 *       N back-ends one after the other, as QEMU's memory listener does: one update = ADD_MEM_REG to
 *       each back-end in turn, waiting for each reply-ack; then the same with REM_MEM_REG.
 *
 *   vhu-front iotlb --socket PATH [--pairs N] [--batch B] [--window W] [--warmup N]
 *       the device IOTLB behind a guest IOMMU (dpdk-testpmd with iommu-support=1): negotiates
 *       VIRTIO_F_ACCESS_PLATFORM with REPLY_ACK and BACKEND_REQ (the request channel: a socketpair,
 *       SET_BACKEND_REQ_FD), gives the back-end one 16 MiB memfd region at GPA 0 (SET_MEM_TABLE) and
 *       allocates its two queues (SET_VRING_NUM 0 and 1: every IOTLB entry then goes into both queues'
 *       caches, as with a virtio-net device; the rings are not started). Then IOVA map + unmap pairs of
 *       4 KiB pages cycling through a window of W pages at IOVA 0x100000000 + 4096 * page:
 *         B = 1: VHOST_IOTLB_UPDATE, wait for its reply-ack, VHOST_IOTLB_INVALIDATE, wait;
 *         B > 1: B UPDATEs in one write, their B reply-acks, then the previous B pages' INVALIDATEs in
 *                one write, their reply-acks (what one batched transaction of the broker sends).
 *       Prints {"ns_per_pair":[...],"misses":N}: one sample per pair (B = 1) or per batch of B pairs,
 *       and the IOTLB misses the back-end sent on its request channel meanwhile (none expected).
 *
 * The memory-table modes print one JSON object: {"add_ns":[...],"rem_ns":[...]} (per iteration, nanoseconds).
 * Build: gcc -O2 -Wall -o vhu-front vhu-front.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
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
#define SET_MEM_TABLE 5
#define SET_VRING_NUM 8
#define SET_BACKEND_REQ_FD 21
#define IOTLB_MSG 22
#define GET_MAX_MEM_SLOTS 36
#define ADD_MEM_REG 37
#define REM_MEM_REG 38

#define F_VERSION 0x1u
#define F_REPLY 0x4u
#define F_NEED_REPLY 0x8u

#define PF_MQ (1ull << 0)
#define PF_REPLY_ACK (1ull << 3)
#define PF_BACKEND_REQ (1ull << 5)
#define PF_CONFIG (1ull << 9)
#define PF_MEM_SLOTS (1ull << 15)
#define VHOST_USER_F_PROTOCOL_FEATURES (1ull << 30)
#define VIRTIO_F_VERSION_1 (1ull << 32)
#define VIRTIO_F_ACCESS_PLATFORM (1ull << 33)

#define IOTLB_UPDATE 2
#define IOTLB_INVALIDATE 3
#define ACCESS_RW 3
#define IOVA_BASE 0x100000000ull
#define PAGE 4096ull
#define IOTLB_RAM (16ull << 20)
#define UADDR_BASE 0x7f0000000000ull

#define MAX_BACKENDS 64

struct hdr {
    uint32_t request, flags, size;
} __attribute__((packed));

struct memreg {
    uint64_t padding, gpa, size, uaddr, mmap_offset;
} __attribute__((packed));

/* struct vhost_iotlb_msg, as the kernel header lays it out: 32 bytes. */
struct iotlb {
    uint64_t iova, size, uaddr;
    uint8_t perm, type, pad[6];
};

/* SET_MEM_TABLE with one region: { u32 nregions, u32 padding, region }. */
struct memtable1 {
    uint32_t nregions, padding;
    uint64_t gpa, size, uaddr, mmap_offset;
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

/*
 * Connects and negotiates. Memory-table modes: REPLY_ACK and CONFIGURE_MEM_SLOTS required. IOTLB mode
 * (`channel` non-NULL): VIRTIO_F_ACCESS_PLATFORM, REPLY_ACK and BACKEND_REQ required; the request
 * channel's other end goes to the back-end (SET_BACKEND_REQ_FD, before SET_OWNER as QEMU does), ours is
 * returned in *channel, non-blocking.
 */
static int connect_backend(const char *path, int *channel) {
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
    uint64_t need = channel ? (PF_REPLY_ACK | PF_BACKEND_REQ) : (PF_REPLY_ACK | PF_MEM_SLOTS);
    uint64_t pf = get_u64(fd, GET_PROTOCOL_FEATURES) & (PF_MQ | PF_REPLY_ACK | PF_CONFIG | PF_MEM_SLOTS | (channel ? PF_BACKEND_REQ : 0));
    if ((pf & need) != need || (channel && !(features & VIRTIO_F_ACCESS_PLATFORM))) {
        fprintf(stderr, "vhu-front: %s lacks %s\n", path, channel ? "ACCESS_PLATFORM, REPLY_ACK or BACKEND_REQ" : "REPLY_ACK or CONFIGURE_MEM_SLOTS");
        exit(1);
    }
    send_msg(fd, SET_PROTOCOL_FEATURES, F_VERSION, &pf, 8, -1);
    if (pf & PF_MEM_SLOTS) (void)get_u64(fd, GET_MAX_MEM_SLOTS);
    if (channel) {
        int sv[2];
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) die("socketpair");
        acked(fd, SET_BACKEND_REQ_FD, NULL, 0, sv[1]);
        close(sv[1]);
        if (fcntl(sv[0], F_SETFL, O_NONBLOCK) < 0) die("fcntl");
        *channel = sv[0];
    }
    acked(fd, SET_OWNER, NULL, 0, -1);
    uint64_t want = (features & VIRTIO_F_VERSION_1) | VHOST_USER_F_PROTOCOL_FEATURES | (channel ? VIRTIO_F_ACCESS_PLATFORM : 0);
    acked(fd, SET_FEATURES, &want, 8, -1);
    return fd;
}

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

/* Writes `n` IOTLB messages (NEED_REPLY) for pages first.. (mod window) in one write, then reads n reply-acks. */
static void iotlb_batch(int fd, uint8_t type, int first, int n, int window) {
    static char *buf;
    static size_t cap;
    size_t one = sizeof(struct hdr) + sizeof(struct iotlb), len = one * (size_t)n;
    if (len > cap) {
        free(buf);
        buf = malloc(len);
        if (!buf) die("malloc");
        cap = len;
    }
    for (int i = 0; i < n; i++) {
        uint64_t page = (uint64_t)((first + i) % window);
        struct hdr h = {IOTLB_MSG, F_VERSION | F_NEED_REPLY, sizeof(struct iotlb)};
        struct iotlb m = {IOVA_BASE + page * PAGE, PAGE, type == IOTLB_UPDATE ? UADDR_BASE + page * PAGE : 0, type == IOTLB_UPDATE ? ACCESS_RW : 0, type, {0}};
        memcpy(buf + (size_t)i * one, &h, sizeof h);
        memcpy(buf + (size_t)i * one + sizeof h, &m, sizeof m);
    }
    for (size_t off = 0; off < len;) {
        ssize_t w = send(fd, buf + off, len - off, MSG_NOSIGNAL);
        if (w <= 0) die("send");
        off += (size_t)w;
    }
    for (int i = 0; i < n; i++) {
        uint64_t status = reply_u64(fd, IOTLB_MSG);
        if (status != 0) {
            fprintf(stderr, "vhu-front: IOTLB message type %u refused (%" PRIu64 ")\n", type, status);
            exit(1);
        }
    }
}

/* Back-end requests that arrived on the request channel (IOTLB misses), read and counted. */
static int drain_channel(int ch) {
    char buf[4096];
    int n = 0;
    for (;;) {
        ssize_t r = read(ch, buf, sizeof buf);
        if (r <= 0) return n;
        n += (int)(r / (ssize_t)(sizeof(struct hdr) + sizeof(struct iotlb)));
    }
}

static int run_iotlb(const char *path, int pairs, int batch, int window, int warmup) {
    int ch = -1;
    int fd = connect_backend(path, &ch);
    int mem = memfd_create("vhu-front-iotlb", MFD_CLOEXEC);
    if (mem < 0) die("memfd_create");
    if (ftruncate(mem, (off_t)IOTLB_RAM) < 0) die("ftruncate");
    struct memtable1 t = {1, 0, 0, IOTLB_RAM, UADDR_BASE, 0};
    acked(fd, SET_MEM_TABLE, &t, sizeof t, mem);
    for (uint32_t q = 0; q < 2; q++) {
        uint32_t state[2] = {q, 16};
        acked(fd, SET_VRING_NUM, state, sizeof state, -1);
    }
    int steps = batch == 1 ? pairs : (pairs + batch - 1) / batch;
    int warm = batch == 1 ? warmup : (warmup + batch - 1) / batch;
    uint64_t *ns = calloc((size_t)steps, sizeof *ns);
    if (!ns) die("calloc");
    int misses = 0, page = 0;
    for (int it = -warm; it < steps; it++) {
        uint64_t t0 = now_ns();
        if (batch == 1) {
            iotlb_batch(fd, IOTLB_UPDATE, page, 1, window);
            iotlb_batch(fd, IOTLB_INVALIDATE, page, 1, window);
        } else {
            /* The next batch in, then the previous one out: one broker transaction's vote and commit. */
            iotlb_batch(fd, IOTLB_UPDATE, page, batch, window);
            if (it > -warm) iotlb_batch(fd, IOTLB_INVALIDATE, (page - batch + window) % window, batch, window);
        }
        uint64_t t1 = now_ns();
        page = (page + batch) % window;
        if (it >= 0) ns[it] = (t1 - t0) / (uint64_t)batch;
    }
    if (batch > 1) iotlb_batch(fd, IOTLB_INVALIDATE, (page - batch + window) % window, batch, window);
    misses += drain_channel(ch);
    printf("{\"ns_per_pair\":[");
    for (int i = 0; i < steps; i++) printf("%s%" PRIu64, i ? "," : "", ns[i]);
    printf("],\"misses\":%d}\n", misses);
    free(ns);
    close(mem);
    close(ch);
    close(fd);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: vhu-front rt|serial --socket PATH [--socket PATH...] [--iterations N] [--warmup N]\n"
                        "       vhu-front iotlb --socket PATH [--pairs N] [--batch B] [--window W] [--warmup N]\n");
        return 2;
    }
    const char *mode = argv[1];
    const char *sockets[MAX_BACKENDS];
    int n = 0, iterations = 1000, warmup = 100, pairs = 10000, batch = 1, window = 2048;
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--socket") && i + 1 < argc && n < MAX_BACKENDS) sockets[n++] = argv[++i];
        else if (!strcmp(argv[i], "--iterations") && i + 1 < argc) iterations = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--warmup") && i + 1 < argc) warmup = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--pairs") && i + 1 < argc) pairs = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--batch") && i + 1 < argc) batch = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--window") && i + 1 < argc) window = atoi(argv[++i]);
        else {
            fprintf(stderr, "vhu-front: bad argument %s\n", argv[i]);
            return 2;
        }
    }
    if (!strcmp(mode, "iotlb")) {
        if (n != 1 || pairs <= 0 || batch <= 0 || window < 2 * batch || window > (int)(IOTLB_RAM / PAGE) || warmup < 0) {
            fprintf(stderr, "vhu-front: iotlb needs one --socket, --pairs > 0, 0 < 2 * --batch <= --window <= %d\n", (int)(IOTLB_RAM / PAGE));
            return 2;
        }
        return run_iotlb(sockets[0], pairs, batch, window, warmup);
    }
    if (n == 0 || iterations <= 0 || (strcmp(mode, "rt") && strcmp(mode, "serial")) || (!strcmp(mode, "rt") && n != 1)) {
        fprintf(stderr, "vhu-front: rt needs one --socket, serial one or more\n");
        return 2;
    }
    int fds[MAX_BACKENDS];
    for (int i = 0; i < n; i++) fds[i] = connect_backend(sockets[i], NULL);

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
