/*
 * quant.c -- row formats, quantizing and dequantizing (kvck_quant.h).
 *
 * This is the scalar definition of the numbers: x^ = zero + scale * level,
 * zero and scale in fp16, the level nearest to (x - zero) / scale with ties
 * to the lower code. Every attention path reproduces dequantize() up to
 * float rounding; quantizing has this one implementation, so codes never
 * depend on the CPU.
 */
#include "kvck_quant.h"
#include "quant_internal.h"

#include <math.h>
#include <pthread.h>
#include <string.h>

/* ---- formats --------------------------------------------------------------- */

/* 1 when lev [L + 1] starts at 0, ends at 1 and never decreases (NaN
 * fails every comparison). Equal neighbours are allowed: nearest-level
 * search then picks the lower code, and the kernels need nothing more. */
static int levels_ok(const float *lev, unsigned L)
{
    if (!(lev[0] == 0.0f) || !(lev[L] == 1.0f))
        return 0;
    for (unsigned i = 0; i < L; i++)
        if (!(lev[i] <= lev[i + 1]))
            return 0;
    return 1;
}

int kvck_qfmt_finish(kvck_qfmt *f)
{
    if (!f || f->d == 0 || f->d > KVCK_MAX_HEAD_DIM || f->n_seg == 0 || f->n_seg > KVCK_QSEG_MAX)
        return -1;
    const uint32_t group = f->group ? f->group : f->d;
    uint32_t next = 0, n_groups = 0;
    /* Check everything before writing anything, so a refused format is
     * left as the caller filled it. */
    for (uint32_t i = 0; i < f->n_seg; i++) {
        const kvck_qseg *s = &f->seg[i];
        if (s->first != next || s->len == 0 || s->len > f->d - next || !kvck_qbits_valid(s->bits))
            return -1;
        if (s->levels && s->bits && !levels_ok(s->levels, (1u << s->bits) - 1u))
            return -1;
        n_groups += (s->len + group - 1) / group;
        if (n_groups > KVCK_QGROUP_MAX)
            return -1;
        next += s->len;
    }
    if (next != f->d)
        return -1;

    uint32_t off = 0, g = 0;
    for (uint32_t i = 0; i < f->n_seg; i++) {
        kvck_qseg *s = &f->seg[i];
        s->offset = off;
        off += (uint32_t)kvck_pack_bytes(s->bits, s->len);
        for (uint32_t c = 0; c < s->len; c += group)
            f->gfirst[g++] = (uint16_t)(s->first + c);
    }
    f->gfirst[g] = (uint16_t)f->d;
    f->n_groups = n_groups;
    f->row_bytes = off;
    f->ulev = kvcki_uniform_levels();
    return 0;
}

/* Uniform levels c / L, a correctly rounded float division, so every path
 * reads the same floats from this table; filled once (formats are small
 * and many: they point here rather than carry 9 KiB each). */
static float g_ulev[9][256];
static pthread_once_t g_ulev_once = PTHREAD_ONCE_INIT;

static void ulev_fill(void)
{
    for (unsigned w = 1; w <= 8; w++) {
        const unsigned L = (1u << w) - 1u;
        for (unsigned c = 0; c <= L; c++)
            g_ulev[w][c] = (float)c / (float)L;
    }
}

const float (*kvcki_uniform_levels(void))[256]
{
    pthread_once(&g_ulev_once, ulev_fill);
    return (const float (*)[256])g_ulev;
}

int kvck_qfmt_uniform(kvck_qfmt *f, uint32_t d, unsigned bits, uint32_t group)
{
    if (!f)
        return -1;
    memset(f, 0, sizeof *f);
    f->d = d;
    f->n_seg = 1;
    f->seg[0].first = 0;
    f->seg[0].len = d;
    f->seg[0].bits = bits;
    f->seg[0].levels = NULL;
    f->group = group;
    return kvck_qfmt_finish(f);
}

size_t kvck_q_scale_bytes(const kvck_qfmt *f, int mode, size_t n)
{
    return mode == KVCK_QS_CHANNEL ? (size_t)f->d * 4 : n * f->n_groups * 4;
}

/* ---- quantizing -------------------------------------------------------------- */

/* Smallest fp16 >= v (v > 0, finite). The nearest fp16 of (float)v is one
 * of the two fp16 neighbours of v; when it is the lower, step up once. */
static uint16_t f16_ceil(double v)
{
    uint16_t h = kvck_f32_to_f16((float)v);
    if ((double)kvck_f16_to_f32(h) < v)
        h++;
    return h;
}

