/*
 * test_quant.c -- Check suite for the quantized-store kernels
 * (kernels/kvck_quant.h): bit packing and its byte layout, formats,
 * quantize/dequantize error bounds, outliers, the Hadamard rotation, the
 * RoPE table, the q_hi/q_lo bounds, and attention on packed codes against
 * dequantize-then-attend.
 *
 * The whole suite runs once per instruction-set path the CPU has (generic,
 * avx2, avx512; KVCK_ISA caps them). Random cases are seeded; the seed is
 * printed and KVCK_TEST_SEED=<n> replays it.
 */
#include "kvck.h"
#include "kvck_quant.h"
#include "ktest.h"

#include <check.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t g_seed = 0x71756e74u; /* default: reproducible CI */

static const unsigned widths[] = {1, 2, 3, 4, 5, 6, 8};
#define N_WIDTHS (sizeof widths / sizeof widths[0])

static float f16r(float x) /* x rounded to fp16 */
{
    return kvck_f16_to_f32(kvck_f32_to_f16(x));
}

/* ---- bit packing ------------------------------------------------------------ */

/* The layout as the header words it, written independently of the kernel:
 * chunks of 128 / w values (planes 2, 4), m = ceil(r w / 8) bytes for a
 * chunk of r, value i at byte i % m, field i / m. */
static void ref_plane(unsigned w, unsigned from, const uint8_t *codes, size_t n, uint8_t *out)
{
    const unsigned mask = (1u << w) - 1u;
    if (w == 8 || w == 1) {
        for (size_t i = 0; i < n; i++) {
            unsigned f = (codes[i] >> from) & mask;
            if (w == 8)
                out[i] = (uint8_t)f;
            else
                out[i / 8] = (uint8_t)(out[i / 8] | f << (i % 8));
        }
        return;
    }
    const size_t C = 128 / w;
    for (size_t base = 0; base < n; base += C) {
        size_t r = n - base < C ? n - base : C, m = (r * w + 7) / 8;
        uint8_t *o = out + base * w / 8;
        for (size_t i = 0; i < r; i++)
            o[i % m] = (uint8_t)(o[i % m] | ((codes[base + i] >> from) & mask) << (i / m * w));
    }
}

static size_t ref_pack(unsigned bits, const uint8_t *codes, size_t n, uint8_t *out)
{
    unsigned lo = bits == 3 ? 2 : bits == 5 || bits == 6 ? 4 : bits;
    unsigned hi = bits - lo;
    size_t b1 = (n * lo + 7) / 8, b2 = (n * hi + 7) / 8;
    memset(out, 0, b1 + b2);
    ref_plane(lo, 0, codes, n, out);
    if (hi)
        ref_plane(hi, lo, codes, n, out + b1);
    return b1 + b2;
}

START_TEST(test_pack_roundtrip)
{
    static const size_t lens[] = {1, 2, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 95, 96, 97,
                                  100, 127, 128, 129, 200, 255, 257, 512};
    rng g = {g_seed ^ 0x9ac};
    uint8_t codes[512], back[512], packed[600], want[600];
    for (size_t wi = 0; wi < N_WIDTHS; wi++) {
        const unsigned w = widths[wi];
        CHECK1(kvck_qbits_valid(w));
        for (size_t li = 0; li < sizeof lens / sizeof lens[0]; li++) {
            const size_t n = lens[li];
            for (size_t i = 0; i < n; i++)
                codes[i] = (uint8_t)(rng_next(&g) & ((1u << w) - 1u));
            codes[0] = (uint8_t)((1u << w) - 1u); /* the all-ones code somewhere */
            const size_t nb = kvck_pack_bytes(w, n);
            memset(packed, 0xa5, sizeof packed);
            kvck_pack(w, codes, n, packed);
            CHECK(ref_pack(w, codes, n, want) == nb, "width %u n %zu: %zu bytes", w, n, nb);
            CHECK(nb <= (n * w + 7) / 8 + 1, "width %u n %zu: %zu bytes", w, n, nb);
            CHECK(memcmp(packed, want, nb) == 0, "width %u n %zu: layout differs", w, n);
            CHECK(packed[nb] == 0xa5, "width %u n %zu: wrote past the end", w, n);
            memset(back, 0xff, sizeof back);
            kvck_unpack(w, packed, n, back);
            CHECK(memcmp(back, codes, n) == 0, "width %u n %zu: round trip", w, n);
        }
    }
    CHECK1(!kvck_qbits_valid(7) && !kvck_qbits_valid(9) && kvck_qbits_valid(0));
    CHECK1(kvck_pack_bytes(0, 100) == 0 && kvck_pack_bytes(7, 100) == 0);
    CHECK1(kvck_pack_bytes(3, 10) == 3 + 2 && kvck_pack_bytes(5, 10) == 5 + 2);
    CHECK1(kvck_pack_bytes(6, 10) == 5 + 3 && kvck_pack_bytes(4, 64) == 32);
}
END_TEST

/* Hand-worked bytes, one example per plane and per two-plane width. */
START_TEST(test_pack_layout)
{
    uint8_t out[64];
    struct ex {
        unsigned bits;
        size_t n;
        uint8_t codes[10];
        size_t nb;
        uint8_t bytes[8];
    };
    static const struct ex ex[] = {
        {8, 3, {7, 200, 255}, 3, {7, 200, 255}},
        /* plane 4, partial chunk of 5: m = 3; values 0..2 low nibbles of
         * bytes 0..2, values 3, 4 high nibbles of bytes 0, 1. */
        {4, 5, {1, 2, 3, 4, 5}, 3, {0x41, 0x52, 0x03}},
        /* plane 2, 5 values: m = 2; byte 0 holds values 0, 2, 4; byte 1
         * values 1, 3. */
        {2, 5, {1, 2, 3, 0, 2}, 2, {0x2d, 0x02}},
        /* plane 1: little-endian bits. */
        {1, 10, {1, 0, 1, 1, 0, 0, 0, 1, 1, 1}, 2, {0x8d, 0x03}},
        /* 3 = 2 + 1: low 2-bit plane (m = 1), then the high bits. */
        {3, 4, {5, 2, 7, 0}, 2, {0x39, 0x05}},
        /* 5 = 4 + 1, 3 values: low nibbles 1, 3, 15 (m = 2), high bits 1, 0, 1. */
        {5, 3, {17, 3, 31}, 3, {0xf1, 0x03, 0x05}},
        /* 6 = 4 + 2, 2 values: nibbles 15, 4 in one byte; high 3, 1. */
        {6, 2, {63, 20}, 2, {0x4f, 0x07}},
    };
    for (size_t e = 0; e < sizeof ex / sizeof ex[0]; e++) {
        const uint8_t *w1 = ex[e].bytes;
        CHECK(kvck_pack_bytes(ex[e].bits, ex[e].n) == ex[e].nb, "example %zu: size", e);
        kvck_pack(ex[e].bits, ex[e].codes, ex[e].n, out);
        for (size_t i = 0; i < ex[e].nb; i++)
            CHECK(out[i] == w1[i], "example %zu (width %u): byte %zu is %02x, want %02x", e,
                  ex[e].bits, i, out[i], w1[i]);
    }
    /* Full chunks: plane 4, 32 values in 16 bytes, value i low nibble of
     * byte i for i < 16, high nibble of byte i - 16 after. */
    uint8_t codes[128];
    for (size_t i = 0; i < 32; i++)
        codes[i] = (uint8_t)(i < 16 ? i : 31 - i);
    kvck_pack(4, codes, 32, out);
    for (size_t i = 0; i < 16; i++)
        CHECK(out[i] == (uint8_t)(i | (15 - i) << 4), "plane 4: byte %zu = %02x", i, out[i]);
    /* plane 2, 64 values: value i in byte i % 16, bits 2 (i / 16). */
    for (size_t i = 0; i < 64; i++)
        codes[i] = (uint8_t)(i / 16);
    kvck_pack(2, codes, 64, out);
    for (size_t i = 0; i < 16; i++)
        CHECK(out[i] == 0xe4, "plane 2: byte %zu = %02x", i, out[i]);
    /* 16 consecutive 1-bit values are one little-endian 16-bit word. */
    for (size_t i = 0; i < 16; i++)
        codes[i] = (uint8_t)((0xb3c5u >> i) & 1u);
    kvck_pack(1, codes, 16, out);
    CHECK1(out[0] == 0xc5 && out[1] == 0xb3);
}
END_TEST

