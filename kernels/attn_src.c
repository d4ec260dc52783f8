/*
 * attn_src.c -- the streaming pass over f32, f16 or quantized blocks
 * (kvck_attn_block_src, kvck_quant.h).
 *
 * Per block: scores of the rows that may see it, straight from the
 * source's storage (fp16 loads, or the codes through kvck_q_scores), then
 * the same masking and online softmax as kvck_attn_block
 * (kvcki_attn_softmax), then P.V from the storage again. Nothing widens a
 * whole block into memory. An all-f32 block is kvck_attn_block itself.
 */
#include "kvck_quant.h"
#include "attn_internal.h"
#include "quant_internal.h"

#include <string.h>

/* ---- fp16 rows ------------------------------------------------------------------ */

/* Floats of the stack buffer the portable fp16 path widens a few rows
 * into (no scratch is asked of callers for fp16). */
#define F16_BUF 4096

/* Keys per widened chunk: as many rows as F16_BUF holds. */
static size_t f16_chunk(size_t d)
{
    size_t c = F16_BUF / (d ? d : 1);
    return c ? c : 1;
}

/* buf [nb][d] <- the fp16 rows x [nb][ldx], widened. */
static void widen_rows(const uint16_t *x, size_t ldx, size_t nb, size_t d, float *buf)
{
    for (size_t i = 0; i < nb; i++)
        kvck_f16_to_f32_n(x + i * ldx, buf + i * d, d);
}

void kvcki_f16_scores(size_t rows, size_t d, const float *q, size_t ldq, const uint16_t *k,
                      size_t ldk, size_t n, float *s, size_t lds)
{
#ifdef KVCK_QUANT_X86
    /* Few rows: straight from fp16 (F16C loads), no widened copy. */
    const int isa = rows <= KVCK_FEW_ROWS ? kvck_isa() : KVCK_ISA_GENERIC;
    if (isa >= KVCK_ISA_AVX512 && kvcki_f16_scores_avx512(rows, d, q, ldq, k, ldk, n, s, lds))
        return;
    if (isa >= KVCK_ISA_AVX2 && kvcki_f16_scores_avx2(rows, d, q, ldq, k, ldk, n, s, lds))
        return;
#endif
    float buf[F16_BUF]; /* [chunk][d] widened keys */
    const size_t ch = f16_chunk(d);
    for (size_t j = 0; j < n; j += ch) {
        const size_t nb = n - j < ch ? n - j : ch;
        widen_rows(k + j * ldk, ldk, nb, d, buf);
        kvck_scores(rows, d, q, ldq, buf, d, nb, s + j, lds);
    }
}

void kvcki_f16_pv(size_t rows, size_t d, const float *p, size_t ldp, const uint16_t *v,
                  size_t ldv, size_t n, float *acc)
{
#ifdef KVCK_QUANT_X86
    const int isa = rows <= KVCK_FEW_ROWS ? kvck_isa() : KVCK_ISA_GENERIC;
    if (isa >= KVCK_ISA_AVX512 && kvcki_f16_pv_avx512(rows, d, p, ldp, v, ldv, n, acc))
        return;
    if (isa >= KVCK_ISA_AVX2 && kvcki_f16_pv_avx2(rows, d, p, ldp, v, ldv, n, acc))
        return;
#endif
    float buf[F16_BUF]; /* [chunk][d] widened values */
    const size_t ch = f16_chunk(d);
    for (size_t j = 0; j < n; j += ch) {
        const size_t nb = n - j < ch ? n - j : ch;
        widen_rows(v + j * ldv, ldv, nb, d, buf);
        kvck_pv(rows, d, p + j, ldp, buf, d, nb, acc);
    }
}

/* ---- one block ------------------------------------------------------------------- */

/* Scales of rows j0.. of a Q source. */
static const uint16_t *q_sz(const kvck_src *x, size_t j0)
{
    return x->mode == KVCK_QS_CHANNEL ? x->sz : x->sz + j0 * x->fmt->n_groups * 2;
}

/* s [nr][lds] (n columns) = q . x[j0 + j]. */
static void src_scores(const kvck_src *x, size_t j0, size_t nr, size_t d, const float *q,
                       size_t ldq, size_t n, float *s, size_t lds, float *scratch)
{
    switch (x->kind) {
    case KVCK_SRC_F32:
        kvck_scores(nr, d, q, ldq, (const float *)x->data + j0 * x->ld, x->ld, n, s, lds);
        return;
    case KVCK_SRC_F16:
        kvcki_f16_scores(nr, d, q, ldq, (const uint16_t *)x->data + j0 * x->ld, x->ld, n, s,
                         lds);
        return;
    default:
        break;
    }
    const kvck_qfmt *f = x->fmt;
    const uint8_t *codes = (const uint8_t *)x->data;
    kvck_q_scores(f, x->mode, nr, q, ldq, n, codes + j0 * f->row_bytes, q_sz(x, j0), s, lds,
                  scratch);
    /* Exact values: add q_c (value - x^) to the score of their key. */
    for (size_t o = 0; o < x->n_out; o++) {
        const kvck_qout *e = &x->out[o];
        if (e->j < j0 || e->j >= j0 + n || e->c >= f->d)
            continue;
        const float delta = kvck_f16_to_f32(e->value)
                            - kvck_q_value(f, x->mode, codes, x->sz, e->j, e->c);
        for (size_t r = 0; r < nr; r++)
            s[r * lds + (e->j - j0)] += q[r * ldq + e->c] * delta;
    }
}

