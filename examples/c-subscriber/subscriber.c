// c-subscriber: a memmap-broker subscriber in plain C11 with Debian's stock msgpack-c (libmsgpack-dev).
//
// It implements docs/protocol.md (version 1; of the optional features only AUTH, when --token-file is
// given) from the subscriber side: HELLO,
// ATTACH, then EV_BACKINGS / EV_BACKINGS_GONE / EV_SYNC / EV_TXN / EV_ROLLBACK / EV_COMMITTED /
// EV_GOODBYE / EV_ERROR, mapping every region MAP_SHARED from its backing's descriptor and acking (or
// nacking) every event that carries a seq. It is a strict reference client: a frame or message that does
// not follow the spec (unknown key, wrong type, value out of range, descriptors that do not match) is a
// protocol error, reported with the same MMB_ERR_* code the TypeScript side uses, and the process exits 2.
//
// Two offline modes share the same code paths: --decode-hex sends one frame (with as many descriptors as
// its header declares) through a socketpair into the real receive path and prints the validated message
// as one JSON line; --encode prints the hex frame of a sample HELLO / ATTACH / ACK / NACK.
//
// Exit status: 0 clean (EOF, SIGTERM/SIGINT, --exit-after-gen reached, EV_GOODBYE MMB_ERR_SHUTDOWN),
// 1 runtime failure (connect, refused request, other goodbye, mmap failure during a rollback),
// 2 protocol error, 64 usage error.
#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <msgpack.h>

// Field paths in error messages ("EV_TXN.ops[3].region.gpa") are cut at 255 bytes on purpose.
#pragma GCC diagnostic ignored "-Wformat-truncation"

// --- protocol constants (protocol/constants.ts, protocol/limits.ts) ------------------------------------
#define HEADER_SIZE 8
#define PROTOCOL_VERSION 1
#define FEATURE_AUTH (1u << 6) // ATTACH.token (docs/protocol.md, feature bits)
#define ADDR_MAX (1ULL << 52)           // GPAs, sizes and offsets: below 2^52 (x86-64 / arm64)
#define UINT_SAFE_MAX ((1ULL << 53) - 1) // generations, seqs: exact in a JS number
#define NAME_MAX_BYTES 64
#define SCM_MAX_FD 253                   // the kernel's cap per SCM_RIGHTS message
#define MAX_PENDING_FDS 256
#define DEFAULT_MAX_FRAME (1u << 20)
#define DEFAULT_MAX_FDS 64
#define SCHEMA_MAX_OPS 4096
#define SCHEMA_MAX_LIST (1u << 20)

/** Descriptors per frame, hence entries per EV_BACKINGS: the default until the HELLO reply states it. */
static uint32_t g_max_fds = DEFAULT_MAX_FDS;

enum {
  M_HELLO = 1, M_STATUS = 2, M_ATTACH = 3, M_BACKING_ADD = 4, M_BACKING_DROP = 5, M_COMMIT = 6,
  M_ACK = 16, M_NACK = 17,
  M_REPLY = 32, EV_BACKINGS = 33, EV_BACKINGS_GONE = 34, EV_SYNC = 35, EV_TXN = 36, EV_ROLLBACK = 37,
  EV_COMMITTED = 38, EV_GOODBYE = 39, EV_ERROR = 40,
};
enum { REQ_HELLO = 1, REQ_ATTACH = 2 }; // our request ids

// --- failures --------------------------------------------------------------------------------------------
static struct {
  const char *code;
  char msg[640];
} g_fail;

