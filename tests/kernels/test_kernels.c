/*
 * test_kernels.c -- Check suite for the CPU kernels (kernels/kvck.h):
 * fp16 conversion, RoPE, and attention against the float64 reference.
 *
 * Random cases are seeded; the seed is printed and can be set with
 * KVCK_TEST_SEED=<n> to replay a failure.
 */
#include "kvck.h"
#include "ktest.h"

#include <check.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- helpers ------------------------------------------------------------- */

static uint64_t g_seed = 0x6b7663u; /* default: reproducible CI */

static uint32_t fbits(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}

static float bitsf(uint32_t u)
{
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

static int half_is_nan(uint16_t h)
{
    return (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu) != 0;
}

/* Independent decoding of a finite or infinite half, via ldexp. */
static double half_value(uint16_t h)
{
    int e = (h >> 10) & 0x1f, m = h & 0x3ff;
    double s = (h & 0x8000u) ? -1.0 : 1.0;
    if (e == 0x1f)
        return s * INFINITY;
    if (e == 0)
        return s * ldexp((double)m, -24);
    return s * ldexp((double)(1024 + m), e - 25);
}

/* ---- fp16 ----------------------------------------------------------------- */

START_TEST(test_f16_known)
{
    ck_assert_uint_eq(kvck_f32_to_f16(1.0f), 0x3c00);
    ck_assert_uint_eq(kvck_f32_to_f16(-2.5f), 0xc100);
    ck_assert_uint_eq(kvck_f32_to_f16(65504.0f), 0x7bff);
    ck_assert_uint_eq(kvck_f32_to_f16(0.0f), 0x0000);
    ck_assert_uint_eq(kvck_f32_to_f16(-0.0f), 0x8000);
    ck_assert_uint_eq(kvck_f32_to_f16(0x1p-24f), 0x0001);  /* smallest subnormal */
    ck_assert_uint_eq(kvck_f32_to_f16(-0x1p-24f), 0x8001);
    ck_assert_uint_eq(kvck_f32_to_f16(0x1p-14f), 0x0400);  /* smallest normal */
    ck_assert_uint_eq(kvck_f32_to_f16(1023 * 0x1p-24f), 0x03ff); /* largest subnormal */
    /* Round to nearest even: 1 + 2^-11 is halfway between 0x3c00 and
     * 0x3c01, goes to the even 0x3c00; 1 + 3 * 2^-11 goes up to 0x3c02. */
    ck_assert_uint_eq(kvck_f32_to_f16(1.0f + 0x1p-11f), 0x3c00);
    ck_assert_uint_eq(kvck_f32_to_f16(1.0f + 3 * 0x1p-11f), 0x3c02);
    ck_assert_uint_eq(kvck_f32_to_f16(1.0f + 0x1p-11f + 0x1p-20f), 0x3c01);
    /* Subnormal ties: 2^-25 -> 0, 3 * 2^-25 -> 2 units, just above -> 1. */
    ck_assert_uint_eq(kvck_f32_to_f16(0x1p-25f), 0x0000);
    ck_assert_uint_eq(kvck_f32_to_f16(3 * 0x1p-25f), 0x0002);
    ck_assert_uint_eq(kvck_f32_to_f16(0x1p-25f * (1.0f + 0x1p-10f)), 0x0001);
    ck_assert_uint_eq(kvck_f32_to_f16(0x1p-30f), 0x0000);
    ck_assert_uint_eq(kvck_f32_to_f16(-0x1p-30f), 0x8000);
    /* Float subnormals underflow to signed zero. */
    ck_assert_uint_eq(kvck_f32_to_f16(0x1p-140f), 0x0000);
    /* Overflow: 65519 rounds down, 65520 (the tie) rounds to even = inf. */
    ck_assert_uint_eq(kvck_f32_to_f16(65519.0f), 0x7bff);
    ck_assert_uint_eq(kvck_f32_to_f16(65520.0f), 0x7c00);
    ck_assert_uint_eq(kvck_f32_to_f16(1e6f), 0x7c00);
    ck_assert_uint_eq(kvck_f32_to_f16(-1e30f), 0xfc00);
    ck_assert_uint_eq(kvck_f32_to_f16(INFINITY), 0x7c00);
    ck_assert_uint_eq(kvck_f32_to_f16(-INFINITY), 0xfc00);
    /* NaN stays NaN, including a NaN whose payload lives in low bits only. */
    CHECK1(half_is_nan(kvck_f32_to_f16(NAN)));
    CHECK1(half_is_nan(kvck_f32_to_f16(bitsf(0x7f800001u))));
    CHECK1(half_is_nan(kvck_f32_to_f16(bitsf(0xff800001u))));

    CHECK1(kvck_f16_to_f32(0x3c00) == 1.0f);
    CHECK1(kvck_f16_to_f32(0xc100) == -2.5f);
    CHECK1(kvck_f16_to_f32(0x7bff) == 65504.0f);
    CHECK1(kvck_f16_to_f32(0x0001) == 0x1p-24f);
    CHECK1(kvck_f16_to_f32(0x03ff) == 1023 * 0x1p-24f);
    ck_assert_uint_eq(fbits(kvck_f16_to_f32(0x8000)), 0x80000000u);
    CHECK1(isinf(kvck_f16_to_f32(0x7c00)) && kvck_f16_to_f32(0x7c00) > 0);
    CHECK1(isinf(kvck_f16_to_f32(0xfc00)) && kvck_f16_to_f32(0xfc00) < 0);
    CHECK1(isnan(kvck_f16_to_f32(0x7e00)));
    CHECK1(isnan(kvck_f16_to_f32(0x7c01))); /* signalling-pattern NaN */
}
END_TEST

START_TEST(test_f16_roundtrip_all)
{
    for (uint32_t h = 0; h < 65536; h++) {
        float f = kvck_f16_to_f32((uint16_t)h);
        uint16_t back = kvck_f32_to_f16(f);
        if (half_is_nan((uint16_t)h)) {
            CHECK(isnan(f), "half %04x: not NaN in float", h);
            CHECK(half_is_nan(back), "half %04x: NaN lost on the way back", h);
            continue;
        }
        CHECK((double)f == half_value((uint16_t)h), "half %04x decodes to %a", h,
                      (double)f);
        CHECK(back == h, "half %04x -> %a -> %04x", h, (double)f, back);
    }
}
END_TEST

/* Every tie between neighbouring finite halves rounds to the even one, and
 * the floats either side of the tie round to the nearer. */
START_TEST(test_f16_all_ties)
{
    for (uint32_t h = 0; h < 0x7c00; h++) {
        for (uint32_t sign = 0; sign <= 0x8000u; sign += 0x8000u) {
            uint16_t lo = (uint16_t)(h | sign), hi = (uint16_t)((h + 1) | sign);
            /* The tie above 65504 (next: infinity) is 65520. */
            double mid = h + 1 < 0x7c00 ? (half_value(lo) + half_value(hi)) / 2
                                        : (sign ? -65520.0 : 65520.0);
            float m = (float)mid;
            CHECK((double)m == mid, "tie %a not exact in float", mid);
            uint16_t even = (h & 1) ? hi : lo;
            CHECK(kvck_f32_to_f16(m) == even, "tie %a -> %04x, want %04x", mid,
                          kvck_f32_to_f16(m), even);
            float below = nextafterf(m, 0.0f), above = nextafterf(m, sign ? -INFINITY : INFINITY);
            CHECK(kvck_f32_to_f16(below) == lo, "%a -> %04x, want %04x", (double)below,
                          kvck_f32_to_f16(below), lo);
            CHECK(kvck_f32_to_f16(above) == hi, "%a -> %04x, want %04x", (double)above,
                          kvck_f32_to_f16(above), hi);
        }
    }
}
END_TEST

/* The array versions (possibly F16C) agree bit for bit with the scalar
 * definitions, at lengths that leave vector tails. */
START_TEST(test_f16_arrays)
{
    const size_t n = 65536 + 7;
    uint16_t *h = xmalloc(n * sizeof *h), *h2 = xmalloc(n * sizeof *h2);
    float *f = xmalloc(n * sizeof *f);
    rng r = {g_seed ^ 0xf16};

    for (size_t i = 0; i < n; i++)
        h[i] = (uint16_t)i;
    kvck_f16_to_f32_n(h, f, n);
    for (size_t i = 0; i < n; i++) {
        float want = kvck_f16_to_f32(h[i]);
        if (isnan(want))
            CHECK(isnan(f[i]), "half %04x", h[i]);
        else
            CHECK(fbits(f[i]) == fbits(want), "half %04x: %a vs %a", h[i],
                          (double)f[i], (double)want);
    }
    /* Floats: random bit patterns (NaNs, infs, subnormals included), then
     * values near half ties. */
    for (size_t i = 0; i < n; i++) {
        if (i % 2)
            f[i] = bitsf((uint32_t)rng_next(&r));
        else
            f[i] = (float)half_value((uint16_t)(i & 0x7bff))
                   * (1.0f + (float)rng_range(&r, 0, 4) * 0x1p-12f);
    }
    for (size_t len = n; len + 9 > n; len--) {
        kvck_f32_to_f16_n(f, h2, len);
        for (size_t i = 0; i < len; i++) {
            uint16_t want = kvck_f32_to_f16(f[i]);
            if (half_is_nan(want))
                CHECK(half_is_nan(h2[i]), "float %a", (double)f[i]);
            else
                CHECK(h2[i] == want, "float %a: %04x vs %04x", (double)f[i], h2[i],
                              want);
        }
    }
    free(h);
    free(h2);
    free(f);
}
END_TEST

START_TEST(test_all_finite)
{
    float x[37];
    for (size_t i = 0; i < 37; i++)
        x[i] = (float)i - 18.0f;
    ck_assert_int_eq(kvck_all_finite(x, 37), 1);
    ck_assert_int_eq(kvck_all_finite(x, 0), 1);
    x[36] = 65504.0f * 1e30f; /* finite in float */
    ck_assert_int_eq(kvck_all_finite(x, 37), 1);
    const float bad[] = {INFINITY, -INFINITY, NAN, -NAN};
    for (size_t b = 0; b < 4; b++) {
        for (size_t at = 0; at < 37; at += 12) {
            float save = x[at];
            x[at] = bad[b];
            ck_assert_int_eq(kvck_all_finite(x, 37), 0);
            ck_assert_int_eq(kvck_all_finite(x, at), 1); /* before it: fine */
            x[at] = save;
        }
    }
}
END_TEST

/* ---- RoPE ------------------------------------------------------------------ */

static double dotf(const float *a, const float *b, size_t n)
{
    double s = 0;
    for (size_t i = 0; i < n; i++)
        s += (double)a[i] * b[i];
    return s;
}

START_TEST(test_rope_init)
{
    kvck_rope r;
    float f[64];
    for (int i = 0; i < 64; i++)
        f[i] = 1.0f / (float)(i + 1);
    ck_assert_int_eq(kvck_rope_init(&r, 1, 64, 0, 10000.0f, NULL, 0.0f), 0);
    ck_assert_int_eq(r.dims, 64);
    CHECK1(r.mscale == 1.0f);
    for (int i = 0; i < 32; i++)
        CHECK(fabs(r.inv_freq[i] - pow(10000.0, -2.0 * i / 64)) <= 1e-7 * r.inv_freq[i],
                      "inv_freq[%d] = %g", i, (double)r.inv_freq[i]);
    ck_assert_int_eq(kvck_rope_init(&r, 2, 128, 32, 0.0f, f, 0.5f), 0);
    CHECK1(r.inv_freq[3] == f[3] && r.mscale == 0.5f && r.dims == 32);
    ck_assert_int_eq(kvck_rope_init(&r, 1, 64, 63, 10000.0f, NULL, 0.0f), -1);  /* odd */
    ck_assert_int_eq(kvck_rope_init(&r, 1, 64, 66, 10000.0f, NULL, 0.0f), -1);  /* > hd */
    ck_assert_int_eq(kvck_rope_init(&r, 1, KVCK_MAX_HEAD_DIM + 2, 0, 10000.0f, NULL, 0.0f), -1);
    ck_assert_int_eq(kvck_rope_init(&r, 3, 64, 0, 10000.0f, NULL, 0.0f), -1);
    ck_assert_int_eq(kvck_rope_init(&r, -1, 64, 0, 10000.0f, NULL, 0.0f), -1);
    ck_assert_int_eq(kvck_rope_init(&r, 1, 64, 0, 0.0f, NULL, 0.0f), -1);
    ck_assert_int_eq(kvck_rope_init(&r, 1, 64, 0, -5.0f, NULL, 0.0f), -1);
    ck_assert_int_eq(kvck_rope_init(&r, 1, 0, 0, 10000.0f, NULL, 0.0f), -1);
    ck_assert_int_eq(kvck_rope_init(&r, 0, 63, 0, 0.0f, NULL, 0.0f), 0); /* none: odd ok */
}
END_TEST

/* A unit vector in one pair's first slot turns into (cos, sin) * mscale of
 * pos * inv_freq[i], in the slots the style pairs. */
START_TEST(test_rope_known)
{
    /* Positions across the fast angle reduction and past it (libm's). */
    static const int32_t positions[] = {0, 1, 7, 12345, 999999, 1000001, 1 << 24, 2147483647};
    for (int style = 1; style <= 2; style++) {
        kvck_rope r;
        const int hd = 16;
        ck_assert_int_eq(kvck_rope_init(&r, style, hd, 0, 100.0f, NULL, 1.5f), 0);
        for (size_t pi = 0; pi < sizeof positions / sizeof positions[0]; pi++) {
            for (int i = 0; i < hd / 2; i++) {
                float x[16] = {0}, y[16];
                int i0 = style == 1 ? 2 * i : i, i1 = style == 1 ? 2 * i + 1 : i + hd / 2;
                int32_t pos = positions[pi];
                x[i0] = 1.0f;
                kvck_rope_apply(&r, 1, 1, &pos, x, y);
                double a = pos * (double)r.inv_freq[i];
                for (int j = 0; j < hd; j++) {
                    double want = j == i0 ? 1.5 * cos(a) : j == i1 ? 1.5 * sin(a) : 0.0;
                    CHECK(fabs(y[j] - want) <= 2e-7, "style %d pos %d pair %d slot %d: %.9g vs %.9g",
                          style, pos, i, j, (double)y[j], want);
                }
            }
        }
    }
}
END_TEST

START_TEST(test_rope_norm_and_relative)
{
    rng g = {g_seed ^ 0x20e};
    for (int style = 1; style <= 2; style++) {
        kvck_rope r;
        const size_t hd = 64;
        float q[64], k[64], qa[64], ka[64], qb[64], kb[64];
        ck_assert_int_eq(kvck_rope_init(&r, style, (int)hd, 0, 10000.0f, NULL, 0.0f), 0);
        fill(&g, q, hd, 1.0f);
        fill(&g, k, hd, 1.0f);
        /* Norm preserved. */
        for (int32_t p = 0; p < 100000; p = p * 3 + 1) {
            kvck_rope_apply(&r, 1, 1, &p, q, qa);
            double n0 = dotf(q, q, hd), n1 = dotf(qa, qa, hd);
            CHECK(fabs(n1 - n0) <= 1e-5 * n0, "style %d pos %d: norm %g -> %g", style,
                          p, n0, n1);
        }
        /* q.k after rotation depends on p1 - p2 only. */
        const int32_t diffs[] = {0, 1, 5, 100, 3000};
        double last = NAN;
        for (size_t di = 0; di < 5; di++) {
            int32_t p1 = diffs[di], p2 = 0;
            kvck_rope_apply(&r, 1, 1, &p1, q, qa);
            kvck_rope_apply(&r, 1, 1, &p2, k, ka);
            double ref = dotf(qa, ka, hd);
            for (int32_t base = 1; base < 60000; base = base * 7 + 3) {
                int32_t p3 = p1 + base, p4 = p2 + base;
                kvck_rope_apply(&r, 1, 1, &p3, q, qb);
                kvck_rope_apply(&r, 1, 1, &p4, k, kb);
                double d = dotf(qb, kb, hd);
                CHECK(fabs(d - ref) <= 1e-4, "style %d diff %d base %d: %g vs %g",
                              style, diffs[di], base, d, ref);
            }
            /* ...and it does change with p1 - p2 (the test would pass on an
             * identity otherwise). */
            CHECK(!(fabs(ref - last) < 1e-3), "style %d: dot constant in distance",
                          style);
            last = ref;
        }
    }
}
END_TEST

START_TEST(test_rope_partial_inplace_batch)
{
    rng g = {g_seed ^ 0xba7c};
    const size_t n_tok = 37, n_heads = 3, hd = 80;
    const size_t n = n_tok * n_heads * hd;
    float *x = xmalloc(n * sizeof *x), *y = xmalloc(n * sizeof *y);
    float *z = xmalloc(n * sizeof *z), *one = xmalloc(n_heads * hd * sizeof *one);
    int32_t pos[37];
    float f[20];
    for (size_t i = 0; i < 20; i++)
        f[i] = (float)pow(500000.0, -(double)i / 20.0) * (i % 3 ? 0.25f : 1.0f);

    for (int style = 0; style <= 2; style++) {
        for (int dims = 0; dims <= 40; dims += 40) { /* 0 = all of head_dim; 40 = partial */
            kvck_rope r;
            ck_assert_int_eq(kvck_rope_init(&r, style, (int)hd, dims, 10000.0f,
                                            dims ? f : NULL, dims ? 1.2f : 0.0f),
                             0);
            fill(&g, x, n, 3.0f);
            for (size_t t = 0; t < n_tok; t++)
                pos[t] = (int32_t)rng_range(&g, 0, 1u << 20);
            kvck_rope_apply(&r, n_tok, n_heads, pos, x, y);
            /* Tail past dims untouched (all of it for style 0). */
            size_t rd = style == 0 ? 0 : (size_t)r.dims;
            for (size_t i = 0; i < n_tok * n_heads; i++)
                CHECK(memcmp(y + i * hd + rd, x + i * hd + rd, (hd - rd) * sizeof *y) == 0,
                              "style %d dims %d: tail changed", style, dims);
            if (style != 0) {
                size_t changed = 0;
                for (size_t i = 0; i < n; i++)
                    changed += y[i] != x[i];
                CHECK(changed > n / 4, "style %d: nothing rotated", style);
            }
            /* In place gives the same bits. */
            memcpy(z, x, n * sizeof *z);
            kvck_rope_apply(&r, n_tok, n_heads, pos, z, z);
            CHECK(memcmp(z, y, n * sizeof *z) == 0, "style %d dims %d: in-place differs",
                          style, dims);
            /* Each token alone gives the same bits as inside the batch. */
            for (size_t t = 0; t < n_tok; t++) {
                kvck_rope_apply(&r, 1, n_heads, pos + t, x + t * n_heads * hd, one);
                CHECK(memcmp(one, y + t * n_heads * hd, n_heads * hd * sizeof *one) == 0,
                              "style %d dims %d: token %zu differs alone", style, dims, t);
            }
            /* ...and head by head. */
            for (size_t t = 0; t < n_tok; t += 5) {
                for (size_t h = 0; h < n_heads; h++) {
                    kvck_rope_apply(&r, 1, 1, pos + t, x + (t * n_heads + h) * hd, one);
                    CHECK1(memcmp(one, y + (t * n_heads + h) * hd, hd * sizeof *one) == 0);
                }
            }
        }
    }
    free(x);
    free(y);
    free(z);
    free(one);
}
END_TEST

/* ---- attention --------------------------------------------------------------- */

typedef struct attn_case {
    size_t n_kv, group, hd, n_q, n_k;
    int style, dims;
    uint32_t window;
    int gaps, shuffle;
    float amp; /* magnitude of q and k: larger = peakier softmax */
    int32_t q_off; /* queries sit at the last n_q key positions plus this */
} attn_case;

static double rel_err(const float *out, const double *ref, size_t n)
{
    double e = 0, r = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)out[i] - ref[i];
        e += d * d;
        r += ref[i] * ref[i];
    }
    return r > 0 ? sqrt(e / r) : sqrt(e);
}

