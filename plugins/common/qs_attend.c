/*
 * The quantized store's attention and expansion (qstore.h). A query at
 * index t (the tokens with position <= its own) sees main tokens below its
 * cut quantized and the newer ones raw: one pass of the streaming kernel
 * over the sinks, one over the Q blocks bounded above by the cut, one over
 * the raw rows bounded below by it (kvck_attn_bounds).
 */
#include <string.h>

#include "qs_internal.h"

/* Queries per pass over the blocks (bounds scratch for long prefills). */
#define QS_Q_CHUNK 64u

typedef struct qs_scratch {
    float *q_rot;   /* [n_q][n_q_heads][d] rotated, scaled (Hadamard when k_signs) */
    float *q_buf;   /* [chunk * group][d] one KV head's query rows */
    float *o_buf;   /* [chunk * group][d] their outputs */
    float *k_buf;   /* [block][d] keys rebuilt as f32 (keys kept before RoPE) */
    int32_t *k_pos; /* [block] positions of a contiguous block */
    int32_t *q_hi;  /* [n_q] last position a query sees quantized */
    int32_t *q_lo;  /* [n_q] the same, as the raw pass's exclusive lower bound */
    float *attn;    /* kvck_attn state */
    float *src;     /* kvck_attn_block_src scratch */
    size_t floats;
} qs_scratch;

static size_t up16(size_t n)
{
    return (n + 15u) & ~(size_t)15u;
}

static size_t src_floats(const kvcp_qs *q, uint32_t layer, size_t rows)
{
    size_t m = 0;
    for (uint32_t h = 0; h < q->g->n_kv; h++) {
        size_t s = kvck_attn_src_scratch_floats(&q->lf[layer].k[h], &q->lf[layer].v[h], rows,
                                                q->o.block);
        m = s > m ? s : m;
    }
    return m;
}

/* Carves scratch for n_q queries at base; with base NULL only counts
 * (sc->floats). */
static void scratch_plan(const kvcp_qs *q, uint32_t layer, uint32_t n_q, float *base,
                         qs_scratch *sc)
{
    const kvcp_geom *g = q->g;
    const size_t d = g->head_dim, B = q->o.block, rows = (size_t)QS_Q_CHUNK * g->group;
    const size_t sizes[] = {(size_t)n_q * g->n_q * d, rows * d, rows * d, B * d, B, n_q, n_q,
                            kvck_attn_scratch_floats(rows, d, B), src_floats(q, layer, rows)};
    size_t o[sizeof sizes / sizeof sizes[0]], off = 0;
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        o[i] = off;
        off += up16(sizes[i]);
    }
    if (base) {
        sc->q_rot = base + o[0];
        sc->q_buf = base + o[1];
        sc->o_buf = base + o[2];
        sc->k_buf = base + o[3];
        sc->k_pos = (int32_t *)(base + o[4]);
        sc->q_hi = (int32_t *)(base + o[5]);
        sc->q_lo = (int32_t *)(base + o[6]);
        sc->attn = base + o[7];
        sc->src = base + o[8];
    }
    sc->floats = off;
}

/* Positions of main block b's held tokens [o, o + n) as an array. */
static const int32_t *block_pos(const kvcp_qs_block *blk, uint32_t o, uint32_t n, int32_t *buf)
{
    if (blk->pos)
        return blk->pos + o;
    for (uint32_t i = 0; i < n; i++)
        buf[i] = blk->pos0 + (int32_t)(o + i);
    return buf;
}

/* Keys kept before RoPE: f32 rows [n][d] of one head rotated in place
 * with the table. */
static void rope_rows(const kvcp_qs *q, float *k, uint32_t n, const int32_t *pos)
{
    if (q->rope_table)
        kvck_rope_apply_table(&q->g->rope, q->rope_table, n, 1, pos, k, k);
}

static kvck_src src_f16(const uint16_t *rows, size_t ld)
{
    kvck_src s = {.kind = KVCK_SRC_F16, .data = rows, .ld = ld};
    return s;
}