static bool fail(const char *code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static bool fail(const char *code, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(g_fail.msg, sizeof g_fail.msg, fmt, ap);
  va_end(ap);
  g_fail.code = code;
  return false;
}
#define BAD(path, ...) bad_field(path, __VA_ARGS__)
static bool bad_field(const char *path, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static bool bad_field(const char *path, const char *fmt, ...) {
  char what[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(what, sizeof what, fmt, ap);
  va_end(ap);
  return fail("MMB_ERR_BAD_MESSAGE", "%s: %s", path, what);
}

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vprintf(fmt, ap);
  va_end(ap);
  putchar('\n');
  fflush(stdout);
}

// --- decoded messages --------------------------------------------------------------------------------------
struct err_core {
  char code[65], errno_[33], message[4097];
  size_t message_len;
  bool has_client, has_generation;
  uint32_t client_id, client_pid;
  char client_kind[65], client_name[65];
  uint64_t generation;
};
struct wire_error {
  struct err_core e;
  bool has_cause;
  struct err_core cause;
};
struct region {
  uint32_t id, backing;
  char name[65];
  uint64_t gpa, size, offset;
  bool readonly, log_dirty;
  void *addr; // local mapping (NULL while not mapped)
};
struct backing_info {
  uint32_t backing;
  uint64_t size;
  char name[65];
};
enum op_kind { OP_REMOVE, OP_SET, OP_ADD };
struct txn_op {
  enum op_kind kind;
  uint32_t region_id;
  bool readonly, log_dirty;
  struct region region;
};
struct message {
  uint32_t t;
  msgpack_unpacked up; // owns the decoded body (REPLY.result points into it)
  uint32_t id;         // REPLY
  const msgpack_object *result;
  bool has_error;
  struct wire_error error; // REPLY, EV_GOODBYE, EV_ERROR
  struct backing_info *backings;
  uint32_t nbackings;
  uint32_t *ids; // EV_BACKINGS_GONE.backings, EV_SYNC.removed
  uint32_t nids;
  uint64_t seq, generation;
  char epoch[65];
  bool delta, last;
  uint32_t part;
  struct region *regions;
  uint32_t nregions;
  struct txn_op *ops;
  uint32_t nops;
};

static void message_free(struct message *m) {
  free(m->backings);
  free(m->ids);
  free(m->regions);
  free(m->ops);
  msgpack_unpacked_destroy(&m->up);
  memset(m, 0, sizeof *m);
}

// --- strict schema helpers (protocol/schema.ts) -----------------------------------------------------------
static const char *type_name(const msgpack_object *o) {
  switch (o->type) {
  case MSGPACK_OBJECT_NIL: return "nil";
  case MSGPACK_OBJECT_BOOLEAN: return "bool";
  case MSGPACK_OBJECT_POSITIVE_INTEGER:
  case MSGPACK_OBJECT_NEGATIVE_INTEGER: return "integer";
  case MSGPACK_OBJECT_FLOAT32:
  case MSGPACK_OBJECT_FLOAT64: return "float";
  case MSGPACK_OBJECT_STR: return "string";
  case MSGPACK_OBJECT_ARRAY: return "array";
  case MSGPACK_OBJECT_MAP: return "map";
  case MSGPACK_OBJECT_BIN: return "bin";
  default: return "ext";
  }
}

static bool utf8_valid(const unsigned char *s, size_t n) {
  for (size_t i = 0; i < n;) {
    unsigned c = s[i];
    size_t len;
    uint32_t cp, min;
    if (c < 0x80) { i++; continue; }
    if ((c & 0xe0) == 0xc0) len = 2, cp = c & 0x1f, min = 0x80;
    else if ((c & 0xf0) == 0xe0) len = 3, cp = c & 0x0f, min = 0x800;
    else if ((c & 0xf8) == 0xf0) len = 4, cp = c & 0x07, min = 0x10000;
    else return false;
    if (i + len > n) return false;
    for (size_t k = 1; k < len; k++) {
      if ((s[i + k] & 0xc0) != 0x80) return false;
      cp = (cp << 6) | (s[i + k] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return false;
    i += len;
  }
  return true;
}

/** Looks up the keys of a strict map: every key a string from `keys`, none twice. Absent -> NULL. */
static bool fields(const msgpack_object *o, const char *path, const char *const *keys, size_t n,
                   const msgpack_object **out) {
  if (o->type != MSGPACK_OBJECT_MAP) return BAD(path, "expected map, got %s", type_name(o));
  for (size_t i = 0; i < n; i++) out[i] = NULL;
  for (uint32_t i = 0; i < o->via.map.size; i++) {
    const msgpack_object *k = &o->via.map.ptr[i].key;
    if (k->type != MSGPACK_OBJECT_STR) return BAD(path, "map key is a %s, not a string", type_name(k));
    size_t j = 0;
    while (j < n && !(strlen(keys[j]) == k->via.str.size && !memcmp(keys[j], k->via.str.ptr, k->via.str.size))) j++;
    if (j == n) return BAD(path, "unknown field \"%.*s\"", (int)(k->via.str.size > 64 ? 64 : k->via.str.size), k->via.str.ptr);
    if (out[j]) return BAD(path, "duplicate field \"%s\"", keys[j]);
    out[j] = &o->via.map.ptr[i].val;
  }
  return true;
}

/** nil means absent for optional fields. */
static const msgpack_object *opt(const msgpack_object *v) {
  return v && v->type == MSGPACK_OBJECT_NIL ? NULL : v;
}

static bool get_uint(const msgpack_object *v, const char *path, uint64_t max, uint64_t *out) {
  const char *desc = max == 0xffffffffULL ? "u32" : "uint";
  if (!v) return BAD(path, "missing %s", desc);
  if (v->type == MSGPACK_OBJECT_NEGATIVE_INTEGER) return BAD(path, "%" PRId64 " is out of range for %s", v->via.i64, desc);
  if (v->type != MSGPACK_OBJECT_POSITIVE_INTEGER) return BAD(path, "expected %s, got %s", desc, type_name(v));
  if (v->via.u64 > max) return BAD(path, "%" PRIu64 " is out of range for %s", v->via.u64, desc);
  *out = v->via.u64;
  return true;
}

static bool get_u32(const msgpack_object *v, const char *path, uint32_t *out) {
  uint64_t x;
  if (!get_uint(v, path, 0xffffffffULL, &x)) return false;
  *out = (uint32_t)x;
  return true;
}

static bool get_bool(const msgpack_object *v, const char *path, bool *out) {
  if (!v) return BAD(path, "missing bool");
  if (v->type != MSGPACK_OBJECT_BOOLEAN) return BAD(path, "expected bool, got %s", type_name(v));
  *out = v->via.boolean;
  return true;
}

/** A UTF-8 string of min..max bytes copied into buf (max + 1 bytes); `printable` forbids control chars. */
static bool get_str(const msgpack_object *v, const char *path, size_t min, size_t max, bool printable, char *buf,
                    size_t *len) {
  if (!v) return BAD(path, "missing string");
  if (v->type != MSGPACK_OBJECT_STR) return BAD(path, "expected string, got %s", type_name(v));
  size_t n = v->via.str.size;
  if (n < min || n > max) return BAD(path, "string of %zu bytes is outside %zu..%zu", n, min, max);
  if (!utf8_valid((const unsigned char *)v->via.str.ptr, n)) return BAD(path, "string is not valid UTF-8");
  for (size_t i = 0; printable && i < n; i++)
    if ((unsigned char)v->via.str.ptr[i] < 0x20 || v->via.str.ptr[i] == 0x7f) return BAD(path, "control characters are not allowed");
  memcpy(buf, v->via.str.ptr, n);
  buf[n] = 0;
  if (len) *len = n;
  return true;
}
#define GET_NAME(v, path, buf) get_str(v, path, 1, NAME_MAX_BYTES, true, buf, NULL)

static bool str_is(const msgpack_object *v, const char *s) {
  return v && v->type == MSGPACK_OBJECT_STR && v->via.str.size == strlen(s) && !memcmp(v->via.str.ptr, s, v->via.str.size);
}

/** One of the string literals `choices` (NULL-terminated); *idx is its index. */
static bool get_lit(const msgpack_object *v, const char *path, const char *const *choices, int *idx) {
  for (int i = 0; choices[i]; i++)
    if (str_is(v, choices[i])) return *idx = i, true;
  if (!v) return BAD(path, "missing \"%s\"", choices[0]);
  return BAD(path, "expected one of \"%s\"%s, got %s", choices[0], choices[1] ? ", ..." : "", type_name(v));
}

static bool get_array(const msgpack_object *v, const char *path, uint32_t max, const msgpack_object **items, uint32_t *n) {
  if (!v) return BAD(path, "missing array");
  if (v->type != MSGPACK_OBJECT_ARRAY) return BAD(path, "expected array, got %s", type_name(v));
  if (v->via.array.size > max) return BAD(path, "%u items exceed the limit of %u", v->via.array.size, max);
  *items = v->via.array.ptr;
  *n = v->via.array.size;
  return true;
}

static const char *sub(char *buf, size_t cap, const char *path, const char *key) {
  snprintf(buf, cap, "%s.%s", path, key);
  return buf;
}
static const char *idx(char *buf, size_t cap, const char *path, uint32_t i) {
  snprintf(buf, cap, "%s[%u]", path, i);
  return buf;
}
#define P(key) sub(pb, sizeof pb, path, key)

// --- message schemas (protocol/messages.ts) --------------------------------------------------------------
static bool parse_error_core(const msgpack_object *o, const char *path, struct err_core *e, bool with_cause,
                             struct wire_error *we) {
  static const char *const keys[] = {"code", "errno", "message", "client", "generation", "cause"};
  const msgpack_object *f[6];
  char pb[256], pc[256];
  if (!fields(o, path, keys, with_cause ? 6 : 5, f)) return false;
  if (!get_str(f[0], P("code"), 1, 64, true, e->code, NULL) || !get_str(f[1], P("errno"), 1, 32, true, e->errno_, NULL) ||
      !get_str(f[2], P("message"), 0, 4096, false, e->message, &e->message_len))
    return false;
  if ((e->has_client = opt(f[3]) != NULL)) {
    static const char *const ck[] = {"id", "kind", "name", "pid"};
    const msgpack_object *c[4];
    const char *cp = P("client");
    if (!fields(f[3], cp, ck, 4, c) || !get_u32(c[0], sub(pc, sizeof pc, cp, "id"), &e->client_id) ||
        !GET_NAME(c[1], sub(pc, sizeof pc, cp, "kind"), e->client_kind) ||
        !GET_NAME(c[2], sub(pc, sizeof pc, cp, "name"), e->client_name) ||
        !get_u32(c[3], sub(pc, sizeof pc, cp, "pid"), &e->client_pid))
      return false;
  }
  if ((e->has_generation = opt(f[4]) != NULL) && !get_uint(f[4], P("generation"), UINT_SAFE_MAX, &e->generation)) return false;
  if (with_cause && (we->has_cause = opt(f[5]) != NULL)) return parse_error_core(f[5], P("cause"), &we->cause, false, NULL);
  return true;
}

static bool parse_error(const msgpack_object *o, const char *path, struct wire_error *we) {
  memset(we, 0, sizeof *we);
  return parse_error_core(o, path, &we->e, true, we);
}

static bool parse_region(const msgpack_object *o, const char *path, struct region *r) {
  static const char *const keys[] = {"id", "name", "gpa", "size", "backing", "offset", "readonly", "logDirty"};
  const msgpack_object *f[8];
  char pb[256];
  memset(r, 0, sizeof *r);
  return fields(o, path, keys, 8, f) && get_u32(f[0], P("id"), &r->id) && GET_NAME(f[1], P("name"), r->name) &&
         get_uint(f[2], P("gpa"), ADDR_MAX, &r->gpa) && get_uint(f[3], P("size"), ADDR_MAX, &r->size) &&
         get_u32(f[4], P("backing"), &r->backing) && get_uint(f[5], P("offset"), ADDR_MAX, &r->offset) &&
         get_bool(f[6], P("readonly"), &r->readonly) && get_bool(f[7], P("logDirty"), &r->log_dirty);
}

static bool parse_regions(const msgpack_object *v, const char *path, struct message *m) {
  const msgpack_object *it;
  char pb[256];
  if (!get_array(v, path, SCHEMA_MAX_LIST, &it, &m->nregions)) return false;
  m->regions = calloc(m->nregions ? m->nregions : 1, sizeof *m->regions);
  if (!m->regions) return fail("MMB_ERR_INTERNAL", "out of memory");
  for (uint32_t i = 0; i < m->nregions; i++)
    if (!parse_region(&it[i], idx(pb, sizeof pb, path, i), &m->regions[i])) return false;
  return true;
}

static bool parse_ids(const msgpack_object *v, const char *path, uint32_t max, struct message *m) {
  const msgpack_object *it;
  char pb[256];
  if (!get_array(v, path, max, &it, &m->nids)) return false;
  m->ids = calloc(m->nids ? m->nids : 1, sizeof *m->ids);
  if (!m->ids) return fail("MMB_ERR_INTERNAL", "out of memory");
  for (uint32_t i = 0; i < m->nids; i++)
    if (!get_u32(&it[i], idx(pb, sizeof pb, path, i), &m->ids[i])) return false;
  return true;
}

static bool parse_op(const msgpack_object *o, const char *path, struct txn_op *op) {
  static const char *const kinds[] = {"remove", "set", "add", NULL};
  static const char *const rk[] = {"op", "region"}, *const sk[] = {"op", "region", "readonly", "logDirty"};
  const msgpack_object *f[4] = {0};
  char pb[256];
  int k;
  if (o->type != MSGPACK_OBJECT_MAP) return BAD(path, "expected map, got %s", type_name(o));
  for (uint32_t i = 0; i < o->via.map.size; i++)
    if (str_is(&o->via.map.ptr[i].key, "op")) f[0] = &o->via.map.ptr[i].val;
  if (!get_lit(f[0], P("op"), kinds, &k)) return false;
  op->kind = (enum op_kind)k;
  switch (op->kind) {
  case OP_REMOVE: return fields(o, path, rk, 2, f) && get_u32(f[1], P("region"), &op->region_id);
  case OP_SET:
    return fields(o, path, sk, 4, f) && get_u32(f[1], P("region"), &op->region_id) &&
           get_bool(f[2], P("readonly"), &op->readonly) && get_bool(f[3], P("logDirty"), &op->log_dirty);
  case OP_ADD:
    if (!fields(o, path, rk, 2, f) || !parse_region(f[1], P("region"), &op->region)) return false;
    op->region_id = op->region.id;
    return true;
  }
  return false;
}

static const char *message_name(uint32_t t) {
  static const char *const names[] = {[M_HELLO] = "HELLO", [M_STATUS] = "STATUS", [M_ATTACH] = "ATTACH",
    [M_BACKING_ADD] = "BACKING_ADD", [M_BACKING_DROP] = "BACKING_DROP", [M_COMMIT] = "COMMIT", [M_ACK] = "ACK",
    [M_NACK] = "NACK", [M_REPLY] = "REPLY", [EV_BACKINGS] = "EV_BACKINGS", [EV_BACKINGS_GONE] = "EV_BACKINGS_GONE",
    [EV_SYNC] = "EV_SYNC", [EV_TXN] = "EV_TXN", [EV_ROLLBACK] = "EV_ROLLBACK", [EV_COMMITTED] = "EV_COMMITTED",
    [EV_GOODBYE] = "EV_GOODBYE", [EV_ERROR] = "EV_ERROR"};
  return t < sizeof names / sizeof names[0] ? names[t] : NULL;
}

/**
 * Decodes one frame body into *m: exactly one msgpack map with an integer `t` (else MMB_ERR_BAD_FRAME),
 * a message a client accepts (else MMB_ERR_UNKNOWN_MESSAGE), its exact schema (else MMB_ERR_BAD_MESSAGE),
 * and as many descriptors as it takes (else MMB_ERR_FD_MISMATCH). On failure g_fail says why.
 */
static bool decode_message(const uint8_t *body, size_t len, int nfds, struct message *m) {
  size_t off = 0;
  msgpack_unpacked_init(&m->up);
  msgpack_unpack_return rc = msgpack_unpack_next(&m->up, (const char *)body, len, &off);
  if (rc != MSGPACK_UNPACK_SUCCESS || off != len)
    return fail("MMB_ERR_BAD_FRAME", "frame body is not one msgpack value (%s)",
                rc == MSGPACK_UNPACK_SUCCESS ? "bytes after the value" : rc == MSGPACK_UNPACK_CONTINUE ? "truncated" : "parse error");
  const msgpack_object *o = &m->up.data;
  if (o->type != MSGPACK_OBJECT_MAP) return fail("MMB_ERR_BAD_FRAME", "frame body is not a msgpack map");
  const msgpack_object *t = NULL;
  for (uint32_t i = 0; i < o->via.map.size; i++)
    if (str_is(&o->via.map.ptr[i].key, "t")) t = &o->via.map.ptr[i].val;
  if (!t || t->type != MSGPACK_OBJECT_POSITIVE_INTEGER) return fail("MMB_ERR_BAD_FRAME", "frame body lacks an integer message id \"t\"");
  const char *name = message_name(t->via.u64 > 0xffff ? 0 : (uint32_t)t->via.u64);
  if (!name) return fail("MMB_ERR_UNKNOWN_MESSAGE", "message id %" PRIu64 " is not defined", t->via.u64);
  m->t = (uint32_t)t->via.u64;
  if (m->t < M_REPLY) return fail("MMB_ERR_UNKNOWN_MESSAGE", "%s (%u) is not accepted by a client", name, m->t);

  const msgpack_object *f[9];
  const char *path = name;
  char pb[256];
  bool ok = false;
  int k;
  switch (m->t) {
  case M_REPLY: {
    static const char *const keys[] = {"t", "id", "result", "error"};
    ok = fields(o, path, keys, 4, f) && get_u32(f[1], P("id"), &m->id);
    m->result = opt(f[2]);
    if (ok && (m->has_error = opt(f[3]) != NULL)) ok = parse_error(f[3], P("error"), &m->error);
    break;
  }
  case EV_BACKINGS: {
    static const char *const keys[] = {"t", "backings"}, *const bk[] = {"backing", "size", "name"};
    const msgpack_object *it, *b[3];
    char pi[256], pj[300];
    if (!(ok = fields(o, path, keys, 2, f) && get_array(f[1], P("backings"), g_max_fds, &it, &m->nbackings))) break;
    m->backings = calloc(m->nbackings ? m->nbackings : 1, sizeof *m->backings);
    if (!m->backings) return fail("MMB_ERR_INTERNAL", "out of memory");
    for (uint32_t i = 0; ok && i < m->nbackings; i++) {
      struct backing_info *bi = &m->backings[i];
      idx(pi, sizeof pi, P("backings"), i);
      ok = fields(&it[i], pi, bk, 3, b) && get_u32(b[0], sub(pj, sizeof pj, pi, "backing"), &bi->backing) &&
           get_uint(b[1], sub(pj, sizeof pj, pi, "size"), ADDR_MAX, &bi->size) && GET_NAME(b[2], sub(pj, sizeof pj, pi, "name"), bi->name);
    }
    break;
  }
  case EV_BACKINGS_GONE: {
    static const char *const keys[] = {"t", "backings"};
    ok = fields(o, path, keys, 2, f) && parse_ids(f[1], P("backings"), 65536, m);
    break;
  }
  case EV_SYNC: {
    static const char *const keys[] = {"t", "seq", "epoch", "generation", "mode", "part", "last", "regions", "removed"};
    static const char *const modes[] = {"snapshot", "delta", NULL};
    ok = fields(o, path, keys, 9, f) && get_uint(f[1], P("seq"), UINT_SAFE_MAX, &m->seq) &&
         get_str(f[2], P("epoch"), 1, 64, true, m->epoch, NULL) && get_uint(f[3], P("generation"), UINT_SAFE_MAX, &m->generation) &&
         get_lit(f[4], P("mode"), modes, &k) && get_u32(f[5], P("part"), &m->part) && get_bool(f[6], P("last"), &m->last) &&
         parse_regions(f[7], P("regions"), m) && parse_ids(f[8], P("removed"), SCHEMA_MAX_LIST, m);
    m->delta = k == 1;
    break;
  }
  case EV_TXN: {
    static const char *const keys[] = {"t", "seq", "generation", "ops"};
    const msgpack_object *it;
    if (!(ok = fields(o, path, keys, 4, f) && get_uint(f[1], P("seq"), UINT_SAFE_MAX, &m->seq) &&
               get_uint(f[2], P("generation"), UINT_SAFE_MAX, &m->generation) && get_array(f[3], P("ops"), SCHEMA_MAX_OPS, &it, &m->nops)))
      break;
    m->ops = calloc(m->nops ? m->nops : 1, sizeof *m->ops);
    if (!m->ops) return fail("MMB_ERR_INTERNAL", "out of memory");
    char pi[256];
    for (uint32_t i = 0; ok && i < m->nops; i++) ok = parse_op(&it[i], idx(pi, sizeof pi, P("ops"), i), &m->ops[i]);
    break;
  }
  case EV_ROLLBACK: {
    static const char *const keys[] = {"t", "seq", "generation"};
    ok = fields(o, path, keys, 3, f) && get_uint(f[1], P("seq"), UINT_SAFE_MAX, &m->seq) &&
         get_uint(f[2], P("generation"), UINT_SAFE_MAX, &m->generation);
    break;
  }
  case EV_COMMITTED: {
    static const char *const keys[] = {"t", "generation"};
    ok = fields(o, path, keys, 2, f) && get_uint(f[1], P("generation"), UINT_SAFE_MAX, &m->generation);
    break;
  }
  case EV_GOODBYE:
  case EV_ERROR: {
    static const char *const keys[] = {"t", "error"};
    ok = fields(o, path, keys, 2, f) && parse_error(f[1], P("error"), &m->error);
    m->has_error = true;
    break;
  }
  }
  if (!ok) return false;
  int want = m->t == EV_BACKINGS ? (int)m->nbackings : 0;
  if (nfds != want) return fail("MMB_ERR_FD_MISMATCH", "%s takes %d descriptor(s), %d arrived", name, want, nfds);
  return true;
}

// --- JSON rendering of decoded messages (for --decode-hex) ----------------------------------------------
static void json_str(const char *s, size_t n) {
  putchar('"');
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c == '"' || c == '\\') printf("\\%c", c);
    else if (c < 0x20) printf("\\u%04x", c);
    else putchar(c);
  }
  putchar('"');
}
#define JS(s) json_str(s, strlen(s))

static void json_obj(const msgpack_object *o) {
  switch (o->type) {
  case MSGPACK_OBJECT_NIL: fputs("null", stdout); break;
  case MSGPACK_OBJECT_BOOLEAN: fputs(o->via.boolean ? "true" : "false", stdout); break;
  case MSGPACK_OBJECT_POSITIVE_INTEGER: printf("%" PRIu64, o->via.u64); break;
  case MSGPACK_OBJECT_NEGATIVE_INTEGER: printf("%" PRId64, o->via.i64); break;
  case MSGPACK_OBJECT_FLOAT32:
  case MSGPACK_OBJECT_FLOAT64: printf("%.17g", o->via.f64); break;
  case MSGPACK_OBJECT_STR: json_str(o->via.str.ptr, o->via.str.size); break;
  case MSGPACK_OBJECT_ARRAY:
    putchar('[');
    for (uint32_t i = 0; i < o->via.array.size; i++) {
      if (i) putchar(',');
      json_obj(&o->via.array.ptr[i]);
    }
    putchar(']');
    break;
  case MSGPACK_OBJECT_MAP:
    putchar('{');
    for (uint32_t i = 0; i < o->via.map.size; i++) {
      const msgpack_object *k = &o->via.map.ptr[i].key;
      if (i) putchar(',');
      if (k->type == MSGPACK_OBJECT_STR) json_str(k->via.str.ptr, k->via.str.size);
      else fputs("\"?\"", stdout);
      putchar(':');
      json_obj(&o->via.map.ptr[i].val);
    }
    putchar('}');
    break;
  default: fputs("null", stdout); break;
  }
}

static void json_err_core(const struct err_core *e) {
  fputs("{\"code\":", stdout), JS(e->code);
  fputs(",\"errno\":", stdout), JS(e->errno_);
  fputs(",\"message\":", stdout), json_str(e->message, e->message_len);
  if (e->has_client) {
    printf(",\"client\":{\"id\":%u,\"kind\":", e->client_id), JS(e->client_kind);
    fputs(",\"name\":", stdout), JS(e->client_name);
    printf(",\"pid\":%u}", e->client_pid);
  }
  if (e->has_generation) printf(",\"generation\":%" PRIu64, e->generation);
}
static void json_error(const struct wire_error *we) {
  json_err_core(&we->e);
  if (we->has_cause) fputs(",\"cause\":", stdout), json_err_core(&we->cause), putchar('}');
  putchar('}');
}

static void json_region(const struct region *r) {
  printf("{\"id\":%u,\"name\":", r->id), JS(r->name);
  printf(",\"gpa\":%" PRIu64 ",\"size\":%" PRIu64 ",\"backing\":%u,\"offset\":%" PRIu64 ",\"readonly\":%s,\"logDirty\":%s}", r->gpa,
         r->size, r->backing, r->offset, r->readonly ? "true" : "false", r->log_dirty ? "true" : "false");
}

static void json_message(const struct message *m, int nfds) {
  printf("{\"nfds\":%d,\"message\":{\"t\":%u", nfds, m->t);
  switch (m->t) {
  case M_REPLY:
    printf(",\"id\":%u", m->id);
    if (m->result) fputs(",\"result\":", stdout), json_obj(m->result);
    if (m->has_error) fputs(",\"error\":", stdout), json_error(&m->error);
    break;
  case EV_BACKINGS:
    fputs(",\"backings\":[", stdout);
    for (uint32_t i = 0; i < m->nbackings; i++) {
      printf("%s{\"backing\":%u,\"size\":%" PRIu64 ",\"name\":", i ? "," : "", m->backings[i].backing, m->backings[i].size);
      JS(m->backings[i].name), putchar('}');
    }
    putchar(']');
    break;
  case EV_BACKINGS_GONE:
  case EV_SYNC:
    if (m->t == EV_SYNC) {
      printf(",\"seq\":%" PRIu64 ",\"epoch\":", m->seq), JS(m->epoch);
      printf(",\"generation\":%" PRIu64 ",\"mode\":\"%s\",\"part\":%u,\"last\":%s,\"regions\":[", m->generation,
             m->delta ? "delta" : "snapshot", m->part, m->last ? "true" : "false");
      for (uint32_t i = 0; i < m->nregions; i++) fputs(i ? "," : "", stdout), json_region(&m->regions[i]);
      fputs("],\"removed\":[", stdout);
    } else {
      fputs(",\"backings\":[", stdout);
    }
    for (uint32_t i = 0; i < m->nids; i++) printf("%s%u", i ? "," : "", m->ids[i]);
    putchar(']');
    break;
  case EV_TXN:
    printf(",\"seq\":%" PRIu64 ",\"generation\":%" PRIu64 ",\"ops\":[", m->seq, m->generation);
    for (uint32_t i = 0; i < m->nops; i++) {
      const struct txn_op *op = &m->ops[i];
      fputs(i ? "," : "", stdout);
      if (op->kind == OP_REMOVE) printf("{\"op\":\"remove\",\"region\":%u}", op->region_id);
      else if (op->kind == OP_SET)
        printf("{\"op\":\"set\",\"region\":%u,\"readonly\":%s,\"logDirty\":%s}", op->region_id, op->readonly ? "true" : "false",
               op->log_dirty ? "true" : "false");
      else fputs("{\"op\":\"add\",\"region\":", stdout), json_region(&op->region), putchar('}');
    }
    putchar(']');
    break;
  case EV_ROLLBACK: printf(",\"seq\":%" PRIu64 ",\"generation\":%" PRIu64, m->seq, m->generation); break;
  case EV_COMMITTED: printf(",\"generation\":%" PRIu64, m->generation); break;
  case EV_GOODBYE:
  case EV_ERROR: fputs(",\"error\":", stdout), json_error(&m->error); break;
  }
  puts("}}");
  fflush(stdout);
}

// --- encoding (msgpack-c packer) --------------------------------------------------------------------------
struct frame_out {
  uint8_t *data;
  size_t len;
};

static void pk_str(msgpack_packer *pk, const char *s) {
  size_t n = strlen(s);
  msgpack_pack_str(pk, n);
  msgpack_pack_str_body(pk, s, n);
}
static void pk_key_uint(msgpack_packer *pk, const char *k, uint64_t v) {
  pk_str(pk, k);
  msgpack_pack_uint64(pk, v); // msgpack-c picks the shortest form: fixint, uint8 .. uint64
}
static void pk_key_str(msgpack_packer *pk, const char *k, const char *v) {
  pk_str(pk, k);
  pk_str(pk, v);
}

/** Header (u32 size, u16 nfds = 0, u16 flags = 0, little-endian) + body. */
static struct frame_out finish_frame(msgpack_sbuffer *sb) {
  struct frame_out f = {malloc(HEADER_SIZE + sb->size), HEADER_SIZE + sb->size};
  if (!f.data) {
    fprintf(stderr, "c-subscriber: out of memory\n");
    exit(1);
  }
  uint32_t n = (uint32_t)sb->size;
  uint8_t hdr[HEADER_SIZE] = {n & 0xff, (n >> 8) & 0xff, (n >> 16) & 0xff, n >> 24, 0, 0, 0, 0};
  memcpy(f.data, hdr, HEADER_SIZE);
  memcpy(f.data + HEADER_SIZE, sb->data, sb->size);
  msgpack_sbuffer_destroy(sb);
  return f;
}
#define BEGIN(n)                                                                                                   \
  msgpack_sbuffer sb;                                                                                              \
  msgpack_packer pk;                                                                                               \
  msgpack_sbuffer_init(&sb);                                                                                       \
  msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);                                                           \
  msgpack_pack_map(&pk, n)

static struct frame_out encode_hello(uint32_t id, uint32_t version, uint32_t features, const char *name) {
  BEGIN(name ? 5 : 4);
  pk_key_uint(&pk, "t", M_HELLO);
  pk_key_uint(&pk, "id", id);
  pk_key_uint(&pk, "version", version);
  pk_key_uint(&pk, "features", features);
  if (name) pk_key_str(&pk, "name", name);
  return finish_frame(&sb);
}

static struct frame_out encode_attach(uint32_t id, const char *space, const char *role, const char *kind, const char *token) {
  BEGIN(token ? 6 : 5);
  pk_key_uint(&pk, "t", M_ATTACH);
  pk_key_uint(&pk, "id", id);
  pk_key_str(&pk, "space", space);
  pk_key_str(&pk, "role", role);
  pk_key_str(&pk, "kind", kind);
  if (token) pk_key_str(&pk, "token", token);
  return finish_frame(&sb);
}

static struct frame_out encode_ack(uint64_t seq) {
  BEGIN(2);
  pk_key_uint(&pk, "t", M_ACK);
  pk_key_uint(&pk, "seq", seq);
  return finish_frame(&sb);
}

static struct frame_out encode_nack(uint64_t seq, const char *code, const char *errno_name, const char *message) {
  BEGIN(3);
  pk_key_uint(&pk, "t", M_NACK);
  pk_key_uint(&pk, "seq", seq);
  pk_str(&pk, "error");
  msgpack_pack_map(&pk, 3);
  pk_key_str(&pk, "code", code);
  pk_key_str(&pk, "errno", errno_name);
  pk_key_str(&pk, "message", message);
  return finish_frame(&sb);
}

// --- the connection: recvmsg + SCM_RIGHTS, frames claim the fd batch their first byte arrived with -----
struct batch {
  uint64_t start, end; // stream offsets of the bytes that arrived with these fds
  int n;
  int *fds;
};
static struct conn {
  int fd;
  uint8_t *buf;
  size_t cap, rd, wr;
  uint64_t pos; // stream offset of buf[rd]
  struct batch batches[MAX_PENDING_FDS];
  int nbatches, pending;
  bool in_body;
  uint32_t body_len, max_frame, max_fds;
  uint16_t frame_nfds;
  uint64_t frame_start;
} g_conn = {.fd = -1};

struct frame {
  const uint8_t *body;
  uint32_t len;
  int *fds; // owned by whoever holds the frame
  int nfds;
};

static void close_fds(int *fds, int n) {
  for (int i = 0; i < n; i++)
    if (fds[i] >= 0) close(fds[i]), fds[i] = -1;
}

static void conn_dispose(struct conn *c) {
  for (int i = 0; i < c->nbatches; i++) close_fds(c->batches[i].fds, c->batches[i].n), free(c->batches[i].fds);
  c->nbatches = c->pending = 0;
  free(c->buf);
  c->buf = NULL;
  if (c->fd >= 0) close(c->fd);
  c->fd = -1;
}

/** One recvmsg: 1 bytes arrived, 0 EOF, -1 failure (g_fail). */
static int conn_recv(struct conn *c) {
  if (c->cap - c->wr < 65536) {
    if (c->buf) memmove(c->buf, c->buf + c->rd, c->wr - c->rd);
    c->wr -= c->rd, c->rd = 0;
    if (c->cap - c->wr < 65536) {
      size_t ncap = c->cap ? c->cap * 2 : 131072;
      uint8_t *nb = realloc(c->buf, ncap);
      if (!nb) return fail("MMB_ERR_INTERNAL", "out of memory"), -1;
      c->buf = nb, c->cap = ncap;
    }
  }
  union {
    struct cmsghdr h;
    char b[CMSG_SPACE(SCM_MAX_FD * sizeof(int))];
  } cb;
  struct iovec iov = {c->buf + c->wr, c->cap - c->wr};
  struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cb.b, .msg_controllen = sizeof cb.b};
  ssize_t n;
  do n = recvmsg(c->fd, &mh, MSG_CMSG_CLOEXEC);
  while (n < 0 && errno == EINTR);
  if (n < 0) return fail("MMB_ERR_DISCONNECTED", "recvmsg: %s", strerror(errno)), -1;
  int fds[SCM_MAX_FD], nfds = 0;
  for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm)) {
    if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS) continue;
    int k = (int)((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));
    for (int i = 0; i < k && nfds < SCM_MAX_FD; i++) memcpy(&fds[nfds++], CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
  }
  if (mh.msg_flags & MSG_CTRUNC) {
    close_fds(fds, nfds);
    return fail("MMB_ERR_FDS_TRUNCATED", "the kernel truncated the descriptors of a message (MSG_CTRUNC)"), -1;
  }
  if (n == 0) {
    close_fds(fds, nfds);
    return 0;
  }
  if (nfds > 0) {
    if (c->nbatches == MAX_PENDING_FDS || c->pending + nfds > MAX_PENDING_FDS) {
      close_fds(fds, nfds);
      return fail("MMB_ERR_TOO_MANY_FDS", "%d descriptors pending, limit %d", c->pending + nfds, MAX_PENDING_FDS), -1;
    }
    struct batch *b = &c->batches[c->nbatches];
    b->fds = malloc(nfds * sizeof(int));
    if (!b->fds) return close_fds(fds, nfds), fail("MMB_ERR_INTERNAL", "out of memory"), -1;
    memcpy(b->fds, fds, nfds * sizeof(int));
    b->n = nfds;
    b->start = c->pos + (c->wr - c->rd);
    b->end = b->start + (uint64_t)n;
    c->nbatches++, c->pending += nfds;
  }
  c->wr += (size_t)n;
  return 1;
}

