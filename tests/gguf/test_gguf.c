/* test_gguf.c -- the GGUF reader on hand-built files (valid, malformed,
 * truncated at every length, randomly corrupted) and on the real SmolLM2
 * file when it is present.
 *
 * Every file handed to kvch_gguf_open_memory is an exactly-sized heap copy,
 * so under ASan a read one byte past the end is a reported error rather
 * than a silent read of the builder's spare capacity. */
#include <check.h>
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "gguf.h"
#include "kvck.h"
#include "model_path.h"

/* ---- a GGUF writer ------------------------------------------------------ */

typedef struct buf {
    uint8_t *p;
    size_t n, cap;
} buf;

static void put(buf *b, const void *s, size_t n)
{
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
        ck_assert_ptr_nonnull(b->p);
    }
    if (n)
        memcpy(b->p + b->n, s, n);
    b->n += n;
}
static void w8(buf *b, uint8_t v) { put(b, &v, 1); }
static void w16(buf *b, uint16_t v) { w8(b, (uint8_t)v), w8(b, (uint8_t)(v >> 8)); }
static void w32(buf *b, uint32_t v) { w16(b, (uint16_t)v), w16(b, (uint16_t)(v >> 16)); }
static void w64(buf *b, uint64_t v) { w32(b, (uint32_t)v), w32(b, (uint32_t)(v >> 32)); }
static void wf32(buf *b, float f) { uint32_t u; memcpy(&u, &f, 4); w32(b, u); }
static void wf64(buf *b, double d) { uint64_t u; memcpy(&u, &d, 8); w64(b, u); }
static void wstr(buf *b, const char *s) { w64(b, strlen(s)), put(b, s, strlen(s)); }
static void pad(buf *b, size_t a) { while (b->n % a) w8(b, 0); }
static void patch32(buf *b, size_t at, uint32_t v) { for (int i = 0; i < 4; i++) b->p[at + i] = (uint8_t)(v >> 8 * i); }
static void patch64(buf *b, size_t at, uint64_t v) { for (int i = 0; i < 8; i++) b->p[at + i] = (uint8_t)(v >> 8 * i); }

static void hdr(buf *b, uint32_t version, uint64_t n_tensors, uint64_t n_kv)
{
    put(b, "GGUF", 4);
    w32(b, version);
    w64(b, n_tensors);
    w64(b, n_kv);
}
static void key(buf *b, const char *k, uint32_t type) { wstr(b, k), w32(b, type); }

/* One tensor info; returns the position of its offset field. */
static size_t tinfo(buf *b, const char *name, uint32_t n_dims, const uint64_t *ne, uint32_t type,
                    uint64_t off)
{
    wstr(b, name);
    w32(b, n_dims);
    for (uint32_t d = 0; d < n_dims; d++)
        w64(b, ne[d]);
    w32(b, type);
    size_t at = b->n;
    w64(b, off);
    return at;
}

/* ---- the valid reference file ------------------------------------------ */

#define NT 4
static const char *const tname[NT] = {"a.f32", "b.f16", "c.q8", "d.q5k"};
static const uint32_t ttype[NT] = {KVCK_GGML_F32, KVCK_GGML_F16, KVCK_GGML_Q8_0, KVCK_GGML_Q5_K};
static const uint32_t tndims[NT] = {2, 1, 2, 1};
static const uint64_t tne[NT][4] = {{3, 2}, {4}, {32, 2}, {256}};
static const uint64_t tbytes[NT] = {24, 8, 68, 176}; /* by hand: 6*4, 4*2, 2*34, 176 */
static const float a_vals[6] = {1, 2, 3, -4, 5.5f, -6};
static const uint16_t b_vals[4] = {0x3c00, 0xc000, 0x3800, 0x0000}; /* 1, -2, 0.5, 0 */
static const float b_want[4] = {1, -2, 0.5f, 0};

typedef struct layout {
    size_t tcount_pos, kvcount_pos, data_start;
    size_t off_pos[NT]; /* each tensor's offset field */
    uint64_t off[NT];
    size_t n_kv;
} layout;

/* Writes the reference file: every scalar type, string/int/float/bool
 * arrays, four tensors. align 0 leaves general.alignment out (default 32).
 * The file ends exactly at the end of the last tensor, so every proper
 * prefix is a truncated file. */
static void build_valid(buf *b, uint32_t align, layout *L)
{
    memset(L, 0, sizeof *L);
    L->n_kv = align ? 17 : 16;
    hdr(b, 3, NT, L->n_kv);
    L->tcount_pos = 8;
    L->kvcount_pos = 16;
    key(b, "t.u8", KVCH_GGUF_UINT8), w8(b, 200);
    key(b, "t.i8", KVCH_GGUF_INT8), w8(b, (uint8_t)-100);
    key(b, "t.u16", KVCH_GGUF_UINT16), w16(b, 60000);
    key(b, "t.i16", KVCH_GGUF_INT16), w16(b, (uint16_t)-30000);
    key(b, "t.u32", KVCH_GGUF_UINT32), w32(b, 4000000000u);
    key(b, "t.i32", KVCH_GGUF_INT32), w32(b, (uint32_t)-2000000000);
    key(b, "t.f32", KVCH_GGUF_FLOAT32), wf32(b, 1.5f);
    key(b, "t.bool", KVCH_GGUF_BOOL), w8(b, 1);
    key(b, "t.str", KVCH_GGUF_STRING), wstr(b, "h\xc3\xa9llo");
    key(b, "t.u64", KVCH_GGUF_UINT64), w64(b, (1ull << 40) + 3);
    key(b, "t.u64big", KVCH_GGUF_UINT64), w64(b, (1ull << 63) + 1);
    key(b, "t.i64", KVCH_GGUF_INT64), w64(b, (uint64_t)-(int64_t)(1ll << 40));
    key(b, "t.f64", KVCH_GGUF_FLOAT64), wf64(b, 0.25);
    key(b, "t.strs", KVCH_GGUF_ARRAY), w32(b, KVCH_GGUF_STRING), w64(b, 3);
    wstr(b, "a"), wstr(b, ""), wstr(b, "<|endoftext|>");
    key(b, "t.ints", KVCH_GGUF_ARRAY), w32(b, KVCH_GGUF_INT32), w64(b, 4);
    w32(b, 1), w32(b, (uint32_t)-2), w32(b, 3), w32(b, (uint32_t)-4);
    key(b, "t.floats", KVCH_GGUF_ARRAY), w32(b, KVCH_GGUF_FLOAT32), w64(b, 2);
    wf32(b, 0.5f), wf32(b, -1.0f);
    if (align)
        key(b, "general.alignment", KVCH_GGUF_UINT32), w32(b, align);
    uint64_t a = align ? align : 32, off = 0;
    for (int i = 0; i < NT; i++) {
        off = (off + a - 1) / a * a;
        L->off[i] = off;
        L->off_pos[i] = tinfo(b, tname[i], tndims[i], tne[i], ttype[i], off);
        off += tbytes[i];
    }
    pad(b, a);
    L->data_start = b->n;
    for (int i = 0; i < NT; i++) {
        while (b->n < L->data_start + L->off[i])
            w8(b, 0xee); /* inter-tensor padding */
        if (i == 0)
            for (int j = 0; j < 6; j++)
                wf32(b, a_vals[j]);
        else if (i == 1)
            for (int j = 0; j < 4; j++)
                w16(b, b_vals[j]);
        else if (i == 2) /* two Q8_0 blocks: d = 0.5 then d = 2, q = j - 16 then 15 - j */
            for (int blk = 0; blk < 2; blk++) {
                w16(b, blk ? 0x4000 : 0x3800);
                for (int j = 0; j < 32; j++)
                    w8(b, (uint8_t)(int8_t)(blk ? 15 - j : j - 16));
            }
        else
            for (uint64_t j = 0; j < tbytes[i]; j++)
                w8(b, 0);
    }
}