static double g_worst = 0; /* worst relative error seen by run_case */

/* Runs kvck_attention and kvck_attention_ref on one case; returns the
 * relative error, and checks the scratch size is honoured (canary) and that
 * rows with no visible key are exactly zero. */
static double run_case(const attn_case *c, rng *g)
{
    const size_t nh = c->n_kv * c->group, hd = c->hd;
    kvck_rope rope;
    ck_assert_int_eq(kvck_rope_init(&rope, c->style, (int)hd, c->dims, 10000.0f, NULL, 0.0f), 0);
    kvck_dense d = {&rope, (float)(1.0 / sqrt((double)hd)), c->window, nh, c->n_kv, hd};

    int32_t *k_pos = xmalloc(c->n_k * sizeof *k_pos), *q_pos = xmalloc(c->n_q * sizeof *q_pos);
    float *q = xmalloc(c->n_q * nh * hd * sizeof *q);
    float *k = xmalloc(c->n_k * c->n_kv * hd * sizeof *k);
    float *v = xmalloc(c->n_k * c->n_kv * hd * sizeof *v);
    float *out = xmalloc(c->n_q * nh * hd * sizeof *out);
    double *ref = xmalloc(c->n_q * nh * hd * sizeof *ref);
    size_t sf = kvck_attention_scratch_floats(&d, c->n_q, c->n_k);
    const size_t canary = 64;
    float *scratch = xmalloc((sf + canary) * sizeof *scratch);

    int32_t p = (int32_t)rng_range(g, 300, 1000);
    for (size_t j = 0; j < c->n_k; j++) {
        k_pos[j] = p;
        p += c->gaps ? (int32_t)rng_range(g, 1, 6) : 1;
    }
    /* Queries are the last n_q tokens (prefill or decode), possibly moved
     * by q_off (into gaps, or before every key). */
    for (size_t t = 0; t < c->n_q; t++)
        q_pos[t] = k_pos[c->n_k - c->n_q + t] + c->q_off;
    fill(g, q, c->n_q * nh * hd, c->amp);
    fill(g, k, c->n_k * c->n_kv * hd, c->amp);
    fill(g, v, c->n_k * c->n_kv * hd, 1.0f);
    if (c->shuffle) {
        /* Keys in any order: Fisher-Yates over whole tokens. */
        const size_t tw = c->n_kv * hd;
        float *tmp = xmalloc(tw * sizeof *tmp);
        for (size_t j = c->n_k; j > 1; j--) {
            size_t o = rng_range(g, 0, j - 1);
            int32_t tp = k_pos[j - 1];
            k_pos[j - 1] = k_pos[o];
            k_pos[o] = tp;
            memcpy(tmp, k + (j - 1) * tw, tw * sizeof *tmp);
            memcpy(k + (j - 1) * tw, k + o * tw, tw * sizeof *tmp);
            memcpy(k + o * tw, tmp, tw * sizeof *tmp);
            memcpy(tmp, v + (j - 1) * tw, tw * sizeof *tmp);
            memcpy(v + (j - 1) * tw, v + o * tw, tw * sizeof *tmp);
            memcpy(v + o * tw, tmp, tw * sizeof *tmp);
        }
        free(tmp);
    }
    for (size_t i = 0; i < sf + canary; i++)
        scratch[i] = 1234.5f;
    for (size_t i = 0; i < c->n_q * nh * hd; i++)
        out[i] = NAN; /* every element must be written */

    kvck_attention(&d, c->n_q, q_pos, q, c->n_k, k_pos, k, v, out, scratch);
    kvck_attention_ref(&d, c->n_q, q_pos, q, c->n_k, k_pos, k, v, ref);

    for (size_t i = sf; i < sf + canary; i++)
        CHECK(scratch[i] == 1234.5f, "scratch overrun at %zu (size %zu)", i, sf);
    for (size_t i = 0; i < c->n_q * nh * hd; i++)
        CHECK(isfinite(out[i]), "out[%zu] = %g", i, (double)out[i]);
    /* Rows that see no key are exactly zero, in both. */
    for (size_t t = 0; t < c->n_q; t++) {
        int sees = 0;
        for (size_t j = 0; j < c->n_k && !sees; j++)
            sees = k_pos[j] <= q_pos[t]
                   && (c->window == 0 || (int64_t)q_pos[t] - k_pos[j] < (int64_t)c->window);
        if (!sees)
            for (size_t i = 0; i < nh * hd; i++) {
                CHECK1(out[t * nh * hd + i] == 0.0f);
                CHECK1(ref[t * nh * hd + i] == 0.0);
            }
    }
    double e = rel_err(out, ref, c->n_q * nh * hd);
    if (e > g_worst)
        g_worst = e;
    free(k_pos);
    free(q_pos);
    free(q);
    free(k);
    free(v);
    free(out);
    free(ref);
    free(scratch);
    return e;
}

