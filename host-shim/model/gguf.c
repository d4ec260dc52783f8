/*
 * gguf.c -- a strict GGUF v2/v3 reader (contract in gguf.h).
 *
 * The file is parsed once, front to back, through a cursor whose every read
 * is checked against the bytes left; a count is compared with the smallest
 * number of bytes its items could occupy before anything is allocated for
 * it, and tables grow with what was actually parsed, so a corrupt count
 * costs an error message, not memory. After parsing, nothing reads the
 * file except through offsets that were validated here: the getters are
 * plain lookups.
 */
#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "errmsg.h"
#include "gguf.h"
#include "kvck.h"

#define HEADER_BYTES 24 /* magic, version, tensor count, kv count */
#define DEFAULT_ALIGNMENT 32
#define KEY_MAX_BYTES 65535 /* the spec's limit on key length */
#define NAME_MAX_BYTES 64   /* the spec's limit on tensor name length */
#define MAX_DIMS 4
/* Smallest encodings, used to bound counts by the bytes left:
 * a KV is key length (8) + one key byte + value type (4) + a 1-byte value;
 * a tensor info is name length (8) + one name byte + n_dims (4) + one dim (8)
 * + type (4) + offset (8); a string is its 8-byte length. */
#define KV_MIN_BYTES 14u
#define TINFO_MIN_BYTES 33u
#define STR_MIN_BYTES 8u

typedef struct kv {
    const char *key; /* into the file, key_len bytes, no NUL inside */
    size_t key_len;
    size_t key_pos;      /* byte offset of the key, for messages */
    uint32_t type;       /* KVCH_GGUF_* */
    uint32_t elem_type;  /* arrays: element type */
    uint64_t n;          /* string: length; array: element count */
    const uint8_t *val;  /* scalar bytes, string bytes, or first array element */
    uint64_t *str_off;   /* string arrays: file offset of each element's bytes */
} kv;

typedef struct tensor {
    kvch_gguf_tensor pub;
    uint64_t offset;   /* relative to the data section */
    size_t info_pos;   /* byte offset of the tensor info, for messages */
    size_t name_len;
    char name[NAME_MAX_BYTES + 1];
} tensor;

struct kvch_gguf {
    const uint8_t *base;
    size_t size;
    void *map; /* our mapping (kvch_gguf_open), NULL over a caller's buffer */
    uint32_t version;
    uint64_t alignment;
    kv *kvs;
    size_t n_kv, cap_kv;
    tensor *tensors;
    size_t n_tensors, cap_tensors;
    /* Open-addressing hash tables: slot = index + 1, 0 = empty. */
    size_t *kv_slots, kv_mask;
    size_t *t_slots, t_mask;
};

/* Parsing cursor. */
typedef struct ctx {
    const uint8_t *p;
    size_t size, pos;
    char *err;
    size_t err_size;
    kvc_status st;
} ctx;

static int fail(ctx *c, kvc_status st, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(ctx *c, kvc_status st, const char *fmt, ...)
{
    c->st = st;
    if (c->err && c->err_size) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(c->err, c->err_size, fmt, ap);
        va_end(ap);
    }
    return -1;
}

/* A printable copy of file bytes for messages: a corrupt key may hold
 * anything, and a terminal should not receive it raw. */
static const char *san(char *buf, size_t cap, const void *s, size_t n)
{
    const unsigned char *b = s;
    size_t o = 0, lim = cap - 4;
    for (size_t i = 0; i < n && o < lim; i++)
        buf[o++] = (b[i] >= 0x20 && b[i] < 0x7f) ? (char)b[i] : '?';
    if (o < n && o == lim)
        buf[o++] = '.', buf[o++] = '.', buf[o++] = '.';
    buf[o] = '\0';
    return buf;
}

static uint32_t le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t le64(const uint8_t *p) { return (uint64_t)le32(p) | (uint64_t)le32(p + 4) << 32; }

static size_t left(const ctx *c) { return c->size - c->pos; }

static int rd_u32(ctx *c, const char *what, uint32_t *v)
{
    if (left(c) < 4)
        return fail(c, KVC_E_CORRUPT, "truncated: %s at byte %zu needs 4 bytes, %zu left", what,
                    c->pos, left(c));
    *v = le32(c->p + c->pos);
    c->pos += 4;
    return 0;
}

static int rd_u64(ctx *c, const char *what, uint64_t *v)
{
    if (left(c) < 8)
        return fail(c, KVC_E_CORRUPT, "truncated: %s at byte %zu needs 8 bytes, %zu left", what,
                    c->pos, left(c));
    *v = le64(c->p + c->pos);
    c->pos += 8;
    return 0;
}