/* ---- opening helpers ---------------------------------------------------- */

static kvch_gguf *const SENTINEL = (kvch_gguf *)(uintptr_t)0x6666;

/* Opens an exact heap copy of b; on success closes it again. */
static kvc_status try_open(const uint8_t *p, size_t n, char *err, size_t cap)
{
    uint8_t *copy = malloc(n ? n : 1);
    ck_assert_ptr_nonnull(copy);
    if (n)
        memcpy(copy, p, n);
    kvch_gguf *g = SENTINEL;
    err[0] = '\0';
    kvc_status s = kvch_gguf_open_memory(copy, n, &g, err, cap);
    if (s == KVC_OK) {
        ck_assert_ptr_ne(g, SENTINEL);
        kvch_gguf_close(g);
    } else {
        ck_assert_msg(g == SENTINEL, "*out written on failure");
        ck_assert_msg(err[0] != '\0', "failure (status %d) without a message", (int)s);
    }
    free(copy);
    return s;
}

/* Expects b to fail with status `want` and every word of `words` (NULL
 * terminated) in the message. */
static void expect_fail_v(const buf *b, kvc_status want, const char *const *words)
{
    char err[1024];
    kvc_status s = try_open(b->p, b->n, err, sizeof err);
    ck_assert_msg(s == want, "status %d, expected %d; message: %s", (int)s, (int)want, err);
    for (; *words; words++)
        ck_assert_msg(strstr(err, *words), "message '%s' lacks '%s'", err, *words);
    printf("  ok: %s\n", err);
}
#define expect_fail(b, want, ...) expect_fail_v((b), (want), (const char *const[]){__VA_ARGS__, NULL})

/* ---- the valid file ------------------------------------------------------ */