/** The next complete frame: 1 got one (fds now owned by the caller), 0 need more bytes, -1 failure. */
static int conn_next(struct conn *c, struct frame *f) {
  if (!c->in_body) {
    if (c->wr - c->rd < HEADER_SIZE) return 0;
    const uint8_t *h = c->buf + c->rd;
    uint32_t len = h[0] | h[1] << 8 | h[2] << 16 | (uint32_t)h[3] << 24;
    uint16_t nfds = h[4] | h[5] << 8, flags = h[6] | h[7] << 8;
    if (flags) return fail("MMB_ERR_BAD_FRAME", "reserved header flags 0x%x must be zero", flags), -1;
    if (len == 0) return fail("MMB_ERR_BAD_FRAME", "empty frame body"), -1;
    if (len > c->max_frame) return fail("MMB_ERR_FRAME_TOO_LARGE", "frame body of %u bytes exceeds the limit of %u", len, c->max_frame), -1;
    if (nfds > c->max_fds) return fail("MMB_ERR_TOO_MANY_FDS", "frame declares %u descriptors, limit %u", nfds, c->max_fds), -1;
    c->frame_start = c->pos;
    if (nfds > 0) {
      struct batch *b = c->nbatches ? &c->batches[0] : NULL;
      if (!b || b->start > c->frame_start || b->end <= c->frame_start)
        return fail("MMB_ERR_FD_MISMATCH", "frame declares %u descriptors but none arrived with its first byte", nfds), -1;
      if (b->n != nfds)
        return fail("MMB_ERR_FD_MISMATCH", "frame declares %u descriptors but %d arrived with it", nfds, b->n), -1;
    }
    c->body_len = len, c->frame_nfds = nfds, c->in_body = true;
  }
  size_t total = HEADER_SIZE + (size_t)c->body_len;
  if (c->wr - c->rd < total) return 0;
  f->body = c->buf + c->rd + HEADER_SIZE; // valid until the next conn_recv
  f->len = c->body_len;
  f->fds = NULL, f->nfds = 0;
  if (c->frame_nfds > 0) {
    f->fds = c->batches[0].fds, f->nfds = c->batches[0].n;
    memmove(&c->batches[0], &c->batches[1], (size_t)--c->nbatches * sizeof c->batches[0]);
    c->pending -= f->nfds;
  }
  c->rd += total, c->pos += total, c->in_body = false;
  return 1;
}