/* (scale, zero) of a group with min m and max M over `any` values. */
static void group_params(float m, float M, int any, uint16_t *scale, uint16_t *zero)
{
    if (!any) {
        /* Every value is an outlier: nothing to cover. */
        *zero = 0, *scale = 0;
        return;
    }
    *zero = kvck_f32_to_f16(m);
    /* Exact in double: both are floats. */
    const double span = (double)M - (double)kvck_f16_to_f32(*zero);
    *scale = (M == m || !(span > 0.0)) ? 0 : f16_ceil(span);
}

/* Code of the level nearest to t (clamped to [0, 1], NaN to 0) among lev
 * [L + 1]: the first c whose midpoint to c + 1 is >= t, so a tie goes to
 * the lower code. */
static unsigned nearest_code(float t, const float *lev, unsigned L)
{
    t = t > 0.0f ? (t < 1.0f ? t : 1.0f) : 0.0f;
    unsigned lo = 0, hi = L; /* answer in [lo, hi] */
    while (lo < hi) {
        unsigned mid = (lo + hi) / 2;
        if (t <= 0.5f * (lev[mid] + lev[mid + 1]))
            hi = mid;
        else
            lo = mid + 1;
    }
    return lo;
}

/* Code of x in a group of (scale, zero), levels lev of width bits. */
static unsigned code_of(float x, uint16_t scale, uint16_t zero, const float *lev, unsigned bits)
{
    const float sf = kvck_f16_to_f32(scale), zf = kvck_f16_to_f32(zero);
    if (bits == 0 || sf == 0.0f)
        return 0;
    return nearest_code((x - zf) / sf, lev, (1u << bits) - 1u);
}

/* Min and max of x [cnt] (stride xs) over the values not marked in skip
 * [cnt] (stride ss, or NULL); returns how many there were. */
static size_t min_max(const float *x, size_t xs, const uint8_t *skip, size_t ss, size_t cnt,
                      float *m, float *M)
{
    size_t any = 0;
    float lo = 0.0f, hi = 0.0f;
    for (size_t i = 0; i < cnt; i++) {
        if (skip && skip[i * ss])
            continue;
        const float v = x[i * xs];
        lo = any == 0 || v < lo ? v : lo;
        hi = any == 0 || v > hi ? v : hi;
        any++;
    }
    *m = lo, *M = hi;
    return any;
}

void kvck_q_quantize(const kvck_qfmt *f, int mode, size_t n, const float *x, size_t ldx,
                     const uint8_t *skip, uint8_t *codes, uint16_t *sz)
{
    const uint32_t d = f->d;
    uint8_t row[KVCK_MAX_HEAD_DIM]; /* [d] codes of one row before packing */

    if (mode == KVCK_QS_CHANNEL) {
        /* Every channel's range over the n rows first, then row by row. */
        for (uint32_t c = 0; c < d; c++) {
            float m, M;
            size_t any = min_max(x + c, ldx, skip ? skip + c : NULL, d, n, &m, &M);
            group_params(m, M, any != 0, &sz[2 * c], &sz[2 * c + 1]);
        }
        for (size_t j = 0; j < n; j++) {
            for (uint32_t i = 0; i < f->n_seg; i++) {
                const kvck_qseg *s = &f->seg[i];
                const float *lev = kvcki_seg_levels(f, s);
                if (s->bits == 0)
                    continue;
                for (uint32_t c = s->first; c < s->first + s->len; c++)
                    row[c] = (uint8_t)code_of(x[j * ldx + c], sz[2 * c], sz[2 * c + 1], lev,
                                              s->bits);
                kvck_pack(s->bits, row + s->first, s->len, codes + j * f->row_bytes + s->offset);
            }
        }
        return;
    }

    for (size_t j = 0; j < n; j++) {
        const float *xr = x + j * ldx;                           /* [d] */
        const uint8_t *sk = skip ? skip + j * d : NULL;          /* [d] */
        uint16_t *szr = sz + j * (size_t)f->n_groups * 2;        /* [n_groups][2] */
        uint32_t g = 0;
        for (uint32_t i = 0; i < f->n_seg; i++) {
            const kvck_qseg *s = &f->seg[i];
            const float *lev = kvcki_seg_levels(f, s);
            for (; g < f->n_groups && f->gfirst[g] < s->first + s->len; g++) {
                const uint32_t c0 = f->gfirst[g], c1 = f->gfirst[g + 1];
                float m, M;
                size_t any = min_max(xr + c0, 1, sk ? sk + c0 : NULL, 1, c1 - c0, &m, &M);
                group_params(m, M, any != 0, &szr[2 * g], &szr[2 * g + 1]);
                for (uint32_t c = c0; c < c1; c++)
                    row[c] = (uint8_t)code_of(xr[c], szr[2 * g], szr[2 * g + 1], lev, s->bits);
            }
            if (s->bits)
                kvck_pack(s->bits, row + s->first, s->len, codes + j * f->row_bytes + s->offset);
        }
    }
}