#define CASE_FMT "n_kv %zu group %zu hd %zu n_q %zu n_k %zu style %d dims %d window %u gaps %d shuffle %d amp %g"
#define CASE_ARGS(c) (c).n_kv, (c).group, (c).hd, (c).n_q, (c).n_k, (c).style, (c).dims, \
        (c).window, (c).gaps, (c).shuffle, (double)(c).amp

static void check_case(const attn_case *c, rng *g, double tol)
{
    double e = run_case(c, g);
    CHECK(e <= tol, "rel err %.3g > %.1g for " CASE_FMT, e, tol, CASE_ARGS(*c));
}

START_TEST(test_attention_random)
{
    static const size_t hds[] = {32, 64, 80, 128};
    rng g = {g_seed ^ 0xa77e};
    printf("kernels: attention random cases, seed %llu\n", (unsigned long long)g_seed);
    for (int i = 0; i < 48; i++) {
        attn_case c = {0};
        c.n_kv = rng_range(&g, 1, 3);
        c.group = rng_range(&g, 1, 8);
        c.hd = hds[rng_range(&g, 0, 3)];
        c.style = 1 + (i & 1); /* both styles, alternately */
        c.dims = rng_range(&g, 0, 3) == 0 ? (int)c.hd / 2 : 0;
        /* n_k log-uniform over 1..2048, so small and ragged sizes show up. */
        c.n_k = (size_t)exp2((double)rng_range(&g, 0, 11000) / 1000.0);
        c.n_k = c.n_k < 1 ? 1 : c.n_k > 2048 ? 2048 : c.n_k;
        c.n_q = rng_range(&g, 0, 2) == 0 ? 1 : rng_range(&g, 1, c.n_k);
        /* Keep the float64 oracle affordable. */
        while (c.n_q > 1 && c.n_q * c.n_k * c.n_kv * c.group * c.hd > ((size_t)1 << 27))
            c.n_q /= 2;
        c.window = rng_range(&g, 0, 5) == 0 ? (uint32_t)rng_range(&g, 1, c.n_k) : 0;
        c.gaps = rng_range(&g, 0, 3) == 0;
        c.shuffle = rng_range(&g, 0, 5) == 0;
        c.amp = rng_range(&g, 0, 1) ? 1.0f : 3.0f;
        check_case(&c, &g, 1e-5);
    }
    printf("kernels: worst relative error %.3g\n", g_worst);
}
END_TEST