/** After a frame: a batch that arrived entirely with bytes already consumed was claimed by no frame. */
static bool conn_check_unclaimed(const struct conn *c) {
  if (c->nbatches && c->batches[0].end <= c->pos)
    return fail("MMB_ERR_FD_MISMATCH", "%d descriptors arrived with a frame that declares none", c->batches[0].n);
  return true;
}

static bool send_frame(struct frame_out f) {
  size_t off = 0;
  while (off < f.len) {
    ssize_t n = send(g_conn.fd, f.data + off, f.len - off, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      free(f.data);
      return fail("MMB_ERR_DISCONNECTED", "send: %s", n < 0 ? strerror(errno) : "short write");
    }
    off += (size_t)n;
  }
  free(f.data);
  return true;
}

// --- local state: backings, regions, the tentative transaction ------------------------------------------
static struct {
  const char *socket, *space, *name, *nack_region, *token;
  bool have_expect, have_write, expect_done, write_done, have_exit_gen;
  uint64_t expect_gpa, write_gpa, exit_gen;
  uint8_t *expect, *write;
  size_t expect_len, write_len;
} opt_;

/** The features we ask for in HELLO, and expect the broker to grant exactly. */
static uint32_t wanted_features(void) { return opt_.token ? FEATURE_AUTH : 0; }