static kvck_src src_f32(const float *rows, size_t ld)
{
    kvck_src s = {.kind = KVCK_SRC_F32, .data = rows, .ld = ld};
    return s;
}

static kvck_src src_q(const kvck_qfmt *f, int mode, const uint8_t *codes, const uint16_t *sz,
                      const kvck_qout *out, size_t n_out)
{
    kvck_src s = {.kind = KVCK_SRC_Q, .data = codes, .fmt = f, .mode = mode, .sz = sz,
                  .out = out, .n_out = n_out};
    return s;
}

/* Outliers of the first n rows of a list sorted by row. */
static size_t out_upto(const kvck_qout *out, uint32_t cnt, uint32_t n)
{
    size_t k = cnt;
    while (k && out[k - 1].j >= n)
        k--;
    return k;
}

/* The three passes of one KV head over one chunk of queries. */
static void head_pass(const kvcp_qs *q, const kvcp_qs_layer *L, uint32_t layer, uint32_t h,
                      kvck_attn *a, const qs_scratch *sc, uint32_t q0, int32_t hi_max)
{
    const kvcp_geom *g = q->g;
    const uint32_t B = q->o.block, d = g->head_dim, H = g->n_kv, m = qs_main(L);
    const kvcp_qs_lfmt *lf = &q->lf[layer];
    const float *qb = sc->q_buf;

    /* Sinks: fp16 rows, post-RoPE, token-major [n_sink][n_kv][d]. */
    for (uint32_t s0 = 0; s0 < L->n_sink; s0 += B) {
        uint32_t n = L->n_sink - s0 < B ? L->n_sink - s0 : B;
        kvck_src ks = src_f16(qs_sink_k(q, L, s0) + (size_t)h * d, (size_t)H * d);
        kvck_src vs = src_f16(qs_sink_v(q, L, s0) + (size_t)h * d, (size_t)H * d);
        kvck_attn_block_src(a, qb, d, &ks, &vs, L->sink_pos + s0, n, sc->src);
    }

    /* Quantized blocks, each query up to its cut. */
    const uint32_t nq = L->nq < m ? L->nq : m;
    kvck_attn_bounds(a, sc->q_hi + q0, NULL);
    for (uint32_t b = 0; b * B < nq; b++) {
        const kvcp_qs_block *blk = &L->blocks[b];
        const uint32_t n = nq - b * B < B ? nq - b * B : B;
        const int32_t *kp = block_pos(blk, 0, n, sc->k_pos);
        if (kp[0] > hi_max)
            break;
        qs_qhead p;
        qs_qhead_at(q, layer, blk->q, h, &p);
        kvck_src ks, vs = src_q(&lf->v[h], KVCK_QS_TOKEN, p.v_codes, p.v_sz, p.v_out,
                                out_upto(p.v_out, *p.v_nout, n));
        if (q->o.k_pre) {
            qs_dequant_block(q, L, layer, b, h, sc->k_buf, NULL);
            rope_rows(q, sc->k_buf, n, kp);
            ks = src_f32(sc->k_buf, d);
        } else {
            ks = src_q(&lf->k[h], q->o.k_mode, p.k_codes, p.k_sz, p.k_out,
                       out_upto(p.k_out, *p.k_nout, n));
        }
        kvck_attn_block_src(a, qb, d, &ks, &vs, kp, n, sc->src);
    }

    /* Raw rows (live, and pending copies), each query above its cut. */
    kvck_attn_bounds(a, NULL, sc->q_lo + q0);
    for (uint32_t b = L->raw_from / B; b * B < m; b++) {
        const kvcp_qs_block *blk = &L->blocks[b];
        const uint32_t o = L->raw_from > b * B ? L->raw_from - b * B : 0;
        const uint32_t end = m - b * B < B ? m - b * B : B;
        if (o >= end || !blk->raw)
            continue;
        const uint32_t n = end - o;
        const int32_t *kp = block_pos(blk, o, n, sc->k_pos);
        kvck_src ks, vs = src_f16(qs_raw_v(q, blk->raw, h) + (size_t)o * d, d);
        if (q->o.k_pre) {
            kvck_f16_to_f32_n(qs_raw_k(q, blk->raw, h) + (size_t)o * d, sc->k_buf, (size_t)n * d);
            rope_rows(q, sc->k_buf, n, kp);
            ks = src_f32(sc->k_buf, d);
        } else {
            ks = src_f16(qs_raw_k(q, blk->raw, h) + (size_t)o * d, d);
        }
        kvck_attn_block_src(a, qb, d, &ks, &vs, kp, n, sc->src);
    }
    kvck_attn_bounds(a, NULL, NULL);
}