/* ---- formats ------------------------------------------------------------------ */

START_TEST(test_qfmt)
{
    kvck_qfmt f;
    static const float lev2[4] = {0.0f, 0.2f, 0.6f, 1.0f};
    static const float bad2[4] = {0.0f, 0.6f, 0.2f, 1.0f};
    static const float bad2b[4] = {0.1f, 0.2f, 0.6f, 1.0f};

    ck_assert_int_eq(kvck_qfmt_uniform(&f, 64, 4, 0), 0);
    CHECK1(f.row_bytes == 32 && f.n_groups == 1 && f.gfirst[0] == 0 && f.gfirst[1] == 64);
    for (unsigned w = 1; w <= 8; w++)
        for (unsigned c = 0; c < (1u << w); c++)
            CHECK1(f.ulev[w][c] == (float)c / (float)((1u << w) - 1u));
    ck_assert_int_eq(kvck_qfmt_uniform(&f, 80, 3, 24), 0);
    /* 80 channels in groups of 24: 24, 24, 24, 8. */
    CHECK1(f.n_groups == 4 && f.gfirst[3] == 72 && f.gfirst[4] == 80);
    CHECK1(f.row_bytes == kvck_pack_bytes(3, 80));
    CHECK1(kvck_q_scale_bytes(&f, KVCK_QS_TOKEN, 10) == 10 * 4 * 4);
    CHECK1(kvck_q_scale_bytes(&f, KVCK_QS_CHANNEL, 10) == 80 * 4);

    ck_assert_int_eq(kvck_qfmt_uniform(&f, 64, 7, 0), -1);
    ck_assert_int_eq(kvck_qfmt_uniform(&f, KVCK_MAX_HEAD_DIM + 2, 4, 0), -1);
    ck_assert_int_eq(kvck_qfmt_uniform(&f, 0, 4, 0), -1);
    ck_assert_int_eq(kvck_qfmt_uniform(&f, 256, 4, 1), -1); /* 256 groups */
    ck_assert_int_eq(kvck_qfmt_uniform(&f, 128, 4, 1), 0);  /* 128 is the limit */

    /* Mixed segments: groups split per segment, offsets follow. */
    memset(&f, 0, sizeof f);
    f.d = 70;
    f.n_seg = 3;
    f.seg[0] = (kvck_qseg){0, 20, 4, 0, NULL};
    f.seg[1] = (kvck_qseg){20, 13, 0, 0, NULL};
    f.seg[2] = (kvck_qseg){33, 37, 2, 0, lev2};
    f.group = 16;
    ck_assert_int_eq(kvck_qfmt_finish(&f), 0);
    CHECK1(f.seg[0].offset == 0 && f.seg[1].offset == 10 && f.seg[2].offset == 10);
    CHECK1(f.row_bytes == 10 + 10);
    /* 20 -> 16 + 4, 13 -> 13, 37 -> 16 + 16 + 5 */
    static const uint16_t gf[] = {0, 16, 20, 33, 49, 65, 70};
    CHECK1(f.n_groups == 6);
    for (int i = 0; i <= 6; i++)
        CHECK(f.gfirst[i] == gf[i], "gfirst[%d] = %u", i, f.gfirst[i]);

    kvck_qfmt bad = f;
    bad.seg[2].levels = bad2;
    ck_assert_int_eq(kvck_qfmt_finish(&bad), -1);
    bad.seg[2].levels = bad2b;
    ck_assert_int_eq(kvck_qfmt_finish(&bad), -1);
    bad = f;
    bad.seg[1].first = 21; /* gap */
    ck_assert_int_eq(kvck_qfmt_finish(&bad), -1);
    bad = f;
    bad.seg[2].len = 36; /* does not reach d */
    ck_assert_int_eq(kvck_qfmt_finish(&bad), -1);
    bad = f;
    bad.seg[2].len = 38; /* past d */
    ck_assert_int_eq(kvck_qfmt_finish(&bad), -1);
    bad = f;
    bad.n_seg = 0;
    ck_assert_int_eq(kvck_qfmt_finish(&bad), -1);
}
END_TEST

/* ---- quantize / dequantize ------------------------------------------------------- */

/* A mixed format over d = 80: widths 4, 0, 2 (table), 8, 3 (table), 1,
 * 5, 6 in segments of odd lengths, per-token groups of `group`. */
static const float tab2[4] = {0.0f, 0.1f, 0.35f, 1.0f};
static const float tab3[8] = {0.0f, 0.05f, 0.15f, 0.3f, 0.5f, 0.7f, 0.9f, 1.0f};
static void mixed_fmt(kvck_qfmt *f, uint32_t group)
{
    memset(f, 0, sizeof *f);
    static const uint32_t len[8] = {11, 7, 13, 9, 10, 5, 12, 13};
    static const uint32_t bits[8] = {4, 0, 2, 8, 3, 1, 5, 6};
    f->d = 80;
    f->n_seg = 8;
    uint32_t c = 0;
    for (int i = 0; i < 8; i++) {
        f->seg[i].first = c;
        f->seg[i].len = len[i];
        f->seg[i].bits = bits[i];
        f->seg[i].levels = bits[i] == 2 ? tab2 : bits[i] == 3 ? tab3 : NULL;
        c += len[i];
    }
    f->group = group;
    ck_assert_int_eq(kvck_qfmt_finish(f), 0);
}

/* The (scale, zero) fp16 pair governing value (j, c). */
static void sz_of(const kvck_qfmt *f, int mode, const uint16_t *sz, size_t j, uint32_t c,
                  float *sf, float *zf)
{
    if (mode == KVCK_QS_CHANNEL) {
        *sf = kvck_f16_to_f32(sz[2 * c]), *zf = kvck_f16_to_f32(sz[2 * c + 1]);
        return;
    }
    uint32_t g = 0;
    while (c >= f->gfirst[g + 1])
        g++;
    const uint16_t *p = sz + (j * f->n_groups + g) * 2;
    *sf = kvck_f16_to_f32(p[0]), *zf = kvck_f16_to_f32(p[1]);
}

static const kvck_qseg *seg_of(const kvck_qfmt *f, uint32_t c)
{
    for (uint32_t i = 0; i < f->n_seg; i++)
        if (c < f->seg[i].first + f->seg[i].len)
            return &f->seg[i];
    return &f->seg[f->n_seg - 1];
}

/* Quantizes x [n][ldx] in format f, checks every value's error against
 * float64: (scale, zero) as specified from the group's min and max, x^ the
 * level nearest x (no other level closer beyond rounding), hence within
 * half the widest level gap times scale, plus what rounding zero to fp16
 * moved the bottom of the range. */
