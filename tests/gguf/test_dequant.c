/*
 * test_dequant.c -- Check suite for ggml block dequantization
 * (kernels/dequant.c, declared in kernels/kvck.h).
 *
 * Blocks are built byte by byte here, little-endian, after ggml's layouts
 * (ggml-common.h); the expected floats are written out by hand from each
 * format's formula. Scales are fp16 values that are exact in few bits
 * (0.5, -0.25, 2, ...), so every expected product is exact and compared
 * with ==. The "packed" cases place random quants with an element-wise
 * rule written independently of the library's loops and compute the
 * expectation from the formula.
 */
#include "kvck.h"

#include <check.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- helpers ------------------------------------------------------------- */

/* Only calls into Check on failure (passing ck_assert calls cost a pipe
 * write each), so it can sit in loops. */
#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond))                                                                               \
            ck_abort_msg(__VA_ARGS__);                                                             \
    } while (0)

/* fp16 encodings used as scales; each value is exact. */
enum {
    H_ZERO = 0x0000,
    H_ONE = 0x3c00,      /*  1.0   */
    H_M_ONE = 0xbc00,    /* -1.0   */
    H_HALF = 0x3800,     /*  0.5   */
    H_M_HALF = 0xb800,   /* -0.5   */
    H_QUARTER = 0x3400,  /*  0.25  */
    H_M_EIGHTH = 0xb000, /* -0.125 */
    H_TWO = 0x4000,      /*  2.0   */
    H_M_TWO = 0xc000,    /* -2.0   */
    H_M_THREE = 0xc200,  /* -3.0   */
    H_THIRD = 0x3555,    /*  0.333251953125 = 1365/4096 */
};

/* Writes v little-endian at p, whatever the host's byte order. */
static void put16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v & 0xffu);
    p[1] = (uint8_t)(v >> 8);
}

static uint32_t fbits(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}

/* got[i] == want[i] for all i (so -0 equals +0; neither may be NaN). */
static void expect_eq(const float *got, const float *want, size_t n, const char *what)
{
    for (size_t i = 0; i < n; i++)
        CHECK(got[i] == want[i], "%s: element %zu is %.9g, expected %.9g", what, i,
              (double)got[i], (double)want[i]);
}

/* Bit-exact comparison, for signed zeros, infinities and subnormals. */
static void expect_bits(const float *got, const float *want, size_t n, const char *what)
{
    for (size_t i = 0; i < n; i++)
        CHECK(fbits(got[i]) == fbits(want[i]), "%s: element %zu has bits 0x%08x, expected 0x%08x",
              what, i, (unsigned)fbits(got[i]), (unsigned)fbits(want[i]));
}

#define SENTINEL 12345.0f

static void fill_sentinel(float *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        x[i] = SENTINEL;
}

static void expect_sentinel(const float *x, size_t n, const char *what)
{
    for (size_t i = 0; i < n; i++)
        CHECK(x[i] == SENTINEL, "%s: element %zu was written (%.9g)", what, i, (double)x[i]);
}

/* Small deterministic generator for the packed cases. */
static uint32_t g_rng = 0x6b766331u;

static uint32_t rnd(void)
{
    g_rng = g_rng * 1664525u + 1013904223u;
    return g_rng >> 8;
}

/* A random power-of-two scale ±2^k, k in -8..3: its fp16 bits in *h and its
 * value returned (exact, so products with small integers stay exact). */
static float rnd_pow2_scale(uint16_t *h)
{
    int k = (int)(rnd() % 12u) - 8;
    int neg = (int)(rnd() & 1u);
    *h = (uint16_t)((neg ? 0x8000u : 0u) | ((unsigned)(15 + k) << 10));
    return neg ? -ldexpf(1.0f, k) : ldexpf(1.0f, k);
}

/* ---- names, sizes, capabilities ---------------------------------------- */

typedef struct type_row {
    uint32_t id;
    const char *name;
    size_t elems, bytes;
    int can;
} type_row;

/* From ggml-common.h's block structs (sizes summed by hand). */
static const type_row k_rows[] = {
    {0, "f32", 1, 4, 1},        {1, "f16", 1, 2, 1},        {2, "q4_0", 32, 18, 1},
    {3, "q4_1", 32, 20, 1},     {6, "q5_0", 32, 22, 0},     {7, "q5_1", 32, 24, 0},
    {8, "q8_0", 32, 34, 1},     {9, "q8_1", 32, 36, 0},     {10, "q2_K", 256, 84, 0},
    {11, "q3_K", 256, 110, 0},  {12, "q4_K", 256, 144, 0},  {13, "q5_K", 256, 176, 0},
    {14, "q6_K", 256, 210, 1},  {15, "q8_K", 256, 292, 0},  {30, "bf16", 1, 2, 1},
};
#define N_ROWS (sizeof k_rows / sizeof k_rows[0])