/* A GGUF string: u64 length, then that many bytes (no NUL). */
static int rd_str(ctx *c, const char *what, const uint8_t **s, size_t *len)
{
    size_t at = c->pos;
    uint64_t n = 0;
    if (rd_u64(c, what, &n))
        return -1;
    if (n > left(c))
        return fail(c, KVC_E_CORRUPT,
                    "%s at byte %zu: string length %llu exceeds the %zu bytes left in the file",
                    what, at, (unsigned long long)n, left(c));
    *s = c->p + c->pos;
    *len = (size_t)n;
    c->pos += (size_t)n;
    return 0;
}

/* Bytes of a scalar value type; 0 for string, array and unknown types. */
static size_t scalar_size(uint32_t t)
{
    switch (t) {
    case KVCH_GGUF_UINT8: case KVCH_GGUF_INT8: case KVCH_GGUF_BOOL: return 1;
    case KVCH_GGUF_UINT16: case KVCH_GGUF_INT16: return 2;
    case KVCH_GGUF_UINT32: case KVCH_GGUF_INT32: case KVCH_GGUF_FLOAT32: return 4;
    case KVCH_GGUF_UINT64: case KVCH_GGUF_INT64: case KVCH_GGUF_FLOAT64: return 8;
    default: return 0;
    }
}

/* Grows *arr (elements of `elem` bytes) to hold at least `need`, doubling,
 * never beyond `max` (the count the header announced). */
static int grow(void **arr, size_t *cap, size_t need, size_t elem, size_t max)
{
    if (need <= *cap)
        return 0;
    size_t nc = *cap ? *cap * 2 : 16;
    if (nc > max)
        nc = max;
    if (nc < need)
        nc = need;
    void *p = realloc(*arr, nc * elem);
    if (!p)
        return -1;
    *arr = p;
    *cap = nc;
    return 0;
}

/* ---- hashing of keys and tensor names ---------------------------------- */

static uint64_t fnv1a(const char *s, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)s[i]) * 1099511628211ull;
    return h;
}

static void kv_name(const kvch_gguf *g, size_t i, const char **s, size_t *n)
{
    *s = g->kvs[i].key;
    *n = g->kvs[i].key_len;
}
static void t_name(const kvch_gguf *g, size_t i, const char **s, size_t *n)
{
    *s = g->tensors[i].name;
    *n = g->tensors[i].name_len;
}

typedef void (*name_fn)(const kvch_gguf *, size_t, const char **, size_t *);

/* The slot holding name s, or the empty slot where it would go. */
static size_t hx_slot(const kvch_gguf *g, const size_t *slots, size_t mask, name_fn nf,
                      const char *s, size_t n)
{
    size_t h = (size_t)fnv1a(s, n) & mask;
    for (; slots[h]; h = (h + 1) & mask) {
        const char *o;
        size_t on;
        nf(g, slots[h] - 1, &o, &on);
        if (on == n && memcmp(o, s, n) == 0)
            break;
    }
    return h;
}

static size_t hx_find(const kvch_gguf *g, const size_t *slots, size_t mask, name_fn nf,
                      const char *s, size_t n)
{
    if (!slots)
        return SIZE_MAX;
    size_t h = hx_slot(g, slots, mask, nf, s, n);
    return slots[h] ? slots[h] - 1 : SIZE_MAX;
}

/* Builds the table over `count` entries (load <= 1/2). Returns -1 on
 * allocation failure, else 0 with *dup = the index of the first entry
 * whose name repeats an earlier one, SIZE_MAX when none does. */
static int hx_build(const kvch_gguf *g, size_t count, name_fn nf, size_t **slots, size_t *mask,
                    size_t *dup)
{
    size_t cap = 8;
    while (cap < 2 * count)
        cap *= 2;
    if (!(*slots = calloc(cap, sizeof **slots)))
        return -1;
    *mask = cap - 1;
    *dup = SIZE_MAX;
    for (size_t i = 0; i < count; i++) {
        const char *s;
        size_t n;
        nf(g, i, &s, &n);
        size_t h = hx_slot(g, *slots, *mask, nf, s, n);
        if ((*slots)[h]) {
            *dup = i;
            return 0;
        }
        (*slots)[h] = i + 1;
    }
    return 0;
}

/* ---- metadata ------------------------------------------------------------ */