/* ---- dequantizing ------------------------------------------------------------- */

void kvcki_row_levels(const kvck_qfmt *f, const uint8_t *codes, float *lev)
{
    uint8_t c8[KVCK_MAX_HEAD_DIM]; /* [len] codes of one segment */
    for (uint32_t i = 0; i < f->n_seg; i++) {
        const kvck_qseg *s = &f->seg[i];
        float *out = lev + s->first; /* [len] */
        if (s->bits == 0) {
            memset(out, 0, s->len * sizeof *out);
            continue;
        }
        const float *tab = kvcki_seg_levels(f, s);
        kvck_unpack(s->bits, codes + s->offset, s->len, c8);
        for (uint32_t c = 0; c < s->len; c++)
            out[c] = tab[c8[c]];
    }
}

void kvck_q_dequantize(const kvck_qfmt *f, int mode, size_t n, const uint8_t *codes,
                       const uint16_t *sz, float *x, size_t ldx)
{
    const uint32_t d = f->d;
    float lev[KVCK_MAX_HEAD_DIM];        /* [d] levels of one row */
    float cs[KVCK_MAX_HEAD_DIM], cz[KVCK_MAX_HEAD_DIM]; /* [d] channel scales, zeros */
    if (mode == KVCK_QS_CHANNEL) /* widened once for all n rows (exact: same values) */
        for (uint32_t c = 0; c < d; c++) {
            cs[c] = kvck_f16_to_f32(sz[2 * c]);
            cz[c] = kvck_f16_to_f32(sz[2 * c + 1]);
        }
    for (size_t j = 0; j < n; j++) {
        float *xr = x + j * ldx; /* [d] */
        kvcki_row_levels(f, codes + j * f->row_bytes, lev);
        if (mode == KVCK_QS_CHANNEL) {
            for (uint32_t c = 0; c < d; c++)
                xr[c] = cz[c] + cs[c] * lev[c];
            continue;
        }
        const uint16_t *szr = sz + j * (size_t)f->n_groups * 2; /* [n_groups][2] */
        for (uint32_t g = 0; g < f->n_groups; g++) {
            const float sf = kvck_f16_to_f32(szr[2 * g]), zf = kvck_f16_to_f32(szr[2 * g + 1]);
            for (uint32_t c = f->gfirst[g]; c < f->gfirst[g + 1]; c++)
                xr[c] = zf + sf * lev[c];
        }
    }
}

float kvck_q_value(const kvck_qfmt *f, int mode, const uint8_t *codes, const uint16_t *sz,
                   size_t j, uint32_t c)
{
    const kvck_qseg *s = kvcki_seg_of(f, c);
    float lev = 0.0f;
    if (s->bits) {
        unsigned code = kvcki_code_at(s->bits, codes + j * f->row_bytes + s->offset, s->len,
                                      c - s->first);
        lev = kvcki_seg_levels(f, s)[code];
    }
    const uint16_t *p = mode == KVCK_QS_CHANNEL
                            ? sz + 2 * (size_t)c
                            : sz + (j * f->n_groups + kvcki_group_of(f, c)) * 2;
    return kvck_f16_to_f32(p[1]) + kvck_f16_to_f32(p[0]) * lev;
}

void kvck_q_encode(const kvck_qfmt *f, int mode, size_t n, const float *x, size_t ldx,
                   const uint16_t *sz, uint8_t *codes)
{
    uint8_t row[KVCK_MAX_HEAD_DIM]; /* [d] codes of one row before packing */
    for (size_t j = 0; j < n; j++) {
        const float *xr = x + j * ldx; /* [d] */
        const uint16_t *szr = mode == KVCK_QS_CHANNEL ? sz : sz + j * (size_t)f->n_groups * 2;
        for (uint32_t i = 0; i < f->n_seg; i++) {
            const kvck_qseg *s = &f->seg[i];
            if (s->bits == 0)
                continue;
            const float *lev = kvcki_seg_levels(f, s);
            for (uint32_t c = s->first; c < s->first + s->len; c++) {
                const uint32_t k = mode == KVCK_QS_CHANNEL ? c : kvcki_group_of(f, c);
                row[c] = (uint8_t)code_of(xr[c], szr[2 * k], szr[2 * k + 1], lev, s->bits);
            }
            kvck_pack(s->bits, row + s->first, s->len, codes + j * f->row_bytes + s->offset);
        }
    }
}