START_TEST(test_enum_values)
{
    /* The ids are frozen by the GGUF format. */
    ck_assert_int_eq(KVCK_GGML_F32, 0);
    ck_assert_int_eq(KVCK_GGML_F16, 1);
    ck_assert_int_eq(KVCK_GGML_Q4_0, 2);
    ck_assert_int_eq(KVCK_GGML_Q4_1, 3);
    ck_assert_int_eq(KVCK_GGML_Q5_0, 6);
    ck_assert_int_eq(KVCK_GGML_Q5_1, 7);
    ck_assert_int_eq(KVCK_GGML_Q8_0, 8);
    ck_assert_int_eq(KVCK_GGML_Q8_1, 9);
    ck_assert_int_eq(KVCK_GGML_Q2_K, 10);
    ck_assert_int_eq(KVCK_GGML_Q3_K, 11);
    ck_assert_int_eq(KVCK_GGML_Q4_K, 12);
    ck_assert_int_eq(KVCK_GGML_Q5_K, 13);
    ck_assert_int_eq(KVCK_GGML_Q6_K, 14);
    ck_assert_int_eq(KVCK_GGML_Q8_K, 15);
    ck_assert_int_eq(KVCK_GGML_BF16, 30);
}
END_TEST

START_TEST(test_size_table)
{
    for (size_t i = 0; i < N_ROWS; i++) {
        const type_row *r = &k_rows[i];
        CHECK(kvck_ggml_block_elems(r->id) == r->elems, "%s: block_elems %zu, expected %zu",
              r->name, kvck_ggml_block_elems(r->id), r->elems);
        CHECK(kvck_ggml_block_bytes(r->id) == r->bytes, "%s: block_bytes %zu, expected %zu",
              r->name, kvck_ggml_block_bytes(r->id), r->bytes);
    }
}
END_TEST

START_TEST(test_names)
{
    for (size_t i = 0; i < N_ROWS; i++)
        ck_assert_str_eq(kvck_ggml_type_name(k_rows[i].id), k_rows[i].name);
    ck_assert_str_eq(kvck_ggml_type_name(99), "unknown");
    ck_assert_str_eq(kvck_ggml_type_name(4), "unknown"); /* removed q4_2 */
    ck_assert_str_eq(kvck_ggml_type_name(UINT32_MAX), "unknown");
}
END_TEST

START_TEST(test_can_dequantize)
{
    for (size_t i = 0; i < N_ROWS; i++)
        CHECK(kvck_ggml_can_dequantize(k_rows[i].id) == k_rows[i].can,
              "%s: can_dequantize %d, expected %d", k_rows[i].name,
              kvck_ggml_can_dequantize(k_rows[i].id), k_rows[i].can);
}
END_TEST

START_TEST(test_unknown_ids)
{
    /* Every id below 64 that is not in the table, and some far beyond. */
    uint32_t extra[] = {64, 99, 1000, 0x7fffffffu, UINT32_MAX};
    int checked = 0;
    for (uint32_t id = 0; id < 64 + sizeof extra / sizeof extra[0]; id++) {
        uint32_t t = id < 64 ? id : extra[id - 64];
        int listed = 0;
        for (size_t i = 0; i < N_ROWS; i++)
            listed |= k_rows[i].id == t;
        if (listed)
            continue;
        CHECK(kvck_ggml_block_elems(t) == 0, "id %u: block_elems %zu", (unsigned)t,
              kvck_ggml_block_elems(t));
        CHECK(kvck_ggml_block_bytes(t) == 0, "id %u: block_bytes %zu", (unsigned)t,
              kvck_ggml_block_bytes(t));
        CHECK(!kvck_ggml_can_dequantize(t), "id %u: can_dequantize", (unsigned)t);
        CHECK(strcmp(kvck_ggml_type_name(t), "unknown") == 0, "id %u: name %s", (unsigned)t,
              kvck_ggml_type_name(t));
        checked++;
    }
    ck_assert_int_eq(checked, 64 - (int)N_ROWS + 5);
}
END_TEST

/* ---- plain float formats -------------------------------------------------- */

START_TEST(test_f32_unaligned)
{
    const float want[5] = {1.5f, -0.0f, INFINITY, 0x1p-149f, -3.25e38f};
    uint8_t buf[3 + sizeof want];
    memcpy(buf + 3, want, sizeof want); /* host order == file order (LE) */
    float got[6];
    fill_sentinel(got, 6);
    ck_assert_int_eq(kvck_dequantize(KVCK_GGML_F32, buf + 3, got, 5), 0);
    expect_bits(got, want, 5, "f32");
    expect_sentinel(got + 5, 1, "f32 past n");
}
END_TEST