/* Checks that `n` bytes holding bool values are all 0 or 1. */
static int check_bools(ctx *c, const uint8_t *b, uint64_t n, const char *key)
{
    for (uint64_t i = 0; i < n; i++)
        if (b[i] > 1)
            return fail(c, KVC_E_CORRUPT, "key '%s': bool value %u at byte %zu is not 0 or 1", key,
                        b[i], (size_t)(b + i - c->p));
    return 0;
}

static int parse_array(ctx *c, kv *e, const char *key)
{
    size_t at = c->pos;
    if (rd_u32(c, "array element type", &e->elem_type) || rd_u64(c, "array length", &e->n))
        return -1;
    if (e->elem_type == KVCH_GGUF_ARRAY)
        /* Allowed by the spec, used by no model: refused rather than half-handled. */
        return fail(c, KVC_E_UNSUPPORTED, "key '%s': nested array at byte %zu is not supported",
                    key, at);
    e->val = c->p + c->pos;
    if (e->elem_type == KVCH_GGUF_STRING) {
        if (e->n > left(c) / STR_MIN_BYTES)
            return fail(c, KVC_E_CORRUPT,
                        "key '%s': array length %llu at byte %zu: that many strings cannot fit in "
                        "the %zu bytes left", key, (unsigned long long)e->n, at + 4, left(c));
        /* Validate every length first, then allocate the index: a corrupt
         * array fails without costing memory. */
        size_t start = c->pos;
        for (uint64_t i = 0; i < e->n; i++) {
            const uint8_t *s;
            size_t len;
            if (rd_str(c, "string array element", &s, &len))
                return -1;
        }
        if (e->n) {
            e->str_off = malloc((size_t)e->n * sizeof *e->str_off);
            if (!e->str_off)
                return fail(c, KVC_E_NOMEM, "key '%s': no memory for an index of %llu strings",
                            key, (unsigned long long)e->n);
        }
        for (size_t i = 0, p = start; i < e->n; i++) {
            e->str_off[i] = p + 8;
            p += 8 + (size_t)le64(c->p + p);
        }
        return 0;
    }
    size_t es = scalar_size(e->elem_type);
    if (!es)
        return fail(c, KVC_E_CORRUPT, "key '%s': unknown array element type %u at byte %zu", key,
                    e->elem_type, at);
    if (e->n > left(c) / es)
        return fail(c, KVC_E_CORRUPT,
                    "key '%s': array length %llu at byte %zu: %llu elements of %zu bytes exceed "
                    "the %zu bytes left", key, (unsigned long long)e->n, at + 4,
                    (unsigned long long)e->n, es, left(c));
    if (e->elem_type == KVCH_GGUF_BOOL && check_bools(c, e->val, e->n, key))
        return -1;
    c->pos += (size_t)e->n * es;
    return 0;
}

static int parse_kv(ctx *c, kv *e)
{
    char kb[80];
    const uint8_t *k;
    size_t klen;
    *e = (kv){.key_pos = c->pos};
    if (rd_str(c, "metadata key", &k, &klen))
        return -1;
    if (klen == 0)
        return fail(c, KVC_E_CORRUPT, "empty metadata key at byte %zu", e->key_pos);
    if (klen > KEY_MAX_BYTES)
        return fail(c, KVC_E_CORRUPT, "metadata key at byte %zu is %zu bytes long (at most %d)",
                    e->key_pos, klen, KEY_MAX_BYTES);
    if (memchr(k, 0, klen))
        return fail(c, KVC_E_CORRUPT, "metadata key at byte %zu contains a NUL byte", e->key_pos);
    e->key = (const char *)k;
    e->key_len = klen;
    san(kb, sizeof kb, k, klen);

    size_t at = c->pos;
    if (rd_u32(c, "value type", &e->type))
        return -1;
    if (e->type == KVCH_GGUF_STRING) {
        const uint8_t *s;
        size_t len;
        if (rd_str(c, "string value", &s, &len))
            return -1;
        e->val = s;
        e->n = len;
        return 0;
    }
    if (e->type == KVCH_GGUF_ARRAY)
        return parse_array(c, e, kb);
    size_t sz = scalar_size(e->type);
    if (!sz)
        return fail(c, KVC_E_CORRUPT, "key '%s': unknown value type %u at byte %zu", kb, e->type,
                    at);
    if (left(c) < sz)
        return fail(c, KVC_E_CORRUPT, "truncated: value of key '%s' at byte %zu needs %zu bytes, "
                    "%zu left", kb, c->pos, sz, left(c));
    e->val = c->p + c->pos;
    e->n = 1;
    if (e->type == KVCH_GGUF_BOOL && check_bools(c, e->val, 1, kb))
        return -1;
    c->pos += sz;
    return 0;
}