struct backing {
  uint32_t id;
  int fd;
  uint64_t size;
  char name[65];
};
static struct backing *g_backings;
static size_t g_nbackings;
static struct region *g_regions;
static size_t g_nregions;
static long g_page;

enum undo_kind { UNDO_ADDED, UNDO_REMOVED, UNDO_SET };
struct undo {
  enum undo_kind kind;
  struct region r; // UNDO_REMOVED: the region as it was; UNDO_ADDED / UNDO_SET: id (+ old flags)
};
static struct {
  bool active;
  uint64_t generation;
  struct undo *log;
  size_t n;
} g_tentative;

static enum { ST_HELLO, ST_ATTACH, ST_SYNCING, ST_READY } g_state = ST_HELLO;
static uint64_t g_generation, g_sync_seq;
static uint32_t g_sync_part;
static struct region *g_sync_regions;
static size_t g_sync_n;
static struct frame g_frame; // the frame being handled: its fds are closed on any error path

static struct backing *find_backing(uint32_t id) {
  for (size_t i = 0; i < g_nbackings; i++)
    if (g_backings[i].id == id) return &g_backings[i];
  return NULL;
}
static struct region *find_region(uint32_t id) {
  for (size_t i = 0; i < g_nregions; i++)
    if (g_regions[i].id == id) return &g_regions[i];
  return NULL;
}
static bool grow(void **p, size_t n, size_t size) {
  void *q = realloc(*p, (n + 1) * size);
  if (!q) return fail("MMB_ERR_INTERNAL", "out of memory");
  *p = q;
  return true;
}

/** mmap a region from its backing (PROT_READ only when read-only). Returns 0 or the errno. */
static int map_region(struct region *r) {
  struct backing *b = find_backing(r->backing);
  void *a = mmap(NULL, r->size, PROT_READ | (r->readonly ? 0 : PROT_WRITE), MAP_SHARED, b->fd, (off_t)r->offset);
  if (a == MAP_FAILED) return errno;
  r->addr = a;
  say("mapped name=%s id=%u gpa=0x%" PRIx64 " size=0x%" PRIx64 " backing=%u offset=0x%" PRIx64 " prot=%s addr=%p", r->name, r->id,
      r->gpa, r->size, r->backing, r->offset, r->readonly ? "r" : "rw", a);
  return 0;
}
static void unmap_region(struct region *r) {
  if (r->addr) munmap(r->addr, r->size);
  r->addr = NULL;
  say("unmapped name=%s id=%u", r->name, r->id);
}
static void drop_region(uint32_t id) { // unmaps and removes from the table
  struct region *r = find_region(id);
  unmap_region(r);
  *r = g_regions[--g_nregions];
}

/** The broker's side of the contract: what it sends must fit what we hold. */
static bool check_add(const struct region *r) {
  struct backing *b = find_backing(r->backing);
  if (find_region(r->id)) return fail("MMB_ERR_PROTOCOL", "region id %u already exists", r->id);
  if (r->size == 0 || r->gpa % g_page || r->size % g_page || r->offset % g_page || r->gpa + r->size > ADDR_MAX)
    return fail("MMB_ERR_PROTOCOL", "region \"%s\" is empty, unaligned or beyond 2^52", r->name);
  if (!b) return fail("MMB_ERR_PROTOCOL", "region \"%s\" uses backing %u, which was never sent", r->name, r->backing);
  if (r->offset + r->size > b->size) return fail("MMB_ERR_PROTOCOL", "region \"%s\" reaches past the end of backing %u", r->name, b->id);
  for (size_t i = 0; i < g_nregions; i++) {
    const struct region *o = &g_regions[i];
    if (!strcmp(o->name, r->name)) return fail("MMB_ERR_PROTOCOL", "two regions are named \"%s\"", r->name);
    if (r->gpa < o->gpa + o->size && o->gpa < r->gpa + r->size)
      return fail("MMB_ERR_PROTOCOL", "region \"%s\" overlaps region \"%s\"", r->name, o->name);
  }
  return true;
}

static int add_region(const struct region *r) { // check_add first; returns 0 or the mmap errno
  if (!grow((void **)&g_regions, g_nregions, sizeof *g_regions)) return ENOMEM;
  g_regions[g_nregions] = *r;
  int err = map_region(&g_regions[g_nregions]);
  if (!err) g_nregions++;
  return err;
}

static int set_flags(struct region *r, bool readonly, bool log_dirty) {
  if (r->readonly != readonly) {
    // Remap rather than mprotect: a region shown read-only may have come with a read-only descriptor (the
    // broker re-sends the backing read-write before the transaction that makes a region writable). The
    // new mapping is made first, so a failure leaves the old one as it was.
    struct backing *b = find_backing(r->backing);
    void *a = mmap(NULL, r->size, PROT_READ | (readonly ? 0 : PROT_WRITE), MAP_SHARED, b->fd, (off_t)r->offset);
    if (a == MAP_FAILED) return errno;
    munmap(r->addr, r->size);
    r->addr = a;
  }
  r->readonly = readonly, r->log_dirty = log_dirty;
  say("set name=%s id=%u readonly=%s logDirty=%s", r->name, r->id, readonly ? "true" : "false", log_dirty ? "true" : "false");
  return 0;
}

static void hex_of(const uint8_t *p, size_t n, char *out) {
  for (size_t i = 0; i < n; i++) sprintf(out + 2 * i, "%02x", p[i]);
  out[2 * n] = 0;
}