START_TEST(test_f16_specials)
{
    static const uint16_t in[] = {
        0x0000, /* +0 */
        0x8000, /* -0 */
        0x3c00, /* 1 */
        0xc000, /* -2 */
        0x3555, /* 1365/4096 */
        0x7bff, /* largest finite, 65504 */
        0x0400, /* smallest normal, 2^-14 */
        0x0001, /* smallest subnormal, 2^-24 */
        0x03ff, /* largest subnormal, 1023 * 2^-24 */
        0x8001, /* -2^-24 */
        0x7c00, /* +inf */
        0xfc00, /* -inf */
    };
    static const float want[] = {
        0.0f,           -0.0f,       1.0f,         -2.0f,   0.333251953125f, 65504.0f,
        0x1p-14f,       0x1p-24f,    0x1.ff8p-15f, -0x1p-24f, INFINITY,      -INFINITY,
    };
    enum { N = sizeof in / sizeof in[0] };
    uint8_t buf[1 + 2 * (N + 2)];
    for (int i = 0; i < N; i++)
        put16(buf + 1 + 2 * i, in[i]); /* odd address */
    put16(buf + 1 + 2 * N, 0x7e00);       /* quiet NaN */
    put16(buf + 1 + 2 * (N + 1), 0xfc01); /* signalling NaN, negative */
    float got[N + 3];
    fill_sentinel(got, N + 3);
    ck_assert_int_eq(kvck_dequantize(KVCK_GGML_F16, buf + 1, got, N + 2), 0);
    expect_bits(got, want, N, "f16");
    CHECK(isnan(got[N]), "f16 0x7e00 gave %g, expected NaN", (double)got[N]);
    CHECK(isnan(got[N + 1]) && signbit(got[N + 1]), "f16 0xfc01 gave %g, expected -NaN",
          (double)got[N + 1]);
    expect_sentinel(got + N + 2, 1, "f16 past n");
}
END_TEST

START_TEST(test_f16_long_run)
{
    /* 1000 elements (several conversion chunks) of the halves 0..999: all
     * subnormal, value h * 2^-24. Odd source address. */
    enum { N = 1000 };
    static uint8_t buf[1 + 2 * N];
    static float got[N + 1];
    for (int i = 0; i < N; i++)
        put16(buf + 1 + 2 * i, (uint16_t)i);
    fill_sentinel(got, N + 1);
    ck_assert_int_eq(kvck_dequantize(KVCK_GGML_F16, buf + 1, got, N), 0);
    for (int i = 0; i < N; i++)
        CHECK(got[i] == ldexpf((float)i, -24), "f16 run: element %d is %g", i, (double)got[i]);
    expect_sentinel(got + N, 1, "f16 run past n");
}
END_TEST

START_TEST(test_bf16_specials)
{
    static const uint16_t in[] = {
        0x0000, /* +0 */
        0x8000, /* -0 */
        0x3f80, /* 1 */
        0xc000, /* -2 */
        0x3eab, /* 171/512 */
        0x7f7f, /* largest finite, 255 * 2^120 */
        0x0080, /* smallest normal, 2^-126 */
        0x0001, /* subnormal, 2^-133 */
        0x807f, /* subnormal, -127 * 2^-133 */
        0x7f80, /* +inf */
        0xff80, /* -inf */
        0x7fc0, /* quiet NaN */
        0xffc1, /* negative quiet NaN with payload */
        0x7f81, /* signalling NaN: bf16 -> f32 is a shift, bits kept */
    };
    enum { N = sizeof in / sizeof in[0] };
    const float finite[] = {0.0f, -0.0f, 1.0f, -2.0f, 0.333984375f, 0x1.fep127f,
                            0x1p-126f, 0x1p-133f, -0x1.fcp-127f, INFINITY, -INFINITY};
    const uint32_t nan_bits[] = {0x7fc00000u, 0xffc10000u, 0x7f810000u};
    uint8_t buf[3 + 2 * N];
    for (int i = 0; i < N; i++)
        put16(buf + 3 + 2 * i, in[i]);
    float got[N + 1];
    fill_sentinel(got, N + 1);
    ck_assert_int_eq(kvck_dequantize(KVCK_GGML_BF16, buf + 3, got, N), 0);
    expect_bits(got, finite, 11, "bf16");
    for (int i = 0; i < 3; i++)
        CHECK(fbits(got[11 + i]) == nan_bits[i], "bf16 NaN %d: bits 0x%08x, expected 0x%08x", i,
              (unsigned)fbits(got[11 + i]), (unsigned)nan_bits[i]);
    expect_sentinel(got + N, 1, "bf16 past n");
}
END_TEST

