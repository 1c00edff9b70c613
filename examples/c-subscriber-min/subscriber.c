// A minimal memmap-broker subscriber: the shape of a client before the details of ../c-subscriber.
// Usage: c-subscriber-min SOCKET SPACE. Speaks protocol version 1 with no features (docs/protocol.md).
// It trusts the broker: messages are read, not validated (the full client checks every field).
//
// It keeps the map it applied (`want`) and makes its mappings (`have`) equal to it after every event:
// unmap what left or changed, then map what is new, then ACK. A removal is therefore unmapped before
// its ACK. If a transaction cannot be mapped, the previous map is restored before the NACK; EV_ROLLBACK
// restores it too. Each frame is read header first: a frame's fds ride with its first byte, so the
// recvmsg(2) of the 8-byte header is the one that receives them.
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <msgpack.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

enum { MAX_REGIONS = 512, MAX_BACKINGS = 512, MAX_FDS = 64 };
struct region { uint64_t id, gpa, size, backing, offset; bool ro; void *addr; };
static struct region want[MAX_REGIONS], undo[MAX_REGIONS], have[MAX_REGIONS];
static int nwant, nundo, nhave, sock;
static struct backing { uint64_t id; int fd; } backings[MAX_BACKINGS];
static int nbackings;

static void die(const char *what) { printf("error %s: %s\n", what, strerror(errno)); exit(1); }

static msgpack_object *get(const msgpack_object *map, const char *key) {
  for (uint32_t i = 0; map->type == MSGPACK_OBJECT_MAP && i < map->via.map.size; i++) {
    msgpack_object_kv *kv = &map->via.map.ptr[i];
    if (kv->key.type == MSGPACK_OBJECT_STR && kv->key.via.str.size == strlen(key) && !memcmp(kv->key.via.str.ptr, key, strlen(key))) return &kv->val;
  }
  return NULL;
}
static uint64_t num(const msgpack_object *map, const char *key) { msgpack_object *o = get(map, key); return o && o->type == MSGPACK_OBJECT_POSITIVE_INTEGER ? o->via.u64 : 0; }
static bool flag(const msgpack_object *map, const char *key) { msgpack_object *o = get(map, key); return o && o->type == MSGPACK_OBJECT_BOOLEAN && o->via.boolean; }
static const char *str(const msgpack_object *map, const char *key, char *out, size_t cap) {
  msgpack_object *o = get(map, key);
  snprintf(out, cap, "%.*s", o && o->type == MSGPACK_OBJECT_STR ? (int)o->via.str.size : 0, o ? o->via.str.ptr : "");
  return out;
}
static struct region region_of(const msgpack_object *m) {
  return (struct region){ num(m, "id"), num(m, "gpa"), num(m, "size"), num(m, "backing"), num(m, "offset"), flag(m, "readonly"), NULL };
}
static struct backing *backing(uint64_t id) {
  for (int i = 0; i < nbackings; i++) if (backings[i].id == id) return &backings[i];
  return NULL;
}

// One frame out: header and body in one send (no fds: this client never sends any).
static void send_map(msgpack_sbuffer *body) {
  unsigned char h[8] = { body->size, body->size >> 8, body->size >> 16, body->size >> 24, 0, 0, 0, 0 };
  if (send(sock, h, 8, MSG_NOSIGNAL | MSG_MORE) != 8 || send(sock, body->data, body->size, MSG_NOSIGNAL) != (ssize_t)body->size) die("send");
  msgpack_sbuffer_clear(body);
}
static void pack_str(msgpack_packer *pk, const char *s) { msgpack_pack_str_with_body(pk, s, strlen(s)); }
static void pack_kv(msgpack_packer *pk, const char *key, const char *s, uint64_t n) {  // key: s, or key: n
  pack_str(pk, key);
  if (s) pack_str(pk, s); else msgpack_pack_uint64(pk, n);
}
static void answer(uint64_t seq, int err) {  // ACK, or NACK with the errno of the failed mmap
  msgpack_sbuffer b; msgpack_packer pk; msgpack_sbuffer_init(&b); msgpack_packer_init(&pk, &b, msgpack_sbuffer_write);
  msgpack_pack_map(&pk, err ? 3 : 2);
  pack_kv(&pk, "t", NULL, err ? 17 : 16); pack_kv(&pk, "seq", NULL, seq);
  if (err) {
    pack_str(&pk, "error"); msgpack_pack_map(&pk, 3);
    pack_kv(&pk, "code", "MMB_ERR_MAP_FAILED", 0); pack_kv(&pk, "errno", strerrorname_np(err) ? strerrorname_np(err) : "EIO", 0);
    pack_kv(&pk, "message", strerror(err), 0);
  }
  send_map(&b); msgpack_sbuffer_destroy(&b);
  printf("%s seq=%" PRIu64 "\n", err ? "nacked" : "acked", seq);
}