START_TEST(test_attention_fixed)
{
    rng g = {g_seed ^ 0xf1f};
    /* Full-size decode and prefill, both styles. */
    attn_case dec = {3, 3, 64, 1, 2048, 1, 0, 0, 0, 0, 1.0f, 0};
    check_case(&dec, &g, 1e-5);
    dec.style = 2;
    dec.hd = 128;
    check_case(&dec, &g, 1e-5);
    attn_case pre = {1, 4, 64, 700, 700, 2, 0, 0, 0, 0, 1.0f, 0};
    check_case(&pre, &g, 1e-5);
    /* Many query chunks (4096 rows a chunk), n_q < n_k. */
    attn_case chunks = {1, 8, 32, 1300, 1500, 1, 0, 0, 0, 0, 1.0f, 0};
    check_case(&chunks, &g, 1e-5);
    /* Sliding window smaller than a key block, and larger. */
    attn_case win = {2, 2, 80, 300, 1000, 1, 0, 37, 0, 0, 1.0f, 0};
    check_case(&win, &g, 1e-5);
    win.window = 600;
    check_case(&win, &g, 1e-5);
    /* Gaps in positions, with a window measured in positions. */
    attn_case gaps = {2, 3, 64, 200, 900, 2, 32, 50, 1, 0, 1.0f, 0};
    check_case(&gaps, &g, 1e-5);
    /* Keys in random order. */
    attn_case shuf = {2, 2, 64, 64, 777, 1, 0, 0, 1, 1, 1.0f, 0};
    check_case(&shuf, &g, 1e-5);
    shuf.window = 100;
    check_case(&shuf, &g, 1e-5);
    /* Keys newer than the queries in the arrays (queries 300 positions
     * back), sorted and shuffled: the block skip must look at every
     * position, not the first or last. */
    attn_case future = {2, 2, 64, 64, 777, 1, 0, 0, 0, 0, 1.0f, -300};
    check_case(&future, &g, 1e-5);
    future.shuffle = 1;
    check_case(&future, &g, 1e-5);
    future.window = 150;
    check_case(&future, &g, 1e-5);
    /* No RoPE. */
    attn_case none = {1, 2, 32, 10, 300, 0, 0, 0, 0, 0, 1.0f, 0};
    check_case(&none, &g, 1e-5);
    /* Very peaky softmax. */
    attn_case peak = {1, 2, 64, 30, 500, 1, 0, 0, 0, 0, 8.0f, 0};
    check_case(&peak, &g, 1e-5);
    /* Queries see no key at all (before every key; run_case checks zeros). */
    attn_case before = {2, 2, 64, 5, 100, 1, 0, 0, 0, 0, 1.0f, -200};
    check_case(&before, &g, 0.0);
    /* Window 1, queries one position before a key: those in a gap see the
     * key there, the others see nothing. */
    attn_case lonely = {1, 3, 32, 40, 200, 2, 0, 1, 1, 0, 1.0f, -1};
    check_case(&lonely, &g, 1e-5);
    /* Window 3 and gaps: each query sees 0 to 3 keys. */
    lonely.window = 3;
    check_case(&lonely, &g, 1e-5);
}
END_TEST