START_TEST(test_bf16_long_run)
{
    /* 700 elements: 0x3f80 + (i % 128) is 1 + (i % 128) / 128; odd i
     * negated through the sign bit. */
    enum { N = 700 };
    static uint8_t buf[1 + 2 * N];
    static float got[N];
    for (int i = 0; i < N; i++)
        put16(buf + 1 + 2 * i, (uint16_t)((i & 1 ? 0x8000 : 0) | (0x3f80 + i % 128)));
    ck_assert_int_eq(kvck_dequantize(KVCK_GGML_BF16, buf + 1, got, N), 0);
    for (int i = 0; i < N; i++) {
        float want = 1.0f + (float)(i % 128) / 128.0f;
        if (i & 1)
            want = -want;
        CHECK(got[i] == want, "bf16 run: element %d is %g, expected %g", i, (double)got[i],
              (double)want);
    }
}
END_TEST

/* ---- q4_0 ---------------------------------------------------------------- */

START_TEST(test_q4_0_blocks)
{
    /* Two blocks at an odd address.
     * Block 0: d = -0.5 (negative scale), byte j = j | (15 - j) << 4, so
     *   low nibbles 0..15 (both extremes) give elements 0..15 and high
     *   nibbles 15..0 give elements 16..31; y = (q - 8) * -0.5.
     * Block 1: d = 2, bytes alternate 0xf0 / 0x0f. */
    uint8_t buf[1 + 2 * 18];
    uint8_t *b0 = buf + 1, *b1 = buf + 1 + 18;
    put16(b0, H_M_HALF);
    for (int j = 0; j < 16; j++)
        b0[2 + j] = (uint8_t)(j | (15 - j) << 4);
    put16(b1, H_TWO);
    for (int j = 0; j < 16; j++)
        b1[2 + j] = j % 2 ? 0x0f : 0xf0;

    static const float want[64] = {
        /* block 0, low nibbles q = 0..15 */
        4.0f, 3.5f, 3.0f, 2.5f, 2.0f, 1.5f, 1.0f, 0.5f, 0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -2.5f,
        -3.0f, -3.5f,
        /* block 0, high nibbles q = 15..0 */
        -3.5f, -3.0f, -2.5f, -2.0f, -1.5f, -1.0f, -0.5f, 0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 2.5f, 3.0f,
        3.5f, 4.0f,
        /* block 1, low nibbles 0, 15, 0, 15 ... */
        -16.0f, 14.0f, -16.0f, 14.0f, -16.0f, 14.0f, -16.0f, 14.0f, -16.0f, 14.0f, -16.0f, 14.0f,
        -16.0f, 14.0f, -16.0f, 14.0f,
        /* block 1, high nibbles 15, 0, 15, 0 ... */
        14.0f, -16.0f, 14.0f, -16.0f, 14.0f, -16.0f, 14.0f, -16.0f, 14.0f, -16.0f, 14.0f, -16.0f,
        14.0f, -16.0f, 14.0f, -16.0f};
    float got[65];
    fill_sentinel(got, 65);
    ck_assert_int_eq(kvck_dequantize(KVCK_GGML_Q4_0, b0, got, 64), 0);
    expect_eq(got, want, 64, "q4_0");
    expect_sentinel(got + 64, 1, "q4_0 past n");
}
END_TEST

/* ---- q4_1 ---------------------------------------------------------------- */

START_TEST(test_q4_1_blocks)
{
    /* Block 0: d = 0.25, m = -3 (the min), byte j = (15 - j) | j << 4;
     *   y = q * 0.25 - 3.
     * Block 1: d = -1 (negative scale), m = 0.5, bytes alternate 0x0f / 0xf0;
     *   y = -q + 0.5: q = 15 -> -14.5, q = 0 -> 0.5 (the min itself). */
    uint8_t buf[2 * 20];
    uint8_t *b0 = buf, *b1 = buf + 20;
    put16(b0, H_QUARTER);
    put16(b0 + 2, H_M_THREE);
    for (int j = 0; j < 16; j++)
        b0[4 + j] = (uint8_t)((15 - j) | j << 4);
    put16(b1, H_M_ONE);
    put16(b1 + 2, H_HALF);
    for (int j = 0; j < 16; j++)
        b1[4 + j] = j % 2 ? 0xf0 : 0x0f;

    static const float want[64] = {
        /* block 0, low nibbles q = 15..0 */
        0.75f, 0.5f, 0.25f, 0.0f, -0.25f, -0.5f, -0.75f, -1.0f, -1.25f, -1.5f, -1.75f, -2.0f,
        -2.25f, -2.5f, -2.75f, -3.0f,
        /* block 0, high nibbles q = 0..15 */
        -3.0f, -2.75f, -2.5f, -2.25f, -2.0f, -1.75f, -1.5f, -1.25f, -1.0f, -0.75f, -0.5f, -0.25f,
        0.0f, 0.25f, 0.5f, 0.75f,
        /* block 1, low nibbles 15, 0, 15, 0 ... */
        -14.5f, 0.5f, -14.5f, 0.5f, -14.5f, 0.5f, -14.5f, 0.5f, -14.5f, 0.5f, -14.5f, 0.5f, -14.5f,
        0.5f, -14.5f, 0.5f,
        /* block 1, high nibbles 0, 15, 0, 15 ... */
        0.5f, -14.5f, 0.5f, -14.5f, 0.5f, -14.5f, 0.5f, -14.5f, 0.5f, -14.5f, 0.5f, -14.5f, 0.5f,
        -14.5f, 0.5f, -14.5f};
    float got[64];
    ck_assert_int_eq(kvck_dequantize(KVCK_GGML_Q4_1, b0, got, 64), 0);
    expect_eq(got, want, 64, "q4_1");

    /* Same data at an odd address. */
    uint8_t odd[1 + 40];
    memcpy(odd + 1, b0, 40);
    float got2[64];
    ck_assert_int_eq(kvck_dequantize(KVCK_GGML_Q4_1, odd + 1, got2, 64), 0);
    expect_eq(got2, want, 64, "q4_1 odd address");
}
END_TEST

