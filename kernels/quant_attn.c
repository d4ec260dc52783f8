/*
 * quant_attn.c -- scores and P.V on packed codes (kvck_quant.h).
 *
 * The algebra every path uses instead of widening the block:
 *   per-channel scales (keys):  q . x^_j = sum_c q_c z_c + sum_c (q_c s_c) lev_jc
 *     the first sum and the folded query q_c s_c are formed once per block;
 *   per-token scales:           q . x^_j = sum_g (z_jg Q_g + s_jg sum_{c in g} q_c lev_jc)
 *     with Q_g = sum_{c in g} q_c once per block;
 *   P.V per token:   acc_c += sum_j (p_j z_jg) + (p_j s_jg) lev_jc
 *   P.V per channel: acc_c += z_c sum_j p_j + s_c sum_j p_j lev_jc.
 * Here in plain C (the definition the SIMD files follow); with many rows
 * (prefill) a block is dequantized once and goes through SGEMM instead,
 * where the product, not the decoding, is the cost.
 */
#include "kvck_quant.h"
#include "attn_internal.h"
#include "quant_internal.h"

#include <string.h>

size_t kvck_q_scratch_floats(const kvck_qfmt *f, size_t rows, size_t n)
{
    return kvcki_qscr_floats(f, rows, n);
}

/* Per-channel folding: qf [rows][d] = q * scale, cst [rows] = q . zero. */
static void fold_channel(const kvck_qfmt *f, size_t rows, const float *q, size_t ldq,
                         const uint16_t *sz, float *qf, float *cst)
{
    const size_t d = f->d;
    for (size_t r = 0; r < rows; r++) {
        double k = 0.0;
        for (size_t c = 0; c < d; c++) {
            qf[r * d + c] = q[r * ldq + c] * kvck_f16_to_f32(sz[2 * c]);
            k += (double)q[r * ldq + c] * kvck_f16_to_f32(sz[2 * c + 1]);
        }
        cst[r] = (float)k;
    }
}

static void scores_generic(const kvck_qfmt *f, int mode, size_t rows, const float *q,
                           size_t ldq, size_t n, const uint8_t *codes, const uint16_t *sz,
                           float *s, size_t lds, const kvcki_qscr *w)
{
    const size_t d = f->d, ng = f->n_groups;
    if (mode == KVCK_QS_CHANNEL) {
        fold_channel(f, rows, q, ldq, sz, w->qf, w->cst);
        for (size_t j = 0; j < n; j++) {
            kvcki_row_levels(f, codes + j * f->row_bytes, w->lev);
            for (size_t r = 0; r < rows; r++) {
                const float *qf = w->qf + r * d; /* [d] */
                double t = 0.0;
                for (size_t c = 0; c < d; c++)
                    t += qf[c] * w->lev[c];
                s[r * lds + j] = (float)(w->cst[r] + t);
            }
        }
        return;
    }
    for (size_t r = 0; r < rows; r++)
        for (size_t g = 0; g < ng; g++) {
            float t = 0.0f;
            for (size_t c = f->gfirst[g]; c < f->gfirst[g + 1]; c++)
                t += q[r * ldq + c];
            w->gs[r * ng + g] = t;
        }
    for (size_t j = 0; j < n; j++) {
        const uint16_t *szj = sz + j * ng * 2; /* [ng][2] */
        kvcki_row_levels(f, codes + j * f->row_bytes, w->lev);
        for (size_t r = 0; r < rows; r++) {
            const float *qr = q + r * ldq; /* [d] */
            double t = 0.0;
            for (size_t g = 0; g < ng; g++) {
                double u = 0.0;
                for (size_t c = f->gfirst[g]; c < f->gfirst[g + 1]; c++)
                    u += qr[c] * w->lev[c];
                t += (double)kvck_f16_to_f32(szj[2 * g + 1]) * w->gs[r * ng + g]
                     + (double)kvck_f16_to_f32(szj[2 * g]) * u;
            }
            s[r * lds + j] = (float)t;
        }
    }
}