/* ---- tensors ------------------------------------------------------------ */

static int parse_tensor(ctx *c, tensor *t, size_t idx, size_t count)
{
    t->info_pos = c->pos;
    const uint8_t *s;
    size_t len;
    if (rd_str(c, "tensor name", &s, &len))
        return -1;
    if (len == 0 || len > NAME_MAX_BYTES || memchr(s, 0, len)) {
        char nb[80];
        return fail(c, KVC_E_CORRUPT,
                    "tensor %zu of %zu at byte %zu: name '%s' (%zu bytes) must be 1..%d bytes "
                    "without NUL", idx, count, t->info_pos, san(nb, sizeof nb, s, len), len,
                    NAME_MAX_BYTES);
    }
    memcpy(t->name, s, len);
    t->name[len] = '\0';
    t->name_len = len;
    kvch_gguf_tensor *p = &t->pub;
    p->name = t->name; /* re-pointed after the array stops moving */

    size_t at = c->pos;
    if (rd_u32(c, "tensor n_dims", &p->n_dims))
        return -1;
    if (p->n_dims < 1 || p->n_dims > MAX_DIMS)
        return fail(c, KVC_E_CORRUPT, "tensor '%s': n_dims %u at byte %zu is not in 1..%d",
                    t->name, p->n_dims, at, MAX_DIMS);
    for (uint32_t d = 0; d < MAX_DIMS; d++) {
        p->ne[d] = 1;
        if (d >= p->n_dims)
            continue;
        at = c->pos;
        if (rd_u64(c, "tensor dimension", &p->ne[d]))
            return -1;
        /* ggml holds dims in int64_t. */
        if (p->ne[d] == 0 || p->ne[d] > (uint64_t)INT64_MAX)
            return fail(c, KVC_E_CORRUPT, "tensor '%s': dimension %u at byte %zu is %llu",
                        t->name, d, at, (unsigned long long)p->ne[d]);
    }
    at = c->pos;
    if (rd_u32(c, "tensor type", &p->type))
        return -1;
    size_t be = kvck_ggml_block_elems(p->type), bb = kvck_ggml_block_bytes(p->type);
    if (!be || !bb)
        return fail(c, KVC_E_UNSUPPORTED, "tensor '%s': unknown ggml type id %u at byte %zu",
                    t->name, p->type, at);
    if (p->ne[0] % be)
        return fail(c, KVC_E_CORRUPT,
                    "tensor '%s' (info at byte %zu): ne[0] = %llu is not a multiple of the %zu "
                    "elements of a %s block", t->name, t->info_pos, (unsigned long long)p->ne[0],
                    be, kvck_ggml_type_name(p->type));
    uint64_t n = 1;
    for (uint32_t d = 0; d < p->n_dims; d++) {
        if (n > (uint64_t)INT64_MAX / p->ne[d])
            return fail(c, KVC_E_CORRUPT,
                        "tensor '%s' (info at byte %zu): element count overflows at dimension %u",
                        t->name, t->info_pos, d);
        n *= p->ne[d];
    }
    p->n_elements = n;
    uint64_t blocks = n / be;
    if (blocks > UINT64_MAX / bb)
        return fail(c, KVC_E_CORRUPT, "tensor '%s' (info at byte %zu): byte size overflows",
                    t->name, t->info_pos);
    p->n_bytes = blocks * bb;
    if (rd_u64(c, "tensor data offset", &t->offset))
        return -1;
    return 0;
}

typedef struct span {
    uint64_t start, end;
    size_t idx;
} span;

static int span_cmp(const void *a, const void *b)
{
    const span *x = a, *y = b;
    return x->start < y->start ? -1 : x->start > y->start;
}

/* Places every tensor in the data section: aligned, inside the file,
 * disjoint from every other. */