START_TEST(test_attention_no_keys)
{
    kvck_rope rope;
    ck_assert_int_eq(kvck_rope_init(&rope, 1, 32, 0, 10000.0f, NULL, 0.0f), 0);
    kvck_dense d = {&rope, 0.2f, 0, 4, 2, 32};
    float q[2 * 4 * 32], out[2 * 4 * 32];
    int32_t qp[2] = {3, 4};
    for (size_t i = 0; i < 2 * 4 * 32; i++) {
        q[i] = 1.0f;
        out[i] = NAN;
    }
    ck_assert_uint_eq(kvck_attention_scratch_floats(&d, 2, 0), 0);
    kvck_attention(&d, 2, qp, q, 0, NULL, NULL, NULL, out, NULL);
    for (size_t i = 0; i < 2 * 4 * 32; i++)
        CHECK1(out[i] == 0.0f);
}
END_TEST

/* Naive float64 attention for the block API: q [rows][ldq] (already
 * scaled), k [n][ldk], v [n][ldv], into ref [rows][dv]. */
static void naive_block_ref(size_t rows, size_t group, size_t dk, size_t dv, uint32_t window,
                            const int32_t *q_pos, const float *q, size_t ldq, const float *k,
                            size_t ldk, const float *v, size_t ldv, const int32_t *k_pos, size_t n,
                            double *ref)
{
    for (size_t r = 0; r < rows; r++) {
        int32_t qp = q_pos[r / group];
        double mx = -INFINITY, sum = 0;
        for (size_t c = 0; c < dv; c++)
            ref[r * dv + c] = 0;
        for (size_t j = 0; j < n; j++) {
            if (!(k_pos[j] <= qp && (window == 0 || (int64_t)qp - k_pos[j] < (int64_t)window)))
                continue;
            double s = dotf(q + r * ldq, k + j * ldk, dk);
            mx = s > mx ? s : mx;
        }
        for (size_t j = 0; j < n; j++) {
            if (!(k_pos[j] <= qp && (window == 0 || (int64_t)qp - k_pos[j] < (int64_t)window)))
                continue;
            double p = exp(dotf(q + r * ldq, k + j * ldk, dk) - mx);
            sum += p;
            for (size_t c = 0; c < dv; c++)
                ref[r * dv + c] += p * v[j * ldv + c];
        }
        for (size_t c = 0; c < dv && sum > 0; c++)
            ref[r * dv + c] /= sum;
    }
}