static void check_valid(const kvch_gguf *g, const uint8_t *base, const layout *L, uint64_t align)
{
    ck_assert_uint_eq(kvch_gguf_version(g), 3);
    uint32_t u32 = 7;
    int64_t i64 = 7;
    float f = 7;
    int bo = 7;
    size_t len = 0;

    ck_assert_int_eq(kvch_gguf_type(g, "t.u8"), KVCH_GGUF_UINT8);
    ck_assert_int_eq(kvch_gguf_type(g, "t.strs"), KVCH_GGUF_ARRAY);
    ck_assert_int_eq(kvch_gguf_type(g, "absent"), -1);
    ck_assert_int_eq(kvch_gguf_type(g, "t.u"), -1); /* a prefix is not a key */

    ck_assert_int_eq(kvch_gguf_get_u32(g, "t.u8", &u32), 0); ck_assert_uint_eq(u32, 200);
    ck_assert_int_eq(kvch_gguf_get_u32(g, "t.u16", &u32), 0); ck_assert_uint_eq(u32, 60000);
    ck_assert_int_eq(kvch_gguf_get_u32(g, "t.u32", &u32), 0); ck_assert_uint_eq(u32, 4000000000u);
    u32 = 7; /* failures leave *out alone */
    ck_assert_int_eq(kvch_gguf_get_u32(g, "t.i8", &u32), -1);      /* negative */
    ck_assert_int_eq(kvch_gguf_get_u32(g, "t.u64", &u32), -1);     /* too wide */
    ck_assert_int_eq(kvch_gguf_get_u32(g, "t.f32", &u32), -1);     /* not an integer */
    ck_assert_int_eq(kvch_gguf_get_u32(g, "t.ints", &u32), -1);    /* an array */
    ck_assert_int_eq(kvch_gguf_get_u32(g, "absent", &u32), -1);
    ck_assert_uint_eq(u32, 7);

    ck_assert_int_eq(kvch_gguf_get_i64(g, "t.i8", &i64), 0); ck_assert_int_eq(i64, -100);
    ck_assert_int_eq(kvch_gguf_get_i64(g, "t.i16", &i64), 0); ck_assert_int_eq(i64, -30000);
    ck_assert_int_eq(kvch_gguf_get_i64(g, "t.i32", &i64), 0); ck_assert_int_eq(i64, -2000000000);
    ck_assert_int_eq(kvch_gguf_get_i64(g, "t.i64", &i64), 0); ck_assert_int_eq(i64, -(1ll << 40));
    ck_assert_int_eq(kvch_gguf_get_i64(g, "t.u64", &i64), 0); ck_assert_int_eq(i64, (1ll << 40) + 3);
    ck_assert_int_eq(kvch_gguf_get_i64(g, "t.u32", &i64), 0); ck_assert_int_eq(i64, 4000000000ll);
    i64 = 7;
    ck_assert_int_eq(kvch_gguf_get_i64(g, "t.u64big", &i64), -1); /* > INT64_MAX */
    ck_assert_int_eq(kvch_gguf_get_i64(g, "t.bool", &i64), -1);
    ck_assert_int_eq(kvch_gguf_get_i64(g, "t.str", &i64), -1);
    ck_assert_int_eq(i64, 7);

    ck_assert_int_eq(kvch_gguf_get_f32(g, "t.f32", &f), 0); ck_assert(f == 1.5f);
    ck_assert_int_eq(kvch_gguf_get_f32(g, "t.f64", &f), 0); ck_assert(f == 0.25f);
    ck_assert_int_eq(kvch_gguf_get_f32(g, "t.i16", &f), 0); ck_assert(f == -30000.0f);
    f = 7;
    ck_assert_int_eq(kvch_gguf_get_f32(g, "t.str", &f), -1);
    ck_assert_int_eq(kvch_gguf_get_f32(g, "t.floats", &f), -1);
    ck_assert(f == 7);

    ck_assert_int_eq(kvch_gguf_get_bool(g, "t.bool", &bo), 0); ck_assert_int_eq(bo, 1);
    bo = 7;
    ck_assert_int_eq(kvch_gguf_get_bool(g, "t.u8", &bo), -1); ck_assert_int_eq(bo, 7);

    const char *s = kvch_gguf_get_str(g, "t.str", &len);
    ck_assert_ptr_nonnull(s);
    ck_assert_uint_eq(len, 6);
    ck_assert(memcmp(s, "h\xc3\xa9llo", 6) == 0);
    ck_assert_ptr_null(kvch_gguf_get_str(g, "t.u8", &len));
    ck_assert_ptr_null(kvch_gguf_get_str(g, "t.strs", &len));

    int et = -5;
    uint64_t n = 0;
    ck_assert_int_eq(kvch_gguf_get_arr(g, "t.strs", &et, &n), 0);
    ck_assert_int_eq(et, KVCH_GGUF_STRING); ck_assert_uint_eq(n, 3);
    ck_assert_int_eq(kvch_gguf_get_arr(g, "t.ints", &et, &n), 0);
    ck_assert_int_eq(et, KVCH_GGUF_INT32); ck_assert_uint_eq(n, 4);
    ck_assert_int_eq(kvch_gguf_get_arr(g, "t.u8", &et, &n), -1);
    static const char *const strs[3] = {"a", "", "<|endoftext|>"};
    for (int i = 0; i < 3; i++) {
        len = 99;
        s = kvch_gguf_arr_str(g, "t.strs", (uint64_t)i, &len);
        ck_assert_ptr_nonnull(s);
        ck_assert_uint_eq(len, strlen(strs[i]));
        ck_assert(memcmp(s, strs[i], len) == 0);
    }
    ck_assert_ptr_null(kvch_gguf_arr_str(g, "t.strs", 3, &len));
    ck_assert_ptr_null(kvch_gguf_arr_str(g, "t.ints", 0, &len));
    ck_assert_ptr_null(kvch_gguf_arr_str(g, "t.str", 0, &len));
    static const int64_t ints[4] = {1, -2, 3, -4};
    for (int i = 0; i < 4; i++) {
        double d;
        ck_assert_int_eq(kvch_gguf_arr_i64(g, "t.ints", (uint64_t)i, &i64), 0);
        ck_assert_int_eq(i64, ints[i]);
        ck_assert_int_eq(kvch_gguf_arr_f64(g, "t.ints", (uint64_t)i, &d), 0);
        ck_assert(d == (double)ints[i]);
    }
    double d = 7;
    i64 = 7;
    ck_assert_int_eq(kvch_gguf_arr_i64(g, "t.ints", 4, &i64), -1);
    ck_assert_int_eq(kvch_gguf_arr_i64(g, "t.strs", 0, &i64), -1);
    ck_assert_int_eq(kvch_gguf_arr_i64(g, "t.floats", 0, &i64), -1);
    ck_assert_int_eq(i64, 7);
    ck_assert_int_eq(kvch_gguf_arr_f64(g, "t.floats", 0, &d), 0); ck_assert(d == 0.5);
    ck_assert_int_eq(kvch_gguf_arr_f64(g, "t.floats", 1, &d), 0); ck_assert(d == -1.0);
    d = 7;
    ck_assert_int_eq(kvch_gguf_arr_f64(g, "t.floats", 2, &d), -1);
    ck_assert_int_eq(kvch_gguf_arr_f64(g, "t.strs", 0, &d), -1);
    ck_assert_int_eq(kvch_gguf_arr_f64(g, "t.f32", 0, &d), -1);
    ck_assert(d == 7);

    /* tensors */
    ck_assert_uint_eq(kvch_gguf_n_tensors(g), NT);
    ck_assert_ptr_null(kvch_gguf_tensor_at(g, NT));
    ck_assert_ptr_null(kvch_gguf_tensor_by_name(g, "nope"));
    ck_assert_ptr_null(kvch_gguf_tensor_by_name(g, "a.f3"));
    for (int i = 0; i < NT; i++) {
        const kvch_gguf_tensor *t = kvch_gguf_tensor_at(g, (uint64_t)i);
        ck_assert_ptr_nonnull(t);
        ck_assert_ptr_eq(kvch_gguf_tensor_by_name(g, tname[i]), t);
        ck_assert_str_eq(t->name, tname[i]);
        ck_assert_uint_eq(t->type, ttype[i]);
        ck_assert_uint_eq(t->n_dims, tndims[i]);
        uint64_t ne = 1;
        for (uint32_t k = 0; k < 4; k++) {
            ck_assert_uint_eq(t->ne[k], k < tndims[i] ? tne[i][k] : 1);
            ne *= t->ne[k];
        }
        ck_assert_uint_eq(t->n_elements, ne);
        ck_assert_uint_eq(t->n_bytes, tbytes[i]);
        size_t at = (size_t)((const uint8_t *)t->data - base);
        ck_assert_uint_eq(at, L->data_start + L->off[i]);
        ck_assert_uint_eq(at % align, 0);
    }

    /* dequantization (through kvck) */
    char err[512];
    float out[256];
    const kvch_gguf_tensor *t = kvch_gguf_tensor_by_name(g, "a.f32");
    ck_assert_int_eq(kvch_gguf_dequantize(t, out, err, sizeof err), 0);
    for (int j = 0; j < 6; j++)
        ck_assert(out[j] == a_vals[j]);
    t = kvch_gguf_tensor_by_name(g, "b.f16");
    ck_assert_int_eq(kvch_gguf_dequantize(t, out, err, sizeof err), 0);
    for (int j = 0; j < 4; j++)
        ck_assert(out[j] == b_want[j]);
    t = kvch_gguf_tensor_by_name(g, "c.q8");
    ck_assert_int_eq(kvch_gguf_dequantize(t, out, err, sizeof err), 0);
    for (int j = 0; j < 64; j++) {
        float want = j < 32 ? 0.5f * (float)(j - 16) : 2.0f * (float)(15 - (j - 32));
        ck_assert_msg(out[j] == want, "q8_0 element %d: %g, expected %g", j, out[j], want);
    }
    /* A known type without a dequantizer opened fine; dequantizing it
     * fails naming the tensor and the type. */
    t = kvch_gguf_tensor_by_name(g, "d.q5k");
    err[0] = '\0';
    ck_assert_int_eq(kvch_gguf_dequantize(t, out, err, sizeof err), -1);
    ck_assert_msg(strstr(err, "d.q5k") && strstr(err, kvck_ggml_type_name(KVCK_GGML_Q5_K)) &&
                  strstr(err, "13"), "message: %s", err);
    ck_assert_int_eq(kvch_gguf_dequantize(NULL, out, err, sizeof err), -1);
}