static void pv_generic(const kvck_qfmt *f, int mode, size_t rows, const float *p, size_t ldp,
                       size_t n, const uint8_t *codes, const uint16_t *sz, float *acc,
                       const kvcki_qscr *w)
{
    const size_t d = f->d, ng = f->n_groups;
    if (mode == KVCK_QS_CHANNEL) {
        float *u = w->qf; /* [rows][d] sum_j p_j lev_jc */
        memset(u, 0, rows * d * sizeof *u);
        for (size_t r = 0; r < rows; r++) {
            float t = 0.0f;
            for (size_t j = 0; j < n; j++)
                t += p[r * ldp + j];
            w->cst[r] = t;
        }
        for (size_t j = 0; j < n; j++) {
            kvcki_row_levels(f, codes + j * f->row_bytes, w->lev);
            for (size_t r = 0; r < rows; r++) {
                const float pj = p[r * ldp + j];
                if (pj == 0.0f)
                    continue; /* masked keys and rows that see nothing */
                for (size_t c = 0; c < d; c++)
                    u[r * d + c] += pj * w->lev[c];
            }
        }
        for (size_t r = 0; r < rows; r++)
            for (size_t c = 0; c < d; c++)
                acc[r * d + c] += kvck_f16_to_f32(sz[2 * c + 1]) * w->cst[r]
                                  + kvck_f16_to_f32(sz[2 * c]) * u[r * d + c];
        return;
    }
    for (size_t j = 0; j < n; j++) {
        const uint16_t *szj = sz + j * ng * 2; /* [ng][2] */
        kvcki_row_levels(f, codes + j * f->row_bytes, w->lev);
        for (size_t r = 0; r < rows; r++) {
            const float pj = p[r * ldp + j];
            if (pj == 0.0f)
                continue;
            float *ar = acc + r * d; /* [d] */
            for (size_t g = 0; g < ng; g++) {
                const float ps = pj * kvck_f16_to_f32(szj[2 * g]);
                const float pz = pj * kvck_f16_to_f32(szj[2 * g + 1]);
                for (size_t c = f->gfirst[g]; c < f->gfirst[g + 1]; c++)
                    ar[c] += pz + ps * w->lev[c];
            }
        }
    }
}

void kvck_q_scores(const kvck_qfmt *f, int mode, size_t rows, const float *q, size_t ldq,
                   size_t n, const uint8_t *codes, const uint16_t *sz, float *s, size_t lds,
                   float *scratch)
{
    kvcki_qscr w;
    if (rows == 0 || n == 0)
        return;
    kvcki_qscr_carve(f, rows, n, scratch, &w);
    if (rows > KVCK_FEW_ROWS) {
        kvck_q_dequantize(f, mode, n, codes, sz, w.blk, f->d);
        kvck_scores(rows, f->d, q, ldq, w.blk, f->d, n, s, lds);
        return;
    }
#ifdef KVCK_QUANT_X86
    const int isa = kvck_isa();
    if (isa >= KVCK_ISA_AVX512
        && kvcki_q_scores_avx512(f, mode, rows, q, ldq, n, codes, sz, s, lds, &w))
        return;
    if (isa >= KVCK_ISA_AVX2
        && kvcki_q_scores_avx2(f, mode, rows, q, ldq, n, codes, sz, s, lds, &w))
        return;
#endif
    scores_generic(f, mode, rows, q, ldq, n, codes, sz, s, lds, &w);
}

void kvck_q_pv(const kvck_qfmt *f, int mode, size_t rows, const float *p, size_t ldp, size_t n,
               const uint8_t *codes, const uint16_t *sz, float *acc, float *scratch)
{
    kvcki_qscr w;
    if (rows == 0 || n == 0)
        return;
    kvcki_qscr_carve(f, rows, n, scratch, &w);
    if (rows > KVCK_FEW_ROWS) {
        kvck_q_dequantize(f, mode, n, codes, sz, w.blk, f->d);
        kvck_pv(rows, f->d, p, ldp, w.blk, f->d, n, acc);
        return;
    }
#ifdef KVCK_QUANT_X86
    const int isa = kvck_isa();
    if (isa >= KVCK_ISA_AVX512 && kvcki_q_pv_avx512(f, mode, rows, p, ldp, n, codes, sz, acc, &w))
        return;
    if (isa >= KVCK_ISA_AVX2 && kvcki_q_pv_avx2(f, mode, rows, p, ldp, n, codes, sz, acc, &w))
        return;
#endif
    pv_generic(f, mode, rows, p, ldp, n, codes, sz, acc, &w);
}