kvc_status kvcp_qs_attend(const kvcp_qs *q, kvcp_qs_layer *L, kvcp_qs_bytes *cnt, uint32_t layer,
                          uint32_t n_q, const int32_t *pos, const float *q_pre, float *out)
{
    const kvcp_geom *g = q->g;
    const size_t d = g->head_dim, G = g->group;
    qs_scratch sc;
    scratch_plan(q, layer, n_q, NULL, &sc);
    const size_t bytes = sc.floats * sizeof(float);
    float *base = kvcp_alloc(q->host, bytes, KVC_USAGE_SCRATCH);
    if (!base)
        return KVC_E_NOMEM;
    scratch_plan(q, layer, n_q, base, &sc);

    kvck_rope_apply(&g->rope, n_q, g->n_q, pos, q_pre, sc.q_rot);
    const size_t nq_all = (size_t)n_q * g->n_q * d;
    for (size_t i = 0; i < nq_all; i++)
        sc.q_rot[i] *= g->scale;
    if (q->k_signs)
        for (size_t r = 0; r < (size_t)n_q * g->n_q; r++)
            kvck_hadamard(sc.q_rot + r * d, d, q->k_signs);

    /* Each query's cut: main tokens [0, eff) are seen quantized. */
    const uint32_t m = qs_main(L);
    const uint32_t nq = L->nq < m ? L->nq : m;
    int32_t qmax = pos[0];
    for (uint32_t i = 0; i < n_q; i++) {
        uint32_t c = kvcp_qs_count_upto(q, L, pos[i]);
        uint32_t eff = kvcp_qs_q_count(q, c);
        eff = eff > L->raw_from ? eff : L->raw_from; /* no raw rows below raw_from */
        eff = eff < nq ? eff : nq;
        int32_t cut = eff ? qs_main_pos(q, L, eff - 1) : -1;
        sc.q_hi[i] = cut < pos[i] ? cut : pos[i];
        sc.q_lo[i] = cut;
        qmax = pos[i] > qmax ? pos[i] : qmax;
    }

    for (uint32_t q0 = 0; q0 < n_q; q0 += QS_Q_CHUNK) {
        const uint32_t nc = n_q - q0 < QS_Q_CHUNK ? n_q - q0 : QS_Q_CHUNK;
        const size_t rows = (size_t)nc * G;
        int32_t hi_max = -1;
        for (uint32_t i = 0; i < nc; i++)
            hi_max = sc.q_hi[q0 + i] > hi_max ? sc.q_hi[q0 + i] : hi_max;
        for (uint32_t h = 0; h < g->n_kv; h++) {
            for (uint32_t i = 0; i < nc; i++)
                memcpy(sc.q_buf + (size_t)i * G * d,
                       sc.q_rot + ((size_t)(q0 + i) * g->n_q + (size_t)h * G) * d,
                       G * d * sizeof(float));
            kvck_attn a;
            kvck_attn_init(&a, rows, G, d, d, q->o.block, g->window, pos + q0, sc.attn);
            kvck_attn_row_invariant(&a); /* batched == single steps, to the byte */
            head_pass(q, L, layer, h, &a, &sc, q0, hi_max);
            kvck_attn_finish(&a, sc.o_buf, d);
            for (uint32_t i = 0; i < nc; i++) {
                float *o = out + ((size_t)(q0 + i) * g->n_q + (size_t)h * G) * d;
                memcpy(o, sc.o_buf + (size_t)i * G * d, G * d * sizeof(float));
                if (q->v_signs)
                    for (size_t j = 0; j < G; j++)
                        kvck_hadamard_inv(o + j * d, d, q->v_signs);
            }
        }
    }
    kvcp_free(q->host, base, bytes);
    if (L->n && qmax >= L->last_pos)
        kvcp_qs_drop_pending(q, L, cnt);
    return KVC_OK;
}