static int place_tensors(ctx *c, kvch_gguf *g)
{
    if (!g->n_tensors)
        return 0;
    uint64_t a = g->alignment;
    uint64_t data_start = ((uint64_t)c->pos + a - 1) / a * a; /* pos <= size: no overflow */
    if (data_start > c->size)
        return fail(c, KVC_E_CORRUPT,
                    "truncated: the tensor data section starts at byte %llu (alignment %llu) but "
                    "the file has %zu bytes", (unsigned long long)data_start,
                    (unsigned long long)a, c->size);
    uint64_t room = c->size - data_start;
    span *sp = malloc(g->n_tensors * sizeof *sp);
    if (!sp)
        return fail(c, KVC_E_NOMEM, "no memory for %zu tensor spans", g->n_tensors);
    for (size_t i = 0; i < g->n_tensors; i++) {
        tensor *t = &g->tensors[i];
        if (t->offset % a) {
            free(sp);
            return fail(c, KVC_E_CORRUPT,
                        "tensor '%s' (info at byte %zu): data offset %llu is not a multiple of "
                        "the alignment %llu", t->name, t->info_pos,
                        (unsigned long long)t->offset, (unsigned long long)a);
        }
        if (t->offset > room || t->pub.n_bytes > room - t->offset) {
            free(sp);
            return fail(c, KVC_E_CORRUPT,
                        "tensor '%s' (info at byte %zu): %llu bytes at data offset %llu (the "
                        "data section starts at byte %llu) run past the end of the file (%zu "
                        "bytes)", t->name, t->info_pos, (unsigned long long)t->pub.n_bytes,
                        (unsigned long long)t->offset, (unsigned long long)data_start, c->size);
        }
        t->pub.data = c->p + data_start + t->offset;
        sp[i] = (span){t->offset, t->offset + t->pub.n_bytes, i};
    }
    qsort(sp, g->n_tensors, sizeof *sp, span_cmp);
    for (size_t i = 1; i < g->n_tensors; i++) {
        if (sp[i].start < sp[i - 1].end) {
            const tensor *x = &g->tensors[sp[i - 1].idx], *y = &g->tensors[sp[i].idx];
            int r = fail(c, KVC_E_CORRUPT,
                         "tensors '%s' and '%s' overlap: data bytes [%llu, %llu) and [%llu, %llu)",
                         x->name, y->name, (unsigned long long)(data_start + sp[i - 1].start),
                         (unsigned long long)(data_start + sp[i - 1].end),
                         (unsigned long long)(data_start + sp[i].start),
                         (unsigned long long)(data_start + sp[i].end));
            free(sp);
            return r;
        }
    }
    free(sp);
    return 0;
}

/* ---- the whole file ----------------------------------------------------- */