/* ---- q8_0 ---------------------------------------------------------------- */

START_TEST(test_q8_0_blocks)
{
    /* Block 0: d = 0.5, the extremes -128 and 127 and a mix.
     * Block 1: d = -0.125, q = j - 16.
     * Block 2: d = 1365/4096 (a scale with a full mantissa), q = 3 at
     *   j = 0, -128 at j = 31, 0 elsewhere. */
    static const int8_t q0[32] = {-128, 127, -1,  0,   1,  2,   -2, 64,  -64, 100, -100,
                                  3,    -3,  10,  -10, 126, -127, 5, -5,  7,   -7,  11,
                                  -11,  20,  -20, 33,  -33, 50,  -50, 99, -99, 42};
    uint8_t buf[3 + 3 * 34];
    uint8_t *b = buf + 3;
    put16(b, H_HALF);
    memcpy(b + 2, q0, 32);
    put16(b + 34, H_M_EIGHTH);
    for (int j = 0; j < 32; j++)
        b[34 + 2 + j] = (uint8_t)(int8_t)(j - 16);
    put16(b + 68, H_THIRD);
    memset(b + 68 + 2, 0, 32);
    b[68 + 2] = 3;
    b[68 + 2 + 31] = 0x80; /* -128 */

    static const float want[96] = {
        /* block 0: q * 0.5 */
        -64.0f, 63.5f, -0.5f, 0.0f, 0.5f, 1.0f, -1.0f, 32.0f, -32.0f, 50.0f, -50.0f, 1.5f, -1.5f,
        5.0f, -5.0f, 63.0f, -63.5f, 2.5f, -2.5f, 3.5f, -3.5f, 5.5f, -5.5f, 10.0f, -10.0f, 16.5f,
        -16.5f, 25.0f, -25.0f, 49.5f, -49.5f, 21.0f,
        /* block 1: (j - 16) * -0.125 */
        2.0f, 1.875f, 1.75f, 1.625f, 1.5f, 1.375f, 1.25f, 1.125f, 1.0f, 0.875f, 0.75f, 0.625f,
        0.5f, 0.375f, 0.25f, 0.125f, 0.0f, -0.125f, -0.25f, -0.375f, -0.5f, -0.625f, -0.75f,
        -0.875f, -1.0f, -1.125f, -1.25f, -1.375f, -1.5f, -1.625f, -1.75f, -1.875f,
        /* block 2: 3 * 1365/4096 = 4095/4096, -128 * 1365/4096 = -1365/32 */
        0.999755859375f, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, -42.65625f};
    float got[97];
    fill_sentinel(got, 97);
    ck_assert_int_eq(kvck_dequantize(KVCK_GGML_Q8_0, b, got, 96), 0);
    expect_eq(got, want, 96, "q8_0");
    expect_sentinel(got + 96, 1, "q8_0 past n");
}
END_TEST

/* ---- q6_K ---------------------------------------------------------------- */

/* Offsets inside a 210-byte q6_K block. */
enum { Q6_QL = 0, Q6_QH = 128, Q6_SC = 192, Q6_D = 208, Q6_BYTES = 210 };