START_TEST(valid_memory)
{
    for (int v = 0; v < 2; v++) {
        buf b = {0};
        layout L;
        uint32_t align = v ? 64 : 0;
        build_valid(&b, align, &L);
        uint8_t *copy = malloc(b.n);
        memcpy(copy, b.p, b.n);
        kvch_gguf *g = NULL;
        char err[512] = "";
        ck_assert_msg(kvch_gguf_open_memory(copy, b.n, &g, err, sizeof err) == KVC_OK, "%s", err);
        check_valid(g, copy, &L, align ? align : 32);
        if (align) {
            uint32_t a = 0;
            ck_assert_int_eq(kvch_gguf_get_u32(g, "general.alignment", &a), 0);
            ck_assert_uint_eq(a, 64);
        }
        kvch_gguf_close(g);
        free(copy);
        free(b.p);
    }
    kvch_gguf_close(NULL);
    kvch_gguf *g = SENTINEL;
    char err[128];
    ck_assert_int_eq(kvch_gguf_open_memory(NULL, 10, &g, err, sizeof err), KVC_E_INVALID);
    ck_assert_ptr_eq(g, SENTINEL);
    ck_assert_int_eq(kvch_gguf_open_memory("GGUF", 4, NULL, err, sizeof err), KVC_E_INVALID);
}
END_TEST

/* Writes n bytes to a fresh temp file; returns its malloc'd path. */
static char *temp_file(const void *p, size_t n)
{
    char *path = strdup("/tmp/kvc-test-gguf-XXXXXX");
    int fd = mkstemp(path);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(write(fd, p, n), (ssize_t)n);
    close(fd);
    return path;
}

START_TEST(valid_file_and_bad_files)
{
    buf b = {0};
    layout L;
    build_valid(&b, 64, &L);
    char *path = temp_file(b.p, b.n);
    kvch_gguf *g = NULL;
    char err[1024] = "";
    ck_assert_msg(kvch_gguf_open(path, &g, err, sizeof err) == KVC_OK, "%s", err);
    /* The mapping's base is not visible; recover it from the first tensor. */
    const uint8_t *base = (const uint8_t *)kvch_gguf_tensor_at(g, 0)->data - L.data_start;
    ck_assert_uint_eq((uintptr_t)base % 4096, 0); /* page-aligned: a real mmap */
    check_valid(g, base, &L, 64);
    kvch_gguf_close(g);
    unlink(path);
    free(path);

    /* Smaller than the header. */
    path = temp_file(b.p, 10);
    g = SENTINEL;
    ck_assert_int_eq(kvch_gguf_open(path, &g, err, sizeof err), KVC_E_CORRUPT);
    ck_assert_ptr_eq(g, SENTINEL);
    ck_assert_msg(strstr(err, path) && strstr(err, "too small"), "message: %s", err);
    printf("  ok: %s\n", err);
    unlink(path);
    free(path);

    /* Empty: mmap cannot map 0 bytes; still a clean message. */
    path = temp_file("", 0);
    ck_assert_int_eq(kvch_gguf_open(path, &g, err, sizeof err), KVC_E_CORRUPT);
    ck_assert_msg(strstr(err, path) && strstr(err, "too small"), "message: %s", err);
    unlink(path);
    free(path);

    /* A malformed file through the path: the parser's message, path first. */
    patch32(&b, 4, 1);
    path = temp_file(b.p, b.n);
    ck_assert_int_eq(kvch_gguf_open(path, &g, err, sizeof err), KVC_E_VERSION);
    ck_assert_msg(strstr(err, path) && strstr(err, "version 1"), "message: %s", err);
    unlink(path);
    free(path);

    /* Missing file, directory. */
    const char *missing = "/tmp/kvc-test-gguf-does-not-exist/x.gguf";
    ck_assert_int_ne(kvch_gguf_open(missing, &g, err, sizeof err), KVC_OK);
    ck_assert_msg(strstr(err, missing) && strstr(err, strerror(ENOENT)), "message: %s", err);
    printf("  ok: %s\n", err);
    ck_assert_int_ne(kvch_gguf_open("/tmp", &g, err, sizeof err), KVC_OK);
    ck_assert_msg(strstr(err, "regular"), "message: %s", err);
    ck_assert_ptr_eq(g, SENTINEL);
    free(b.p);
}
END_TEST