static int parse(ctx *c, kvch_gguf *g)
{
    if (c->size >= 4 && memcmp(c->p, "GGUF", 4) != 0)
        return fail(c, KVC_E_CORRUPT,
                    "bad magic at byte 0: %02x %02x %02x %02x, expected \"GGUF\" (47 47 55 46)",
                    c->p[0], c->p[1], c->p[2], c->p[3]);
    if (c->size < HEADER_BYTES)
        return fail(c, KVC_E_CORRUPT, "file too small: %zu bytes, the GGUF header alone is %d",
                    c->size, HEADER_BYTES);
    c->pos = 4;
    uint32_t v;
    rd_u32(c, "version", &v);
    if (v == 1)
        return fail(c, KVC_E_VERSION, "GGUF version 1 at byte 4 (32-bit counts) is not supported; "
                    "convert the model again to v3");
    if (v == 0x02000000u || v == 0x03000000u)
        return fail(c, KVC_E_VERSION, "version at byte 4 reads 0x%08x: a big-endian GGUF file; "
                    "only little-endian files are supported", v);
    if (v != 2 && v != 3)
        return fail(c, KVC_E_VERSION, "unsupported GGUF version %u at byte 4 (2 and 3 are read)", v);
    g->version = v;
    uint64_t nt, nkv;
    rd_u64(c, "tensor count", &nt);
    rd_u64(c, "metadata count", &nkv);
    size_t room = left(c);
    if (nt > room / TINFO_MIN_BYTES)
        return fail(c, KVC_E_CORRUPT, "tensor count %llu at byte 8 is impossible: the %zu bytes "
                    "left hold at most %zu tensor infos", (unsigned long long)nt, room,
                    room / TINFO_MIN_BYTES);
    if (nkv > room / KV_MIN_BYTES || nkv * KV_MIN_BYTES + nt * TINFO_MIN_BYTES > room)
        return fail(c, KVC_E_CORRUPT, "metadata count %llu at byte 16 is impossible: with %llu "
                    "tensors, the %zu bytes left cannot hold that many key-value pairs",
                    (unsigned long long)nkv, (unsigned long long)nt, room);

    for (size_t i = 0; i < nkv; i++) {
        if (grow((void **)&g->kvs, &g->cap_kv, i + 1, sizeof *g->kvs, (size_t)nkv))
            return fail(c, KVC_E_NOMEM, "no memory for %zu metadata entries", i + 1);
        int r = parse_kv(c, &g->kvs[i]);
        g->n_kv = i + 1; /* counted even on failure: close frees its index */
        if (r)
            return -1;
    }
    size_t dup;
    if (hx_build(g, g->n_kv, kv_name, &g->kv_slots, &g->kv_mask, &dup))
        return fail(c, KVC_E_NOMEM, "no memory for the metadata index");
    if (dup != SIZE_MAX) {
        char kb[80];
        const kv *e = &g->kvs[dup];
        size_t first = hx_find(g, g->kv_slots, g->kv_mask, kv_name, e->key, e->key_len);
        return fail(c, KVC_E_CORRUPT, "duplicate metadata key '%s' at byte %zu (first at byte %zu)",
                    san(kb, sizeof kb, e->key, e->key_len), e->key_pos, g->kvs[first].key_pos);
    }

    g->alignment = DEFAULT_ALIGNMENT;
    size_t ai = hx_find(g, g->kv_slots, g->kv_mask, kv_name, "general.alignment", 17);
    if (ai != SIZE_MAX) {
        const kv *e = &g->kvs[ai];
        if (e->type != KVCH_GGUF_UINT32)
            return fail(c, KVC_E_CORRUPT, "general.alignment (key at byte %zu) has value type %u, "
                        "expected uint32 (4)", e->key_pos, e->type);
        uint32_t a = le32(e->val);
        if (a == 0 || (a & (a - 1)))
            return fail(c, KVC_E_CORRUPT, "general.alignment (key at byte %zu) is %u, not a "
                        "nonzero power of two", e->key_pos, a);
        g->alignment = a;
    }

    for (size_t i = 0; i < nt; i++) {
        if (grow((void **)&g->tensors, &g->cap_tensors, i + 1, sizeof *g->tensors, (size_t)nt))
            return fail(c, KVC_E_NOMEM, "no memory for %zu tensor infos", i + 1);
        if (parse_tensor(c, &g->tensors[i], i, (size_t)nt))
            return -1;
        g->n_tensors = i + 1;
    }
    for (size_t i = 0; i < g->n_tensors; i++)
        g->tensors[i].pub.name = g->tensors[i].name;
    if (hx_build(g, g->n_tensors, t_name, &g->t_slots, &g->t_mask, &dup))
        return fail(c, KVC_E_NOMEM, "no memory for the tensor index");
    if (dup != SIZE_MAX) {
        const tensor *t = &g->tensors[dup];
        size_t first = hx_find(g, g->t_slots, g->t_mask, t_name, t->name, t->name_len);
        return fail(c, KVC_E_CORRUPT, "duplicate tensor name '%s': infos at byte %zu and %zu",
                    t->name, g->tensors[first].info_pos, t->info_pos);
    }
    return place_tensors(c, g);
}

void kvch_gguf_close(kvch_gguf *g)
{
    if (!g)
        return;
    for (size_t i = 0; i < g->n_kv; i++)
        free(g->kvs[i].str_off);
    free(g->kvs);
    free(g->tensors);
    free(g->kv_slots);
    free(g->t_slots);
    if (g->map)
        munmap(g->map, g->size);
    free(g);
}

/* Parses p[0..size); on success *out owns `map` (may be NULL). On failure
 * the caller still owns `map`. */
static kvc_status open_impl(const void *p, size_t size, void *map, kvch_gguf **out, char *err,
                            size_t err_size)
{
    kvch_gguf *g = calloc(1, sizeof *g);
    if (!g) {
        kvch_set_err(err, err_size, "no memory for a GGUF reader");
        return KVC_E_NOMEM;
    }
    g->base = p;
    g->size = size;
    ctx c = {.p = p, .size = size, .pos = 0, .err = err, .err_size = err_size, .st = KVC_OK};
    if (parse(&c, g)) {
        kvch_gguf_close(g); /* map is NULL in g: the caller unmaps */
        return c.st;
    }
    g->map = map;
    *out = g;
    return KVC_OK;
}

kvc_status kvch_gguf_open_memory(const void *data, size_t size, kvch_gguf **out, char *err,
                                 size_t err_size)
{
    static const uint8_t empty[1];
    if (!out || (!data && size)) {
        kvch_set_err(err, err_size, "kvch_gguf_open_memory: NULL %s", out ? "data" : "out");
        return KVC_E_INVALID;
    }
    return open_impl(data ? data : empty, size, NULL, out, err, err_size);
}