static void check_quant(const kvck_qfmt *f, int mode, size_t n, const float *x, size_t ldx,
                        const char *what)
{
    const size_t d = f->d;
    uint8_t *codes = xmalloc(n * f->row_bytes + 1);
    uint16_t *sz = xmalloc(kvck_q_scale_bytes(f, mode, n) + 2);
    float *y = xmalloc(n * ldx * sizeof *y);
    kvck_q_quantize(f, mode, n, x, ldx, NULL, codes, sz);
    kvck_q_dequantize(f, mode, n, codes, sz, y, ldx);
    for (size_t j = 0; j < n; j++) {
        for (uint32_t c = 0; c < d; c++) {
            const kvck_qseg *s = seg_of(f, c);
            float sf, zf;
            sz_of(f, mode, sz, j, c, &sf, &zf);
            /* The group's min and max, in double. */
            double m = INFINITY, M = -INFINITY;
            for (size_t jj = 0; jj < n; jj++)
                for (uint32_t cc = 0; cc < d; cc++) {
                    int same;
                    if (mode == KVCK_QS_CHANNEL) {
                        same = cc == c;
                    } else {
                        float a, b;
                        sz_of(f, mode, sz, j, cc, &a, &b);
                        uint32_t g1 = 0, g2 = 0;
                        while (c >= f->gfirst[g1 + 1])
                            g1++;
                        while (cc >= f->gfirst[g2 + 1])
                            g2++;
                        same = jj == j && g1 == g2;
                    }
                    if (same) {
                        double v = x[jj * ldx + cc];
                        m = v < m ? v : m;
                        M = v > M ? v : M;
                    }
                }
            CHECK(zf == f16r((float)m), "%s (%zu,%u): zero %a for min %a", what, j, c,
                  (double)zf, m);
            if (M == m) {
                CHECK(sf == 0.0f, "%s (%zu,%u): constant group, scale %a", what, j, c,
                      (double)sf);
            } else if (M - zf > 0) {
                CHECK(sf >= M - zf, "%s (%zu,%u): scale %a below range %a", what, j, c,
                      (double)sf, M - zf);
                /* The next fp16 down would not cover M. */
                uint16_t h = kvck_f32_to_f16(sf);
                CHECK(h == 0 || kvck_f16_to_f32((uint16_t)(h - 1)) < M - zf,
                      "%s (%zu,%u): scale %a not the smallest", what, j, c, (double)sf);
            }
            const double xv = x[j * ldx + c], yv = y[j * ldx + c];
            CHECK(yv == kvck_q_value(f, mode, codes, sz, j, c), "%s (%zu,%u): q_value", what, j,
                  c);
            const double slack = 4e-7 * (fabs(xv) + fabs(zf) + sf);
            if (s->bits == 0) {
                CHECK(yv == zf, "%s (%zu,%u): width 0 gives %a, zero %a", what, j, c, yv,
                      (double)zf);
                continue;
            }
            const unsigned L = (1u << s->bits) - 1u;
            const float *lev = s->levels ? s->levels : f->ulev[s->bits];
            double gap = 0;
            for (unsigned i = 0; i < L; i++)
                gap = lev[i + 1] - lev[i] > gap ? lev[i + 1] - lev[i] : gap;
            /* Rounding zero to fp16 moves the bottom level off the min. */
            const double below = fabs(zf - m);
            const double err = fabs(xv - yv);
            CHECK(err <= (sf * gap / 2 > below ? sf * gap / 2 : below) + slack,
                  "%s (%zu,%u) width %u: |%a - %a| = %g > half step %g", what, j, c, s->bits, xv,
                  yv, err, sf * gap / 2);
            for (unsigned i = 0; i <= L; i++) {
                double alt = (double)zf + (double)sf * lev[i];
                CHECK(err <= fabs(xv - alt) + slack, "%s (%zu,%u): level %u nearer (%g < %g)",
                      what, j, c, i, fabs(xv - alt), err);
            }
        }
    }
    free(codes);
    free(sz);
    free(y);
}

START_TEST(test_quant_error)
{
    rng g = {g_seed ^ 0x9e7};
    const size_t n = 23, ldx = 83;
    float *x = xmalloc(n * ldx * sizeof *x);
    static const uint32_t groups[] = {0, 24, 32, 7};
    char what[96];
    for (size_t wi = 0; wi < N_WIDTHS; wi++) {
        for (size_t gi = 0; gi < 4; gi++) {
            for (int mode = 0; mode < 2; mode++) {
                kvck_qfmt f;
                ck_assert_int_eq(kvck_qfmt_uniform(&f, 80, widths[wi], groups[gi]), 0);
                /* Ranges of every kind: offsets, tiny spans, a constant channel. */
                for (size_t j = 0; j < n; j++)
                    for (size_t c = 0; c < ldx; c++) {
                        float off = (float)(c % 5) - 2.0f, amp = c % 7 == 3 ? 1e-3f : 1.5f;
                        x[j * ldx + c] = off + amp * rng_unit(&g);
                        if (c == 17)
                            x[j * ldx + c] = 0.37f;
                    }
                snprintf(what, sizeof what, "width %u group %u %s", widths[wi], groups[gi],
                         mode ? "channel" : "token");
                check_quant(&f, mode, n, x, ldx, what);
            }
        }
    }
    /* Mixed segments (width 0 and tables included), both modes. */
    for (int mode = 0; mode < 2; mode++) {
        kvck_qfmt f;
        mixed_fmt(&f, 6);
        fill(&g, x, n * ldx, 2.0f);
        check_quant(&f, mode, n, x, ldx, mode ? "mixed channel" : "mixed token");
    }
    free(x);
}
END_TEST

/* Ties go to the lower code; skipped values get the clamped code. */
START_TEST(test_quant_ties_skip)
{
    kvck_qfmt f;
    ck_assert_int_eq(kvck_qfmt_uniform(&f, 4, 1, 0), 0);
    /* min 0, max 1: scale 1; 0.5 is the midpoint of levels 0 and 1. */
    float x[4] = {0.0f, 0.5f, 1.0f, 0.5000001f}, y[4];
    uint8_t codes[1];
    uint16_t sz[2];
    kvck_q_quantize(&f, KVCK_QS_TOKEN, 1, x, 4, NULL, codes, sz);
    CHECK(codes[0] == 0x0c, "codes %02x", codes[0]); /* 0, 0 (tie: lower), 1, 1 */
    ck_assert_int_eq(kvck_qfmt_uniform(&f, 4, 2, 0), 0);
    float x2[4] = {-1.0f, 50.0f, 1.0f, 0.0f};
    uint8_t skip[4] = {0, 1, 0, 0};
    kvck_q_quantize(&f, KVCK_QS_TOKEN, 1, x2, 4, skip, codes, sz);
    kvck_q_dequantize(&f, KVCK_QS_TOKEN, 1, codes, sz, y, 4);
    CHECK1(kvck_f16_to_f32(sz[1]) == -1.0f && kvck_f16_to_f32(sz[0]) == 2.0f);
    CHECK(y[1] == 1.0f, "skipped value clamps to the top: %g", (double)y[1]);
    CHECK1(y[0] == -1.0f && y[2] == 1.0f);
    /* 0 is at t = 0.5: between levels 1/3 and 2/3, nearer... 0.5 vs 1/3
     * (0.1667) and 2/3 (0.1667): a tie in exact arithmetic; the float
     * midpoint decides, and either neighbour is within half a step. */
    CHECK1(fabs(y[3]) <= 1.0f / 3.0f + 1e-6f);
}
END_TEST

/* ---- outliers ----------------------------------------------------------------------- */

/* The greedy rule, written plainly: at each step try removing each
 * remaining value of each group with > 2 values, keep the largest cut of
 * the squared range (first group, then smaller value, on ties). */