static bool same(const struct region *a, const struct region *b) {
  return a->id == b->id && a->gpa == b->gpa && a->size == b->size && a->backing == b->backing && a->offset == b->offset && a->ro == b->ro;
}
static int reconcile(void) {  // 0, or the errno of the mmap that failed
  for (int i = 0; i < nhave;) {
    bool kept = false;
    for (int j = 0; j < nwant; j++) kept = kept || same(&have[i], &want[j]);
    if (kept) { i++; continue; }
    munmap(have[i].addr, have[i].size);
    printf("unmapped id=%" PRIu64 "\n", have[i].id);
    have[i] = have[--nhave];
  }
  for (int j = 0; j < nwant; j++) {
    bool mapped = false;
    for (int i = 0; i < nhave; i++) mapped = mapped || same(&have[i], &want[j]);
    struct backing *bk = backing(want[j].backing);
    if (mapped) continue;
    void *addr = bk ? mmap(NULL, want[j].size, PROT_READ | (want[j].ro ? 0 : PROT_WRITE), MAP_SHARED, bk->fd, want[j].offset) : MAP_FAILED;
    if (addr == MAP_FAILED) return bk ? errno : EBADF;
    have[nhave] = want[j]; have[nhave++].addr = addr;
    printf("mapped id=%" PRIu64 " gpa=0x%" PRIx64 " size=0x%" PRIx64 " addr=%p\n", want[j].id, want[j].gpa, want[j].size, addr);
  }
  return 0;
}
static void apply(uint64_t seq) {  // follow `want`, or go back to `undo` and refuse
  int err = reconcile();
  if (err) { memcpy(want, undo, sizeof undo); nwant = nundo; reconcile(); }
  answer(seq, err);
}

static void event(const msgpack_object *m, int *fds, int nfds) {
  char code[80];
  msgpack_object *list = get(m, "backings"), *ops = get(m, "ops"), *regions = get(m, "regions");
  switch (num(m, "t")) {
  case 32:  // REPLY to HELLO (id 1) or ATTACH (id 2)
    if (get(m, "error")) { printf("refused code=%s\n", str(get(m, "error"), "code", code, sizeof code)); exit(1); }
    if (num(m, "id") == 2) printf("attached client=%" PRIu64 "\n", num(get(m, "result"), "client"));
    break;
  case 33:  // EV_BACKINGS: the i-th fd is backings[i]; a backing sent again replaces its fd
    for (int i = 0; i < nfds && i < (int)list->via.array.size; i++) {
      uint64_t id = num(&list->via.array.ptr[i], "backing");
      struct backing *bk = backing(id);
      if (bk) close(bk->fd);
      else if (nbackings == MAX_BACKINGS) { errno = ENOSPC; die("backings"); }
      else bk = &backings[nbackings++];
      *bk = (struct backing){ id, fds[i] };
    }
    break;
  case 34:  // EV_BACKINGS_GONE
    for (uint32_t i = 0; i < list->via.array.size; i++) {
      struct backing *bk = backing(list->via.array.ptr[i].via.u64);
      if (bk) { close(bk->fd); *bk = backings[--nbackings]; }
      printf("backing-gone id=%" PRIu64 "\n", list->via.array.ptr[i].via.u64);
    }
    break;
  case 35:  // EV_SYNC: the whole map, in parts; applied once after the last
    if (num(m, "part") == 0) nwant = 0;
    for (uint32_t i = 0; i < regions->via.array.size && nwant < MAX_REGIONS; i++) want[nwant++] = region_of(&regions->via.array.ptr[i]);
    if (flag(m, "last")) { memcpy(undo, want, sizeof want); nundo = nwant; apply(num(m, "seq")); printf("synced generation=%" PRIu64 "\n", num(m, "generation")); }
    break;
  case 36:  // EV_TXN: removes, sets, adds, in that order
    memcpy(undo, want, sizeof want); nundo = nwant;
    for (uint32_t i = 0; i < ops->via.array.size; i++) {
      msgpack_object *op = &ops->via.array.ptr[i];
      char kind[8];
      str(op, "op", kind, sizeof kind);
      for (int j = 0; j < nwant && strcmp(kind, "add"); j++) {
        if (want[j].id != num(op, "region")) continue;
        if (!strcmp(kind, "remove")) want[j--] = want[--nwant];
        else want[j].ro = flag(op, "readonly");
      }
      if (!strcmp(kind, "add") && nwant < MAX_REGIONS) want[nwant++] = region_of(get(op, "region"));
    }
    apply(num(m, "seq"));
    break;
  case 37:  // EV_ROLLBACK: back to the map before the transaction
    memcpy(want, undo, sizeof undo); nwant = nundo;
    apply(num(m, "seq"));
    printf("rolledback generation=%" PRIu64 "\n", num(m, "generation"));
    break;
  case 38: printf("committed generation=%" PRIu64 "\n", num(m, "generation")); break;
  case 39:  // EV_GOODBYE
    printf("goodbye code=%s\n", str(get(m, "error"), "code", code, sizeof code));
    exit(strcmp(code, "MMB_ERR_SHUTDOWN") ? 1 : 0);
  case 40: printf("ev-error code=%s\n", str(get(m, "error"), "code", code, sizeof code)); break;
  }
}