START_TEST(test_q6_K_hand)
{
    /* Block 0: d = 0.5; sub-block scales 1, -1, 2, -2, ..., 7, -7, -128,
     * 127. All ql/qh bytes 0 (q = 0, i.e. -32 after the offset) except a
     * few, chosen so every quarter (ql low/high nibble of byte l or l + 32,
     * qh bit pairs 0-1, 2-3, 4-5, 6-7) appears in both halves, in both
     * 16-runs of l:
     *   half 0, l = 0:  ql[0] = 0x5a, ql[32] = 0xf0, qh[0] = 0xe4 (pairs 0,1,2,3)
     *     e0:  q = 0xa | 0 << 4  = 10 -> -22 * 0.5 *  1 = -11
     *     e32: q = 0x0 | 1 << 4  = 16 -> -16 * 0.5 *  2 = -16
     *     e64: q = 0x5 | 2 << 4  = 37 ->   5 * 0.5 *  3 =   7.5
     *     e96: q = 0xf | 3 << 4  = 63 ->  31 * 0.5 *  4 =  62
     *   half 0, l = 8:  qh[8] = 0x02
     *     e8:  q = 0 | 2 << 4 = 32 -> 0 (the offset exactly cancels)
     *   half 0, l = 17: ql[17] = 0x0f, ql[49] = 0x3c, qh[17] = 0x1b (pairs 3,2,1,0)
     *     e17:  q = 0xf | 3 << 4 = 63 ->  31 * 0.5 * -1 = -15.5
     *     e49:  q = 0xc | 2 << 4 = 44 ->  12 * 0.5 * -2 = -12
     *     e81:  q = 0x0 | 1 << 4 = 16 -> -16 * 0.5 * -3 =  24
     *     e113: q = 0x3 | 0 << 4 =  3 -> -29 * 0.5 * -4 =  58
     *   half 1, l = 5:  ql[69] = 0x21, ql[101] = 0x87, qh[37] = 0xff
     *     e133: q = 0x1 | 48 = 49 -> 17 * 0.5 *    5 =    42.5
     *     e165: q = 0x7 | 48 = 55 -> 23 * 0.5 *    6 =    69
     *     e197: q = 0x2 | 48 = 50 -> 18 * 0.5 *    7 =    63
     *     e229: q = 0x8 | 48 = 56 -> 24 * 0.5 * -128 = -1536
     *   half 1, l = 31: ql[95] = 0xff, ql[127] = 0x96, qh[63] = 0
     *     e159: q = 15 -> -17 * 0.5 *  -5 =    42.5
     *     e191: q =  6 -> -26 * 0.5 *  -6 =    78
     *     e223: q = 15 -> -17 * 0.5 *  -7 =    59.5
     *     e255: q =  9 -> -23 * 0.5 * 127 = -1460.5
     * Every other element is -32 * 0.5 * scale = -16 * scale.
     *
     * Block 1 (same call): d = -2, scales s - 8 for sub-block s, every ql
     * and qh byte 0xff (q = 63 -> 31): y = -62 * (s - 8). */
    static const int8_t sc0[16] = {1, -1, 2, -2, 3, -3, 4, -4, 5, -5, 6, -6, 7, -7, -128, 127};
    static const float base0[16] = {-16,  16,  -32, 32,  -48, 48,   -64,  64,
                                    -80, 80, -96, 96, -112, 112, 2048, -2032};
    static const struct {
        int e;
        float y;
    } hot[] = {{0, -11.0f},    {32, -16.0f},   {64, 7.5f},    {96, 62.0f},    {8, 0.0f},
               {17, -15.5f},   {49, -12.0f},   {81, 24.0f},   {113, 58.0f},   {133, 42.5f},
               {165, 69.0f},   {197, 63.0f},   {229, -1536.0f}, {159, 42.5f}, {191, 78.0f},
               {223, 59.5f},   {255, -1460.5f}};
    static const float base1[16] = {496,  434,  372,  310,  248,  186,  124,  62,
                                    0,    -62,  -124, -186, -248, -310, -372, -434};

    uint8_t buf[1 + 2 * Q6_BYTES];
    uint8_t *b0 = buf + 1, *b1 = b0 + Q6_BYTES;
    memset(b0, 0, Q6_BYTES);
    b0[Q6_QL + 0] = 0x5a;
    b0[Q6_QL + 32] = 0xf0;
    b0[Q6_QH + 0] = 0xe4;
    b0[Q6_QH + 8] = 0x02;
    b0[Q6_QL + 17] = 0x0f;
    b0[Q6_QL + 49] = 0x3c;
    b0[Q6_QH + 17] = 0x1b;
    b0[Q6_QL + 64 + 5] = 0x21;
    b0[Q6_QL + 64 + 37] = 0x87;
    b0[Q6_QH + 32 + 5] = 0xff;
    b0[Q6_QL + 64 + 31] = 0xff;
    b0[Q6_QL + 64 + 63] = 0x96;
    b0[Q6_QH + 32 + 31] = 0x00;
    memcpy(b0 + Q6_SC, sc0, 16);
    put16(b0 + Q6_D, H_HALF);

    memset(b1, 0xff, Q6_QH + 64);
    for (int s = 0; s < 16; s++)
        b1[Q6_SC + s] = (uint8_t)(int8_t)(s - 8);
    put16(b1 + Q6_D, H_M_TWO);

    static float want[512];
    for (int e = 0; e < 256; e++) {
        want[e] = base0[e / 16];
        want[256 + e] = base1[e / 16];
    }
    for (size_t i = 0; i < sizeof hot / sizeof hot[0]; i++)
        want[hot[i].e] = hot[i].y;

    static float got[513];
    fill_sentinel(got, 513);
    ck_assert_int_eq(kvck_dequantize(KVCK_GGML_Q6_K, b0, got, 512), 0);
    expect_eq(got, want, 512, "q6_K");
    expect_sentinel(got + 512, 1, "q6_K past n");
}
END_TEST