/* The block API fed in uneven blocks equals one pass over all keys, and
 * both match the naive reference; strides wider than the data, dv != dk,
 * a window and a query that sees nothing. */
/* The explicit-softmax pieces against plain double loops, for few rows
 * (the AVX2 path where the CPU has it) and many (CBLAS), with strides. */
START_TEST(test_explicit_softmax_pieces)
{
    rng r = {g_seed ^ 0x5e7u};
    const size_t rows_list[] = {1, 3, 16, 17, 40};
    for (size_t ri = 0; ri < sizeof rows_list / sizeof rows_list[0]; ri++) {
        const size_t rows = rows_list[ri], d = rng_range(&r, 1, 80), n = rng_range(&r, 1, 70);
        const size_t ldq = d + 3, ldk = d + 1, lds = n + 5, ldv = d + 2;
        float *q = malloc(rows * ldq * sizeof *q), *k = malloc(n * ldk * sizeof *k);
        float *v = malloc(n * ldv * sizeof *v), *sc = malloc(rows * lds * sizeof *sc);
        float *acc = malloc(rows * d * sizeof *acc);
        CHECK1(q && k && v && sc && acc);
        fill(&r, q, rows * ldq, 1.0f);
        fill(&r, k, n * ldk, 1.0f);
        fill(&r, v, n * ldv, 1.0f);
        fill(&r, acc, rows * d, 1.0f);
        double *want_acc = malloc(rows * d * sizeof *want_acc);
        CHECK1(want_acc != NULL);
        for (size_t i = 0; i < rows * d; i++)
            want_acc[i] = acc[i];
        kvck_scores(rows, d, q, ldq, k, ldk, n, sc, lds);
        for (size_t a = 0; a < rows; a++) {
            double m = -INFINITY;
            for (size_t j = 0; j < n; j++) {
                double t = 0;
                for (size_t c = 0; c < d; c++)
                    t += (double)q[a * ldq + c] * k[j * ldk + c];
                CHECK(fabs(sc[a * lds + j] - t) <= 1e-5 * (1 + fabs(t)),
                      "rows %zu d %zu n %zu: score (%zu,%zu) %g, want %g", rows, d, n, a, j,
                      (double)sc[a * lds + j], t);
                m = t > m ? t : m;
            }
            if (n > 1)
                sc[a * lds + n - 1] = -INFINITY; /* a masked key */
            float mx = kvck_row_max(sc + a * lds, n);
            double mw = -INFINITY;
            for (size_t j = 0; j < n; j++)
                mw = sc[a * lds + j] > mw ? sc[a * lds + j] : mw;
            CHECK(mx == (float)mw, "row max %g, want %g", (double)mx, mw);
            double sum_w = 0;
            float before[80];
            for (size_t j = 0; j < n && j < 80; j++)
                before[j] = sc[a * lds + j];
            float sum = kvck_row_exp(sc + a * lds, n, mx);
            for (size_t j = 0; j < n && j < 80; j++) {
                double e = before[j] == -INFINITY ? 0.0 : exp((double)before[j] - mx);
                sum_w += e;
                CHECK(fabs(sc[a * lds + j] - e) <= 1e-6 * (1 + e), "exp %g, want %g",
                      (double)sc[a * lds + j], e);
            }
            CHECK(fabs(sum - sum_w) <= 1e-5 * sum_w, "exp sum %g, want %g", (double)sum, sum_w);
            for (size_t c = 0; c < d; c++) {
                double t = 0;
                for (size_t j = 0; j < n; j++)
                    t += (double)sc[a * lds + j] * v[j * ldv + c];
                want_acc[a * d + c] += t;
            }
            (void)m;
        }
        kvck_pv(rows, d, sc, lds, v, ldv, n, acc);
        for (size_t i = 0; i < rows * d; i++)
            CHECK(fabs(acc[i] - want_acc[i]) <= 1e-4 * (1 + fabs(want_acc[i])),
                  "rows %zu: P.V %zu is %g, want %g", rows, i, (double)acc[i], want_acc[i]);
        free(q), free(k), free(v), free(sc), free(acc), free(want_acc);
    }
    CHECK1(kvck_row_max(NULL, 0) == -INFINITY);
    CHECK1(kvck_row_exp(NULL, 0, 0.0f) == 0.0f);
}
END_TEST