/* ---- expansion ------------------------------------------------------------------ */

kvc_status kvcp_qs_expand(const kvcp_qs *q, const kvcp_qs_layer *L, uint32_t layer, int32_t *pos,
                          float *k, float *v)
{
    const kvcp_geom *g = q->g;
    const uint32_t B = q->o.block, d = g->head_dim, H = g->n_kv, m = qs_main(L);
    const size_t row = q->raw_row;
    const uint32_t nq = L->nq < m ? L->nq : m;
    const size_t bytes = 2 * (size_t)B * d * sizeof(float);
    float *kb = kvcp_alloc(q->host, bytes, KVC_USAGE_SCRATCH), *vb = kb + (size_t)B * d;
    if (!kb)
        return KVC_E_NOMEM;
    int32_t kp[256];
    for (uint32_t i = 0; i < L->n_sink; i++) {
        pos[i] = L->sink_pos[i];
        if (k)
            kvck_f16_to_f32_n(qs_sink_k(q, L, i), k + (size_t)i * row, row);
        if (v)
            kvck_f16_to_f32_n(qs_sink_v(q, L, i), v + (size_t)i * row, row);
    }
    for (uint32_t b = 0; b * B < m; b++) {
        const kvcp_qs_block *blk = &L->blocks[b];
        const uint32_t n = m - b * B < B ? m - b * B : B;
        const uint32_t nqb = nq > b * B ? (nq - b * B < n ? nq - b * B : n) : 0;
        const int32_t *bp = block_pos(blk, 0, n, kp);
        float *kd = k ? k + ((size_t)L->n_sink + (size_t)b * B) * row : NULL;
        float *vd = v ? v + ((size_t)L->n_sink + (size_t)b * B) * row : NULL;
        memcpy(pos + L->n_sink + (size_t)b * B, bp, n * sizeof(int32_t));
        for (uint32_t h = 0; h < H; h++) {
            if (nqb)
                qs_dequant_block(q, L, layer, b, h, kb, vb);
            for (uint32_t i = nqb; i < n; i++) {
                kvck_f16_to_f32_n(qs_raw_k(q, blk->raw, h) + (size_t)i * d, kb + (size_t)i * d, d);
                kvck_f16_to_f32_n(qs_raw_v(q, blk->raw, h) + (size_t)i * d, vb + (size_t)i * d, d);
            }
            if (q->o.k_pre)
                rope_rows(q, kb, n, bp);
            for (uint32_t i = 0; i < n; i++) {
                if (kd)
                    memcpy(kd + (size_t)i * row + (size_t)h * d, kb + (size_t)i * d, d * sizeof(float));
                if (vd)
                    memcpy(vd + (size_t)i * row + (size_t)h * d, vb + (size_t)i * d, d * sizeof(float));
            }
        }
    }
    /* Back from the rotated bases. */
    for (size_t r = 0; r < (size_t)L->n * H; r++) {
        if (k && q->k_signs)
            kvck_hadamard_inv(k + r * d, d, q->k_signs);
        if (v && q->v_signs)
            kvck_hadamard_inv(v + r * d, d, q->v_signs);
    }
    kvcp_free(q->host, kb, bytes);
    return KVC_OK;
}