static size_t naive_outliers(const kvck_qfmt *f, int mode, size_t n, const float *x, size_t ldx,
                             size_t k, uint8_t *out /* [n][d] */)
{
    const size_t d = f->d;
    memset(out, 0, n * d);
    size_t chosen = 0;
    size_t G = mode == KVCK_QS_CHANNEL ? d : n * f->n_groups;
    for (; chosen < k; chosen++) {
        double best = -1;
        size_t bj = 0, bc = 0;
        for (size_t gi = 0; gi < G; gi++) {
            /* members of group gi */
            size_t j0, j1, c0, c1;
            if (mode == KVCK_QS_CHANNEL)
                j0 = 0, j1 = n, c0 = gi, c1 = gi + 1;
            else
                j0 = gi / f->n_groups, j1 = j0 + 1, c0 = f->gfirst[gi % f->n_groups],
                c1 = f->gfirst[gi % f->n_groups + 1];
            double m = INFINITY, M = -INFINITY;
            size_t cnt = 0;
            for (size_t j = j0; j < j1; j++)
                for (size_t c = c0; c < c1; c++)
                    if (!out[j * d + c]) {
                        double v = x[j * ldx + c];
                        m = v < m ? v : m;
                        M = v > M ? v : M;
                        cnt++;
                    }
            if (cnt <= 2)
                continue;
            for (int side = 0; side < 2; side++) {
                /* remove one value equal to the min (side 0) or max */
                double target = side ? M : m, m2 = INFINITY, M2 = -INFINITY;
                size_t tj = 0, tc = 0;
                int removed = 0;
                for (size_t j = j0; j < j1; j++)
                    for (size_t c = c0; c < c1; c++) {
                        if (out[j * d + c])
                            continue;
                        double v = x[j * ldx + c];
                        if (!removed && v == target) {
                            removed = 1, tj = j, tc = c;
                            continue;
                        }
                        m2 = v < m2 ? v : m2;
                        M2 = v > M2 ? v : M2;
                    }
                double gain = (M - m) * (M - m) - (M2 - m2) * (M2 - m2);
                if (gain > best)
                    best = gain, bj = tj, bc = tc;
            }
        }
        if (best < 0)
            break;
        out[bj * d + bc] = 1;
    }
    return chosen;
}

START_TEST(test_outliers)
{
    rng g = {g_seed ^ 0x0071};
    /* By hand: one group {0, 0.1, 0.2, 10, -0.15}: 10 goes first, then
     * -0.15 (range^2 0.1225 -> 0.04) rather than 0.2 (-> 0.0625). */
    {
        kvck_qfmt f;
        ck_assert_int_eq(kvck_qfmt_uniform(&f, 5, 4, 0), 0);
        float x[5] = {0.0f, 0.1f, 0.2f, 10.0f, -0.15f};
        uint32_t idx[5];
        float scr[64];
        CHECK1(kvck_q_outlier_scratch_floats(&f, KVCK_QS_TOKEN, 1) <= 64);
        size_t got = kvck_q_outliers(&f, KVCK_QS_TOKEN, 1, x, 5, 2, idx, scr);
        CHECK1(got == 2 && idx[0] == 3 && idx[1] == 4);
        got = kvck_q_outliers(&f, KVCK_QS_TOKEN, 1, x, 5, 5, idx, scr);
        CHECK(got == 3, "a group keeps 2 values: chose %zu", got);
    }
    for (int mode = 0; mode < 2; mode++) {
        for (int rep = 0; rep < 6; rep++) {
            kvck_qfmt f;
            const size_t n = 17, d = 40, ldx = 43;
            ck_assert_int_eq(kvck_qfmt_uniform(&f, (uint32_t)d, 3, 16), 0);
            float *x = xmalloc(n * ldx * sizeof *x);
            fill(&g, x, n * ldx, 1.0f);
            for (int o = 0; o < 12; o++) /* plant spikes */
                x[rng_range(&g, 0, n - 1) * ldx + rng_range(&g, 0, d - 1)] =
                    (o & 1 ? -1.0f : 1.0f) * (3.0f + (float)o);
            if (rep == 5) /* duplicates, including at the boundary */
                for (size_t i = 0; i < n * ldx; i++)
                    x[i] = (float)((int)(x[i] * 2.0f)) / 2.0f;
            const size_t k = rep == 4 ? n * d : 9 + (size_t)rep * 5;
            uint32_t *idx = xmalloc(k * sizeof *idx);
            float *scr = xmalloc(kvck_q_outlier_scratch_floats(&f, mode, n) * sizeof *scr);
            uint8_t *want = xmalloc(n * d);
            size_t got = kvck_q_outliers(&f, mode, n, x, ldx, k, idx, scr);
            size_t wn = naive_outliers(&f, mode, n, x, ldx, k, want);
            CHECK(got == wn, "mode %d rep %d: chose %zu, want %zu", mode, rep, got, wn);
            /* Same set up to ties among equal values: compare the multiset
             * of values per group via sorted values of chosen entries. */
            double s1 = 0, s2 = 0;
            for (size_t i = 0; i < got; i++) {
                CHECK(i == 0 || idx[i] > idx[i - 1], "indices not ascending at %zu", i);
                CHECK1(idx[i] < n * d);
                s1 += x[idx[i] / d * ldx + idx[i] % d];
            }
            for (size_t i = 0; i < n * d; i++)
                if (want[i])
                    s2 += x[i / d * ldx + i % d];
            CHECK(fabs(s1 - s2) < 1e-9, "mode %d rep %d: other values chosen", mode, rep);
            if (rep < 4)
                for (size_t i = 0; i < got; i++)
                    CHECK(want[idx[i]], "mode %d rep %d: %u not the greedy choice", mode, rep,
                          idx[i]);
            free(x), free(idx), free(scr), free(want);
        }
    }
}
END_TEST

/* ---- Hadamard ---------------------------------------------------------------------- */

START_TEST(test_hadamard)
{
    rng g = {g_seed ^ 0x4ad};
    static const size_t ds[] = {64, 128, 96, 80, 100, 1};
    for (size_t di = 0; di < sizeof ds / sizeof ds[0]; di++) {
        const size_t d = ds[di];
        float *H = xmalloc(d * d * sizeof *H), *signs = xmalloc(d * sizeof *signs);
        kvck_hadamard_signs(signs, d, 0x1234 + d);
        size_t neg = 0;
        for (size_t i = 0; i < d; i++) {
            CHECK1(signs[i] == 1.0f || signs[i] == -1.0f);
            neg += signs[i] < 0;
        }
        if (d >= 64)
            CHECK(neg > d / 4 && neg < 3 * d / 4, "d %zu: %zu negative signs", d, neg);
        /* Column i = rotation of unit vector e_i. */
        for (size_t i = 0; i < d; i++) {
            float *col = H + i * d;
            memset(col, 0, d * sizeof *col);
            col[i] = 1.0f;
            kvck_hadamard(col, d, signs);
        }
        size_t nonzero = 0;
        for (size_t i = 0; i < d; i++)
            for (size_t j = 0; j < d; j++) {
                double t = 0;
                for (size_t c = 0; c < d; c++)
                    t += (double)H[i * d + c] * H[j * d + c];
                CHECK(fabs(t - (i == j)) <= 1e-6, "d %zu: (H^T H)[%zu][%zu] = %.9g", d, i, j, t);
                nonzero += H[i * d + j] != 0.0f;
            }
        if (d >= 64)
            CHECK(nonzero >= d * 32, "d %zu: not mixing (%zu nonzero)", d, nonzero);
        float q[128], k[128], q2[128], k2[128];
        for (int rep = 0; rep < 5; rep++) {
            fill(&g, q, d, 2.0f);
            fill(&g, k, d, 2.0f);
            q[rep % d] = 40.0f; /* an outlier channel */
            memcpy(q2, q, d * sizeof *q);
            memcpy(k2, k, d * sizeof *k);
            kvck_hadamard(q2, d, signs);
            kvck_hadamard(k2, d, signs);
            double a = 0, b = 0, nq = 0, nq2 = 0;
            for (size_t c = 0; c < d; c++) {
                a += (double)q[c] * k[c];
                b += (double)q2[c] * k2[c];
                nq += (double)q[c] * q[c];
                nq2 += (double)q2[c] * q2[c];
            }
            CHECK(fabs(a - b) <= 1e-6 * sqrt(nq) * 2 * sqrt((double)d), "d %zu: q.k %g vs %g",
                  d, a, b);
            CHECK(fabs(nq - nq2) <= 1e-6 * nq, "d %zu: norm %g vs %g", d, nq, nq2);
            kvck_hadamard_inv(q2, d, signs);
            for (size_t c = 0; c < d; c++)
                CHECK(fabs(q2[c] - q[c]) <= 1e-5 * (1 + fabs(q[c])), "d %zu: inverse %zu", d, c);
        }
        /* NULL signs: plain H, symmetric. */
        float e[128] = {0}, e2[128] = {0};
        e[0] = 1.0f;
        e2[1] = 1.0f;
        kvck_hadamard(e, d, NULL);
        kvck_hadamard(e2, d, NULL);
        if (d > 1)
            CHECK1(fabs(e[1] - e2[0]) < 1e-7);
        free(H), free(signs);
    }
    /* Reproducible from the seed, different across seeds. */
    float s1[64], s2[64], s3[64];
    kvck_hadamard_signs(s1, 64, 7);
    kvck_hadamard_signs(s2, 64, 7);
    kvck_hadamard_signs(s3, 64, 8);
    CHECK1(memcmp(s1, s2, sizeof s1) == 0 && memcmp(s1, s3, sizeof s1) != 0);
}
END_TEST