/* ---- malformed headers and metadata -------------------------------------- */

START_TEST(bad_header)
{
    buf b = {0};
    layout L;
    build_valid(&b, 64, &L);
    b.p[0] = 'X';
    expect_fail(&b, KVC_E_CORRUPT, "magic", "byte 0");
    b.p[0] = 'G';
    patch32(&b, 4, 1);
    expect_fail(&b, KVC_E_VERSION, "version 1", "byte 4");
    patch32(&b, 4, 0x03000000u);
    expect_fail(&b, KVC_E_VERSION, "big-endian");
    patch32(&b, 4, 0x02000000u);
    expect_fail(&b, KVC_E_VERSION, "big-endian");
    patch32(&b, 4, 4);
    expect_fail(&b, KVC_E_VERSION, "version 4");
    patch32(&b, 4, 2); /* v2 has the v3 layout for everything read here */
    char err[512];
    ck_assert_int_eq(try_open(b.p, b.n, err, sizeof err), KVC_OK);
    patch32(&b, 4, 3);

    patch64(&b, L.tcount_pos, 1ull << 60);
    expect_fail(&b, KVC_E_CORRUPT, "tensor count 1152921504606846976", "byte 8");
    patch64(&b, L.tcount_pos, UINT64_MAX);
    expect_fail(&b, KVC_E_CORRUPT, "tensor count");
    patch64(&b, L.tcount_pos, NT);
    patch64(&b, L.kvcount_pos, 1ull << 60);
    expect_fail(&b, KVC_E_CORRUPT, "metadata count", "byte 16");
    patch64(&b, L.kvcount_pos, UINT64_MAX);
    expect_fail(&b, KVC_E_CORRUPT, "metadata count");
    /* One more KV than there is: the first tensor info read as a key-value. */
    patch64(&b, L.kvcount_pos, L.n_kv + 1);
    expect_fail(&b, KVC_E_CORRUPT, "");
    free(b.p);
}
END_TEST

/* Every proper prefix of f must fail as CORRUPT with a message; f itself
 * must open. Prints which check caught how many. */
static void truncate_all(const buf *f)
{
    static const char *const why[] = {"too small", "truncated", "impossible", "exceed",
                                      "cannot fit", "past the end"};
    enum { NWHY = sizeof why / sizeof *why };
    int counts[NWHY + 1] = {0};
    char err[1024];
    for (size_t n = 0; n < f->n; n++) {
        kvc_status s = try_open(f->p, n, err, sizeof err);
        ck_assert_msg(s == KVC_E_CORRUPT, "prefix of %zu/%zu bytes: status %d (%s)", n, f->n,
                      (int)s, err);
        int k = 0;
        while (k < NWHY && !strstr(err, why[k]))
            k++;
        ck_assert_msg(k < NWHY, "prefix of %zu bytes: unexpected message '%s'", n, err);
        counts[k]++;
    }
    ck_assert_int_eq(try_open(f->p, f->n, err, sizeof err), KVC_OK);
    printf("  %zu prefixes rejected:", f->n);
    for (int k = 0; k < NWHY; k++)
        printf(" %d '%s'", counts[k], why[k]);
    printf("\n");
    ck_assert_int_eq(counts[0], 24); /* 0..23 bytes: shorter than the header */
}

START_TEST(truncated_everywhere)
{
    buf b = {0};
    layout L;
    build_valid(&b, 64, &L);
    truncate_all(&b);
    /* Few entries but long ones, so that the count bound (which rejects
     * most prefixes of the file above) does not hide the array walker and
     * tensor info reader: one KV of 40 strings, one tensor. */
    b.n = 0;
    hdr(&b, 3, 1, 1);
    key(&b, "tokens", KVCH_GGUF_ARRAY), w32(&b, KVCH_GGUF_STRING), w64(&b, 40);
    for (int i = 0; i < 40; i++)
        wstr(&b, i % 3 ? "tok" : "");
    tinfo(&b, "w", 2, (const uint64_t[]){32, 2}, KVCK_GGML_Q8_0, 0);
    pad(&b, 32);
    for (int i = 0; i < 68; i++)
        w8(&b, 0);
    truncate_all(&b);
    free(b.p);
}
END_TEST