/** The local address of [gpa, gpa + len) if one mapped region covers it all. */
static uint8_t *translate(uint64_t gpa, size_t len, bool *readonly) {
  for (size_t i = 0; i < g_nregions; i++) {
    const struct region *r = &g_regions[i];
    if (r->addr && gpa >= r->gpa && gpa + len <= r->gpa + r->size) {
      if (readonly) *readonly = r->readonly;
      return (uint8_t *)r->addr + (gpa - r->gpa);
    }
  }
  return NULL;
}

/** --expect-* and --write-*, once their GPA range is mapped. */
static void guest_memory_checks(void) {
  bool ro;
  uint8_t *p;
  if (opt_.have_expect && !opt_.expect_done && (p = translate(opt_.expect_gpa, opt_.expect_len, &ro))) {
    opt_.expect_done = true;
    if (!memcmp(p, opt_.expect, opt_.expect_len)) {
      say("pattern ok gpa=0x%" PRIx64 " len=%zu", opt_.expect_gpa, opt_.expect_len);
    } else {
      char *got = malloc(2 * opt_.expect_len + 1);
      if (got) hex_of(p, opt_.expect_len, got);
      say("pattern MISMATCH got=%s", got ? got : "?");
      free(got);
    }
  }
  if (opt_.have_write && !opt_.write_done && (!opt_.have_expect || opt_.expect_done) &&
      (p = translate(opt_.write_gpa, opt_.write_len, &ro))) {
    opt_.write_done = true;
    if (ro) {
      say("write refused gpa=0x%" PRIx64 ": the region is read-only", opt_.write_gpa);
    } else {
      memcpy(p, opt_.write, opt_.write_len);
      say("wrote gpa=0x%" PRIx64 " len=%zu", opt_.write_gpa, opt_.write_len);
    }
  }
}

static bool ack(uint64_t seq) {
  if (!send_frame(encode_ack(seq))) return false;
  say("acked seq=%" PRIu64, seq);
  return true;
}
static bool nack(uint64_t seq, const char *code, const char *errno_name, const char *message) {
  if (!send_frame(encode_nack(seq, code, errno_name, message))) return false;
  say("nacked seq=%" PRIu64 " code=%s errno=%s message=%s", seq, code, errno_name, message);
  return true;
}

static const char *errno_name(int e) {
  switch (e) {
  case ENOMEM: return "ENOMEM";
  case EINVAL: return "EINVAL";
  case EACCES: return "EACCES";
  case EPERM: return "EPERM";
  case ENODEV: return "ENODEV";
  case EOVERFLOW: return "EOVERFLOW";
  case EAGAIN: return "EAGAIN";
  case EBADF: return "EBADF";
  default: return "EIO";
  }
}

/** Undoes the log in reverse order. False (fatal) if memory could not be restored. */
static bool undo(struct undo *log, size_t n) {
  for (size_t i = n; i-- > 0;) {
    struct undo *u = &log[i];
    int err = 0;
    if (u->kind == UNDO_ADDED) drop_region(u->r.id);
    else if (u->kind == UNDO_SET) err = set_flags(find_region(u->r.id), u->r.readonly, u->r.log_dirty);
    else err = add_region(&u->r);
    if (err) return fail("MMB_ERR_MAP_FAILED", "cannot restore region \"%s\": %s", u->r.name, strerror(err));
  }
  return true;
}

// --- event handlers --------------------------------------------------------------------------------------
static bool on_backings(struct message *m) {
  for (uint32_t i = 0; i < m->nbackings; i++) {
    struct backing_info *bi = &m->backings[i];
    struct stat st;
    int fd = g_frame.fds[i];
    struct backing *held = find_backing(bi->backing);
    if (fstat(fd, &st) || !S_ISREG(st.st_mode) || (uint64_t)st.st_size < bi->size)
      return fail("MMB_ERR_PROTOCOL", "backing %u is not a regular file of at least %" PRIu64 " bytes", bi->backing, bi->size);
    int seals = fcntl(fd, F_GET_SEALS);
    if (seals < 0 || !(seals & F_SEAL_SHRINK))
      return fail("MMB_ERR_PROTOCOL", "backing %u is not sealed against shrinking (F_SEAL_SHRINK)", bi->backing);
    if (held) {
      // Sent again: read-write now that a writable region needs it (it came read-only before).
      close(held->fd);
      held->fd = fd;
      g_frame.fds[i] = -1; // kept
      say("backing-replaced id=%u name=%s fd=%d", bi->backing, bi->name, fd);
      continue;
    }
    if (!grow((void **)&g_backings, g_nbackings, sizeof *g_backings)) return false;
    g_backings[g_nbackings++] = (struct backing){bi->backing, fd, bi->size, ""};
    strcpy(g_backings[g_nbackings - 1].name, bi->name);
    g_frame.fds[i] = -1; // kept
    say("backing id=%u name=%s size=0x%" PRIx64 " fd=%d", bi->backing, bi->name, bi->size, fd);
  }
  return true;
}

static bool on_backings_gone(struct message *m) {
  for (uint32_t i = 0; i < m->nids; i++) {
    struct backing *b = find_backing(m->ids[i]);
    if (!b) return fail("MMB_ERR_PROTOCOL", "EV_BACKINGS_GONE names backing %u, which this client does not hold", m->ids[i]);
    for (size_t k = 0; k < g_nregions; k++)
      if (g_regions[k].backing == b->id) return fail("MMB_ERR_PROTOCOL", "backing %u is gone but region \"%s\" uses it", b->id, g_regions[k].name);
    close(b->fd);
    say("backing-gone id=%u name=%s", b->id, b->name);
    *b = g_backings[--g_nbackings];
  }
  return true;
}

static bool on_sync(struct message *m) {
  if (g_state != ST_SYNCING) return fail("MMB_ERR_PROTOCOL", "EV_SYNC after the initial sync");
  if (m->delta || m->nids) return fail("MMB_ERR_PROTOCOL", "a delta sync without RESUME");
  if (m->part != g_sync_part || (m->part > 0 && (m->seq != g_sync_seq || m->generation != g_generation)))
    return fail("MMB_ERR_PROTOCOL", "EV_SYNC part %u out of order", m->part);
  g_sync_seq = m->seq, g_generation = m->generation, g_sync_part++;
  for (uint32_t i = 0; i < m->nregions; i++) {
    if (!grow((void **)&g_sync_regions, g_sync_n, sizeof *g_sync_regions)) return false;
    g_sync_regions[g_sync_n++] = m->regions[i];
  }
  if (!m->last) return true;
  // The initial map: check it all, then map it; if a mapping fails, unmap what this sync mapped and nack.
  for (size_t i = 0; i < g_sync_n; i++) {
    if (!check_add(&g_sync_regions[i])) return false;
    int err = add_region(&g_sync_regions[i]);
    if (err) {
      char msg[256];
      snprintf(msg, sizeof msg, "cannot map region \"%s\": %s", g_sync_regions[i].name, strerror(err));
      while (g_nregions) drop_region(g_regions[0].id);
      return nack(m->seq, "MMB_ERR_MAP_FAILED", errno_name(err), msg);
    }
  }
  g_state = ST_READY;
  guest_memory_checks();
  if (!ack(m->seq)) return false;
  say("synced gen=%" PRIu64 " regions=%zu", g_generation, g_sync_n);
  free(g_sync_regions), g_sync_regions = NULL;
  return true;
}

static bool on_txn(struct message *m) {
  if (g_state != ST_READY || g_tentative.active) return fail("MMB_ERR_PROTOCOL", "EV_TXN before the previous one completed");
  if (m->generation != g_generation + 1)
    return fail("MMB_ERR_PROTOCOL", "EV_TXN for generation %" PRIu64 " at generation %" PRIu64, m->generation, g_generation);
  say("txn gen=%" PRIu64 " seq=%" PRIu64 " ops=%u", m->generation, m->seq, m->nops);
  struct undo *log = calloc(m->nops ? m->nops : 1, sizeof *log);
  if (!log) return fail("MMB_ERR_INTERNAL", "out of memory");
  size_t n = 0;
  char msg[256] = "";
  const char *code = NULL, *eno = NULL;
  for (uint32_t i = 0; i < m->nops && !code; i++) {
    struct txn_op *op = &m->ops[i];
    struct region *r = op->kind == OP_ADD ? NULL : find_region(op->region_id);
    if (op->kind != OP_ADD && !r) {
      free(log);
      return fail("MMB_ERR_PROTOCOL", "ops[%u] names region %u, which does not exist", i, op->region_id);
    }
    if (i > 0 && op->kind < m->ops[i - 1].kind) {
      free(log);
      return fail("MMB_ERR_PROTOCOL", "ops are not ordered removes, sets, adds");
    }
    int err = 0;
    if (op->kind == OP_REMOVE) {
      log[n] = (struct undo){UNDO_REMOVED, *r};
      log[n++].r.addr = NULL;
      drop_region(r->id);
    } else if (op->kind == OP_SET) {
      struct undo u = {UNDO_SET, *r};
      if ((err = set_flags(r, op->readonly, op->log_dirty))) snprintf(msg, sizeof msg, "cannot remap region \"%s\": %s", r->name, strerror(err));
      else log[n++] = u;
    } else if (!check_add(&op->region)) {
      free(log);
      return false;
    } else if (opt_.nack_region && !strcmp(op->region.name, opt_.nack_region)) {
      code = "MMB_ERR_CLIENT_REFUSED", eno = "EIO";
      snprintf(msg, sizeof msg, "region \"%s\" is refused by --nack-region", op->region.name);
    } else if ((err = add_region(&op->region))) {
      snprintf(msg, sizeof msg, "cannot map region \"%s\": %s", op->region.name, strerror(err));
    } else {
      log[n++] = (struct undo){UNDO_ADDED, op->region};
    }
    if (err) code = "MMB_ERR_MAP_FAILED", eno = errno_name(err);
  }
  if (code) { // leave everything exactly as it was before the event, then nack
    bool ok = undo(log, n);
    free(log);
    return ok && nack(m->seq, code, eno, msg);
  }
  g_tentative = (typeof(g_tentative)){true, m->generation, log, n};
  guest_memory_checks();
  return ack(m->seq);
}