/* ---- RoPE table ----------------------------------------------------------------------- */

START_TEST(test_rope_table)
{
    rng g = {g_seed ^ 0x70be};
    const size_t n_tok = 29, n_heads = 3, hd = 80, n_pos = 5000;
    float *x = xmalloc(n_tok * n_heads * hd * sizeof *x);
    float *y1 = xmalloc(n_tok * n_heads * hd * sizeof *y1);
    float *y2 = xmalloc(n_tok * n_heads * hd * sizeof *y2);
    int32_t pos[29];
    for (int style = 0; style <= 2; style++)
        for (int dims = 0; dims <= 48; dims += 48) {
            kvck_rope r;
            ck_assert_int_eq(kvck_rope_init(&r, style, (int)hd, dims, 10000.0f, NULL,
                                            dims ? 1.3f : 0.0f),
                             0);
            size_t tf = kvck_rope_table_floats(&r, n_pos);
            CHECK1(tf == (style ? n_pos * (size_t)r.dims : 0));
            float *tab = xmalloc((tf + 1) * sizeof *tab);
            kvck_rope_table_fill(&r, n_pos, tab);
            fill(&g, x, n_tok * n_heads * hd, 2.0f);
            for (size_t t = 0; t < n_tok; t++)
                pos[t] = (int32_t)rng_range(&g, 0, n_pos - 1);
            pos[0] = 0;
            pos[1] = (int32_t)n_pos - 1;
            kvck_rope_apply(&r, n_tok, n_heads, pos, x, y1);
            kvck_rope_apply_table(&r, tab, n_tok, n_heads, pos, x, y2);
            size_t moved = 0;
            for (size_t i = 0; i < n_tok * n_heads * hd; i++) {
                CHECK(fabs(y1[i] - y2[i]) <= 1e-6 * (1 + fabs(y1[i])),
                      "style %d dims %d: %zu: %g vs %g", style, dims, i, (double)y1[i],
                      (double)y2[i]);
                moved += y2[i] != x[i];
            }
            if (style)
                CHECK(moved > n_tok * n_heads * hd / 4, "style %d: nothing rotated", style);
            /* In place too. */
            memcpy(y2, x, n_tok * n_heads * hd * sizeof *y2);
            kvck_rope_apply_table(&r, tab, n_tok, n_heads, pos, y2, y2);
            CHECK1(memcmp(y1, y2, n_tok * n_heads * hd * sizeof *y2) == 0);
            free(tab);
        }
    free(x), free(y1), free(y2);
}
END_TEST

/* ---- attention bounds ------------------------------------------------------------------ */

/* Plain float64 attention of rows over keys with the full visibility rule. */
static void naive_attn(size_t rows, size_t group, size_t d, uint32_t window, const int32_t *q_pos,
                       const int32_t *q_hi, const int32_t *q_lo, const float *q, size_t ldq,
                       const float *k, const float *v, const int32_t *k_pos, size_t n,
                       double *out)
{
    double *s = xmalloc(n * sizeof *s);
    for (size_t r = 0; r < rows; r++) {
        const size_t t = r / group;
        const int32_t qp = q_pos[t], hi = q_hi ? q_hi[t] : qp;
        double m = -INFINITY;
        for (size_t j = 0; j < n; j++) {
            int vis = k_pos[j] <= hi && (!q_lo || k_pos[j] > q_lo[t])
                      && (window == 0 || (int64_t)qp - k_pos[j] < (int64_t)window);
            double a = 0;
            for (size_t c = 0; c < d; c++)
                a += (double)q[r * ldq + c] * k[j * d + c];
            s[j] = vis ? a : -INFINITY;
            m = s[j] > m ? s[j] : m;
        }
        double l = 0;
        for (size_t c = 0; c < d; c++)
            out[r * d + c] = 0;
        if (m == -INFINITY)
            continue;
        for (size_t j = 0; j < n; j++) {
            double p = exp(s[j] - m);
            l += p;
            for (size_t c = 0; c < d; c++)
                out[r * d + c] += p * v[j * d + c];
        }
        for (size_t c = 0; c < d; c++)
            out[r * d + c] /= l;
    }
    free(s);
}

START_TEST(test_attn_bounds)
{
    rng g = {g_seed ^ 0xb0d};
    const size_t nq = 7, group = 3, rows = nq * group, d = 32, n = 300, block = 64;
    for (int few = 0; few < 2; few++) {
        const size_t nqr = few ? 2 : nq, rr = nqr * group;
        float *q = xmalloc(rows * d * sizeof *q), *k = xmalloc(n * d * sizeof *k);
        float *v = xmalloc(n * d * sizeof *v), *o = xmalloc(rows * d * sizeof *o);
        double *ref = xmalloc(rows * d * sizeof *ref);
        float *scr = xmalloc(kvck_attn_scratch_floats(rows, d, block) * sizeof *scr);
        int32_t k_pos[300], q_pos[7], q_hi[7], q_lo[7];
        fill(&g, q, rows * d, 0.4f);
        fill(&g, k, n * d, 1.0f);
        fill(&g, v, n * d, 1.0f);
        for (size_t j = 0; j < n; j++)
            k_pos[j] = (int32_t)(10 + j);
        for (size_t t = 0; t < nq; t++) {
            q_pos[t] = (int32_t)(300 + t);
            q_hi[t] = (int32_t)(100 + 30 * t); /* causal bound below the position */
            q_lo[t] = (int32_t)(20 + 25 * t);
        }
        q_lo[1] = q_hi[1]; /* sees nothing */
        for (int wi = 0; wi < 3; wi++) {
            const uint32_t window = wi == 0 ? 0 : wi == 1 ? 250 : 200;
            for (int mode = 0; mode < 3; mode++) {
                const int32_t *hi = mode != 1 ? q_hi : NULL, *lo = mode != 0 ? q_lo : NULL;
                kvck_attn a;
                kvck_attn_init(&a, rr, group, d, d, block, window, q_pos, scr);
                CHECK1(a.q_hi == NULL && a.q_lo == NULL);
                kvck_attn_bounds(&a, hi, lo);
                for (size_t j = 0; j < n; j += block) {
                    size_t nb = n - j < block ? n - j : block;
                    kvck_attn_block(&a, q, d, k + j * d, d, v + j * d, d, k_pos + j, nb);
                }
                kvck_attn_finish(&a, o, d);
                naive_attn(rr, group, d, window, q_pos, hi, lo, q, d, k, v, k_pos, n, ref);
                double e = 0, r2 = 0;
                for (size_t i = 0; i < rr * d; i++) {
                    e += (o[i] - ref[i]) * (o[i] - ref[i]);
                    r2 += ref[i] * ref[i];
                }
                e = r2 > 0 ? sqrt(e / r2) : sqrt(e);
                CHECK(e <= 1e-5, "few %d window %u bounds %d: error %g", few, window, mode, e);
            }
        }
        free(q), free(k), free(v), free(o), free(ref), free(scr);
    }
}
END_TEST

