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
    int32_t *k_hi;  /* [n_q] last position whose key a query sees quantized */
    int32_t *v_hi;  /* [n_q] likewise values */
    int32_t *lo_hi; /* [n_q] min(k_hi, v_hi) */
    int32_t *hi_hi; /* [n_q] max(k_hi, v_hi) */
    uint32_t *kc, *vc; /* [n_q] the cuts as indices */
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

/* Index ranges of main tokens the passes of one chunk of queries need. */
typedef struct qs_span {
    uint32_t both_q;            /* [0, both_q): both forms quantized for some query */
    uint32_t kraw_lo, kraw_hi;  /* key raw, value quantized */
    uint32_t vraw_lo, vraw_hi;  /* key quantized, value raw */
    uint32_t raw_from;          /* [raw_from, main): both raw */
} qs_span;

/* Carves scratch for n_q queries at base; with base NULL only counts
 * (sc->floats). */
static void scratch_plan(const kvcp_qs *q, uint32_t layer, uint32_t n_q, float *base,
                         qs_scratch *sc)
{
    const kvcp_geom *g = q->g;
    const size_t d = g->head_dim, B = q->o.block, rows = (size_t)QS_Q_CHUNK * g->group;
    const size_t sizes[] = {(size_t)n_q * g->n_q * d, rows * d, rows * d, B * d, B,
                            n_q, n_q, n_q, n_q, n_q, n_q,
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
        sc->k_hi = (int32_t *)(base + o[5]);
        sc->v_hi = (int32_t *)(base + o[6]);
        sc->lo_hi = (int32_t *)(base + o[7]);
        sc->hi_hi = (int32_t *)(base + o[8]);
        sc->kc = (uint32_t *)(base + o[9]);
        sc->vc = (uint32_t *)(base + o[10]);
        sc->attn = base + o[11];
        sc->src = base + o[12];
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

/* An output row [d] of head h from the values' stored basis back to the
 * model's: inverse Hadamard, or the inverse channel permutation. */
static void unrotate_out(const kvcp_qs *q, uint32_t layer, uint32_t h, float *o)
{
    const uint32_t d = q->g->head_dim;
    if (q->v_signs)
        kvck_hadamard_inv(o, d, q->v_signs);
    const uint16_t *perm = q->lf[layer].v_perm;
    if (perm) {
        float t[KVCK_MAX_HEAD_DIM];
        memcpy(t, o, d * sizeof(float));
        for (uint32_t i = 0; i < d; i++)
            o[perm[(size_t)h * d + i]] = t[i];
    }
}

/* Outliers of the first n rows of a list sorted by row. */
static size_t out_upto(const kvck_qout *out, uint32_t cnt, uint32_t n)
{
    size_t k = cnt;
    while (k && out[k - 1].j >= n)
        k--;
    return k;
}

/* Key and value sources of rows [o, o + n) of main block b, head h, in
 * the given forms (1 quantized, 0 raw); keys kept before RoPE are rebuilt
 * as rotated f32 rows in k_buf. kp: their positions. */
static void block_srcs(const kvcp_qs *q, const kvcp_qs_layer *L, uint32_t layer, uint32_t b,
                       uint32_t h, uint32_t o, uint32_t n, int kq, int vq, const int32_t *kp,
                       const qs_scratch *sc, kvck_src *ks, kvck_src *vs)
{
    const uint32_t d = q->g->head_dim;
    const kvcp_qs_lfmt *lf = &q->lf[layer];
    const kvcp_qs_block *blk = &L->blocks[b];
    qs_qhead p;
    memset(&p, 0, sizeof p);
    if (kq || vq)
        qs_qhead_at(q, layer, blk->q, h, &p);
    if (vq) /* o == 0 for quantized rows: they start a block */
        *vs = src_q(&lf->v[h], KVCK_QS_TOKEN, p.v_codes, p.v_sz, p.v_out,
                    out_upto(p.v_out, *p.v_nout, n));
    else if (q->o.v_raw8)
        *vs = src_q(&q->vraw8, KVCK_QS_TOKEN, qs_rawv(q, blk, h) + (size_t)o * q->rawv_row,
                    qs_rawv_sz(q, blk, h) + 2 * (size_t)o, NULL, 0);
    else
        *vs = src_f16((const uint16_t *)qs_rawv(q, blk, h) + (size_t)o * d, d);
    if (q->o.k_pre) {
        if (kq) {
            qs_dequant_keys(q, L, layer, b, h, sc->k_buf);
        } else {
            qs_rawk_rows(q, layer, blk, h, o, n, sc->k_buf);
        }
        rope_rows(q, sc->k_buf, n, kp);
        *ks = src_f32(sc->k_buf, d);
    } else if (kq) {
        *ks = src_q(&lf->k[h], q->o.k_mode, p.k_codes, p.k_sz, p.k_out,
                    out_upto(p.k_out, *p.k_nout, n));
    } else {
        *ks = src_f16((const uint16_t *)qs_rawk(q, blk, h) + (size_t)o * d, d);
    }
}

/* One pass over main tokens [from, to) (indices) with keys and values in
 * the given forms, each query bounded by the current kvck_attn_bounds. */
static void main_pass(const kvcp_qs *q, const kvcp_qs_layer *L, uint32_t layer, uint32_t h,
                      kvck_attn *a, const qs_scratch *sc, uint32_t from, uint32_t to, int kq,
                      int vq, int32_t hi_max)
{
    const uint32_t B = q->o.block, d = q->g->head_dim;
    for (uint32_t b = from / B; b * B < to; b++) {
        const kvcp_qs_block *blk = &L->blocks[b];
        const uint32_t o = from > b * B ? from - b * B : 0;
        const uint32_t end = to - b * B < B ? to - b * B : B;
        /* A quantized form is read from the block's start: its scales and
         * outliers are the block's. Rows before `from` are then outside
         * every query's bounds anyway. */
        const uint32_t o2 = kq || vq ? 0 : o;
        if (o >= end)
            continue;
        const uint32_t n = end - o2;
        const int32_t *kp = block_pos(blk, o2, n, sc->k_pos);
        if (kp[o - o2] > hi_max)
            break;
        kvck_src ks, vs;
        block_srcs(q, L, layer, b, h, o2, n, kq, vq, kp, sc, &ks, &vs);
        kvck_attn_block_src(a, sc->q_buf, d, &ks, &vs, kp, n, sc->src);
    }
}

/* The passes of one KV head over one chunk of queries: sinks; then main
 * tokens with both forms quantized (below both of a query's cuts), only
 * the key raw (between the key cut and a higher value cut), only the
 * value raw (between the value cut and a higher key cut), both raw
 * (above both). Each query's bounds leave it one form per token; span
 * holds the index ranges any query of the chunk may need. */
static void head_pass(const kvcp_qs *q, const kvcp_qs_layer *L, uint32_t layer, uint32_t h,
                      kvck_attn *a, const qs_scratch *sc, uint32_t q0, const qs_span *sp,
                      int32_t hi_max)
{
    const kvcp_geom *g = q->g;
    const uint32_t B = q->o.block, d = g->head_dim, H = g->n_kv;
    for (uint32_t s0 = 0; s0 < L->n_sink; s0 += B) {
        uint32_t n = L->n_sink - s0 < B ? L->n_sink - s0 : B;
        kvck_src ks = src_f16(qs_sink_k(q, L, s0) + (size_t)h * d, (size_t)H * d);
        kvck_src vs = src_f16(qs_sink_v(q, L, s0) + (size_t)h * d, (size_t)H * d);
        kvck_attn_block_src(a, sc->q_buf, d, &ks, &vs, L->sink_pos + s0, n, sc->src);
    }
    kvck_attn_bounds(a, sc->lo_hi + q0, NULL);
    main_pass(q, L, layer, h, a, sc, 0, sp->both_q, 1, 1, hi_max);
    if (sp->kraw_lo < sp->kraw_hi) {
        kvck_attn_bounds(a, sc->v_hi + q0, sc->k_hi + q0);
        main_pass(q, L, layer, h, a, sc, sp->kraw_lo, sp->kraw_hi, 0, 1, hi_max);
    }
    if (sp->vraw_lo < sp->vraw_hi) {
        kvck_attn_bounds(a, sc->k_hi + q0, sc->v_hi + q0);
        main_pass(q, L, layer, h, a, sc, sp->vraw_lo, sp->vraw_hi, 1, 0, hi_max);
    }
    kvck_attn_bounds(a, NULL, sc->hi_hi + q0);
    main_pass(q, L, layer, h, a, sc, sp->raw_from, qs_main(L), 0, 0, hi_max);
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

    /* Each query's cuts: main keys [0, kc) and values [0, vc) are seen
     * quantized (what was quantized at its time, or has no raw row left);
     * as positions k_hi, v_hi (-1: none). */
    const uint32_t m = qs_main(L);
    const uint32_t kq = L->kq < m ? L->kq : m, vq = L->vq < m ? L->vq : m;
    int32_t qmax = pos[0];
    for (uint32_t i = 0; i < n_q; i++) {
        const uint32_t c = kvcp_qs_count_upto(q, L, pos[i]);
        uint32_t k = kvcp_qs_kq_count(q, c), v = kvcp_qs_vq_count(q, c);
        k = k > L->kraw_from ? k : L->kraw_from;
        v = v > L->vraw_from ? v : L->vraw_from;
        k = k < kq ? k : kq;
        v = v < vq ? v : vq;
        sc.kc[i] = k;
        sc.vc[i] = v;
        const int32_t kp = k ? qs_main_pos(q, L, k - 1) : -1, vp = v ? qs_main_pos(q, L, v - 1) : -1;
        sc.k_hi[i] = kp < pos[i] ? kp : pos[i];
        sc.v_hi[i] = vp < pos[i] ? vp : pos[i];
        sc.lo_hi[i] = sc.k_hi[i] < sc.v_hi[i] ? sc.k_hi[i] : sc.v_hi[i];
        sc.hi_hi[i] = sc.k_hi[i] > sc.v_hi[i] ? sc.k_hi[i] : sc.v_hi[i];
        qmax = pos[i] > qmax ? pos[i] : qmax;
    }

    for (uint32_t q0 = 0; q0 < n_q; q0 += QS_Q_CHUNK) {
        const uint32_t nc = n_q - q0 < QS_Q_CHUNK ? n_q - q0 : QS_Q_CHUNK;
        const size_t rows = (size_t)nc * G;
        int32_t hi_max = -1;
        qs_span sp = {0, m, 0, m, 0, m};
        for (uint32_t i = q0; i < q0 + nc; i++) {
            const uint32_t k = sc.kc[i], v = sc.vc[i];
            const uint32_t lo = k < v ? k : v, hi = k > v ? k : v;
            hi_max = pos[i] > hi_max ? pos[i] : hi_max;
            sp.both_q = lo > sp.both_q ? lo : sp.both_q;
            sp.raw_from = hi < sp.raw_from ? hi : sp.raw_from;
            if (k < v) {
                sp.kraw_lo = k < sp.kraw_lo ? k : sp.kraw_lo;
                sp.kraw_hi = v > sp.kraw_hi ? v : sp.kraw_hi;
            } else if (v < k) {
                sp.vraw_lo = v < sp.vraw_lo ? v : sp.vraw_lo;
                sp.vraw_hi = k > sp.vraw_hi ? k : sp.vraw_hi;
            }
        }
        for (uint32_t h = 0; h < g->n_kv; h++) {
            for (uint32_t i = 0; i < nc; i++)
                memcpy(sc.q_buf + (size_t)i * G * d,
                       sc.q_rot + ((size_t)(q0 + i) * g->n_q + (size_t)h * G) * d,
                       G * d * sizeof(float));
            kvck_attn a;
            kvck_attn_init(&a, rows, G, d, d, q->o.block, g->window, pos + q0, sc.attn);
            kvck_attn_row_invariant(&a); /* batched == single steps, to the byte */
            head_pass(q, L, layer, h, &a, &sc, q0, &sp, hi_max);
            kvck_attn_finish(&a, sc.o_buf, d);
            for (uint32_t i = 0; i < nc; i++) {
                float *o = out + ((size_t)(q0 + i) * g->n_q + (size_t)h * G) * d;
                memcpy(o, sc.o_buf + (size_t)i * G * d, G * d * sizeof(float));
                for (size_t j = 0; j < G; j++)
                    unrotate_out(q, layer, h, o + j * d);
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
    const size_t row = q->row;
    const uint32_t kq = L->kq < m ? L->kq : m, vq = L->vq < m ? L->vq : m;
    const size_t bytes = 2 * (size_t)B * d * sizeof(float);
    float *kb = kvcp_alloc(q->host, bytes, KVC_USAGE_SCRATCH);
    if (!kb)
        return KVC_E_NOMEM;
    float *vb = kb + (size_t)B * d; /* [B][d] each */
    int32_t kp[256];
    for (uint32_t i = 0; i < L->n_sink; i++) {
        pos[i] = L->sink_pos[i];
        if (k)
            kvck_f16_to_f32_n(qs_sink_k(q, L, i), k + (size_t)i * row, row);
        if (v)
            kvck_f16_to_f32_n(qs_sink_v(q, L, i), v + (size_t)i * row, row);
    }
    /* Each row in its current form: quantized below kq (vq), raw above. */
    for (uint32_t b = 0; b * B < m; b++) {
        const kvcp_qs_block *blk = &L->blocks[b];
        const uint32_t n = m - b * B < B ? m - b * B : B;
        const uint32_t nk = kq > b * B ? (kq - b * B < n ? kq - b * B : n) : 0;
        const uint32_t nv = vq > b * B ? (vq - b * B < n ? vq - b * B : n) : 0;
        const int32_t *bp = block_pos(blk, 0, n, kp);
        const size_t t0 = (size_t)L->n_sink + (size_t)b * B;
        memcpy(pos + t0, bp, n * sizeof(int32_t));
        for (uint32_t h = 0; h < H; h++) {
            if (nk)
                qs_dequant_keys(q, L, layer, b, h, kb);
            if (n > nk)
                qs_rawk_rows(q, layer, blk, h, nk, n - nk, kb + (size_t)nk * d);
            if (nv)
                qs_dequant_values(q, L, layer, b, h, vb);
            if (n > nv)
                qs_rawv_rows(q, blk, h, nv, n - nv, vb + (size_t)nv * d);
            if (q->o.k_pre)
                rope_rows(q, kb, n, bp);
            for (uint32_t i = 0; i < n; i++) {
                if (k)
                    memcpy(k + (t0 + i) * row + (size_t)h * d, kb + (size_t)i * d,
                           d * sizeof(float));
                if (v)
                    memcpy(v + (t0 + i) * row + (size_t)h * d, vb + (size_t)i * d,
                           d * sizeof(float));
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