/* Places the 6-bit quant q of element e (0..255) into a q6_K block,
 * element by element after ggml's layout: element e = 128h + 32k + l sits
 * in ql[64h + l + 32 (k & 1)] (low nibble if k < 2, else high) and in bits
 * 2k, 2k + 1 of qh[32h + l]. */
static void q6_put(uint8_t *blk, int e, int q)
{
    int h = e / 128, k = (e % 128) / 32, l = e % 32;
    int ql = Q6_QL + 64 * h + l + 32 * (k & 1);
    int qh = Q6_QH + 32 * h + l;
    blk[ql] |= (uint8_t)((q & 0x0f) << (k < 2 ? 0 : 4));
    blk[qh] |= (uint8_t)((q >> 4) << (2 * k));
}

START_TEST(test_q6_K_packed)
{
    /* Three blocks of random quants and scales, power-of-two d, expectation
     * d * scale * (q - 32), all exact. */
    enum { NB = 3, N = NB * 256 };
    static uint8_t buf[3 + NB * Q6_BYTES];
    static float want[N], got[N];
    uint8_t *b = buf + 3;
    memset(buf, 0, sizeof buf);
    for (int i = 0; i < NB; i++) {
        uint8_t *blk = b + i * Q6_BYTES;
        uint16_t h;
        float d = rnd_pow2_scale(&h);
        put16(blk + Q6_D, h);
        int8_t sc[16];
        for (int s = 0; s < 16; s++) {
            sc[s] = (int8_t)((int)(rnd() % 256u) - 128);
            blk[Q6_SC + s] = (uint8_t)sc[s];
        }
        for (int e = 0; e < 256; e++) {
            int q = (int)(rnd() % 64u);
            if (e < 4)
                q = e == 0 ? 0 : e == 1 ? 63 : e == 2 ? 32 : 31; /* extremes, offset */
            q6_put(blk, e, q);
            want[256 * i + e] = d * (float)sc[e / 16] * (float)(q - 32);
        }
    }
    ck_assert_int_eq(kvck_dequantize(KVCK_GGML_Q6_K, b, got, N), 0);
    expect_eq(got, want, N, "q6_K packed");
}
END_TEST

/* ---- 32-element formats, packed at random --------------------------------- */

START_TEST(test_q32_packed)
{
    /* Five blocks of each of q4_0, q4_1, q8_0 at odd addresses, quants
     * placed by the nibble rule (low nibble of byte j: element j; high:
     * element j + 16). */
    enum { NB = 5, N = NB * 32 };
    static uint8_t buf[1 + NB * 34];
    static float want[N], got[N];

    for (int pass = 0; pass < 3; pass++) {
        uint32_t type = pass == 0 ? KVCK_GGML_Q4_0 : pass == 1 ? KVCK_GGML_Q4_1 : KVCK_GGML_Q8_0;
        size_t bytes = pass == 0 ? 18 : pass == 1 ? 20 : 34;
        uint8_t *b = buf + 1;
        memset(buf, 0, sizeof buf);
        for (int i = 0; i < NB; i++) {
            uint8_t *blk = b + (size_t)i * bytes;
            uint16_t hd, hm;
            float d = rnd_pow2_scale(&hd), m = rnd_pow2_scale(&hm);
            put16(blk, hd);
            if (type == KVCK_GGML_Q4_1)
                put16(blk + 2, hm);
            for (int j = 0; j < 32; j++) {
                float *w = &want[32 * i + j];
                if (type == KVCK_GGML_Q8_0) {
                    int q = (int)(rnd() % 256u) - 128;
                    blk[2 + j] = (uint8_t)(int8_t)q;
                    *w = (float)q * d;
                } else {
                    int q = (int)(rnd() % 16u);
                    uint8_t *qs = blk + (type == KVCK_GGML_Q4_1 ? 4 : 2);
                    qs[j % 16] |= (uint8_t)(q << (j < 16 ? 0 : 4));
                    *w = type == KVCK_GGML_Q4_0 ? (float)(q - 8) * d : (float)q * d + m;
                }
            }
        }
        ck_assert_int_eq(kvck_dequantize(type, b, got, N), 0);
        expect_eq(got, want, N, kvck_ggml_type_name(type));
    }
}
END_TEST

/* ---- errors ---------------------------------------------------------------- */