/* ---- attention on codes ---------------------------------------------------------------- */

/* One side (keys or values) of a case. */
typedef struct side {
    int kind;      /* KVCK_SRC_* */
    unsigned bits; /* Q: uniform width, or 0 = the mixed format */
    int mode;      /* Q: KVCK_QS_* */
    uint32_t group;
    int outliers;  /* Q: keep ~3% exactly */
    int table;     /* Q: table levels instead of uniform */
} side;

/* A side stored the way a store would: per block of `block` rows. */
typedef struct stored {
    kvck_qfmt f;
    uint8_t *codes;   /* [n][row_bytes] */
    uint16_t *sz;     /* TOKEN: [n][n_groups][2]; CHANNEL: [n_blocks][d][2] */
    uint16_t *h;      /* F16: [n][d] */
    kvck_qout *out;   /* [n * d] exact values, by block */
    size_t *out_at;   /* [n_blocks + 1] first of each block in out */
    float *ref;       /* [n][d] what the source stands for, in f32 */
} stored;

static const float lev4[16] = {0.0f,  0.02f, 0.05f, 0.1f,  0.16f, 0.23f, 0.31f, 0.4f,
                               0.5f,  0.6f,  0.69f, 0.77f, 0.85f, 0.91f, 0.97f, 1.0f};

static void store_side(const side *sd, size_t n, size_t d, size_t block, const float *x,
                       stored *st)
{
    memset(st, 0, sizeof *st);
    st->ref = xmalloc(n * d * sizeof *st->ref);
    if (sd->kind == KVCK_SRC_F32) {
        memcpy(st->ref, x, n * d * sizeof *x);
        return;
    }
    if (sd->kind == KVCK_SRC_F16) {
        st->h = xmalloc(n * d * sizeof *st->h);
        kvck_f32_to_f16_n(x, st->h, n * d);
        kvck_f16_to_f32_n(st->h, st->ref, n * d);
        return;
    }
    kvck_qfmt *f = &st->f;
    if (sd->bits == 0) {
        mixed_fmt(f, sd->group);
        ck_assert_uint_eq(f->d, d);
    } else {
        ck_assert_int_eq(kvck_qfmt_uniform(f, (uint32_t)d, sd->bits, sd->group), 0);
        if (sd->table && (sd->bits == 2 || sd->bits == 4 || sd->bits == 3)) {
            f->seg[0].levels = sd->bits == 2 ? tab2 : sd->bits == 3 ? tab3 : lev4;
            ck_assert_int_eq(kvck_qfmt_finish(f), 0);
        }
    }
    const size_t nblk = (n + block - 1) / block;
    st->codes = xmalloc(n * f->row_bytes + 1);
    st->sz = xmalloc((sd->mode == KVCK_QS_CHANNEL ? nblk * d : n * f->n_groups) * 4 + 2);
    st->out = xmalloc(n * d * sizeof *st->out);
    st->out_at = xmalloc((nblk + 1) * sizeof *st->out_at);
    uint8_t *skip = xmalloc(block * d);
    uint32_t *idx = xmalloc(block * d * sizeof *idx);
    float *scr = xmalloc(kvck_q_outlier_scratch_floats(f, sd->mode, block) * sizeof *scr);
    size_t no = 0;
    for (size_t b = 0; b < nblk; b++) {
        const size_t j0 = b * block, nb = n - j0 < block ? n - j0 : block;
        uint16_t *sz = sd->mode == KVCK_QS_CHANNEL ? st->sz + b * d * 2
                                                   : st->sz + j0 * f->n_groups * 2;
        memset(skip, 0, nb * d);
        size_t k = sd->outliers ? nb * d * 3 / 100 + 1 : 0;
        k = kvck_q_outliers(f, sd->mode, nb, x + j0 * d, d, k, idx, scr);
        st->out_at[b] = no;
        for (size_t i = 0; i < k; i++) {
            skip[idx[i]] = 1;
            kvck_qout o = {(uint16_t)(idx[i] / d), (uint16_t)(idx[i] % d),
                           kvck_f32_to_f16(x[j0 * d + idx[i]]), 0};
            st->out[no++] = o;
        }
        kvck_q_quantize(f, sd->mode, nb, x + j0 * d, d, sd->outliers ? skip : NULL,
                        st->codes + j0 * f->row_bytes, sz);
        kvck_q_dequantize(f, sd->mode, nb, st->codes + j0 * f->row_bytes, sz, st->ref + j0 * d,
                          d);
        /* Patched back, an outlier is exactly its fp16 value. */
        for (size_t i = st->out_at[b]; i < no; i++) {
            const kvck_qout *o = &st->out[i];
            float *r = st->ref + (j0 + o->j) * d + o->c;
            *r = kvck_f16_to_f32(o->value);
            CHECK1(*r == f16r(x[(j0 + o->j) * d + o->c]));
        }
    }
    st->out_at[nblk] = no;
    free(skip), free(idx), free(scr);
}

static void free_stored(stored *st)
{
    free(st->codes), free(st->sz), free(st->h), free(st->out), free(st->out_at), free(st->ref);
}

/* The source of block b. */
static kvck_src src_of(const side *sd, const stored *st, size_t d, size_t block, size_t b)
{
    kvck_src s;
    memset(&s, 0, sizeof s);
    s.kind = sd->kind;
    const size_t j0 = b * block;
    if (sd->kind == KVCK_SRC_F32) {
        s.data = st->ref + j0 * d;
        s.ld = d;
    } else if (sd->kind == KVCK_SRC_F16) {
        s.data = st->h + j0 * d;
        s.ld = d;
    } else {
        s.data = st->codes + j0 * st->f.row_bytes;
        s.fmt = &st->f;
        s.mode = sd->mode;
        s.sz = sd->mode == KVCK_QS_CHANNEL ? st->sz + b * d * 2
                                           : st->sz + j0 * st->f.n_groups * 2;
        s.out = st->out + st->out_at[b];
        s.n_out = st->out_at[b + 1] - st->out_at[b];
    }
    return s;
}

typedef struct qcase {
    side k, v;
    size_t nq, group, n, block, d;
    uint32_t window;
    int bounds; /* 0 none, 1 q_hi, 2 q_hi and q_lo */
} qcase;

static double g_worst = 0, g_worst_plain = 0;

/* Attention over the sources, block by block, against kvck_attn_block
 * over what they stand for in f32. Returns the error relative to the
 * attention over |values| (see below), and in *plain relative to the
 * output itself. */