int main(int argc, char **argv) {
  if (argc != 3) { fprintf(stderr, "usage: %s SOCKET SPACE\n", argv[0]); return 64; }
  setvbuf(stdout, NULL, _IOLBF, 0);
  struct sockaddr_un sa = { .sun_family = AF_UNIX };
  snprintf(sa.sun_path, sizeof sa.sun_path, "%s", argv[1]);
  sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (connect(sock, (struct sockaddr *)&sa, sizeof sa) < 0) die("connect");

  msgpack_sbuffer b; msgpack_packer pk; msgpack_sbuffer_init(&b); msgpack_packer_init(&pk, &b, msgpack_sbuffer_write);
  msgpack_pack_map(&pk, 4);  // HELLO, then ATTACH; their replies are read as events
  pack_kv(&pk, "t", NULL, 1); pack_kv(&pk, "id", NULL, 1); pack_kv(&pk, "version", NULL, 1); pack_kv(&pk, "features", NULL, 0);
  send_map(&b);
  msgpack_pack_map(&pk, 5);
  pack_kv(&pk, "t", NULL, 3); pack_kv(&pk, "id", NULL, 2); pack_kv(&pk, "space", argv[2], 0);
  pack_kv(&pk, "role", "subscriber", 0); pack_kv(&pk, "kind", "c-subscriber-min", 0);
  send_map(&b); msgpack_sbuffer_destroy(&b);

  for (;;) {
    unsigned char h[8];
    char control[CMSG_SPACE(MAX_FDS * sizeof(int))];
    struct iovec iov = { h, sizeof h };
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control };
    ssize_t n = recvmsg(sock, &msg, MSG_WAITALL | MSG_CMSG_CLOEXEC);
    if (n == 0) { printf("eof\n"); return 0; }
    if (n != 8 || (msg.msg_flags & MSG_CTRUNC)) die("recvmsg");
    int fds[MAX_FDS], nfds = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
      if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
        for (size_t i = 0; i < (c->cmsg_len - CMSG_LEN(0)) / sizeof(int); i++) fds[nfds++] = ((int *)CMSG_DATA(c))[i];
    uint32_t size = h[0] | h[1] << 8 | h[2] << 16 | (uint32_t)h[3] << 24;
    char *body = malloc(size);
    if (!body || recv(sock, body, size, MSG_WAITALL) != (ssize_t)size || nfds != (h[4] | h[5] << 8)) die("frame");
    msgpack_unpacked u;
    msgpack_unpacked_init(&u);
    if (msgpack_unpack_next(&u, body, size, NULL) != MSGPACK_UNPACK_SUCCESS) die("msgpack");
    event(&u.data, fds, nfds);
    msgpack_unpacked_destroy(&u);
    free(body);
  }
}