/* acc [nr][d] += p [nr][ldp] (n wide) . x[j0 + j]. */
static void src_pv(const kvck_src *x, size_t j0, size_t nr, size_t d, const float *p, size_t ldp,
                   size_t n, float *acc, float *scratch)
{
    switch (x->kind) {
    case KVCK_SRC_F32:
        kvck_pv(nr, d, p, ldp, (const float *)x->data + j0 * x->ld, x->ld, n, acc);
        return;
    case KVCK_SRC_F16:
        kvcki_f16_pv(nr, d, p, ldp, (const uint16_t *)x->data + j0 * x->ld, x->ld, n, acc);
        return;
    default:
        break;
    }
    const kvck_qfmt *f = x->fmt;
    const uint8_t *codes = (const uint8_t *)x->data;
    kvck_q_pv(f, x->mode, nr, p, ldp, n, codes + j0 * f->row_bytes, q_sz(x, j0), acc, scratch);
    for (size_t o = 0; o < x->n_out; o++) {
        const kvck_qout *e = &x->out[o];
        if (e->j < j0 || e->j >= j0 + n || e->c >= f->d)
            continue;
        const float delta = kvck_f16_to_f32(e->value)
                            - kvck_q_value(f, x->mode, codes, x->sz, e->j, e->c);
        for (size_t r = 0; r < nr; r++)
            acc[r * d + e->c] += p[r * ldp + (e->j - j0)] * delta;
    }
}

/* Asks for every cache line of [p, p + bytes) ahead of use. */
static void prefetch_range(const void *p, size_t bytes)
{
    const char *c = (const char *)p;
    for (size_t i = 0; i < bytes; i += 64)
        __builtin_prefetch(c + i, 0, 3);
    if (bytes)
        __builtin_prefetch(c + bytes - 1, 0, 3);
}

/* Prefetches rows j0 .. j0 + n - 1 of a source (d wide): a block spans a
 * few 4 KiB pages, where the hardware prefetchers stop and restart, so
 * asking for the next block while this one computes keeps misses in
 * flight across the page boundaries. */
static void src_prefetch(const kvck_src *x, size_t j0, size_t n, size_t d)
{
    if (x->kind == KVCK_SRC_Q) {
        const kvck_qfmt *f = x->fmt;
        prefetch_range((const uint8_t *)x->data + j0 * f->row_bytes, n * f->row_bytes);
        prefetch_range(q_sz(x, j0), x->mode == KVCK_QS_CHANNEL ? (size_t)f->d * 4
                                                               : n * f->n_groups * 4);
        return;
    }
    const size_t el = x->kind == KVCK_SRC_F32 ? 4 : 2;
    const char *b = (const char *)x->data + j0 * x->ld * el;
    if (x->ld == d)
        prefetch_range(b, n * d * el);
    else
        for (size_t j = 0; j < n; j++)
            prefetch_range(b + j * x->ld * el, d * el);
}

/* Keys and values j0 .. j0 + n - 1 (n <= a->block). */
static void src_block1(kvck_attn *a, const float *q, size_t ldq, const kvck_src *k,
                       const kvck_src *v, const int32_t *k_pos, size_t j0, size_t n,
                       float *scratch)
{
    kvcki_span all;
    if (!kvcki_attn_span(a, k_pos, n, &all))
        return;
    const size_t bs = a->block;
    /* Row-invariant passes take the span in tiles of few rows. */
    const size_t tile = a->row_invariant ? KVCK_FEW_ROWS : all.nr;
    for (size_t r = 0; r < all.nr; r += tile) {
        kvcki_span sp = all;
        sp.r0 = all.r0 + r;
        sp.nr = all.nr - r < tile ? all.nr - r : tile;
        float *s0 = a->s + sp.r0 * bs; /* [nr][bs], first n columns used */
        src_scores(k, j0, sp.nr, a->dk, q + sp.r0 * ldq, ldq, n, s0, bs, scratch);
        kvcki_attn_softmax(a, k_pos, n, &sp, NULL);
        src_pv(v, j0, sp.nr, a->dv, s0, bs, n, a->acc + sp.r0 * a->dv, scratch);
    }
}

void kvck_attn_row_invariant(kvck_attn *a)
{
    a->row_invariant = 1;
}

void kvck_attn_block_src(kvck_attn *a, const float *q, size_t ldq, const kvck_src *k,
                         const kvck_src *v, const int32_t *k_pos, size_t n, float *scratch)
{
    if (a->rows == 0 || n == 0)
        return;
    if (k->kind == KVCK_SRC_F32 && v->kind == KVCK_SRC_F32 && !a->row_invariant) {
        kvck_attn_block(a, q, ldq, (const float *)k->data, k->ld, (const float *)v->data, v->ld,
                        k_pos, n);
        return;
    }
    /* n > block breaks the contract; folding it in block-sized pieces is
     * the harmless reading, as kvck_attn_block does. */
    for (size_t j = 0; j < n; j += a->block) {
        const size_t nb = n - j < a->block ? n - j : a->block;
        src_block1(a, q, ldq, k, v, k_pos + j, j, nb, scratch);
    }
}

void kvck_src_prefetch(const kvck_src *x, size_t n, size_t d)
{
    if (x && n)
        src_prefetch(x, 0, n, d);
}

size_t kvck_attn_src_scratch_floats(const kvck_qfmt *fk, const kvck_qfmt *fv, size_t rows,
                                    size_t block)
{
    /* Scores and P.V run one after the other and share the scratch. */
    const size_t a = fk ? kvck_q_scratch_floats(fk, rows, block) : 0;
    const size_t b = fv ? kvck_q_scratch_floats(fv, rows, block) : 0;
    return a > b ? a : b;
}