START_TEST(test_attn_blocks_uneven)
{
    rng g = {g_seed ^ 0xb10c};
    const size_t nq = 9, group = 3, rows = nq * group, dk = 48, dv = 40, n = 1000;
    const size_t ldq = dk + 3, ldk = dk + 5, ldv = dv + 7, ldo = dv + 2;
    static const size_t sizes[] = {1, 17, 128, 3, 100, 64, 2, 127};
    for (int wi = 0; wi < 2; wi++) {
        const uint32_t window = wi ? 300 : 0;
        float *q = xmalloc(rows * ldq * sizeof *q), *k = xmalloc(n * ldk * sizeof *k);
        float *v = xmalloc(n * ldv * sizeof *v);
        float *o1 = xmalloc(rows * ldo * sizeof *o1), *o2 = xmalloc(rows * ldo * sizeof *o2);
        double *ref = xmalloc(rows * dv * sizeof *ref);
        int32_t k_pos[1000], q_pos[9];
        fill(&g, q, rows * ldq, 0.5f);
        fill(&g, k, n * ldk, 1.0f);
        fill(&g, v, n * ldv, 1.0f);
        for (size_t j = 0; j < n; j++)
            k_pos[j] = (int32_t)(100 + 2 * j);
        for (size_t t = 0; t < nq; t++)
            q_pos[t] = (int32_t)(100 + 250 * t) - 1; /* query 0 at 99: sees nothing */
        for (size_t i = 0; i < rows * ldo; i++)
            o1[i] = o2[i] = -7.0f; /* gaps past dv must stay */

        /* One pass. */
        size_t sf1 = kvck_attn_scratch_floats(rows, dv, n);
        float *s1 = xmalloc(sf1 * sizeof *s1);
        kvck_attn a;
        kvck_attn_init(&a, rows, group, dk, dv, n, window, q_pos, s1);
        kvck_attn_block(&a, q, ldq, k, ldk, v, ldv, k_pos, n);
        kvck_attn_finish(&a, o1, ldo);

        /* Uneven blocks, block capacity 128. */
        size_t sf2 = kvck_attn_scratch_floats(rows, dv, 128);
        float *s2 = xmalloc(sf2 * sizeof *s2);
        kvck_attn_init(&a, rows, group, dk, dv, 128, window, q_pos, s2);
        for (size_t j = 0, b = 0; j < n; b++) {
            size_t nb = sizes[b % 8];
            nb = nb < n - j ? nb : n - j;
            kvck_attn_block(&a, q, ldq, k + j * ldk, ldk, v + j * ldv, ldv, k_pos + j, nb);
            j += nb;
        }
        kvck_attn_finish(&a, o2, ldo);

        naive_block_ref(rows, group, dk, dv, window, q_pos, q, ldq, k, ldk, v, ldv, k_pos, n, ref);
        double e1 = 0, e2 = 0, e12 = 0, rn = 0;
        for (size_t r = 0; r < rows; r++) {
            for (size_t c = 0; c < dv; c++) {
                double a1 = o1[r * ldo + c], a2 = o2[r * ldo + c], x = ref[r * dv + c];
                e1 += (a1 - x) * (a1 - x);
                e2 += (a2 - x) * (a2 - x);
                e12 += (a1 - a2) * (a1 - a2);
                rn += x * x;
            }
            for (size_t c = dv; c < ldo; c++)
                CHECK1(o1[r * ldo + c] == -7.0f && o2[r * ldo + c] == -7.0f);
        }
        for (size_t r = 0; r < group; r++) /* query 0 saw no key */
            for (size_t c = 0; c < dv; c++)
                CHECK1(o1[r * ldo + c] == 0.0f && o2[r * ldo + c] == 0.0f);
        e1 = sqrt(e1 / rn);
        e2 = sqrt(e2 / rn);
        e12 = sqrt(e12 / rn);
        CHECK(e1 <= 1e-5 && e2 <= 1e-5 && e12 <= 1e-5,
                      "window %u: one pass %.3g, uneven %.3g, between %.3g", window, e1, e2, e12);
        free(q);
        free(k);
        free(v);
        free(o1);
        free(o2);
        free(ref);
        free(s1);
        free(s2);
    }
}
END_TEST

static Suite *kernels_suite(void)
{
    Suite *s = suite_create("kernels");
    TCase *tc;

    tc = tcase_create("fp16");
    tcase_add_test(tc, test_f16_known);
    tcase_add_test(tc, test_f16_roundtrip_all);
    tcase_add_test(tc, test_f16_all_ties);
    tcase_add_test(tc, test_f16_arrays);
    tcase_add_test(tc, test_all_finite);
    suite_add_tcase(s, tc);

    tc = tcase_create("rope");
    tcase_add_test(tc, test_rope_init);
    tcase_add_test(tc, test_rope_known);
    tcase_add_test(tc, test_rope_norm_and_relative);
    tcase_add_test(tc, test_rope_partial_inplace_batch);
    suite_add_tcase(s, tc);

    tc = tcase_create("attention");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_attention_random);
    tcase_add_test(tc, test_attention_fixed);
    tcase_add_test(tc, test_attention_no_keys);
    tcase_add_test(tc, test_attn_blocks_uneven);
    tcase_add_test(tc, test_explicit_softmax_pieces);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    g_seed = ktest_seed("kernels", g_seed);
    return ktest_run(kernels_suite()) ? EXIT_FAILURE : EXIT_SUCCESS;
}
