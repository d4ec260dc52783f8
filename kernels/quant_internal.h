/*
 * quant_internal.h -- pieces the quantized-store kernels share between
 * their files (packing, formats, the ISA paths). Internal to kvck.
 */
#ifndef KVCK_QUANT_INTERNAL_H
#define KVCK_QUANT_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "kvck_quant.h"

/* Plane widths of a code width (low plane first; 0 = none). */
void kvcki_planes(unsigned bits, unsigned *lo, unsigned *hi);

/* Code of value i of n packed at `bits` (the scalar definition). */
unsigned kvcki_code_at(unsigned bits, const uint8_t *in, size_t n, size_t i);

/* Uniform levels [9][256] of every width (c / (2^w - 1)), shared. */
const float (*kvcki_uniform_levels(void))[256];

/* The levels of a segment: its table, or the format's uniform ones. */
static inline const float *kvcki_seg_levels(const kvck_qfmt *f, const kvck_qseg *s)
{
    return s->levels ? s->levels : f->ulev[s->bits];
}

/* Segment holding channel c (segments tile [0, d)). */
static inline const kvck_qseg *kvcki_seg_of(const kvck_qfmt *f, uint32_t c)
{
    uint32_t i = 0;
    while (i + 1 < f->n_seg && c >= f->seg[i].first + f->seg[i].len)
        i++;
    return &f->seg[i];
}

/* Per-token group holding channel c. */
static inline uint32_t kvcki_group_of(const kvck_qfmt *f, uint32_t c)
{
    uint32_t lo = 0, hi = f->n_groups; /* gfirst[lo] <= c < gfirst[hi] */
    while (hi - lo > 1) {
        uint32_t mid = (lo + hi) / 2;
        if (c >= f->gfirst[mid])
            lo = mid;
        else
            hi = mid;
    }
    return lo;
}

/* Unpacks row codes [row_bytes] into lev [d]: the level (not yet scaled)
 * of every channel, 0 for width-0 channels. */
void kvcki_row_levels(const kvck_qfmt *f, const uint8_t *codes, float *lev);

/* Scratch regions start on 16-float (64-byte) boundaries. */
static inline size_t kvcki_up16(size_t n)
{
    return (n + 15u) & ~(size_t)15u;
}

/* The regions of kvck_q_scores / kvck_q_pv scratch (kvck_q_scratch_floats),
 * for `rows` rows and blocks of up to n rows. */
typedef struct kvcki_qscr {
    float *qf;  /* [rows][d] folded queries (scores) or level sums (P.V) */
    float *cst; /* [rows] per-row constant (sum q.zero, or sum p) */
    float *gs;  /* [rows][n_groups] per-group sums of q (per-token scores) */
    float *lev; /* [d] levels of one row */
    float *blk; /* [n][d] a dequantized block (many rows) */
    float *w1;  /* [rows][n_groups][n] per-row, per-key weights (SIMD P.V) */
    float *w2;  /* [n][n_groups][2] a block's per-token scales as floats (SIMD) */
} kvcki_qscr;

static inline size_t kvcki_qscr_floats(const kvck_qfmt *f, size_t rows, size_t n)
{
    const size_t d = f->d, ng = f->n_groups;
    return kvcki_up16(rows * d) + kvcki_up16(rows) + kvcki_up16(rows * ng) + kvcki_up16(d)
           + kvcki_up16(n * d) + kvcki_up16(rows * ng * n) + kvcki_up16(n * ng * 2);
}

static inline void kvcki_qscr_carve(const kvck_qfmt *f, size_t rows, size_t n, float *base,
                                    kvcki_qscr *v)
{
    const size_t d = f->d;
    v->qf = base;
    v->cst = v->qf + kvcki_up16(rows * d);
    v->gs = v->cst + kvcki_up16(rows);
    v->lev = v->gs + kvcki_up16(rows * f->n_groups);
    v->blk = v->lev + kvcki_up16(d);
    v->w1 = v->blk + kvcki_up16(n * d);
    v->w2 = v->w1 + kvcki_up16(rows * f->n_groups * n);
}

/* fp16 rows: s [rows][lds] (n columns) = q [rows][ldq] . k [n][ldk]^T and
 * acc [rows][d] += p [rows][ldp] (n wide) . v [n][ldv], d wide. */
void kvcki_f16_scores(size_t rows, size_t d, const float *q, size_t ldq, const uint16_t *k,
                      size_t ldk, size_t n, float *s, size_t lds);
void kvcki_f16_pv(size_t rows, size_t d, const float *p, size_t ldp, const uint16_t *v,
                  size_t ldv, size_t n, float *acc);

/* The SIMD instances (quant_simd.h): each returns 0, doing nothing, for a
 * format or width it does not cover; the caller then takes the plain C
 * path. Only called when kvck_isa() allows their ISA. */
int kvcki_q_scores_avx2(const kvck_qfmt *f, int mode, size_t rows, const float *q, size_t ldq,
                        size_t n, const uint8_t *codes, const uint16_t *sz, float *s, size_t lds,
                        const kvcki_qscr *w);
int kvcki_q_pv_avx2(const kvck_qfmt *f, int mode, size_t rows, const float *p, size_t ldp,
                    size_t n, const uint8_t *codes, const uint16_t *sz, float *acc,
                    const kvcki_qscr *w);
int kvcki_f16_scores_avx2(size_t rows, size_t d, const float *q, size_t ldq, const uint16_t *k,
                          size_t ldk, size_t n, float *s, size_t lds);
int kvcki_f16_pv_avx2(size_t rows, size_t d, const float *p, size_t ldp, const uint16_t *v,
                      size_t ldv, size_t n, float *acc);
int kvcki_q_scores_avx512(const kvck_qfmt *f, int mode, size_t rows, const float *q, size_t ldq,
                          size_t n, const uint8_t *codes, const uint16_t *sz, float *s,
                          size_t lds, const kvcki_qscr *w);
int kvcki_q_pv_avx512(const kvck_qfmt *f, int mode, size_t rows, const float *p, size_t ldp,
                      size_t n, const uint8_t *codes, const uint16_t *sz, float *acc,
                      const kvcki_qscr *w);
int kvcki_f16_scores_avx512(size_t rows, size_t d, const float *q, size_t ldq, const uint16_t *k,
                            size_t ldk, size_t n, float *s, size_t lds);
int kvcki_f16_pv_avx512(size_t rows, size_t d, const float *p, size_t ldp, const uint16_t *v,
                        size_t ldv, size_t n, float *acc);

#if defined(__GNUC__) && defined(__x86_64__) && !defined(KVCK_GENERIC_ONLY)
#define KVCK_QUANT_X86 1
#endif

#endif