START_TEST(bad_metadata)
{
    buf b = {0};
    /* absurd key length */
    hdr(&b, 3, 0, 1), w64(&b, 1ull << 63), put(&b, "k\0\0\0\0\0\0\0\0\0\0\0\0\0", 14);
    expect_fail(&b, KVC_E_CORRUPT, "string length 9223372036854775808", "byte 24");
    /* absurd string value length */
    b.n = 0, hdr(&b, 3, 0, 1), key(&b, "k", KVCH_GGUF_STRING), w64(&b, (1ull << 63) - 1), w32(&b, 0);
    expect_fail(&b, KVC_E_CORRUPT, "string length", "byte 37");
    /* absurd array lengths, of strings and of numbers */
    b.n = 0, hdr(&b, 3, 0, 1), key(&b, "k", KVCH_GGUF_ARRAY), w32(&b, KVCH_GGUF_STRING);
    w64(&b, 1ull << 62), wstr(&b, "x");
    expect_fail(&b, KVC_E_CORRUPT, "array length 4611686018427387904", "'k'");
    b.n = 0, hdr(&b, 3, 0, 1), key(&b, "k", KVCH_GGUF_ARRAY), w32(&b, KVCH_GGUF_INT32);
    w64(&b, 1ull << 62), w32(&b, 1);
    expect_fail(&b, KVC_E_CORRUPT, "array length 4611686018427387904");
    b.n = 0, hdr(&b, 3, 0, 1), key(&b, "k", KVCH_GGUF_ARRAY), w32(&b, KVCH_GGUF_UINT64);
    w64(&b, 1ull << 61), w64(&b, 1); /* n * 8 would wrap to 0 */
    expect_fail(&b, KVC_E_CORRUPT, "array length");
    /* a string array whose count fits but whose third string overruns */
    b.n = 0, hdr(&b, 3, 0, 1), key(&b, "k", KVCH_GGUF_ARRAY), w32(&b, KVCH_GGUF_STRING);
    w64(&b, 3), wstr(&b, "ab"), wstr(&b, "c"), w64(&b, 100), put(&b, "zz", 2);
    expect_fail(&b, KVC_E_CORRUPT, "string length 100");
    /* unknown value type, unknown element type, nested array */
    b.n = 0, hdr(&b, 3, 0, 1), key(&b, "t.x", 13), w64(&b, 0);
    expect_fail(&b, KVC_E_CORRUPT, "unknown value type 13", "'t.x'", "byte 35");
    b.n = 0, hdr(&b, 3, 0, 1), key(&b, "k", KVCH_GGUF_ARRAY), w32(&b, 99), w64(&b, 1), w64(&b, 0);
    expect_fail(&b, KVC_E_CORRUPT, "element type 99");
    b.n = 0, hdr(&b, 3, 0, 1), key(&b, "k", KVCH_GGUF_ARRAY), w32(&b, KVCH_GGUF_ARRAY), w64(&b, 1);
    w32(&b, KVCH_GGUF_INT8), w64(&b, 1), w8(&b, 0);
    expect_fail(&b, KVC_E_UNSUPPORTED, "nested array");
    /* duplicate key, empty key, bool 2, bool array with 7 */
    b.n = 0, hdr(&b, 3, 0, 3), key(&b, "a.b", KVCH_GGUF_UINT8), w8(&b, 1);
    key(&b, "c", KVCH_GGUF_UINT8), w8(&b, 1), key(&b, "a.b", KVCH_GGUF_INT8), w8(&b, 2);
    expect_fail(&b, KVC_E_CORRUPT, "duplicate metadata key 'a.b'", "byte 54", "byte 24");
    b.n = 0, hdr(&b, 3, 0, 1), key(&b, "", KVCH_GGUF_UINT8), w8(&b, 1), w8(&b, 0);
    expect_fail(&b, KVC_E_CORRUPT, "empty", "byte 24");
    b.n = 0, hdr(&b, 3, 0, 1), key(&b, "k", KVCH_GGUF_BOOL), w8(&b, 2);
    expect_fail(&b, KVC_E_CORRUPT, "bool value 2");
    b.n = 0, hdr(&b, 3, 0, 1), key(&b, "k", KVCH_GGUF_ARRAY), w32(&b, KVCH_GGUF_BOOL), w64(&b, 2);
    w8(&b, 0), w8(&b, 7);
    expect_fail(&b, KVC_E_CORRUPT, "bool value 7");
    /* a key with a NUL byte inside */
    b.n = 0, hdr(&b, 3, 0, 1), w64(&b, 3), put(&b, "a\0b", 3), w32(&b, KVCH_GGUF_UINT8), w8(&b, 0);
    expect_fail(&b, KVC_E_CORRUPT, "NUL");
    /* alignment: not a power of two, zero, wrong type */
    uint32_t bad_align[3] = {48, 0, 3};
    for (int i = 0; i < 3; i++) {
        b.n = 0, hdr(&b, 3, 0, 1), key(&b, "general.alignment", KVCH_GGUF_UINT32);
        w32(&b, bad_align[i]);
        expect_fail(&b, KVC_E_CORRUPT, "general.alignment", "power of two");
    }
    b.n = 0, hdr(&b, 3, 0, 1), key(&b, "general.alignment", KVCH_GGUF_UINT64), w64(&b, 32);
    expect_fail(&b, KVC_E_CORRUPT, "general.alignment", "uint32");
    /* A file with metadata only, no tensors, and no padding is valid. */
    b.n = 0, hdr(&b, 3, 0, 1), key(&b, "k", KVCH_GGUF_UINT8), w8(&b, 9);
    char err[256];
    ck_assert_int_eq(try_open(b.p, b.n, err, sizeof err), KVC_OK);
    free(b.p);
}
END_TEST

/* ---- malformed tensor infos --------------------------------------------- */

typedef struct tspec {
    const char *name;
    uint32_t n_dims;
    uint64_t ne[5];
    uint32_t type;
    uint64_t off;
} tspec;

/* Header, no metadata, the infos, padding to 32, then `data` zero bytes. */
static void tensor_file(buf *b, const tspec *t, size_t n, size_t data)
{
    b->n = 0;
    hdr(b, 3, n, 0);
    for (size_t i = 0; i < n; i++)
        tinfo(b, t[i].name, t[i].n_dims, t[i].ne, t[i].type, t[i].off);
    pad(b, 32);
    for (size_t i = 0; i < data; i++)
        w8(b, 0);
}

