/*
 * rope.c -- rotary position embedding.
 *
 * Every token is rotated on its own: the angle pos * inv_freq[i] is formed
 * in double, its cos and sin are taken in double, multiplied by mscale and
 * rounded once to float; the rotation is done in float. Nothing depends on
 * the other tokens of the call, so a token gives the same bits whatever
 * batch it comes in (prefill vs. decode, re-rotation of cached keys).
 */
#include "kvck.h"
#include "kvck_quant.h"

#include <math.h>
#include <string.h>

int kvck_rope_init(kvck_rope *r, int style, int head_dim, int dims, float theta,
                   const float *inv_freq, float mscale)
{
    kvck_rope t;

    if (!r || style < 0 || style > 2 || head_dim <= 0 || head_dim > KVCK_MAX_HEAD_DIM)
        return -1;
    memset(&t, 0, sizeof t);
    t.style = style;
    t.head_dim = head_dim;
    if (style == 0) {
        /* No rotation: dims, theta and inv_freq are irrelevant, and an odd
         * head_dim is legal (the ABI asks for even only when RoPE is used). */
        t.dims = 0;
        t.mscale = 1.0f;
        *r = t;
        return 0;
    }
    if (dims == 0)
        dims = head_dim;
    if (dims < 0 || (dims & 1) || dims > head_dim)
        return -1;
    if (mscale == 0.0f)
        mscale = 1.0f;
    if (!isfinite(mscale))
        return -1;
    t.dims = dims;
    t.mscale = mscale;
    for (int i = 0; i < dims / 2; i++) {
        if (inv_freq) {
            if (!isfinite(inv_freq[i]))
                return -1;
            t.inv_freq[i] = inv_freq[i];
        } else {
            if (!(theta > 0.0f) || !isfinite(theta))
                return -1;
            /* theta^(-2i/dims) in double, rounded once to float. */
            t.inv_freq[i] = (float)pow((double)theta, -2.0 * (double)i / (double)dims);
        }
    }
    *r = t;
    return 0;
}

/* ---- angles ----------------------------------------------------------------
 *
 * cos and sin come from libm, in double, so every caller (any batch, any
 * clone below) gets the same bits for the same position. glibc's sincos()
 * computes both from one argument reduction. */

/* cos and sin of pos * inv_freq[i], times mscale, in double, rounded once
 * to float, for the half = dims/2 pairs of one token. */
static inline __attribute__((always_inline)) void
rope_angles(const kvck_rope *r, int32_t pos, size_t half, float *c /* [half] */,
            float *s /* [half] */)
{
    const double ms = (double)r->mscale;
    for (size_t i = 0; i < half; i++) {
        double a = (double)pos * (double)r->inv_freq[i];
        double ci, si;
        sincos(a, &si, &ci);
        c[i] = (float)(ci * ms);
        s[i] = (float)(si * ms);
    }
}

/* Rotates n_tok tokens, angles from libm or, when table != NULL, from a
 * table of the same floats (kvck_rope_table_fill), so both give the same
 * bits; compiled twice below (baseline and AVX2, unless
 * -DKVCK_GENERIC_ONLY), the results are the same bits. */
static inline __attribute__((always_inline)) void
rope_body(const kvck_rope *r, const float *table /* [n_pos][dims/2][2] or NULL */, size_t n_tok,
          size_t n_heads, const int32_t *pos, const float *x, float *y)
{
    const size_t hd = (size_t)r->head_dim;
    const size_t dims = (size_t)r->dims;
    const size_t half = dims / 2;
    float c[KVCK_MAX_HEAD_DIM / 2], s[KVCK_MAX_HEAD_DIM / 2]; /* [half] per token */

    for (size_t t = 0; t < n_tok; t++) {
        /* Angles once per token, shared by all its heads. */
        if (table) {
            const float *cs = table + (size_t)pos[t] * dims; /* [half][2] */
            for (size_t i = 0; i < half; i++) {
                c[i] = cs[2 * i];
                s[i] = cs[2 * i + 1];
            }
        } else {
            rope_angles(r, pos[t], half, c, s);
        }
        for (size_t h = 0; h < n_heads; h++) {
            const float *xr = x + (t * n_heads + h) * hd; /* [hd] */
            float *yr = y + (t * n_heads + h) * hd;       /* [hd] */
            /* The rotation itself is in float: the per-element work of
             * every cached key at decode, twice as wide as double. Each
             * pair is read into locals before either output is written,
             * so y == x works. */
            if (r->style == 1) {
                for (size_t i = 0; i < half; i++) {
                    float x0 = xr[2 * i], x1 = xr[2 * i + 1];
                    yr[2 * i] = x0 * c[i] - x1 * s[i];
                    yr[2 * i + 1] = x0 * s[i] + x1 * c[i];
                }
            } else {
                for (size_t i = 0; i < half; i++) {
                    float x0 = xr[i], x1 = xr[i + half];
                    yr[i] = x0 * c[i] - x1 * s[i];
                    yr[i + half] = x0 * s[i] + x1 * c[i];
                }
            }
            /* Dimensions past `dims` pass through unrotated. */
            if (yr != xr && hd > dims)
                memcpy(yr + dims, xr + dims, (hd - dims) * sizeof *yr);
        }
    }
}