START_TEST(test_errors)
{
    static uint8_t src[4 * 292]; /* zeros: big enough for any case below */
    float dst[600];

    /* Unknown ids and known types without a dequantizer. */
    static const uint32_t bad_types[] = {99,
                                         4,
                                         UINT32_MAX,
                                         KVCK_GGML_Q4_K,
                                         KVCK_GGML_Q5_0,
                                         KVCK_GGML_Q5_1,
                                         KVCK_GGML_Q8_1,
                                         KVCK_GGML_Q2_K,
                                         KVCK_GGML_Q3_K,
                                         KVCK_GGML_Q5_K,
                                         KVCK_GGML_Q8_K};
    for (size_t i = 0; i < sizeof bad_types / sizeof bad_types[0]; i++) {
        uint32_t t = bad_types[i];
        size_t n = kvck_ggml_block_elems(t) ? kvck_ggml_block_elems(t) : 32;
        fill_sentinel(dst, 600);
        CHECK(kvck_dequantize(t, src, dst, n) == -1, "type %u: expected -1", (unsigned)t);
        expect_sentinel(dst, 600, "rejected type");
    }

    /* n not a multiple of the block. */
    static const struct {
        uint32_t type;
        size_t n;
    } bad_n[] = {{KVCK_GGML_Q4_0, 31}, {KVCK_GGML_Q4_0, 33}, {KVCK_GGML_Q4_0, 1},
                 {KVCK_GGML_Q4_1, 48}, {KVCK_GGML_Q8_0, 16}, {KVCK_GGML_Q8_0, 65},
                 {KVCK_GGML_Q6_K, 32}, {KVCK_GGML_Q6_K, 255}, {KVCK_GGML_Q6_K, 257},
                 {KVCK_GGML_Q6_K, 384}};
    for (size_t i = 0; i < sizeof bad_n / sizeof bad_n[0]; i++) {
        fill_sentinel(dst, 600);
        CHECK(kvck_dequantize(bad_n[i].type, src, dst, bad_n[i].n) == -1, "%s n=%zu: expected -1",
              kvck_ggml_type_name(bad_n[i].type), bad_n[i].n);
        expect_sentinel(dst, 600, "rejected n");
    }

    /* NULL pointers with work to do. */
    ck_assert_int_eq(kvck_dequantize(KVCK_GGML_F32, NULL, dst, 4), -1);
    ck_assert_int_eq(kvck_dequantize(KVCK_GGML_Q4_0, src, NULL, 32), -1);

    /* n == 0 is valid for a supported type and touches nothing. */
    fill_sentinel(dst, 600);
    ck_assert_int_eq(kvck_dequantize(KVCK_GGML_Q6_K, src, dst, 0), 0);
    ck_assert_int_eq(kvck_dequantize(KVCK_GGML_F16, NULL, NULL, 0), 0);
    expect_sentinel(dst, 600, "n = 0");
    /* ... but not for a type that cannot be dequantized. */
    ck_assert_int_eq(kvck_dequantize(KVCK_GGML_Q4_K, src, dst, 0), -1);
    ck_assert_int_eq(kvck_dequantize(99, src, dst, 0), -1);

    /* Zero bytes decode to zeros (q4_0: (0 - 8) * 0 = -0). */
    ck_assert_int_eq(kvck_dequantize(KVCK_GGML_Q6_K, src, dst, 512), 0);
    for (int i = 0; i < 512; i++)
        CHECK(dst[i] == 0.0f, "q6_K zero block: element %d is %g", i, (double)dst[i]);
}
END_TEST

/* ---- runner ---------------------------------------------------------------- */

static Suite *dequant_suite(void)
{
    Suite *s = suite_create("dequant");

    TCase *tc = tcase_create("table");
    tcase_add_test(tc, test_enum_values);
    tcase_add_test(tc, test_size_table);
    tcase_add_test(tc, test_names);
    tcase_add_test(tc, test_can_dequantize);
    tcase_add_test(tc, test_unknown_ids);
    suite_add_tcase(s, tc);

    tc = tcase_create("floats");
    tcase_add_test(tc, test_f32_unaligned);
    tcase_add_test(tc, test_f16_specials);
    tcase_add_test(tc, test_f16_long_run);
    tcase_add_test(tc, test_bf16_specials);
    tcase_add_test(tc, test_bf16_long_run);
    suite_add_tcase(s, tc);

    tc = tcase_create("blocks");
    tcase_add_test(tc, test_q4_0_blocks);
    tcase_add_test(tc, test_q4_1_blocks);
    tcase_add_test(tc, test_q8_0_blocks);
    tcase_add_test(tc, test_q6_K_hand);
    tcase_add_test(tc, test_q6_K_packed);
    tcase_add_test(tc, test_q32_packed);
    suite_add_tcase(s, tc);

    tc = tcase_create("errors");
    tcase_add_test(tc, test_errors);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(dequant_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