START_TEST(bad_tensors)
{
    buf b = {0};
    char err[512];
    const uint32_t F32 = KVCK_GGML_F32, Q8 = KVCK_GGML_Q8_0;
    /* the baseline: two F32 tensors of 16 bytes at 0 and 32 open */
    tspec ok[2] = {{"x", 1, {4}, F32, 0}, {"y", 1, {4}, F32, 32}};
    tensor_file(&b, ok, 2, 48);
    ck_assert_int_eq(try_open(b.p, b.n, err, sizeof err), KVC_OK);

    tspec t1[2] = {{"x", 1, {4}, F32, 0}, {"y", 1, {4}, F32, 64}};
    tensor_file(&b, t1, 2, 48);
    expect_fail(&b, KVC_E_CORRUPT, "'y'", "past the end");
    t1[1].off = 1ull << 63; /* offset + size would wrap */
    tensor_file(&b, t1, 2, 48);
    expect_fail(&b, KVC_E_CORRUPT, "'y'", "past the end");
    tspec t2[2] = {{"x", 1, {4}, F32, 0}, {"y", 1, {4}, F32, 4}};
    tensor_file(&b, t2, 2, 48);
    expect_fail(&b, KVC_E_CORRUPT, "'y'", "offset 4", "alignment 32");
    tspec t3[2] = {{"x", 1, {12}, F32, 0}, {"y", 1, {4}, F32, 32}}; /* x is 48 bytes */
    tensor_file(&b, t3, 2, 64);
    expect_fail(&b, KVC_E_CORRUPT, "'x' and 'y' overlap");
    tspec t4[2] = {{"x", 1, {4}, F32, 0}, {"x", 1, {4}, F32, 32}};
    tensor_file(&b, t4, 2, 48);
    expect_fail(&b, KVC_E_CORRUPT, "duplicate tensor name 'x'");

    tspec t5 = {"w5", 5, {1, 1, 1, 1, 1}, F32, 0};
    tensor_file(&b, &t5, 1, 64);
    expect_fail(&b, KVC_E_CORRUPT, "'w5'", "n_dims 5", "byte 34");
    tspec t6 = {"w0", 0, {0}, F32, 0};
    tensor_file(&b, &t6, 1, 64);
    expect_fail(&b, KVC_E_CORRUPT, "n_dims 0");
    tspec t7 = {"wz", 2, {4, 0}, F32, 0};
    tensor_file(&b, &t7, 1, 64);
    expect_fail(&b, KVC_E_CORRUPT, "'wz'", "dimension 1", "is 0");
    tspec t8 = {"wo", 3, {1ull << 32, 1ull << 32, 2}, F32, 0};
    tensor_file(&b, &t8, 1, 64);
    expect_fail(&b, KVC_E_CORRUPT, "'wo'", "overflow");
    tspec t8b = {"wneg", 1, {1ull << 63}, F32, 0};
    tensor_file(&b, &t8b, 1, 64);
    expect_fail(&b, KVC_E_CORRUPT, "'wneg'", "dimension 0");
    /* bytes overflow although elements fit: 2^62 f32 elements = 2^64 bytes */
    tspec t8c = {"wb", 2, {1ull << 31, 1ull << 31}, F32, 0};
    tensor_file(&b, &t8c, 1, 64);
    expect_fail(&b, KVC_E_CORRUPT, "'wb'");
    tspec t9 = {"wt", 1, {32}, 99, 0};
    tensor_file(&b, &t9, 1, 64);
    expect_fail(&b, KVC_E_UNSUPPORTED, "'wt'", "99");
    tspec t10 = {"wq", 1, {33}, Q8, 0};
    tensor_file(&b, &t10, 1, 64);
    expect_fail(&b, KVC_E_CORRUPT, "'wq'", "multiple");
    char longname[66]; /* one byte over the spec's 64 */
    memset(longname, 'n', 65);
    longname[65] = '\0';
    tspec t11 = {longname, 1, {4}, F32, 0};
    tensor_file(&b, &t11, 1, 64);
    expect_fail(&b, KVC_E_CORRUPT, "name");
    tspec t12 = {"", 1, {4}, F32, 0};
    tensor_file(&b, &t12, 1, 64);
    expect_fail(&b, KVC_E_CORRUPT, "name");
    /* the data section itself missing: infos end, padding absent */
    tensor_file(&b, ok, 2, 0);
    b.n -= 1;
    expect_fail(&b, KVC_E_CORRUPT, "data section");
    free(b.p);
}
END_TEST

/* ---- random single-byte corruptions -------------------------------------- */

static uint64_t rng_next(uint64_t *s)
{
    *s ^= *s << 13, *s ^= *s >> 7, *s ^= *s << 17;
    return *s;
}

static volatile char sink;

/* Exercises everything a reader of an opened file can reach. */
static void touch_all(const kvch_gguf *g)
{
    static const char *const keys[] = {"t.u8", "t.i8", "t.u16", "t.i16", "t.u32", "t.i32",
                                       "t.f32", "t.bool", "t.str", "t.u64", "t.u64big", "t.i64",
                                       "t.f64", "t.strs", "t.ints", "t.floats", "general.alignment"};
    for (size_t k = 0; k < sizeof keys / sizeof *keys; k++) {
        uint32_t u;
        int64_t i;
        float f;
        int bo, et;
        size_t len;
        uint64_t n;
        double d;
        (void)kvch_gguf_get_u32(g, keys[k], &u);
        (void)kvch_gguf_get_i64(g, keys[k], &i);
        (void)kvch_gguf_get_f32(g, keys[k], &f);
        (void)kvch_gguf_get_bool(g, keys[k], &bo);
        const char *s = kvch_gguf_get_str(g, keys[k], &len);
        if (s && len)
            sink = s[len - 1]; /* the last byte is readable (ASan checks) */
        if (kvch_gguf_get_arr(g, keys[k], &et, &n) == 0)
            for (uint64_t j = 0; j < n && j < 64; j++) {
                s = kvch_gguf_arr_str(g, keys[k], j, &len);
                if (s && len)
                    sink = s[len - 1];
                (void)kvch_gguf_arr_i64(g, keys[k], j, &i);
                (void)kvch_gguf_arr_f64(g, keys[k], j, &d);
            }
    }
    for (uint64_t i = 0; i < kvch_gguf_n_tensors(g); i++) {
        const kvch_gguf_tensor *t = kvch_gguf_tensor_at(g, i);
        ck_assert_ptr_eq(kvch_gguf_tensor_by_name(g, t->name), t);
        if (t->n_elements <= 4096) {
            float *out = malloc(t->n_elements * sizeof *out);
            char err[256];
            (void)kvch_gguf_dequantize(t, out, err, sizeof err);
            free(out);
        }
    }
}

START_TEST(random_corruptions)
{
    const char *env = getenv("KVC_TEST_SEED");
    uint64_t seed = env ? strtoull(env, NULL, 0) : (uint64_t)time(NULL);
    printf("random_corruptions: seed %llu (set KVC_TEST_SEED to replay)\n",
           (unsigned long long)seed);
    uint64_t s = seed * 2654435761u + 1;
    buf b = {0};
    layout L;
    build_valid(&b, 64, &L);
    uint8_t *copy = malloc(b.n);
    int opened = 0, failed = 0;
    const int iters = 4000;
    for (int it = 0; it < iters; it++) {
        memcpy(copy, b.p, b.n);
        /* Half the hits land in the header/metadata/infos, where a byte
         * changes structure; the rest anywhere. */
        size_t span = (it & 1) ? b.n : L.data_start;
        size_t pos = (size_t)(rng_next(&s) % span);
        copy[pos] ^= (uint8_t)(1 + rng_next(&s) % 255);
        uint8_t *exact = malloc(b.n);
        memcpy(exact, copy, b.n);
        kvch_gguf *g = NULL;
        char err[1024] = "";
        kvc_status st = kvch_gguf_open_memory(exact, b.n, &g, err, sizeof err);
        if (st == KVC_OK) {
            touch_all(g);
            kvch_gguf_close(g);
            opened++;
        } else {
            ck_assert_msg(err[0], "byte %zu: status %d without message", pos, (int)st);
            failed++;
        }
        free(exact);
    }
    printf("  %d corruptions: %d opened, %d rejected\n", iters, opened, failed);
    ck_assert_int_eq(opened + failed, iters);
    ck_assert_int_gt(failed, 0);
    free(copy);
    free(b.p);
}
END_TEST