static double run_qcase(const qcase *c, rng *g, double *plain)
{
    const size_t rows = c->nq * c->group, d = c->d, n = c->n, B = c->block;
    const size_t ldq = d + 3, nblk = (n + B - 1) / B;
    float *q = xmalloc(rows * ldq * sizeof *q), *kx = xmalloc(n * d * sizeof *kx);
    float *vx = xmalloc(n * d * sizeof *vx);
    int32_t *k_pos = xmalloc(n * sizeof *k_pos);
    int32_t q_pos[64], q_hi[64], q_lo[64];
    fill(g, q, rows * ldq, 0.25f);
    /* Keys with per-channel offsets and a few large channels (what
     * per-channel scales are for); values plain. */
    for (size_t j = 0; j < n; j++)
        for (size_t i = 0; i < d; i++)
            kx[j * d + i] =
                (float)((int)(i % 7) - 3) * 0.5f + (i % 13 == 5 ? 3.0f : 1.0f) * rng_unit(g);
    fill(g, vx, n * d, 1.0f);
    int32_t p = (int32_t)rng_range(g, 0, 50);
    for (size_t j = 0; j < n; j++) {
        k_pos[j] = p;
        p += (int32_t)rng_range(g, 1, 2);
    }
    for (size_t t = 0; t < c->nq; t++) {
        q_pos[t] = k_pos[n - 1] - (int32_t)(c->nq - 1 - t) * 3;
        q_hi[t] = q_pos[t] - (int32_t)rng_range(g, 0, (size_t)n / 3);
        q_lo[t] = (int32_t)rng_range(g, 0, (size_t)n / 2);
    }
    stored ks, vs;
    store_side(&c->k, n, d, B, kx, &ks);
    store_side(&c->v, n, d, B, vx, &vs);

    const size_t asf = kvck_attn_scratch_floats(rows, d, B);
    float *sa = xmalloc(asf * sizeof *sa), *sb = xmalloc(asf * sizeof *sb);
    const size_t qsf = kvck_attn_src_scratch_floats(c->k.kind == KVCK_SRC_Q ? &ks.f : NULL,
                                                    c->v.kind == KVCK_SRC_Q ? &vs.f : NULL,
                                                    rows, B);
    const size_t canary = 32;
    float *qs = xmalloc((qsf + canary) * sizeof *qs);
    for (size_t i = 0; i < qsf + canary; i++)
        qs[i] = 777.0f;
    float *o1 = xmalloc(rows * d * sizeof *o1), *o2 = xmalloc(rows * d * sizeof *o2);

    /* A third pass over |values| gives the scale of the P.V sums: random
     * values average out to outputs far smaller than the terms that were
     * summed, and float rounding is relative to the terms. */
    float *vabs = xmalloc(n * d * sizeof *vabs), *o3 = xmalloc(rows * d * sizeof *o3);
    float *sc3 = xmalloc(asf * sizeof *sc3);
    for (size_t i = 0; i < n * d; i++)
        vabs[i] = fabsf(vs.ref[i]);
    kvck_attn a, b, m;
    kvck_attn_init(&a, rows, c->group, d, d, B, c->window, q_pos, sa);
    kvck_attn_init(&b, rows, c->group, d, d, B, c->window, q_pos, sb);
    kvck_attn_init(&m, rows, c->group, d, d, B, c->window, q_pos, sc3);
    if (c->bounds) {
        kvck_attn_bounds(&a, q_hi, c->bounds == 2 ? q_lo : NULL);
        kvck_attn_bounds(&b, q_hi, c->bounds == 2 ? q_lo : NULL);
        kvck_attn_bounds(&m, q_hi, c->bounds == 2 ? q_lo : NULL);
    }
    for (size_t blk = 0; blk < nblk; blk++) {
        const size_t j0 = blk * B, nb = n - j0 < B ? n - j0 : B;
        kvck_src sk = src_of(&c->k, &ks, d, B, blk), sv = src_of(&c->v, &vs, d, B, blk);
        kvck_attn_block_src(&a, q, ldq, &sk, &sv, k_pos + j0, nb, qs);
        kvck_attn_block(&b, q, ldq, ks.ref + j0 * d, d, vs.ref + j0 * d, d, k_pos + j0, nb);
        kvck_attn_block(&m, q, ldq, ks.ref + j0 * d, d, vabs + j0 * d, d, k_pos + j0, nb);
    }
    kvck_attn_finish(&a, o1, d);
    kvck_attn_finish(&b, o2, d);
    kvck_attn_finish(&m, o3, d);
    for (size_t i = qsf; i < qsf + canary; i++)
        CHECK(qs[i] == 777.0f, "scratch overrun at %zu of %zu", i, qsf);
    double e = 0, r2 = 0, m2 = 0;
    for (size_t i = 0; i < rows * d; i++) {
        CHECK(isfinite(o1[i]), "out %zu = %g", i, (double)o1[i]);
        if (o2[i] == 0.0f)
            CHECK(o1[i] == 0.0f, "row %zu sees nothing in the reference", i / d);
        e += ((double)o1[i] - o2[i]) * ((double)o1[i] - o2[i]);
        r2 += (double)o2[i] * o2[i];
        m2 += (double)o3[i] * o3[i];
    }
    free(q), free(kx), free(vx), free(k_pos), free(sa), free(sb), free(qs), free(o1), free(o2);
    free(vabs), free(o3), free(sc3);
    free_stored(&ks);
    free_stored(&vs);
    *plain = r2 > 0 ? sqrt(e / r2) : sqrt(e);
    if (*plain > g_worst_plain)
        g_worst_plain = *plain;
    e = m2 > 0 ? sqrt(e / m2) : sqrt(e);
    if (e > g_worst)
        g_worst = e;
    return e;
}

static const char *kind_name(const side *s)
{
    return s->kind == KVCK_SRC_F32 ? "f32" : s->kind == KVCK_SRC_F16 ? "f16" : "q";
}

/* Relative to the scale of the sums (attention over |V|), and plainly
 * relative to the output, which cancellation among random values makes
 * ~10x smaller than the terms. */
#define QTOL 1e-6
#define QTOL_PLAIN 4e-6

/* Every width, both modes on both sides, with and without outliers and
 * tables; decode (3 and 16 rows) and prefill (24 rows). */
START_TEST(test_qattn_widths)
{
    rng g = {g_seed ^ 0x9a77 ^ ((uint64_t)kvck_isa() << 40)};
    static const size_t shapes[][2] = {{1, 3}, {1, 16}, {2, 5}, {8, 3}, {1, 1}};
    for (size_t wi = 0; wi <= N_WIDTHS; wi++) {
        const unsigned bits = wi < N_WIDTHS ? widths[wi] : 0; /* 0: the mixed format */
        for (int kmode = 0; kmode < 2; kmode++)
            for (int extra = 0; extra < 2; extra++) {
                const size_t *sh = shapes[(wi + (size_t)kmode * 2 + (size_t)extra) % 5];
                qcase c = {{KVCK_SRC_Q, bits, kmode, 32, extra, extra},
                           {KVCK_SRC_Q, bits, !kmode, bits ? 64 : 16, !extra, extra},
                           sh[0], sh[1], 200, 64, bits ? 64 : 80, 0, 0};
                double pl, e = run_qcase(&c, &g, &pl);
                CHECK(e <= QTOL && pl <= QTOL_PLAIN,
                      "%s: width %u, keys %s, outliers %d/%d, tables %d, rows %zu: error %g (%g)",
                      kvck_isa_name(kvck_isa()), bits, kmode ? "channel" : "token", extra,
                      !extra, extra, c.nq * c.group, e, pl);
                /* Prefill rows go through the dequantize + SGEMM path. */
                c.nq = 8;
                c.group = 3;
                e = run_qcase(&c, &g, &pl);
                CHECK(e <= QTOL && pl <= QTOL_PLAIN, "%s prefill: width %u keys %s: error %g (%g)",
                      kvck_isa_name(kvck_isa()), bits, kmode ? "channel" : "token", e, pl);
            }
    }
}
END_TEST