static bool on_rollback(struct message *m) {
  if (!g_tentative.active || g_tentative.generation != m->generation)
    return fail("MMB_ERR_PROTOCOL", "EV_ROLLBACK of generation %" PRIu64 ", which is not tentative here", m->generation);
  bool ok = undo(g_tentative.log, g_tentative.n);
  free(g_tentative.log);
  g_tentative.active = false, g_tentative.log = NULL;
  if (!ok) { // cannot restore: tell the broker (it evicts us) and give up
    nack(m->seq, g_fail.code, "EIO", g_fail.msg);
    return false;
  }
  say("rolledback gen=%" PRIu64, m->generation);
  guest_memory_checks();
  return ack(m->seq);
}

static bool on_committed(struct message *m) {
  if (!g_tentative.active || g_tentative.generation != m->generation)
    return fail("MMB_ERR_PROTOCOL", "EV_COMMITTED of generation %" PRIu64 ", which is not tentative here", m->generation);
  free(g_tentative.log);
  g_tentative.active = false, g_tentative.log = NULL;
  g_generation = m->generation;
  say("committed gen=%" PRIu64, m->generation);
  return true;
}

static void say_error(const char *what, const struct wire_error *we) {
  const struct err_core *e = &we->e;
  say("%s code=%s errno=%s message=%.*s", what, e->code, e->errno_, (int)e->message_len, e->message);
}

enum { GO_ON = 0, EXIT_OK = 1, EXIT_FAIL = 2, EXIT_PROTO = 3 };

static int on_reply(struct message *m) {
  uint32_t want = g_state == ST_HELLO ? REQ_HELLO : g_state == ST_ATTACH ? REQ_ATTACH : 0;
  if (m->id != want || !want) return fail("MMB_ERR_PROTOCOL", "REPLY to request %u, which is not outstanding", m->id), EXIT_PROTO;
  if (m->has_error == (m->result != NULL)) return fail("MMB_ERR_PROTOCOL", "REPLY must carry exactly one of result and error"), EXIT_PROTO;
  if (m->has_error) {
    say_error(want == REQ_HELLO ? "hello-refused" : "attach-refused", &m->error);
    return EXIT_FAIL;
  }
  const msgpack_object *f[6];
  char pb[256];
  const char *path = "REPLY.result";
  if (want == REQ_HELLO) {
    static const char *const keys[] = {"version", "features", "broker", "limits"};
    static const char *const lk[] = {"maxFrameBytes", "maxFdsPerFrame", "maxOpsPerCommit", "maxNameBytes"};
    uint32_t version, features, lim[4];
    char broker[65];
    const msgpack_object *l[4];
    if (!fields(m->result, path, keys, 4, f) || !get_u32(f[0], P("version"), &version) || !get_u32(f[1], P("features"), &features) ||
        !GET_NAME(f[2], P("broker"), broker) || (!f[3] && !BAD(P("limits"), "missing map")) || !fields(f[3], P("limits"), lk, 4, l))
      return EXIT_PROTO;
    char pl[300];
    for (int i = 0; i < 4; i++)
      if (!get_u32(l[i], sub(pl, sizeof pl, "REPLY.result.limits", lk[i]), &lim[i])) return EXIT_PROTO;
    if (version == PROTOCOL_VERSION && (features & ~wanted_features()) == 0 && features != wanted_features())
      return fail("MMB_ERR_FEATURE", "the broker does not offer feature AUTH, which --token-file needs"), EXIT_FAIL;
    if (version != PROTOCOL_VERSION || features != wanted_features())
      return fail("MMB_ERR_PROTOCOL", "HELLO reply with version %u, features 0x%x", version, features), EXIT_PROTO;
    if (lim[0] < 1 || lim[1] > SCM_MAX_FD) return fail("MMB_ERR_PROTOCOL", "unusable limits in the HELLO reply"), EXIT_PROTO;
    g_conn.max_frame = lim[0], g_conn.max_fds = g_max_fds = lim[1];
    say("hello broker=%s version=%u features=0x%x maxFrameBytes=%u maxFdsPerFrame=%u", broker, version, features, lim[0], lim[1]);
    g_state = ST_ATTACH;
    return send_frame(encode_attach(REQ_ATTACH, opt_.space, "subscriber", "c-subscriber", opt_.token)) ? GO_ON : EXIT_FAIL;
  }
  static const char *const keys[] = {"client", "epoch", "generation", "sync"};
  static const char *const syncs[] = {"snapshot", "delta", "none", NULL};
  uint32_t client;
  uint64_t gen;
  char epoch[65];
  int sync;
  if (!fields(m->result, path, keys, 4, f) || !get_u32(f[0], P("client"), &client) || !get_str(f[1], P("epoch"), 1, 64, true, epoch, NULL) ||
      !get_uint(f[2], P("generation"), UINT_SAFE_MAX, &gen) || !get_lit(f[3], P("sync"), syncs, &sync))
    return EXIT_PROTO;
  if (sync != 0) return fail("MMB_ERR_PROTOCOL", "ATTACH reply announces a %s sync; expected a snapshot", syncs[sync]), EXIT_PROTO;
  say("attached client=%u epoch=%s generation=%" PRIu64 " sync=snapshot", client, epoch, gen);
  g_state = ST_SYNCING;
  return GO_ON;
}

static int handle(struct message *m) {
  if (m->t != M_REPLY && m->t != EV_GOODBYE && m->t != EV_ERROR && g_state < ST_SYNCING)
    return fail("MMB_ERR_PROTOCOL", "%s before the ATTACH reply", message_name(m->t)), EXIT_PROTO;
  bool ok = true;
  switch (m->t) {
  case M_REPLY: return on_reply(m);
  case EV_BACKINGS: ok = on_backings(m); break;
  case EV_BACKINGS_GONE: ok = on_backings_gone(m); break;
  case EV_SYNC:
    ok = on_sync(m);
    if (ok && g_state == ST_READY && opt_.have_exit_gen && g_generation >= opt_.exit_gen) return EXIT_OK;
    break;
  case EV_TXN: ok = on_txn(m); break;
  case EV_ROLLBACK: ok = on_rollback(m); break;
  case EV_COMMITTED:
    ok = on_committed(m);
    if (ok && opt_.have_exit_gen && g_generation >= opt_.exit_gen) return EXIT_OK;
    break;
  case EV_GOODBYE:
    say_error("goodbye", &m->error);
    return strcmp(m->error.e.code, "MMB_ERR_SHUTDOWN") ? EXIT_FAIL : EXIT_OK;
  case EV_ERROR: say_error("ev-error", &m->error); break;
  }
  if (ok) return GO_ON;
  return !strcmp(g_fail.code, "MMB_ERR_PROTOCOL") ? EXIT_PROTO : EXIT_FAIL;
}

// --- setup, main loop, teardown --------------------------------------------------------------------------
static void cleanup(void) {
  if (g_frame.fds) close_fds(g_frame.fds, g_frame.nfds), free(g_frame.fds), g_frame.fds = NULL;
  for (size_t i = 0; i < g_nregions; i++)
    if (g_regions[i].addr) munmap(g_regions[i].addr, g_regions[i].size);
  for (size_t i = 0; i < g_nbackings; i++) close(g_backings[i].fd);
  free(g_regions), free(g_backings), free(g_sync_regions), free(g_tentative.log);
  g_nregions = g_nbackings = 0;
  conn_dispose(&g_conn);
}

static bool decode_mode; // failures print one JSON line on stdout

static int protocol_exit(void) {
  if (decode_mode) printf("{\"error\":{\"code\":\"%s\",\"message\":", g_fail.code), JS(g_fail.msg), puts("}}");
  else say("protocol-error code=%s message=%s", g_fail.code, g_fail.msg);
  fprintf(stderr, "c-subscriber: %s: %s\n", g_fail.code, g_fail.msg);
  fflush(stdout);
  cleanup();
  return 2;
}

/** Reads and handles frames until something ends the connection. Returns the exit status. */
static int run(int sigfd) {
  for (;;) {
    struct pollfd p[2] = {{g_conn.fd, POLLIN, 0}, {sigfd, POLLIN, 0}};
    if (poll(p, sigfd >= 0 ? 2 : 1, -1) < 0) {
      if (errno == EINTR) continue;
      fail("MMB_ERR_INTERNAL", "poll: %s", strerror(errno));
      return cleanup(), 1;
    }
    if (sigfd >= 0 && (p[1].revents & POLLIN)) {
      struct signalfd_siginfo si;
      if (read(sigfd, &si, sizeof si) == (ssize_t)sizeof si) say("signal %s", strsignal((int)si.ssi_signo));
      return cleanup(), 0;
    }
    if (!p[0].revents) continue;
    int r = conn_recv(&g_conn);
    if (r < 0) return strcmp(g_fail.code, "MMB_ERR_DISCONNECTED") ? protocol_exit() : (say("disconnected %s", g_fail.msg), cleanup(), 1);
    if (r == 0) {
      bool idle = !g_conn.in_body && g_conn.rd == g_conn.wr;
      if (decode_mode && idle) return cleanup(), 0;
      if (!idle) return fail("MMB_ERR_DISCONNECTED", "peer closed the connection in the middle of a frame"), protocol_exit();
      say("eof");
      return cleanup(), 0;
    }
    for (;;) {
      r = conn_next(&g_conn, &g_frame);
      if (r < 0) return protocol_exit();
      if (r == 0) break;
      struct message m = {0};
      int status;
      if (!decode_message(g_frame.body, g_frame.len, g_frame.nfds, &m) || !conn_check_unclaimed(&g_conn)) {
        message_free(&m);
        return protocol_exit();
      }
      if (decode_mode) {
        json_message(&m, g_frame.nfds);
        status = GO_ON;
      } else {
        status = handle(&m);
      }
      message_free(&m);
      if (g_frame.fds) close_fds(g_frame.fds, g_frame.nfds), free(g_frame.fds); // those not kept
      g_frame.fds = NULL, g_frame.nfds = 0;
      if (status == EXIT_PROTO) return protocol_exit();
      if (status == EXIT_FAIL) {
        if (g_fail.code && !strncmp(g_fail.code, "MMB_", 4) && strcmp(g_fail.code, "MMB_ERR_PROTOCOL"))
          fprintf(stderr, "c-subscriber: %s: %s\n", g_fail.code, g_fail.msg);
        return cleanup(), 1;
      }
      if (status == EXIT_OK) return say("exit generation=%" PRIu64, g_generation), cleanup(), 0;
    }
  }
}