kvc_status kvch_gguf_open(const char *path, kvch_gguf **out, char *err, size_t err_size)
{
    if (!path || !out) {
        kvch_set_err(err, err_size, "kvch_gguf_open: NULL %s", path ? "out" : "path");
        return KVC_E_INVALID;
    }
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        kvch_set_err(err, err_size, "%s: cannot open: %s", path, strerror(e));
        return KVC_E_INVALID;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        kvch_set_err(err, err_size, "%s: fstat failed: %s", path, strerror(e));
        close(fd);
        return KVC_E_INTERNAL;
    }
    if (!S_ISREG(st.st_mode)) {
        kvch_set_err(err, err_size, "%s: not a regular file", path);
        close(fd);
        return KVC_E_INVALID;
    }
    if ((uint64_t)st.st_size > SIZE_MAX) {
        kvch_set_err(err, err_size, "%s: %lld bytes do not fit in the address space", path,
                (long long)st.st_size);
        close(fd);
        return KVC_E_UNSUPPORTED;
    }
    size_t size = (size_t)st.st_size;
    void *map = NULL;
    if (size) { /* mmap refuses length 0; an empty file fails in parse */
        map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (map == MAP_FAILED) {
            int e = errno;
            kvch_set_err(err, err_size, "%s: mmap of %zu bytes failed: %s", path, size, strerror(e));
            close(fd);
            return e == ENOMEM ? KVC_E_NOMEM : KVC_E_INTERNAL;
        }
    }
    close(fd); /* the mapping keeps the file */
    char msg[512];
    msg[0] = '\0';
    static const uint8_t empty[1];
    kvc_status s = open_impl(map ? map : empty, size, map, out, msg, sizeof msg);
    if (s != KVC_OK) {
        if (map)
            munmap(map, size);
        kvch_set_err(err, err_size, "%s: %s", path, msg);
    }
    return s;
}

uint32_t kvch_gguf_version(const kvch_gguf *g) { return g ? g->version : 0; }

/* ---- metadata getters --------------------------------------------------- */

static const kv *find(const kvch_gguf *g, const char *key)
{
    if (!g || !key)
        return NULL;
    size_t i = hx_find(g, g->kv_slots, g->kv_mask, kv_name, key, strlen(key));
    return i == SIZE_MAX ? NULL : &g->kvs[i];
}

/* A value of any GGUF integer type at p into *v; -1 for a non-integer type
 * or a uint64 above INT64_MAX (which fits none of the integer getters). */
static int read_int(uint32_t type, const uint8_t *p, int64_t *v)
{
    switch (type) {
    case KVCH_GGUF_UINT8: *v = p[0]; return 0;
    case KVCH_GGUF_INT8: *v = (int8_t)p[0]; return 0;
    case KVCH_GGUF_UINT16: *v = (uint16_t)(p[0] | p[1] << 8); return 0;
    case KVCH_GGUF_INT16: *v = (int16_t)(uint16_t)(p[0] | p[1] << 8); return 0;
    case KVCH_GGUF_UINT32: *v = le32(p); return 0;
    case KVCH_GGUF_INT32: *v = (int32_t)le32(p); return 0;
    case KVCH_GGUF_INT64: *v = (int64_t)le64(p); return 0;
    case KVCH_GGUF_UINT64:
        if (le64(p) > (uint64_t)INT64_MAX)
            return -1;
        *v = (int64_t)le64(p);
        return 0;
    default: return -1;
    }
}

/* Any integer or float at p as double. */
static int read_f64(uint32_t type, const uint8_t *p, double *out)
{
    int64_t v;
    if (type == KVCH_GGUF_FLOAT32) {
        uint32_t b = le32(p);
        float f;
        memcpy(&f, &b, 4);
        *out = f;
    } else if (type == KVCH_GGUF_FLOAT64) {
        uint64_t b = le64(p);
        memcpy(out, &b, 8);
    } else if (type == KVCH_GGUF_UINT64) {
        *out = (double)le64(p);
    } else if (read_int(type, p, &v) == 0) {
        *out = (double)v;
    } else {
        return -1;
    }
    return 0;
}

int kvch_gguf_type(const kvch_gguf *g, const char *key)
{
    const kv *e = find(g, key);
    return e ? (int)e->type : -1;
}

int kvch_gguf_get_u32(const kvch_gguf *g, const char *key, uint32_t *out)
{
    const kv *e = find(g, key);
    int64_t v;
    if (!e || !out || read_int(e->type, e->val, &v) || v < 0 || v > (int64_t)UINT32_MAX)
        return -1;
    *out = (uint32_t)v;
    return 0;
}

int kvch_gguf_get_i64(const kvch_gguf *g, const char *key, int64_t *out)
{
    const kv *e = find(g, key);
    return e && out ? read_int(e->type, e->val, out) : -1;
}

