/*
 * The quantized store's layers (qstore.h): append (all-or-nothing),
 * quantization of the rows that became quantizable, pending raw copies,
 * truncate, copy, release, positions and byte counts.
 */
#include <math.h>
#include <string.h>

#include "qs_internal.h"

/* ---- small helpers ------------------------------------------------------------- */

static size_t pos_bytes(const kvcp_qs *q)
{
    return (size_t)q->o.block * sizeof(int32_t);
}

void kvcp_qs_layer_init(kvcp_qs_layer *L)
{
    memset(L, 0, sizeof *L);
    L->last_pos = -1;
}

int32_t kvcp_qs_pos(const kvcp_qs *q, const kvcp_qs_layer *L, uint32_t i)
{
    return i < L->n_sink ? L->sink_pos[i] : qs_main_pos(q, L, i - L->n_sink);
}

uint32_t kvcp_qs_count_upto(const kvcp_qs *q, const kvcp_qs_layer *L, int32_t p)
{
    /* Positions grow with the index: the first index whose position is > p. */
    uint32_t lo = 0, hi = L->n;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (kvcp_qs_pos(q, L, mid) <= p)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* Tokens of main block b held by L. */
static uint32_t block_count(const kvcp_qs *q, const kvcp_qs_layer *L, uint32_t b)
{
    const uint32_t m = qs_main(L), B = q->o.block;
    return m > b * B ? (m - b * B < B ? m - b * B : B) : 0;
}

/* ---- raw rows ----------------------------------------------------------------------- */

void qs_rawk_rows(const kvcp_qs *q, uint32_t layer, const kvcp_qs_block *b, uint32_t h,
                  uint32_t j0, uint32_t n, float *x)
{
    const uint32_t d = q->g->head_dim;
    const uint8_t *src = qs_rawk(q, b, h) + (size_t)j0 * q->rawk_row;
    const uint16_t *sz = qs_raw_sz(q, layer, h);
    if (sz)
        kvck_q_dequantize(&q->raw8, KVCK_QS_CHANNEL, n, src, sz, x, d);
    else
        kvck_f16_to_f32_n((const uint16_t *)src, x, (size_t)n * d);
}

void qs_rawv_rows(const kvcp_qs *q, const kvcp_qs_block *b, uint32_t h, uint32_t j0, uint32_t n,
                  float *x)
{
    const uint32_t d = q->g->head_dim;
    const uint8_t *src = qs_rawv(q, b, h) + (size_t)j0 * q->rawv_row;
    if (q->o.v_raw8)
        kvck_q_dequantize(&q->vraw8, KVCK_QS_TOKEN, n, src, qs_rawv_sz(q, b, h) + 2 * (size_t)j0,
                          x, d);
    else
        kvck_f16_to_f32_n((const uint16_t *)src, x, (size_t)n * d);
}

void qs_rawv_put(const kvcp_qs *q, kvcp_qs_block *b, uint32_t h, uint32_t j0, uint32_t n,
                 const float *x, size_t ldx)
{
    const uint32_t d = q->g->head_dim;
    uint8_t *dst = qs_rawv(q, b, h) + (size_t)j0 * q->rawv_row;
    for (uint32_t i = 0; i < n; i++) {
        if (q->o.v_raw8)
            kvck_q_quantize(&q->vraw8, KVCK_QS_TOKEN, 1, x + i * ldx, d, NULL,
                            dst + i * q->rawv_row, qs_rawv_sz(q, b, h) + 2 * ((size_t)j0 + i));
        else
            kvck_f32_to_f16_n(x + i * ldx, (uint16_t *)(dst + i * q->rawv_row), d);
    }
}

/* Writes n float key rows x [n][d] as raw rows j0.. of block b, head h. */
static void rawk_put(const kvcp_qs *q, uint32_t layer, kvcp_qs_block *b, uint32_t h, uint32_t j0,
                     uint32_t n, const float *x, size_t ldx)
{
    const uint32_t d = q->g->head_dim;
    uint8_t *dst = qs_rawk(q, b, h) + (size_t)j0 * q->rawk_row;
    const uint16_t *sz = qs_raw_sz(q, layer, h);
    for (uint32_t i = 0; i < n; i++) {
        if (sz)
            kvck_q_encode(&q->raw8, KVCK_QS_CHANNEL, 1, x + i * ldx, d, sz, dst + i * q->rawk_row);
        else
            kvck_f32_to_f16_n(x + i * ldx, (uint16_t *)(dst + i * q->rawk_row), d);
    }
}

/* ---- quantization ---------------------------------------------------------------- */

size_t qs_quant_scratch_floats(const kvcp_qs *q)
{
    const uint32_t B = q->o.block, d = q->g->head_dim;
    size_t out = 0;
    for (uint32_t l = 0; l < q->g->n_layers; l++)
        for (uint32_t h = 0; h < q->g->n_kv; h++) {
            size_t a = kvck_q_outlier_scratch_floats(&q->lf[l].k[h], q->o.k_mode, B);
            size_t b = kvck_q_outlier_scratch_floats(&q->lf[l].v[h], KVCK_QS_TOKEN, 1);
            out = a > out ? a : out;
            out = b > out ? b : out;
        }
    /* x [B][d], its permuted copy [B][d], skip mask [B][d] bytes, outlier
     * indices [B * d] */
    return 2 * (size_t)B * d + ((size_t)B * d + 3) / 4 + (size_t)B * d + out + 16;
}

/* The scratch regions of one quantization call. */
typedef struct quant_scr {
    float *x;       /* [B][d] rows as read */
    float *xp;      /* [B][d] rows in stored channel order */
    uint8_t *skip;  /* [B][d] outlier marks */
    uint32_t *idx;  /* [B * d] outlier indices */
    float *oscr;    /* kvck_q_outliers scratch */
} quant_scr;

static void quant_scr_carve(const kvcp_qs *q, float *base, quant_scr *s)
{
    const size_t Bd = (size_t)q->o.block * q->g->head_dim;
    s->x = base;
    s->xp = base + Bd;
    s->skip = (uint8_t *)(base + 2 * Bd);
    s->idx = (uint32_t *)(base + 2 * Bd + (Bd + 3) / 4);
    s->oscr = (float *)(s->idx + Bd);
}

/* xp [n][d] <- x [n][d] in stored order (perm NULL: a copy). */
static void to_stored(const uint16_t *perm, uint32_t d, uint32_t n, const float *x, float *xp)
{
    for (uint32_t j = 0; j < n; j++)
        for (uint32_t i = 0; i < d; i++)
            xp[(size_t)j * d + i] = x[(size_t)j * d + (perm ? perm[i] : i)];
}

/* Row [d] in stored order -> natural order, in place (perm NULL: nothing). */
static void to_natural(const uint16_t *perm, uint32_t d, float *row)
{
    if (!perm)
        return;
    float t[KVCK_MAX_HEAD_DIM];
    memcpy(t, row, d * sizeof(float));
    for (uint32_t i = 0; i < d; i++)
        row[perm[i]] = t[i];
}

/* Outliers of n rows x [n][d] (first row = row j0 of the block) for the
 * `mode` groups: chosen, marked in skip [n][d], appended to out[*cnt] (at
 * most `room`) as (j0 + j, stored channel, fp16 value). */
static void pick_outliers(const kvck_qfmt *f, int mode, uint32_t n, const float *x, uint32_t j0,
                          uint32_t room, const quant_scr *s, kvck_qout *out, uint32_t *cnt)
{
    const uint32_t d = f->d;
    memset(s->skip, 0, (size_t)n * d);
    if (!room)
        return;
    size_t k = kvck_q_outliers(f, mode, n, x, d, room, s->idx, s->oscr);
    for (size_t i = 0; i < k; i++) {
        s->skip[s->idx[i]] = 1;
        kvck_qout *o = &out[(*cnt)++];
        o->j = (uint16_t)(j0 + s->idx[i] / d);
        o->c = (uint16_t)(s->idx[i] % d);
        o->value = kvck_f32_to_f16(x[s->idx[i]]);
        o->reserved = 0;
    }
}

/* Outlier slots row j of a block may use under per-token scaling: the
 * block's cap spread evenly over its rows. */
static uint32_t row_room(uint32_t cap, uint32_t B, uint32_t j)
{
    return cap / B + (j < cap % B ? 1u : 0u);
}

void qs_quantize_keys(const kvcp_qs *q, kvcp_qs_layer *L, uint32_t layer, uint32_t from,
                      uint32_t to, float *scratch)
{
    const uint32_t B = q->o.block, d = q->g->head_dim, H = q->g->n_kv;
    const kvcp_qs_lfmt *lf = &q->lf[layer];
    quant_scr s;
    quant_scr_carve(q, scratch, &s);
    for (uint32_t h = 0; h < H; h++) {
        const uint16_t *perm = lf->k_perm ? lf->k_perm + (size_t)h * d : NULL;
        const kvck_qfmt *kf = &lf->k[h];
        if (q->o.k_mode == KVCK_QS_CHANNEL) {
            for (uint32_t b = from / B; b * B < to; b++) {
                kvcp_qs_block *blk = &L->blocks[b];
                qs_qhead p;
                qs_qhead_at(q, layer, blk->q, h, &p);
                qs_rawk_rows(q, layer, blk, h, 0, B, s.x);
                to_stored(perm, d, B, s.x, s.xp);
                *p.k_nout = 0;
                pick_outliers(kf, KVCK_QS_CHANNEL, B, s.xp, 0, lf->k_out_cap, &s, p.k_out, p.k_nout);
                kvck_q_quantize(kf, KVCK_QS_CHANNEL, B, s.xp, d, s.skip, p.k_codes, p.k_sz);
            }
            continue;
        }
        for (uint32_t m = from; m < to; m++) {
            kvcp_qs_block *blk = &L->blocks[m / B];
            const uint32_t j = m % B;
            qs_qhead p;
            qs_qhead_at(q, layer, blk->q, h, &p);
            if (j == 0)
                *p.k_nout = 0;
            qs_rawk_rows(q, layer, blk, h, j, 1, s.x);
            to_stored(perm, d, 1, s.x, s.xp);
            pick_outliers(kf, KVCK_QS_TOKEN, 1, s.xp, j, row_room(lf->k_out_cap, B, j), &s,
                          p.k_out, p.k_nout);
            kvck_q_quantize(kf, KVCK_QS_TOKEN, 1, s.xp, d, s.skip,
                            p.k_codes + (size_t)j * kf->row_bytes,
                            p.k_sz + (size_t)j * kf->n_groups * 2);
        }
    }
}

void qs_quantize_values(const kvcp_qs *q, kvcp_qs_layer *L, uint32_t layer, uint32_t from,
                        uint32_t to, float *scratch)
{
    const uint32_t B = q->o.block, d = q->g->head_dim, H = q->g->n_kv;
    const kvcp_qs_lfmt *lf = &q->lf[layer];
    quant_scr s;
    quant_scr_carve(q, scratch, &s);
    for (uint32_t m = from; m < to; m++) {
        kvcp_qs_block *blk = &L->blocks[m / B];
        const uint32_t j = m % B;
        for (uint32_t h = 0; h < H; h++) {
            const uint16_t *perm = lf->v_perm ? lf->v_perm + (size_t)h * d : NULL;
            const kvck_qfmt *vf = &lf->v[h];
            qs_qhead p;
            qs_qhead_at(q, layer, blk->q, h, &p);
            if (j == 0)
                *p.v_nout = 0;
            qs_rawv_rows(q, blk, h, j, 1, s.x);
            to_stored(perm, d, 1, s.x, s.xp);
            pick_outliers(vf, KVCK_QS_TOKEN, 1, s.xp, j, row_room(lf->v_out_cap, B, j), &s,
                          p.v_out, p.v_nout);
            kvck_q_quantize(vf, KVCK_QS_TOKEN, 1, s.xp, d, s.skip,
                            p.v_codes + (size_t)j * vf->row_bytes,
                            p.v_sz + (size_t)j * vf->n_groups * 2);
        }
    }
}

/* Replaces x^ by the kept value at each outlier of rows [0, n) of a
 * dequantized [n][d] array (stored order). */
static void patch_outliers(const kvck_qout *out, uint32_t cnt, uint32_t n, uint32_t d, float *x)
{
    for (uint32_t i = 0; i < cnt; i++)
        if (out[i].j < n)
            x[(size_t)out[i].j * d + out[i].c] = kvck_f16_to_f32(out[i].value);
}

/* Quantized rows of block b: keys, values. */
static uint32_t q_rows(const kvcp_qs *q, uint32_t nq, uint32_t b)
{
    const uint32_t B = q->o.block;
    uint32_t r = nq > b * B ? nq - b * B : 0;
    return r < B ? r : B;
}

void qs_dequant_keys(const kvcp_qs *q, const kvcp_qs_layer *L, uint32_t layer, uint32_t b,
                     uint32_t h, float *k)
{
    const uint32_t d = q->g->head_dim;
    const kvcp_qs_lfmt *lf = &q->lf[layer];
    qs_qhead p;
    qs_qhead_at(q, layer, L->blocks[b].q, h, &p);
    const uint32_t rows = q->o.k_mode == KVCK_QS_CHANNEL ? q->o.block : q_rows(q, L->kq, b);
    kvck_q_dequantize(&lf->k[h], q->o.k_mode, rows, p.k_codes, p.k_sz, k, d);
    patch_outliers(p.k_out, *p.k_nout, rows, d, k);
    if (lf->k_perm)
        for (uint32_t j = 0; j < rows; j++)
            to_natural(lf->k_perm + (size_t)h * d, d, k + (size_t)j * d);
}

void qs_dequant_values(const kvcp_qs *q, const kvcp_qs_layer *L, uint32_t layer, uint32_t b,
                       uint32_t h, float *v)
{
    const uint32_t d = q->g->head_dim;
    const kvcp_qs_lfmt *lf = &q->lf[layer];
    qs_qhead p;
    qs_qhead_at(q, layer, L->blocks[b].q, h, &p);
    const uint32_t rows = q_rows(q, L->vq, b);
    kvck_q_dequantize(&lf->v[h], KVCK_QS_TOKEN, rows, p.v_codes, p.v_sz, v, d);
    patch_outliers(p.v_out, *p.v_nout, rows, d, v);
    if (lf->v_perm)
        for (uint32_t j = 0; j < rows; j++)
            to_natural(lf->v_perm + (size_t)h * d, d, v + (size_t)j * d);
}

/* Writes the dequantized keys (kv 0) or values (kv 1) of main tokens
 * [from, to) into their raw rows (the raw blocks exist). */
static void dequantize_to_raw(const kvcp_qs *q, kvcp_qs_layer *L, uint32_t layer, int kv,
                              uint32_t from, uint32_t to, float *scratch)
{
    const uint32_t B = q->o.block, d = q->g->head_dim, H = q->g->n_kv;
    float *x = scratch; /* [B][d] */
    for (uint32_t b = from / B; b * B < to; b++) {
        kvcp_qs_block *blk = &L->blocks[b];
        uint32_t lo = from > b * B ? from - b * B : 0;
        uint32_t hi = to < (b + 1) * B ? to - b * B : B;
        for (uint32_t h = 0; h < H; h++) {
            if (kv == 0) {
                qs_dequant_keys(q, L, layer, b, h, x);
                rawk_put(q, layer, blk, h, lo, hi - lo, x + (size_t)lo * d, d);
            } else {
                qs_dequant_values(q, L, layer, b, h, x);
                qs_rawv_put(q, blk, h, lo, hi - lo, x + (size_t)lo * d, d);
            }
        }
    }
}

/* ---- append ------------------------------------------------------------------------- */

size_t kvcp_qs_append_scratch_floats(const kvcp_qs *q, uint32_t n)
{
    size_t rows = (size_t)n * q->row;
    size_t quant = qs_quant_scratch_floats(q);
    /* k (stored form) [n][n_kv][d], k post-RoPE (sinks), v */
    return 3 * rows + quant;
}

/* What an append allocates, so a failure can give it all back. */
typedef struct append_plan {
    uint32_t n_sink_new;   /* tokens going to the sinks */
    uint32_t main_old, main_new;
    uint32_t need_blocks;
    uint32_t kq_old, kq_new, vq_old, vq_new;
    uint32_t b0;           /* first block the append touches */
    kvcp_qs_block *tab;    /* new table, or L->blocks */
    uint32_t cap;
    int new_sink;          /* sink area allocated here */
    uint8_t *got;          /* per block from b0: 1 rawk, 2 rawv, 4 q, 8 pos allocated here */
} append_plan;

/* Gives back what an append allocated before it failed. */
static void plan_rollback(const kvcp_qs *q, kvcp_qs_layer *L, append_plan *pl, uint32_t layer)
{
    /* A table that could not grow: nothing per block was allocated yet. */
    const uint32_t end = pl->tab && pl->cap >= pl->need_blocks ? pl->need_blocks : pl->b0;
    for (uint32_t b = pl->b0; b < end; b++) {
        kvcp_qs_block *blk = &pl->tab[b];
        uint8_t g = pl->got[b - pl->b0];
        if (g & 1) {
            kvcp_free(q->host, blk->rawk, q->rawk_bytes);
            blk->rawk = NULL;
        }
        if (g & 2) {
            kvcp_free(q->host, blk->rawv, q->rawv_bytes);
            blk->rawv = NULL;
        }
        if (g & 4) {
            kvcp_free(q->host, blk->q, q->lf[layer].q_bytes);
            blk->q = NULL;
        }
        if (g & 8) {
            kvcp_free(q->host, blk->pos, pos_bytes(q));
            blk->pos = NULL;
        }
        if (b >= L->n_blocks)
            memset(blk, 0, sizeof *blk);
    }
    if (pl->tab && pl->tab != L->blocks)
        kvcp_free(q->host, pl->tab, (size_t)pl->cap * sizeof(kvcp_qs_block));
    if (pl->new_sink) {
        kvcp_free(q->host, L->sink_kv, qs_sink_bytes(q));
        L->sink_kv = NULL;
        L->sink_pos = NULL;
    }
}

/* Step 1 of an append: every allocation. NOMEM leaves L as it was (the
 * caller rolls back what the plan holds). */
static kvc_status plan_allocate(const kvcp_qs *q, kvcp_qs_layer *L, append_plan *pl,
                                uint32_t layer, uint32_t n, const int32_t *pos)
{
    const uint32_t B = q->o.block, S = q->o.sink;
    if (pl->n_sink_new && !L->sink_kv) {
        if (!(L->sink_kv = kvcp_alloc(q->host, qs_sink_bytes(q), KVC_USAGE_CACHE)))
            return KVC_E_NOMEM;
        L->sink_pos = (int32_t *)(L->sink_kv + 2 * (size_t)S * q->row);
        pl->new_sink = 1;
    }
    if (pl->need_blocks > L->cap_blocks) {
        uint32_t c = L->cap_blocks ? L->cap_blocks : KVCP_TABLE_INIT;
        while (c < pl->need_blocks)
            c *= 2;
        kvcp_qs_block *tab = kvcp_alloc(q->host, (size_t)c * sizeof(kvcp_qs_block),
                                        KVC_USAGE_CACHE);
        if (!tab)
            return KVC_E_NOMEM;
        if (L->n_blocks)
            memcpy(tab, L->blocks, (size_t)L->n_blocks * sizeof(kvcp_qs_block));
        pl->tab = tab;
        pl->cap = c;
    }
    for (uint32_t b = pl->b0; b < pl->need_blocks; b++) {
        kvcp_qs_block *blk = &pl->tab[b];
        uint8_t *g = &pl->got[b - pl->b0];
        const int gets_tokens = (b + 1) * B > pl->main_old;
        if (gets_tokens && !blk->rawk) {
            if (!(blk->rawk = kvcp_alloc(q->host, q->rawk_bytes, KVC_USAGE_CACHE)))
                return KVC_E_NOMEM;
            *g |= 1;
        }
        if (gets_tokens && !blk->rawv) {
            if (!(blk->rawv = kvcp_alloc(q->host, q->rawv_bytes, KVC_USAGE_CACHE)))
                return KVC_E_NOMEM;
            *g |= 2;
        }
        if ((b * B < pl->vq_new || b * B < pl->kq_new) && !blk->q) {
            if (!(blk->q = kvcp_alloc(q->host, q->lf[layer].q_bytes, KVC_USAGE_CACHE)))
                return KVC_E_NOMEM;
            *g |= 4;
        }
    }
    /* Positions: a block's first token sets pos0; a gap gets an array. */
    for (uint32_t t = pl->n_sink_new; t < n; t++) {
        uint32_t m = pl->main_old + (t - pl->n_sink_new);
        kvcp_qs_block *blk = &pl->tab[m / B];
        uint32_t i = m % B;
        if (i == 0) {
            blk->pos0 = pos[t]; /* a new block (existing blocks hold a token) */
        } else if (!blk->pos && pos[t] != blk->pos0 + (int32_t)i) {
            if (!(blk->pos = kvcp_alloc(q->host, pos_bytes(q), KVC_USAGE_CACHE)))
                return KVC_E_NOMEM;
            pl->got[m / B - pl->b0] |= 8;
            for (uint32_t j = 0; j < i; j++)
                blk->pos[j] = blk->pos0 + (int32_t)j;
        }
    }
    return KVC_OK;
}

kvc_status kvcp_qs_append(const kvcp_qs *q, kvcp_qs_layer *L, kvcp_qs_bytes *cnt, uint32_t layer,
                          uint32_t n, const int32_t *pos, const float *k_pre, const float *v,
                          float *scratch)
{
    const kvcp_geom *g = q->g;
    const uint32_t B = q->o.block, d = g->head_dim, H = g->n_kv, S = q->o.sink;
    const size_t row = q->row;
    append_plan pl;
    memset(&pl, 0, sizeof pl);
    uint8_t got_small[64];
    pl.n_sink_new = L->n < S ? (n < S - L->n ? n : S - L->n) : 0;
    pl.main_old = qs_main(L);
    pl.main_new = pl.main_old + (n - pl.n_sink_new);
    pl.need_blocks = (pl.main_new + B - 1) / B;
    pl.kq_old = L->kq;
    pl.vq_old = L->vq;
    pl.kq_new = kvcp_qs_kq_count(q, L->n + n);
    pl.vq_new = kvcp_qs_vq_count(q, L->n + n);
    pl.kq_new = pl.kq_new > pl.kq_old ? pl.kq_new : pl.kq_old; /* over-quantized after a */
    pl.vq_new = pl.vq_new > pl.vq_old ? pl.vq_new : pl.vq_old; /* truncate without memory */
    pl.b0 = (pl.kq_old < pl.main_old ? pl.kq_old : pl.main_old) / B;
    pl.tab = L->blocks;
    pl.cap = L->cap_blocks;
    const uint32_t touched = pl.need_blocks > pl.b0 ? pl.need_blocks - pl.b0 : 0;
    uint8_t *got = got_small;
    if (touched > sizeof got_small && !(got = kvcp_alloc(q->host, touched, KVC_USAGE_SCRATCH)))
        return KVC_E_NOMEM;
    memset(got, 0, touched > sizeof got_small ? touched : sizeof got_small);
    pl.got = got;

    /* 1. Allocate everything. */
    if (plan_allocate(q, L, &pl, layer, n, pos)) {
        plan_rollback(q, L, &pl, layer);
        if (got != got_small)
            kvcp_free(q->host, got, touched);
        return KVC_E_NOMEM;
    }

    /* 2. Commit: nothing fails from here on. Rows in their stored forms. */
    float *ks = scratch;              /* [n][n_kv][d] keys as stored raw */
    float *kr = ks + (size_t)n * row; /* [n][n_kv][d] post-RoPE keys (sinks) */
    float *vs = kr + (size_t)n * row; /* [n][n_kv][d] values as stored */
    float *qscr = vs + (size_t)n * row;
    kvck_rope_apply(&g->rope, n, H, pos, k_pre, kr);
    if (q->k_signs)
        for (size_t r = 0; r < (size_t)n * H; r++)
            kvck_hadamard(kr + r * d, d, q->k_signs);
    memcpy(ks, q->o.k_pre ? k_pre : kr, (size_t)n * row * sizeof(float));
    memcpy(vs, v, (size_t)n * row * sizeof(float));
    if (q->v_signs)
        for (size_t r = 0; r < (size_t)n * H; r++)
            kvck_hadamard(vs + r * d, d, q->v_signs);

    for (uint32_t t = 0; t < pl.n_sink_new; t++) {
        uint32_t i = L->n_sink + t;
        kvck_f32_to_f16_n(kr + (size_t)t * row, qs_sink_k(q, L, i), row);
        kvck_f32_to_f16_n(vs + (size_t)t * row, qs_sink_v(q, L, i), row);
        L->sink_pos[i] = pos[t];
    }
    for (uint32_t t = pl.n_sink_new; t < n; t++) {
        uint32_t m = pl.main_old + (t - pl.n_sink_new);
        kvcp_qs_block *blk = &pl.tab[m / B];
        uint32_t i = m % B;
        for (uint32_t h = 0; h < H; h++) {
            rawk_put(q, layer, blk, h, i, 1, ks + ((size_t)t * H + h) * d, d);
            qs_rawv_put(q, blk, h, i, 1, vs + ((size_t)t * H + h) * d, d);
        }
        if (blk->pos)
            blk->pos[i] = pos[t];
    }
    for (uint32_t b = 0; b < touched; b++) {
        cnt->raw += ((got[b] & 1) ? q->rawk_bytes : 0) + ((got[b] & 2) ? q->rawv_bytes : 0);
        cnt->q += (got[b] & 4) ? q->lf[layer].q_bytes : 0;
        cnt->pos += (got[b] & 8) ? pos_bytes(q) : 0;
    }
    if (pl.tab != L->blocks) {
        if (L->blocks) {
            kvcp_free(q->host, L->blocks, (size_t)L->cap_blocks * sizeof(kvcp_qs_block));
            cnt->table -= (size_t)L->cap_blocks * sizeof(kvcp_qs_block);
        }
        L->blocks = pl.tab;
        L->cap_blocks = pl.cap;
        cnt->table += (size_t)pl.cap * sizeof(kvcp_qs_block);
    }
    if (pl.new_sink)
        cnt->sink += qs_sink_bytes(q);
    L->n += n;
    L->n_sink += pl.n_sink_new;
    L->n_blocks = pl.need_blocks > L->n_blocks ? pl.need_blocks : L->n_blocks;
    L->last_pos = pos[n - 1];

    /* 3. Quantize what became quantizable. A per-channel key block that
     * already held quantized keys (left by a truncate without memory) goes
     * back to raw first and is quantized whole again. */
    if (pl.vq_new > pl.vq_old) {
        qs_quantize_values(q, L, layer, pl.vq_old, pl.vq_new, qscr);
        L->vq = pl.vq_new;
    }
    if (pl.kq_new > pl.kq_old) {
        uint32_t from = pl.kq_old;
        if (q->o.k_mode == KVCK_QS_CHANNEL && from % B) {
            /* Rows still holding their raw copy keep it. */
            const uint32_t b0 = from / B * B, upto = L->kraw_from < from ? L->kraw_from : from;
            if (upto > b0)
                dequantize_to_raw(q, L, layer, 0, b0, upto, qscr);
            from = b0;
        }
        qs_quantize_keys(q, L, layer, from, pl.kq_new, qscr);
        L->kq = pl.kq_new;
    }
    if (got != got_small)
        kvcp_free(q->host, got, touched);
    return KVC_OK;
}

/* ---- pending raw copies ------------------------------------------------------------- */

uint64_t kvcp_qs_pending_bytes(const kvcp_qs *q, const kvcp_qs_layer *L)
{
    const uint32_t m = qs_main(L);
    const uint32_t kq = L->kq < m ? L->kq : m, vq = L->vq < m ? L->vq : m;
    const uint64_t k_tok = (uint64_t)q->g->n_kv * q->rawk_row;
    const uint64_t v_tok = (uint64_t)q->g->n_kv * (q->rawv_row + (q->o.v_raw8 ? 4 : 0));
    return (kq > L->kraw_from ? (uint64_t)(kq - L->kraw_from) * k_tok : 0) +
           (vq > L->vraw_from ? (uint64_t)(vq - L->vraw_from) * v_tok : 0);
}

/* Frees the raw key (value) rows of blocks whose every held token is below
 * kraw_from (vraw_from). */
static void free_raw_below(const kvcp_qs *q, kvcp_qs_layer *L, kvcp_qs_bytes *cnt)
{
    const uint32_t B = q->o.block;
    for (uint32_t b = 0; b < L->n_blocks; b++) {
        const uint32_t end = b * B + block_count(q, L, b);
        kvcp_qs_block *blk = &L->blocks[b];
        if (end > L->vraw_from && end > L->kraw_from)
            break;
        if (end <= L->kraw_from && blk->rawk) {
            kvcp_free(q->host, blk->rawk, q->rawk_bytes);
            blk->rawk = NULL;
            cnt->raw -= q->rawk_bytes;
        }
        if (end <= L->vraw_from && blk->rawv) {
            kvcp_free(q->host, blk->rawv, q->rawv_bytes);
            blk->rawv = NULL;
            cnt->raw -= q->rawv_bytes;
        }
    }
}

void kvcp_qs_drop_pending(const kvcp_qs *q, kvcp_qs_layer *L, kvcp_qs_bytes *cnt)
{
    const uint32_t m = qs_main(L);
    const uint32_t kq = L->kq < m ? L->kq : m, vq = L->vq < m ? L->vq : m;
    if (L->kraw_from >= kq && L->vraw_from >= vq)
        return;
    L->kraw_from = kq > L->kraw_from ? kq : L->kraw_from;
    L->vraw_from = vq > L->vraw_from ? vq : L->vraw_from;
    free_raw_below(q, L, cnt);
}

/* ---- truncate, release, copy -------------------------------------------------------- */

static void block_free(const kvcp_qs *q, kvcp_qs_block *blk, kvcp_qs_bytes *cnt, uint32_t layer)
{
    if (blk->rawk) {
        kvcp_free(q->host, blk->rawk, q->rawk_bytes);
        cnt->raw -= q->rawk_bytes;
    }
    if (blk->rawv) {
        kvcp_free(q->host, blk->rawv, q->rawv_bytes);
        cnt->raw -= q->rawv_bytes;
    }
    if (blk->q) {
        kvcp_free(q->host, blk->q, q->lf[layer].q_bytes);
        cnt->q -= q->lf[layer].q_bytes;
    }
    if (blk->pos) {
        kvcp_free(q->host, blk->pos, pos_bytes(q));
        cnt->pos -= pos_bytes(q);
    }
    memset(blk, 0, sizeof *blk);
}

/* Removes outliers of rows >= rows from a per-row list (sorted by row). */
static void trim_outliers(const kvck_qout *out, uint32_t *cnt, uint32_t rows)
{
    while (*cnt && out[*cnt - 1].j >= rows)
        (*cnt)--;
}

void kvcp_qs_truncate(const kvcp_qs *q, kvcp_qs_layer *L, kvcp_qs_bytes *cnt, uint32_t layer,
                      int32_t p)
{
    const uint32_t B = q->o.block;
    const uint32_t c = p <= 0 ? 0 : kvcp_qs_count_upto(q, L, p - 1);
    if (c >= L->n)
        return;
    const uint32_t sink_new = c < q->o.sink ? c : q->o.sink;
    const uint32_t main_new = c - sink_new;
    /* Quantized rows stay quantized: truncate removes tokens and changes
     * none of those it keeps, needs no memory, and gives the same result
     * whatever the allocator does. (The layer may then hold more
     * quantized rows than its length implies, e.g. a per-channel key
     * block cut short; every path allows that, and such a block is
     * quantized whole again once it is refilled.) */
    L->kq = L->kq < main_new ? L->kq : main_new;
    L->vq = L->vq < main_new ? L->vq : main_new;
    L->kraw_from = L->kraw_from < L->kq ? L->kraw_from : L->kq;
    L->vraw_from = L->vraw_from < L->vq ? L->vraw_from : L->vq;
    /* Drop whole blocks past the new end, Q blocks with no quantized row
     * left, outliers of removed rows. */
    const uint32_t keep = (main_new + B - 1) / B;
    for (uint32_t b = keep; b < L->n_blocks; b++)
        block_free(q, &L->blocks[b], cnt, layer);
    L->n_blocks = keep;
    const uint32_t q_end = L->vq > L->kq ? L->vq : L->kq;
    for (uint32_t b = (q_end + B - 1) / B; b < keep; b++)
        if (L->blocks[b].q) {
            kvcp_free(q->host, L->blocks[b].q, q->lf[layer].q_bytes);
            cnt->q -= q->lf[layer].q_bytes;
            L->blocks[b].q = NULL;
        }
    for (uint32_t h = 0; h < q->g->n_kv; h++) {
        qs_qhead hp;
        if (q->o.k_mode == KVCK_QS_TOKEN && L->kq % B) {
            qs_qhead_at(q, layer, L->blocks[L->kq / B].q, h, &hp);
            trim_outliers(hp.k_out, hp.k_nout, L->kq % B);
        }
        if (L->vq % B) {
            qs_qhead_at(q, layer, L->blocks[L->vq / B].q, h, &hp);
            trim_outliers(hp.v_out, hp.v_nout, L->vq % B);
        }
    }
    L->n = c;
    L->n_sink = sink_new;
    L->last_pos = c ? kvcp_qs_pos(q, L, c - 1) : -1;
    free_raw_below(q, L, cnt);
}

void kvcp_qs_release(const kvcp_qs *q, kvcp_qs_layer *L, kvcp_qs_bytes *cnt, uint32_t layer)
{
    for (uint32_t b = 0; b < L->n_blocks; b++)
        block_free(q, &L->blocks[b], cnt, layer);
    if (L->blocks) {
        kvcp_free(q->host, L->blocks, (size_t)L->cap_blocks * sizeof(kvcp_qs_block));
        cnt->table -= (size_t)L->cap_blocks * sizeof(kvcp_qs_block);
    }
    if (L->sink_kv) {
        kvcp_free(q->host, L->sink_kv, qs_sink_bytes(q));
        cnt->sink -= qs_sink_bytes(q);
    }
    kvcp_qs_layer_init(L);
}

/* *dst = a copy of src's `bytes` bytes (NULL stays NULL); -1 on NOMEM. */
static int dup_region(const kvcp_qs *q, const void *src, size_t bytes, void **dst, uint64_t *cnt)
{
    if (!src)
        return 0;
    if (!(*dst = kvcp_alloc(q->host, bytes, KVC_USAGE_CACHE)))
        return -1;
    memcpy(*dst, src, bytes);
    *cnt += bytes;
    return 0;
}

kvc_status kvcp_qs_copy(const kvcp_qs *q, const kvcp_qs_layer *src, kvcp_qs_layer *dst,
                        kvcp_qs_bytes *cnt, uint32_t layer)
{
    kvcp_qs_layer_init(dst);
    if (dup_region(q, src->sink_kv, qs_sink_bytes(q), (void **)&dst->sink_kv, &cnt->sink))
        goto nomem;
    if (dst->sink_kv)
        dst->sink_pos = (int32_t *)(dst->sink_kv + 2 * (size_t)q->o.sink * q->row);
    if (src->cap_blocks) {
        dst->blocks = kvcp_alloc(q->host, (size_t)src->cap_blocks * sizeof(kvcp_qs_block),
                                 KVC_USAGE_CACHE);
        if (!dst->blocks)
            goto nomem;
        dst->cap_blocks = src->cap_blocks;
        cnt->table += (size_t)src->cap_blocks * sizeof(kvcp_qs_block);
    }
    for (uint32_t b = 0; b < src->n_blocks; b++) {
        const kvcp_qs_block *s = &src->blocks[b];
        kvcp_qs_block *t = &dst->blocks[b];
        dst->n_blocks = b + 1;
        t->pos0 = s->pos0;
        if (dup_region(q, s->rawk, q->rawk_bytes, (void **)&t->rawk, &cnt->raw) ||
            dup_region(q, s->rawv, q->rawv_bytes, (void **)&t->rawv, &cnt->raw) ||
            dup_region(q, s->q, q->lf[layer].q_bytes, (void **)&t->q, &cnt->q) ||
            dup_region(q, s->pos, pos_bytes(q), (void **)&t->pos, &cnt->pos))
            goto nomem;
    }
    dst->n = src->n;
    dst->n_sink = src->n_sink;
    dst->kq = src->kq;
    dst->vq = src->vq;
    dst->kraw_from = src->kraw_from;
    dst->vraw_from = src->vraw_from;
    dst->last_pos = src->last_pos;
    return KVC_OK;
nomem:
    kvcp_qs_release(q, dst, cnt, layer);
    return KVC_E_NOMEM;
}

uint64_t kvcp_qs_payload_bytes(const kvcp_qs *q, const kvcp_qs_layer *L, uint32_t layer)
{
    const uint32_t m = qs_main(L);
    const uint32_t kq = L->kq < m ? L->kq : m, vq = L->vq < m ? L->vq : m;
    uint64_t kc = 0, vc = 0;
    for (uint32_t h = 0; h < q->g->n_kv; h++) {
        kc += q->lf[layer].k[h].row_bytes;
        vc += q->lf[layer].v[h].row_bytes;
    }
    const uint64_t k_tok = (uint64_t)q->g->n_kv * q->rawk_row;
    const uint64_t v_tok = (uint64_t)q->g->n_kv * (q->rawv_row + (q->o.v_raw8 ? 4 : 0));
    const uint64_t sink_tok = 2 * q->row * sizeof(uint16_t);
    /* quantized rows' codes, raw rows (live and pending), sinks */
    return (uint64_t)kq * kc + (uint64_t)vq * vc + (uint64_t)(m - L->kraw_from) * k_tok +
           (uint64_t)(m - L->vraw_from) * v_tok + (uint64_t)L->n_sink * sink_tok;
}