/* Sources mixed, f16, windows, bounds, odd head sizes and blocks. */
START_TEST(test_qattn_sources)
{
    rng g = {g_seed ^ 0x50c ^ ((uint64_t)kvck_isa() << 40)};
    const side F32 = {KVCK_SRC_F32, 0, 0, 0, 0, 0}, F16 = {KVCK_SRC_F16, 0, 0, 0, 0, 0};
    const side Q4c = {KVCK_SRC_Q, 4, KVCK_QS_CHANNEL, 0, 1, 0};
    const side Q2t = {KVCK_SRC_Q, 2, KVCK_QS_TOKEN, 64, 0, 1};
    const side Q4t = {KVCK_SRC_Q, 4, KVCK_QS_TOKEN, 32, 1, 0};
    const side Q2c = {KVCK_SRC_Q, 2, KVCK_QS_CHANNEL, 0, 0, 0};
    const side Q8t = {KVCK_SRC_Q, 8, KVCK_QS_TOKEN, 0, 1, 0};
    const side sides[][2] = {{F16, F16}, {F32, F16}, {F16, F32}, {Q4c, F16}, {F16, Q4t},
                             {Q4c, Q4t}, {Q2c, Q2t}, {Q4c, Q2t}, {Q2t, Q4c}, {Q8t, Q8t},
                             {F32, Q4t}, {Q2c, F32}};
    static const size_t ds[] = {64, 128, 96, 80, 40};
    static const size_t rowsh[][2] = {{1, 3}, {1, 9}, {3, 3}, {1, 16}, {6, 4}, {2, 1}};
    for (size_t si = 0; si < sizeof sides / sizeof sides[0]; si++)
        for (int var = 0; var < 6; var++) {
            qcase c;
            memset(&c, 0, sizeof c);
            c.k = sides[si][0];
            c.v = sides[si][1];
            c.d = ds[(si + (size_t)var) % 5];
            c.nq = rowsh[var][0];
            c.group = rowsh[var][1];
            c.block = var % 2 ? 48 : 64;
            c.n = 150 + 37 * (size_t)var;
            c.window = var == 2 ? 70 : var == 5 ? 33 : 0;
            c.bounds = var % 3;
            double pl, e = run_qcase(&c, &g, &pl);
            CHECK(e <= QTOL && pl <= QTOL_PLAIN,
                  "%s: k %s v %s d %zu rows %zu window %u bounds %d: error %g (%g)",
                  kvck_isa_name(kvck_isa()), kind_name(&c.k), kind_name(&c.v), c.d,
                  c.nq * c.group, c.window, c.bounds, e, pl);
        }
    printf("quant: %s: worst error on codes vs dequantized: %.3g of the sums' scale, %.3g "
           "of the output\n",
           kvck_isa_name(kvck_isa()), g_worst, g_worst_plain);
}
END_TEST

/* kvck_q_scores / kvck_q_pv on their own, against float64 on the
 * dequantized rows, for every row count 1..20. */
START_TEST(test_q_scores_pv)
{
    rng g = {g_seed ^ 0x5c0 ^ ((uint64_t)kvck_isa() << 40)};
    const size_t n = 70, d = 64, ldq = 67, lds = 75;
    for (size_t wi = 0; wi < N_WIDTHS; wi++)
        for (int mode = 0; mode < 2; mode++)
            for (int tab = 0; tab < 2; tab++) {
                kvck_qfmt f;
                ck_assert_int_eq(kvck_qfmt_uniform(&f, d, widths[wi], mode ? 0 : 16), 0);
                if (tab && widths[wi] == 4) {
                    f.seg[0].levels = lev4;
                    ck_assert_int_eq(kvck_qfmt_finish(&f), 0);
                } else if (tab && widths[wi] == 2) {
                    f.seg[0].levels = tab2;
                    ck_assert_int_eq(kvck_qfmt_finish(&f), 0);
                }
                float *x = xmalloc(n * d * sizeof *x), *y = xmalloc(n * d * sizeof *y);
                uint8_t *codes = xmalloc(n * f.row_bytes);
                uint16_t *sz = xmalloc(kvck_q_scale_bytes(&f, mode, n));
                fill(&g, x, n * d, 1.5f);
                for (size_t i = 0; i < n * d; i++)
                    x[i] += (float)(i % 5) * 0.3f;
                kvck_q_quantize(&f, mode, n, x, d, NULL, codes, sz);
                kvck_q_dequantize(&f, mode, n, codes, sz, y, d);
                for (size_t rows = 1; rows <= 20; rows++) {
                    float *q = xmalloc(rows * ldq * sizeof *q);
                    float *s = xmalloc(rows * lds * sizeof *s);
                    float *acc = xmalloc(rows * d * sizeof *acc);
                    double *want = xmalloc(rows * d * sizeof *want);
                    float *scr = xmalloc(kvck_q_scratch_floats(&f, rows, n) * sizeof *scr);
                    fill(&g, q, rows * ldq, 1.0f);
                    for (size_t i = 0; i < rows * lds; i++)
                        s[i] = -5.0f;
                    kvck_q_scores(&f, mode, rows, q, ldq, n, codes, sz, s, lds, scr);
                    for (size_t r = 0; r < rows; r++) {
                        for (size_t j = 0; j < n; j++) {
                            double t = 0, mag = 0;
                            for (size_t c = 0; c < d; c++) {
                                t += (double)q[r * ldq + c] * y[j * d + c];
                                mag += fabs((double)q[r * ldq + c] * y[j * d + c]);
                            }
                            CHECK(fabs(s[r * lds + j] - t) <= 2e-6 * (mag + 1),
                                  "%s width %u mode %d tab %d rows %zu: s[%zu][%zu] %g vs %g",
                                  kvck_isa_name(kvck_isa()), widths[wi], mode, tab, rows, r, j,
                                  (double)s[r * lds + j], t);
                        }
                        for (size_t j = n; j < lds; j++)
                            CHECK1(s[r * lds + j] == -5.0f);
                    }
                    /* P.V with p in [0, 1], some zero. */
                    for (size_t r = 0; r < rows; r++)
                        for (size_t j = 0; j < n; j++)
                            s[r * lds + j] = j % 9 == 4 ? 0.0f : 0.5f + 0.5f * rng_unit(&g);
                    for (size_t i = 0; i < rows * d; i++)
                        acc[i] = 0.25f, want[i] = 0.25;
                    kvck_q_pv(&f, mode, rows, s, lds, n, codes, sz, acc, scr);
                    for (size_t r = 0; r < rows; r++)
                        for (size_t c = 0; c < d; c++) {
                            double mag = 0;
                            for (size_t j = 0; j < n; j++) {
                                want[r * d + c] += (double)s[r * lds + j] * y[j * d + c];
                                mag += fabs((double)s[r * lds + j] * y[j * d + c]);
                            }
                            CHECK(fabs(acc[r * d + c] - want[r * d + c]) <= 2e-6 * (mag + 1),
                                  "%s width %u mode %d tab %d rows %zu: acc[%zu][%zu] %g vs %g",
                                  kvck_isa_name(kvck_isa()), widths[wi], mode, tab, rows, r, c,
                                  (double)acc[r * d + c], want[r * d + c]);
                        }
                    free(q), free(s), free(acc), free(want), free(scr);
                }
                free(x), free(y), free(codes), free(sz);
            }
}
END_TEST

static Suite *quant_suite(void)
{
    Suite *s = suite_create("quant");
    TCase *tc = tcase_create("format");
    tcase_add_test(tc, test_pack_roundtrip);
    tcase_add_test(tc, test_pack_layout);
    tcase_add_test(tc, test_qfmt);
    tcase_add_test(tc, test_quant_error);
    tcase_add_test(tc, test_quant_ties_skip);
    tcase_add_test(tc, test_outliers);
    tcase_add_test(tc, test_hadamard);
    tcase_add_test(tc, test_rope_table);
    suite_add_tcase(s, tc);
    tc = tcase_create("attention");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_attn_bounds);
    tcase_add_test(tc, test_q_scores_pv);
    tcase_add_test(tc, test_qattn_widths);
    tcase_add_test(tc, test_qattn_sources);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    g_seed = ktest_seed("quant", g_seed);
    /* Every path the CPU (and KVCK_ISA) allows, each a full run; forked
     * tests inherit the path set here. */
    const int top = kvck_isa();
    int failed = 0;
    for (int isa = KVCK_ISA_GENERIC; isa <= top; isa++) {
        if (kvck_isa_set(isa) != isa)
            continue;
        printf("quant: path %s\n", kvck_isa_name(isa));
        fflush(stdout);
        failed += ktest_run(quant_suite());
    }
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