int kvch_gguf_get_f32(const kvch_gguf *g, const char *key, float *out)
{
    const kv *e = find(g, key);
    double d;
    if (!e || !out || read_f64(e->type, e->val, &d))
        return -1;
    if (isfinite(d) && fabs(d) > FLT_MAX) /* a float64 beyond float range does not fit */
        return -1;
    *out = (float)d;
    return 0;
}

int kvch_gguf_get_bool(const kvch_gguf *g, const char *key, int *out)
{
    const kv *e = find(g, key);
    if (!e || !out || e->type != KVCH_GGUF_BOOL)
        return -1;
    *out = e->val[0]; /* validated 0 or 1 at open */
    return 0;
}

const char *kvch_gguf_get_str(const kvch_gguf *g, const char *key, size_t *len)
{
    const kv *e = find(g, key);
    if (!e || e->type != KVCH_GGUF_STRING)
        return NULL;
    if (len)
        *len = (size_t)e->n;
    return (const char *)e->val;
}

int kvch_gguf_get_arr(const kvch_gguf *g, const char *key, int *elem_type, uint64_t *n)
{
    const kv *e = find(g, key);
    if (!e || e->type != KVCH_GGUF_ARRAY)
        return -1;
    if (elem_type)
        *elem_type = (int)e->elem_type;
    if (n)
        *n = e->n;
    return 0;
}

const char *kvch_gguf_arr_str(const kvch_gguf *g, const char *key, uint64_t i, size_t *len)
{
    const kv *e = find(g, key);
    if (!e || e->type != KVCH_GGUF_ARRAY || e->elem_type != KVCH_GGUF_STRING || i >= e->n)
        return NULL;
    const uint8_t *s = g->base + e->str_off[i];
    if (len)
        *len = (size_t)le64(s - 8); /* the length prefix, validated at open */
    return (const char *)s;
}

/* Element i of a numeric array, or NULL. */
static const uint8_t *arr_elem(const kvch_gguf *g, const char *key, uint64_t i, uint32_t *type)
{
    const kv *e = find(g, key);
    if (!e || e->type != KVCH_GGUF_ARRAY || i >= e->n)
        return NULL;
    size_t es = scalar_size(e->elem_type); /* 0 for strings */
    if (!es)
        return NULL;
    *type = e->elem_type;
    return e->val + (size_t)i * es;
}

int kvch_gguf_arr_i64(const kvch_gguf *g, const char *key, uint64_t i, int64_t *out)
{
    uint32_t type;
    const uint8_t *p = arr_elem(g, key, i, &type);
    return p && out ? read_int(type, p, out) : -1;
}

int kvch_gguf_arr_f64(const kvch_gguf *g, const char *key, uint64_t i, double *out)
{
    uint32_t type;
    const uint8_t *p = arr_elem(g, key, i, &type);
    return p && out ? read_f64(type, p, out) : -1;
}

/* ---- tensor access ------------------------------------------------------- */

uint64_t kvch_gguf_n_tensors(const kvch_gguf *g) { return g ? g->n_tensors : 0; }

const kvch_gguf_tensor *kvch_gguf_tensor_at(const kvch_gguf *g, uint64_t i)
{
    return g && i < g->n_tensors ? &g->tensors[i].pub : NULL;
}

const kvch_gguf_tensor *kvch_gguf_tensor_by_name(const kvch_gguf *g, const char *name)
{
    if (!g || !name)
        return NULL;
    size_t i = hx_find(g, g->t_slots, g->t_mask, t_name, name, strlen(name));
    return i == SIZE_MAX ? NULL : &g->tensors[i].pub;
}

int kvch_gguf_dequantize(const kvch_gguf_tensor *t, float *dst, char *err, size_t err_size)
{
    if (!t || !dst) {
        kvch_set_err(err, err_size, "kvch_gguf_dequantize: NULL %s", t ? "destination" : "tensor");
        return -1;
    }
    if (!kvck_ggml_can_dequantize(t->type)) {
        kvch_set_err(err, err_size, "tensor '%s': type %s (%u) has no dequantizer", t->name,
                kvck_ggml_type_name(t->type), t->type);
        return -1;
    }
    if (t->n_elements > SIZE_MAX ||
        kvck_dequantize(t->type, t->data, dst, (size_t)t->n_elements) != 0) {
        kvch_set_err(err, err_size, "tensor '%s': dequantizing %llu elements of type %s failed",
                t->name, (unsigned long long)t->n_elements, kvck_ggml_type_name(t->type));
        return -1;
    }
    return 0;
}