static uint8_t *parse_hex(const char *s, size_t *len) {
  size_t n = strlen(s);
  if (n % 2) return NULL;
  uint8_t *out = malloc(n / 2 + 1);
  for (size_t i = 0; out && i < n / 2; i++) {
    unsigned v;
    if (!isxdigit((unsigned char)s[2 * i]) || !isxdigit((unsigned char)s[2 * i + 1]) || sscanf(s + 2 * i, "%2x", &v) != 1)
      return free(out), NULL;
    out[i] = (uint8_t)v;
  }
  *len = n / 2;
  return out;
}

static int usage(const char *why) {
  fprintf(stderr,
          "c-subscriber: %s\n"
          "usage: c-subscriber --socket PATH --space NAME [--name NAME] [--expect-gpa ADDR --expect-len N --expect-hex HEX]\n"
          "                    [--write-gpa ADDR --write-hex HEX] [--exit-after-gen N] [--nack-region NAME]\n"
          "                    [--token-file PATH]   (present the space's token: feature AUTH)\n"
          "       c-subscriber --decode-hex HEX     (validate one frame, print it as JSON)\n"
          "       c-subscriber --encode hello|attach|ack|nack   (print a sample frame as hex)\n",
          why);
  return 64;
}

/** Sends the frame in `hex` (with as many /dev/null descriptors as its header declares) through a
 *  socketpair into the real receive path, which validates it and prints it as JSON. */
static int decode_hex(const char *hex) {
  size_t len;
  uint8_t *bytes = parse_hex(hex, &len);
  if (!bytes || len == 0 || len > 65536) return free(bytes), usage("--decode-hex wants 1..65536 bytes of hex");
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv)) return perror("socketpair"), free(bytes), 1;
  int nfds = len >= HEADER_SIZE ? (bytes[4] | bytes[5] << 8) : 0, fds[SCM_MAX_FD];
  if (nfds > SCM_MAX_FD) nfds = SCM_MAX_FD;
  for (int i = 0; i < nfds; i++) fds[i] = open("/dev/null", O_RDONLY | O_CLOEXEC);
  union {
    struct cmsghdr h;
    char b[CMSG_SPACE(SCM_MAX_FD * sizeof(int))];
  } cb;
  struct iovec iov = {bytes, len};
  struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
  if (nfds) {
    mh.msg_control = cb.b, mh.msg_controllen = CMSG_SPACE(nfds * sizeof(int));
    struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
    cm->cmsg_level = SOL_SOCKET, cm->cmsg_type = SCM_RIGHTS, cm->cmsg_len = CMSG_LEN(nfds * sizeof(int));
    memcpy(CMSG_DATA(cm), fds, nfds * sizeof(int));
  }
  ssize_t n = sendmsg(sv[0], &mh, MSG_NOSIGNAL);
  close_fds(fds, nfds); // in flight now: the receiver owns its copies
  close(sv[0]);
  free(bytes);
  if (n != (ssize_t)len) return perror("sendmsg"), close(sv[1]), 1;
  decode_mode = true;
  g_conn.fd = sv[1], g_conn.max_frame = DEFAULT_MAX_FRAME, g_conn.max_fds = DEFAULT_MAX_FDS;
  return run(-1);
}

static int encode_sample(const char *name) {
  struct frame_out f;
  if (!strcmp(name, "hello")) f = encode_hello(1, 1, 1, "vhost-blk0");
  else if (!strcmp(name, "attach")) f = encode_attach(3, "vm0", "subscriber", "c-subscriber", NULL);
  else if (!strcmp(name, "ack")) f = encode_ack(12);
  else if (!strcmp(name, "nack")) f = encode_nack(13, "MMB_ERR_MAP_FAILED", "ENOMEM", "cannot map region \"dimm0\"");
  else return usage("--encode takes hello, attach, ack or nack");
  for (size_t i = 0; i < f.len; i++) printf("%02x", f.data[i]);
  putchar('\n');
  free(f.data);
  return 0;
}

/** The first line of a token file (trailing whitespace removed), or NULL. Kept until exit. */
static const char *read_token(const char *path) {
  static char buf[258];
  FILE *f = fopen(path, "re");
  if (!f) return NULL;
  bool ok = fgets(buf, sizeof buf, f) != NULL;
  fclose(f);
  if (!ok) return NULL;
  size_t n = strlen(buf);
  while (n && isspace((unsigned char)buf[n - 1])) buf[--n] = 0;
  return n >= 16 && n <= 255 ? buf : NULL;
}

static bool parse_u64(const char *s, uint64_t *out) {
  char *end;
  errno = 0;
  *out = strtoull(s, &end, 0);
  return *s && *s != '-' && !*end && !errno;
}

int main(int argc, char **argv) {
  uint64_t expect_len = 0;
  const char *expect_hex = NULL, *write_hex = NULL;
  bool have_expect_len = false, have_expect_gpa = false;
  g_page = sysconf(_SC_PAGESIZE);
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (!strcmp(a, "--help")) return usage("help"), 0;
    if (!v) return usage("missing value");
    i++;
    if (!strcmp(a, "--decode-hex")) return decode_hex(v);
    if (!strcmp(a, "--encode")) return encode_sample(v);
    if (!strcmp(a, "--socket")) opt_.socket = v;
    else if (!strcmp(a, "--space")) opt_.space = v;
    else if (!strcmp(a, "--name")) opt_.name = v;
    else if (!strcmp(a, "--nack-region")) opt_.nack_region = v;
    else if (!strcmp(a, "--token-file")) {
      if (!(opt_.token = read_token(v))) return usage("--token-file: cannot read a token of 16..255 characters from it");
    }
    else if (!strcmp(a, "--expect-hex")) expect_hex = v;
    else if (!strcmp(a, "--write-hex")) write_hex = v;
    else if (!strcmp(a, "--expect-gpa") && parse_u64(v, &opt_.expect_gpa)) have_expect_gpa = true;
    else if (!strcmp(a, "--expect-len") && parse_u64(v, &expect_len)) have_expect_len = true;
    else if (!strcmp(a, "--write-gpa") && parse_u64(v, &opt_.write_gpa)) opt_.have_write = true;
    else if (!strcmp(a, "--exit-after-gen") && parse_u64(v, &opt_.exit_gen)) opt_.have_exit_gen = true;
    else return usage(a);
  }
  if (!opt_.socket || !opt_.space) return usage("--socket and --space are required");
  if (strlen(opt_.space) < 1 || strlen(opt_.space) > NAME_MAX_BYTES || (opt_.name && (!*opt_.name || strlen(opt_.name) > NAME_MAX_BYTES)))
    return usage("names are 1..64 bytes");
  if (have_expect_gpa || have_expect_len || expect_hex) {
    if (!have_expect_gpa || !have_expect_len || !expect_hex) return usage("--expect-gpa, --expect-len and --expect-hex go together");
    if (!(opt_.expect = parse_hex(expect_hex, &opt_.expect_len)) || opt_.expect_len != expect_len || !expect_len)
      return usage("--expect-hex must be --expect-len bytes of hex");
    opt_.have_expect = true;
  }
  if (opt_.have_write != (write_hex != NULL)) return usage("--write-gpa and --write-hex go together");
  if (write_hex && (!(opt_.write = parse_hex(write_hex, &opt_.write_len)) || !opt_.write_len)) return usage("bad --write-hex");

  // SIGTERM / SIGINT end the program cleanly through the poll loop.
  sigset_t ss;
  sigemptyset(&ss);
  sigaddset(&ss, SIGTERM);
  sigaddset(&ss, SIGINT);
  sigprocmask(SIG_BLOCK, &ss, NULL);
  int sigfd = signalfd(-1, &ss, SFD_CLOEXEC);

  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  if (strlen(opt_.socket) >= sizeof sa.sun_path) return usage("socket path too long");
  strcpy(sa.sun_path, opt_.socket);
  g_conn.fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (g_conn.fd < 0 || connect(g_conn.fd, (struct sockaddr *)&sa, sizeof sa)) {
    fprintf(stderr, "c-subscriber: cannot connect to %s: %s\n", opt_.socket, strerror(errno));
    return cleanup(), 1;
  }
  g_conn.max_frame = DEFAULT_MAX_FRAME, g_conn.max_fds = DEFAULT_MAX_FDS; // until the HELLO reply says
  say("connected socket=%s pid=%d", opt_.socket, (int)getpid());
  int status = send_frame(encode_hello(REQ_HELLO, PROTOCOL_VERSION, wanted_features(), opt_.name)) ? run(sigfd) : (cleanup(), 1);
  close(sigfd);
  free(opt_.expect), free(opt_.write);
  return status;
}