/* ---- the real model ------------------------------------------------------ */

START_TEST(real_model)
{
    const char *path = kvct_model_or_null();
    if (!path) {
        printf("real_model: skipped (model absent)\n");
        return;
    }
    kvch_gguf *g = NULL;
    char err[1024] = "";
    ck_assert_msg(kvch_gguf_open(path, &g, err, sizeof err) == KVC_OK, "%s", err);
    ck_assert_uint_eq(kvch_gguf_version(g), 3);
    ck_assert_uint_eq(kvch_gguf_n_tensors(g), 272);
    size_t len;
    const char *arch = kvch_gguf_get_str(g, "general.architecture", &len);
    ck_assert_ptr_nonnull(arch);
    ck_assert_uint_eq(len, 5);
    ck_assert(memcmp(arch, "llama", 5) == 0);
    struct { const char *k; uint32_t v; } u[] = {
        {"llama.block_count", 30}, {"llama.embedding_length", 576},
        {"llama.attention.head_count", 9}, {"llama.attention.head_count_kv", 3},
        {"llama.vocab_size", 49152}};
    for (size_t i = 0; i < sizeof u / sizeof *u; i++) {
        uint32_t v = 0;
        ck_assert_msg(kvch_gguf_get_u32(g, u[i].k, &v) == 0, "%s", u[i].k);
        ck_assert_msg(v == u[i].v, "%s = %u, expected %u", u[i].k, v, u[i].v);
    }
    float f = 0;
    ck_assert_int_eq(kvch_gguf_get_f32(g, "llama.rope.freq_base", &f), 0);
    ck_assert(f == 100000.0f);
    int et = -1;
    uint64_t n = 0;
    ck_assert_int_eq(kvch_gguf_get_arr(g, "tokenizer.ggml.tokens", &et, &n), 0);
    ck_assert_int_eq(et, KVCH_GGUF_STRING);
    ck_assert_uint_eq(n, 49152);
    const char *tok = kvch_gguf_arr_str(g, "tokenizer.ggml.tokens", 0, &len);
    ck_assert_ptr_nonnull(tok);
    ck_assert_uint_eq(len, 13);
    ck_assert(memcmp(tok, "<|endoftext|>", 13) == 0);
    ck_assert_ptr_nonnull(kvch_gguf_arr_str(g, "tokenizer.ggml.tokens", 49151, &len));
    ck_assert_ptr_null(kvch_gguf_arr_str(g, "tokenizer.ggml.tokens", 49152, &len));
    ck_assert_int_eq(kvch_gguf_get_arr(g, "tokenizer.ggml.merges", &et, &n), 0);
    ck_assert_uint_eq(n, 48900);
    int64_t tt = -1;
    ck_assert_int_eq(kvch_gguf_arr_i64(g, "tokenizer.ggml.token_type", 0, &tt), 0);

    const kvch_gguf_tensor *t = kvch_gguf_tensor_by_name(g, "token_embd.weight");
    ck_assert_ptr_nonnull(t);
    ck_assert_uint_eq(t->type, KVCK_GGML_Q8_0);
    ck_assert_uint_eq(t->n_dims, 2);
    ck_assert_uint_eq(t->ne[0], 576);
    ck_assert_uint_eq(t->ne[1], 49152);
    ck_assert_uint_eq(t->n_bytes, 49152ull * 576 / 32 * 34);

    t = kvch_gguf_tensor_by_name(g, "blk.0.attn_norm.weight");
    ck_assert_ptr_nonnull(t);
    ck_assert_uint_eq(t->type, KVCK_GGML_F32);
    ck_assert_uint_eq(t->n_elements, 576);
    float out[576], raw[576];
    ck_assert_msg(kvch_gguf_dequantize(t, out, err, sizeof err) == 0, "%s", err);
    memcpy(raw, t->data, sizeof raw);
    for (int i = 0; i < 576; i++) {
        ck_assert(isfinite(out[i]));
        ck_assert(out[i] == raw[i]);
    }
    /* A Q4_1 matrix dequantizes to finite values. */
    t = kvch_gguf_tensor_by_name(g, "blk.0.ffn_down.weight");
    ck_assert_ptr_nonnull(t);
    ck_assert_uint_eq(t->type, KVCK_GGML_Q4_1);
    float *w = malloc(t->n_elements * sizeof *w);
    ck_assert_msg(kvch_gguf_dequantize(t, w, err, sizeof err) == 0, "%s", err);
    for (uint64_t i = 0; i < t->n_elements; i++)
        ck_assert(isfinite(w[i]));
    free(w);
    /* Every tensor has a name that finds it back and fits in the file. */
    for (uint64_t i = 0; i < kvch_gguf_n_tensors(g); i++) {
        const kvch_gguf_tensor *x = kvch_gguf_tensor_at(g, i);
        ck_assert_ptr_eq(kvch_gguf_tensor_by_name(g, x->name), x);
    }
    kvch_gguf_close(g);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("gguf");
    TCase *tc = tcase_create("reader");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, valid_memory);
    tcase_add_test(tc, valid_file_and_bad_files);
    tcase_add_test(tc, bad_header);
    tcase_add_test(tc, truncated_everywhere);
    tcase_add_test(tc, bad_metadata);
    tcase_add_test(tc, bad_tensors);
    tcase_add_test(tc, random_corruptions);
    tcase_add_test(tc, real_model);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