static void rope_generic(const kvck_rope *r, const float *table, size_t n_tok, size_t n_heads,
                         const int32_t *pos, const float *x, float *y)
{
    rope_body(r, table, n_tok, n_heads, pos, x, y);
}

#if defined(__GNUC__) && defined(__x86_64__) && !defined(KVCK_GENERIC_ONLY)
#include <cpuid.h>
#define KVCK_ROPE_AVX2 1

__attribute__((target("avx2"))) static void rope_avx2(const kvck_rope *r, const float *table,
                                                      size_t n_tok, size_t n_heads,
                                                      const int32_t *pos, const float *x, float *y)
{
    rope_body(r, table, n_tok, n_heads, pos, x, y);
}

/* AVX2 usable: CPU flag plus OS-saved YMM state. Cached; racing first
 * calls store the same value. */
static int have_avx2(void)
{
    static _Atomic int cached = -1;
    int c = cached;
    if (c >= 0)
        return c;
    c = 0;
    {
        unsigned a, b, cx, d;
        if (__get_cpuid(1, &a, &b, &cx, &d) && (cx & bit_OSXSAVE) && (cx & bit_AVX)) {
            uint32_t lo, hi;
            __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
            (void)hi;
            if ((lo & 6u) == 6u && __get_cpuid_count(7, 0, &a, &b, &cx, &d) && (b & bit_AVX2))
                c = 1;
        }
    }
    cached = c;
    return c;
}
#endif

/* Both entry points: angles from libm (table NULL) or from the table. */
static void rope_run(const kvck_rope *r, const float *table, size_t n_tok, size_t n_heads,
                     const int32_t *pos, const float *x, float *y)
{
    if (r->style == 0 || r->dims == 0) {
        if (y != x)
            memmove(y, x, n_tok * n_heads * (size_t)r->head_dim * sizeof *y);
        return;
    }
#ifdef KVCK_ROPE_AVX2
    if (have_avx2()) {
        rope_avx2(r, table, n_tok, n_heads, pos, x, y);
        return;
    }
#endif
    rope_generic(r, table, n_tok, n_heads, pos, x, y);
}

void kvck_rope_apply(const kvck_rope *r, size_t n_tok, size_t n_heads, const int32_t *pos,
                     const float *x, float *y)
{
    rope_run(r, NULL, n_tok, n_heads, pos, x, y);
}

/* ---- table of angles (kvck_quant.h) ----------------------------------------
 *
 * Keys kept before RoPE (quantized per channel, where RoPE would mix
 * channel pairs) are rotated at every attend; a table of the same floats
 * rope_angles() gives saves a sincos per pair and position. */

size_t kvck_rope_table_floats(const kvck_rope *r, size_t n_pos)
{
    return r->style == 0 ? 0 : n_pos * (size_t)r->dims;
}

void kvck_rope_table_fill(const kvck_rope *r, size_t n_pos, float *table)
{
    const size_t half = r->style == 0 ? 0 : (size_t)r->dims / 2;
    float c[KVCK_MAX_HEAD_DIM / 2], s[KVCK_MAX_HEAD_DIM / 2]; /* [half] */
    for (size_t p = 0; p < n_pos && half; p++) {
        rope_angles(r, (int32_t)p, half, c, s);
        for (size_t i = 0; i < half; i++) {
            table[(p * half + i) * 2] = c[i];
            table[(p * half + i) * 2 + 1] = s[i];
        }
    }
}

void kvck_rope_apply_table(const kvck_rope *r, const float *table, size_t n_tok, size_t n_heads,
                           const int32_t *pos, const float *x, float *y)
{
    rope_run(r, table, n_tok, n_heads, pos, x, y);
}
