/*
 * The quantized store's layers (qstore.h): append (all-or-nothing),
 * quantization of the tokens that became quantizable, pending raw copies,
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

static void f32_to_f16(const float *x, uint16_t *y, size_t n)
{
    kvck_f32_to_f16_n(x, y, n);
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
    /* x [B][d], skip mask [B][d] bytes, outlier indices [B * d] */
    return (size_t)B * d + ((size_t)B * d + 3) / 4 + (size_t)B * d + out + 16;
}

/* Outliers of n rows x [n][d] (first row = row j0 of the block) for the
 * `mode` groups: chosen, marked in skip [n][d], and appended to out[*cnt]
 * (at most `room`) as (j0 + j, c, fp16 value). */
static void pick_outliers(const kvck_qfmt *f, int mode, uint32_t n, const float *x, uint32_t j0,
                          uint32_t room, uint8_t *skip, uint32_t *idx, float *scr,
                          kvck_qout *out, uint32_t *cnt)
{
    const uint32_t d = f->d;
    memset(skip, 0, (size_t)n * d);
    if (!room)
        return;
    size_t k = kvck_q_outliers(f, mode, n, x, d, room, idx, scr);
    for (size_t i = 0; i < k; i++) {
        uint32_t j = idx[i] / d, c = idx[i] % d;
        skip[idx[i]] = 1;
        kvck_qout *o = &out[(*cnt)++];
        o->j = (uint16_t)(j0 + j);
        o->c = (uint16_t)c;
        o->value = kvck_f32_to_f16(x[idx[i]]);
        o->reserved = 0;
    }
}

/* Outlier slots row j of a block may use under per-token scaling: the
 * block's cap spread evenly over its rows. */
static uint32_t row_room(uint32_t cap, uint32_t B, uint32_t j)
{
    return cap / B + (j < cap % B ? 1u : 0u);
}

void qs_quantize_range(const kvcp_qs *q, kvcp_qs_layer *L, uint32_t layer, uint32_t from,
                       uint32_t to, float *scratch)
{
    const uint32_t B = q->o.block, d = q->g->head_dim, H = q->g->n_kv;
    const kvcp_qs_lfmt *lf = &q->lf[layer];
    float *x = scratch;                                 /* [B][d] */
    uint8_t *skip = (uint8_t *)(x + (size_t)B * d);     /* [B][d] */
    uint32_t *idx = (uint32_t *)(x + (size_t)B * d + ((size_t)B * d + 3) / 4); /* [B*d] */
    float *oscr = (float *)(idx + (size_t)B * d);
    /* Keys per channel: whole blocks. */
    if (q->o.k_mode == KVCK_QS_CHANNEL) {
        for (uint32_t b = from / B; b * B < to; b++) {
            kvcp_qs_block *blk = &L->blocks[b];
            for (uint32_t h = 0; h < H; h++) {
                qs_qhead p;
                qs_qhead_at(q, layer, blk->q, h, &p);
                kvck_f16_to_f32_n(qs_raw_k(q, blk->raw, h), x, (size_t)B * d);
                *p.k_nout = 0;
                pick_outliers(&lf->k[h], KVCK_QS_CHANNEL, B, x, 0, lf->k_out_cap, skip, idx, oscr,
                              p.k_out, p.k_nout);
                kvck_q_quantize(&lf->k[h], KVCK_QS_CHANNEL, B, x, d, skip, p.k_codes, p.k_sz);
            }
        }
    }
    /* Per-token rows: keys in token mode, values always. */
    for (uint32_t m = from; m < to; m++) {
        kvcp_qs_block *blk = &L->blocks[m / B];
        const uint32_t j = m % B;
        for (uint32_t h = 0; h < H; h++) {
            qs_qhead p;
            qs_qhead_at(q, layer, blk->q, h, &p);
            if (j == 0) {
                if (q->o.k_mode == KVCK_QS_TOKEN)
                    *p.k_nout = 0;
                *p.v_nout = 0;
            }
            if (q->o.k_mode == KVCK_QS_TOKEN) {
                const kvck_qfmt *kf = &lf->k[h];
                kvck_f16_to_f32_n(qs_raw_k(q, blk->raw, h) + (size_t)j * d, x, d);
                pick_outliers(kf, KVCK_QS_TOKEN, 1, x, j, row_room(lf->k_out_cap, B, j), skip,
                              idx, oscr, p.k_out, p.k_nout);
                kvck_q_quantize(kf, KVCK_QS_TOKEN, 1, x, d, skip, p.k_codes + (size_t)j * kf->row_bytes,
                                p.k_sz + (size_t)j * kf->n_groups * 2);
            }
            const kvck_qfmt *vf = &lf->v[h];
            kvck_f16_to_f32_n(qs_raw_v(q, blk->raw, h) + (size_t)j * d, x, d);
            pick_outliers(vf, KVCK_QS_TOKEN, 1, x, j, row_room(lf->v_out_cap, B, j), skip, idx,
                          oscr, p.v_out, p.v_nout);
            kvck_q_quantize(vf, KVCK_QS_TOKEN, 1, x, d, skip, p.v_codes + (size_t)j * vf->row_bytes,
                            p.v_sz + (size_t)j * vf->n_groups * 2);
        }
    }
}

/* Replaces x^ by the kept value at each outlier of rows [j0, j0 + n) of a
 * dequantized [n][d] array. */
static void patch_outliers(const kvck_qout *out, uint32_t cnt, uint32_t j0, uint32_t n, uint32_t d,
                           float *x)
{
    for (uint32_t i = 0; i < cnt; i++)
        if (out[i].j >= j0 && out[i].j < j0 + n)
            x[(size_t)(out[i].j - j0) * d + out[i].c] = kvck_f16_to_f32(out[i].value);
}

void qs_dequant_block(const kvcp_qs *q, const kvcp_qs_layer *L, uint32_t layer, uint32_t b,
                      uint32_t h, float *k, float *v)
{
    const uint32_t B = q->o.block, d = q->g->head_dim;
    const kvcp_qs_lfmt *lf = &q->lf[layer];
    const kvcp_qs_block *blk = &L->blocks[b];
    qs_qhead p;
    qs_qhead_at(q, layer, blk->q, h, &p);
    /* Rows of the block that are quantized. */
    uint32_t nq_here = L->nq > b * B ? L->nq - b * B : 0;
    nq_here = nq_here < B ? nq_here : B;
    if (k) {
        uint32_t rows = q->o.k_mode == KVCK_QS_CHANNEL ? B : nq_here;
        kvck_q_dequantize(&lf->k[h], q->o.k_mode, rows, p.k_codes, p.k_sz, k, d);
        patch_outliers(p.k_out, *p.k_nout, 0, rows, d, k);
    }
    if (v) {
        kvck_q_dequantize(&lf->v[h], KVCK_QS_TOKEN, nq_here, p.v_codes, p.v_sz, v, d);
        patch_outliers(p.v_out, *p.v_nout, 0, nq_here, d, v);
    }
}

void qs_dequantize_to_raw(const kvcp_qs *q, kvcp_qs_layer *L, uint32_t layer, uint32_t from,
                          uint32_t to, float *scratch)
{
    const uint32_t B = q->o.block, d = q->g->head_dim, H = q->g->n_kv;
    float *k = scratch, *v = scratch + (size_t)B * d; /* [B][d] each */
    for (uint32_t b = from / B; b * B < to; b++) {
        kvcp_qs_block *blk = &L->blocks[b];
        uint32_t lo = from > b * B ? from - b * B : 0;
        uint32_t hi = to < (b + 1) * B ? to - b * B : B;
        for (uint32_t h = 0; h < H; h++) {
            qs_dequant_block(q, L, layer, b, h, k, v);
            f32_to_f16(k + (size_t)lo * d, qs_raw_k(q, blk->raw, h) + (size_t)lo * d,
                       (size_t)(hi - lo) * d);
            f32_to_f16(v + (size_t)lo * d, qs_raw_v(q, blk->raw, h) + (size_t)lo * d,
                       (size_t)(hi - lo) * d);
        }
    }
}

/* ---- append ------------------------------------------------------------------------- */

size_t kvcp_qs_append_scratch_floats(const kvcp_qs *q, uint32_t n)
{
    size_t rows = (size_t)n * q->raw_row;
    size_t quant = qs_quant_scratch_floats(q);
    size_t deq = 2 * (size_t)q->o.block * q->g->head_dim;
    /* k (stored form) [n][n_kv][d], k post-RoPE for sinks, v */
    return 3 * rows + (quant > deq ? quant : deq);
}

/* What an append allocates, so a failure can give it all back. */
typedef struct append_plan {
    uint32_t n_sink_new;   /* tokens going to the sinks */
    uint32_t main_old, main_new;
    uint32_t need_blocks;
    uint32_t nq_old, nq_new;
    kvcp_qs_block *tab;    /* new table, or L->blocks */
    uint32_t cap;
    int new_sink;          /* sink area allocated here */
    uint8_t *got;          /* per block touched: bit 1 raw, 2 q, 4 pos allocated here */
} append_plan;

static void plan_rollback(const kvcp_qs *q, kvcp_qs_layer *L, append_plan *pl, uint32_t layer)
{
    const size_t qb = q->lf[layer].q_bytes;
    const uint32_t B = q->o.block;
    const uint32_t b0 = pl->nq_old / B < pl->main_old / B ? pl->nq_old / B : pl->main_old / B;
    /* A table that could not grow: nothing per block was allocated yet. */
    const uint32_t end = pl->tab && pl->cap >= pl->need_blocks ? pl->need_blocks : b0;
    for (uint32_t b = b0; b < end; b++) {
        kvcp_qs_block *blk = &pl->tab[b];
        uint8_t g = pl->got[b - b0];
        if (g & 1) {
            kvcp_free(q->host, blk->raw, q->raw_bytes);
            blk->raw = NULL;
        }
        if (g & 2) {
            kvcp_free(q->host, blk->q, qb);
            blk->q = NULL;
        }
        if (g & 4) {
            kvcp_free(q->host, blk->pos, pos_bytes(q));
            blk->pos = NULL;
        }
        if (b >= L->n_blocks)
            memset(blk, 0, sizeof *blk);
    }
    if (pl->tab != L->blocks)
        kvcp_free(q->host, pl->tab, (size_t)pl->cap * sizeof(kvcp_qs_block));
    if (pl->new_sink) {
        kvcp_free(q->host, L->sink_kv, qs_sink_bytes(q));
        L->sink_kv = NULL;
        L->sink_pos = NULL;
    }
}

kvc_status kvcp_qs_append(const kvcp_qs *q, kvcp_qs_layer *L, kvcp_qs_bytes *cnt, uint32_t layer,
                          uint32_t n, const int32_t *pos, const float *k_pre, const float *v,
                          float *scratch)
{
    const kvcp_geom *g = q->g;
    const uint32_t B = q->o.block, d = g->head_dim, H = g->n_kv, S = q->o.sink;
    const size_t row = q->raw_row;
    append_plan pl = {0};
    uint8_t got_small[64];
    pl.n_sink_new = L->n < S ? (n < S - L->n ? n : S - L->n) : 0;
    pl.main_old = qs_main(L);
    pl.main_new = pl.main_old + (n - pl.n_sink_new);
    pl.need_blocks = (pl.main_new + B - 1) / B;
    pl.nq_old = L->nq;
    pl.nq_new = kvcp_qs_q_count(q, L->n + n);
    if (pl.nq_new < pl.nq_old)
        pl.nq_new = pl.nq_old; /* over-quantized after an out-of-memory truncate */
    pl.tab = L->blocks;
    pl.cap = L->cap_blocks;

    /* 1. Allocate everything: raw blocks for the new tokens, Q blocks for
     * the tokens becoming quantized (older blocks too, with a window). */
    const uint32_t b0 = pl.nq_old / B < pl.main_old / B ? pl.nq_old / B : pl.main_old / B;
    const uint32_t touched = pl.need_blocks > b0 ? pl.need_blocks - b0 : 0;
    uint8_t *got = got_small;
    if (touched > sizeof got_small) {
        got = kvcp_alloc(q->host, touched, KVC_USAGE_SCRATCH);
        if (!got)
            return KVC_E_NOMEM;
    }
    memset(got, 0, touched ? touched : 1);
    pl.got = got;
    if (pl.n_sink_new && !L->sink_kv) {
        L->sink_kv = kvcp_alloc(q->host, qs_sink_bytes(q), KVC_USAGE_CACHE);
        if (!L->sink_kv)
            goto nomem;
        L->sink_pos = (int32_t *)(L->sink_kv + 2 * (size_t)S * row);
        pl.new_sink = 1;
    }
    if (pl.need_blocks > L->cap_blocks) {
        uint32_t c = L->cap_blocks ? L->cap_blocks : KVCP_TABLE_INIT;
        while (c < pl.need_blocks)
            c *= 2;
        pl.tab = kvcp_alloc(q->host, (size_t)c * sizeof(kvcp_qs_block), KVC_USAGE_CACHE);
        if (!pl.tab) {
            pl.tab = L->blocks;
            goto nomem;
        }
        pl.cap = c;
        if (L->n_blocks)
            memcpy(pl.tab, L->blocks, (size_t)L->n_blocks * sizeof(kvcp_qs_block));
    }
    for (uint32_t b = b0; b < pl.need_blocks; b++) {
        kvcp_qs_block *blk = &pl.tab[b];
        if (!blk->raw && (b + 1) * B > pl.main_old) {
            if (!(blk->raw = kvcp_alloc(q->host, q->raw_bytes, KVC_USAGE_CACHE)))
                goto nomem;
            got[b - b0] |= 1;
        }
        if (b * B < pl.nq_new && !blk->q) {
            if (!(blk->q = kvcp_alloc(q->host, q->lf[layer].q_bytes, KVC_USAGE_CACHE)))
                goto nomem;
            got[b - b0] |= 2;
        }
    }
    /* Positions: a block's first token sets pos0; a gap gets an array. */
    for (uint32_t t = pl.n_sink_new; t < n; t++) {
        uint32_t m = pl.main_old + (t - pl.n_sink_new);
        kvcp_qs_block *blk = &pl.tab[m / B];
        uint32_t i = m % B;
        if (i == 0 && m >= L->n_blocks * B)
            blk->pos0 = pos[t];
        else if (i == 0)
            blk->pos0 = pos[t]; /* a block emptied by truncate and refilled */
        else if (!blk->pos && pos[t] != blk->pos0 + (int32_t)i) {
            if (!(blk->pos = kvcp_alloc(q->host, pos_bytes(q), KVC_USAGE_CACHE)))
                goto nomem;
            got[m / B - b0] |= 4;
            for (uint32_t j = 0; j < i; j++)
                blk->pos[j] = blk->pos0 + (int32_t)j;
        }
    }

    /* 2. Commit: nothing fails from here on. Rows in their stored forms. */
    float *ks = scratch;                      /* [n][n_kv][d] keys as stored raw */
    float *kr = ks + (size_t)n * row;         /* [n][n_kv][d] post-RoPE keys (sinks) */
    float *vs = kr + (size_t)n * row;         /* [n][n_kv][d] values as stored */
    float *qscr = vs + (size_t)n * row;
    kvck_rope_apply(&g->rope, n, H, pos, k_pre, kr);
    if (q->k_signs)
        for (size_t r = 0; r < (size_t)n * H; r++)
            kvck_hadamard(kr + r * d, d, q->k_signs);
    if (q->o.k_pre)
        memcpy(ks, k_pre, (size_t)n * row * sizeof(float));
    else
        memcpy(ks, kr, (size_t)n * row * sizeof(float));
    memcpy(vs, v, (size_t)n * row * sizeof(float));
    if (q->v_signs)
        for (size_t r = 0; r < (size_t)n * H; r++)
            kvck_hadamard(vs + r * d, d, q->v_signs);

    for (uint32_t t = 0; t < pl.n_sink_new; t++) {
        uint32_t i = L->n_sink + t;
        f32_to_f16(kr + (size_t)t * row, qs_sink_k(q, L, i), row);
        f32_to_f16(vs + (size_t)t * row, qs_sink_v(q, L, i), row);
        L->sink_pos[i] = pos[t];
    }
    for (uint32_t t = pl.n_sink_new; t < n; t++) {
        uint32_t m = pl.main_old + (t - pl.n_sink_new);
        kvcp_qs_block *blk = &pl.tab[m / B];
        uint32_t i = m % B;
        for (uint32_t h = 0; h < H; h++) {
            f32_to_f16(ks + ((size_t)t * H + h) * d, qs_raw_k(q, blk->raw, h) + (size_t)i * d, d);
            f32_to_f16(vs + ((size_t)t * H + h) * d, qs_raw_v(q, blk->raw, h) + (size_t)i * d, d);
        }
        if (blk->pos)
            blk->pos[i] = pos[t];
    }
    uint64_t add_raw = 0, add_q = 0, add_pos = 0;
    for (uint32_t b = 0; b < touched; b++) {
        add_raw += (got[b] & 1) ? q->raw_bytes : 0;
        add_q += (got[b] & 2) ? q->lf[layer].q_bytes : 0;
        add_pos += (got[b] & 4) ? pos_bytes(q) : 0;
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
    cnt->raw += add_raw;
    cnt->q += add_q;
    cnt->pos += add_pos;
    if (pl.new_sink)
        cnt->sink += qs_sink_bytes(q);
    L->n += n;
    L->n_sink += pl.n_sink_new;
    L->n_blocks = pl.need_blocks > L->n_blocks ? pl.need_blocks : L->n_blocks;
    L->last_pos = pos[n - 1];

    /* 3. Quantize what became quantizable. A per-channel block that
     * already held quantized tokens (left by an out-of-memory truncate) is
     * taken back to raw first and quantized whole again. */
    if (pl.nq_new > pl.nq_old) {
        uint32_t from = pl.nq_old;
        if (q->o.k_mode == KVCK_QS_CHANNEL && from % B) {
            qs_dequantize_to_raw(q, L, layer, from / B * B, from, qscr);
            from = from / B * B;
        }
        qs_quantize_range(q, L, layer, from, pl.nq_new, qscr);
        L->nq = pl.nq_new;
    }
    if (got != got_small)
        kvcp_free(q->host, got, touched);
    return KVC_OK;

nomem:
    plan_rollback(q, L, &pl, layer);
    if (got != got_small)
        kvcp_free(q->host, got, touched);
    return KVC_E_NOMEM;
}

/* ---- pending raw copies ------------------------------------------------------------- */

uint64_t kvcp_qs_pending_bytes(const kvcp_qs *q, const kvcp_qs_layer *L)
{
    uint32_t nq = L->nq < qs_main(L) ? L->nq : qs_main(L);
    return nq > L->raw_from ? (uint64_t)(nq - L->raw_from) * 2 * q->raw_row * sizeof(uint16_t)
                            : 0;
}

/* Frees the raw blocks whose every held token is below raw_from. */
static void free_raw_below(const kvcp_qs *q, kvcp_qs_layer *L, kvcp_qs_bytes *cnt)
{
    const uint32_t B = q->o.block, m = qs_main(L);
    for (uint32_t b = 0; b < L->n_blocks; b++) {
        uint32_t end = (b + 1) * B < m ? (b + 1) * B : m;
        if (end > L->raw_from)
            break;
        if (L->blocks[b].raw) {
            kvcp_free(q->host, L->blocks[b].raw, q->raw_bytes);
            L->blocks[b].raw = NULL;
            cnt->raw -= q->raw_bytes;
        }
    }
}

void kvcp_qs_drop_pending(const kvcp_qs *q, kvcp_qs_layer *L, kvcp_qs_bytes *cnt)
{
    uint32_t nq = L->nq < qs_main(L) ? L->nq : qs_main(L);
    if (L->raw_from >= nq)
        return;
    L->raw_from = nq;
    free_raw_below(q, L, cnt);
}

/* ---- truncate, release, copy -------------------------------------------------------- */

static void block_free(const kvcp_qs *q, kvcp_qs_block *blk, kvcp_qs_bytes *cnt, uint32_t layer)
{
    if (blk->raw) {
        kvcp_free(q->host, blk->raw, q->raw_bytes);
        cnt->raw -= q->raw_bytes;
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

/* Removes outliers of rows >= rows from a per-token list (sorted by row). */
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
    const uint32_t nq_target = kvcp_qs_q_count(q, c);
    const uint32_t nq_keep = L->nq < main_new ? L->nq : main_new;
    uint32_t raw_from = L->raw_from < main_new ? L->raw_from : main_new;
    /* Tokens [nq_target, nq_keep) were quantized but are raw at this
     * length: back to raw as their dequantized values. Those from raw_from
     * on still have their raw rows (pending); the others need them
     * rebuilt, which needs memory: without it they stay quantized (the
     * store then holds more quantized tokens than the length implies,
     * which every path allows). */
    L->nq = nq_keep;
    if (nq_keep > nq_target) {
        const uint32_t lo = nq_target;
        const uint32_t rebuild_to = raw_from < nq_keep ? raw_from : nq_keep;
        int ok = 1;
        for (uint32_t b = lo / B; b * B < rebuild_to && ok; b++)
            if (!L->blocks[b].raw) {
                if ((L->blocks[b].raw = kvcp_alloc(q->host, q->raw_bytes, KVC_USAGE_CACHE)))
                    cnt->raw += q->raw_bytes;
                else
                    ok = 0;
            }
        size_t sfl = qs_quant_scratch_floats(q), dfl = 2 * (size_t)B * q->g->head_dim;
        size_t sbytes = (sfl > dfl ? sfl : dfl) * sizeof(float);
        float *scr = ok && lo < rebuild_to ? kvcp_alloc(q->host, sbytes, KVC_USAGE_SCRATCH) : NULL;
        if (ok && (scr || lo >= rebuild_to)) {
            if (scr) {
                qs_dequantize_to_raw(q, L, layer, lo, rebuild_to, scr);
                kvcp_free(q->host, scr, sbytes);
            }
            L->nq = lo;
            raw_from = lo;
        }
        /* else: raw blocks allocated above hold nothing valid; they lie
         * below raw_from and free_raw_below gives them back. */
    }
    L->raw_from = raw_from < L->nq ? raw_from : L->nq;
    /* Drop whole blocks past the new end; Q blocks with no quantized
     * token left; outliers of removed rows. */
    const uint32_t keep_blocks = (main_new + B - 1) / B;
    for (uint32_t b = keep_blocks; b < L->n_blocks; b++)
        block_free(q, &L->blocks[b], cnt, layer);
    L->n_blocks = keep_blocks;
    for (uint32_t b = (L->nq + B - 1) / B; b < keep_blocks; b++)
        if (L->blocks[b].q) {
            kvcp_free(q->host, L->blocks[b].q, q->lf[layer].q_bytes);
            cnt->q -= q->lf[layer].q_bytes;
            L->blocks[b].q = NULL;
        }
    if (L->nq % B) {
        kvcp_qs_block *blk = &L->blocks[L->nq / B];
        const uint32_t rows = L->nq % B;
        for (uint32_t h = 0; h < q->g->n_kv; h++) {
            qs_qhead hp;
            qs_qhead_at(q, layer, blk->q, h, &hp);
            if (q->o.k_mode == KVCK_QS_TOKEN)
                trim_outliers(hp.k_out, hp.k_nout, rows);
            trim_outliers(hp.v_out, hp.v_nout, rows);
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

kvc_status kvcp_qs_copy(const kvcp_qs *q, const kvcp_qs_layer *src, kvcp_qs_layer *dst,
                        kvcp_qs_bytes *cnt, uint32_t layer)
{
    kvcp_qs_layer_init(dst);
    const size_t qb = q->lf[layer].q_bytes;
    if (src->sink_kv) {
        if (!(dst->sink_kv = kvcp_alloc(q->host, qs_sink_bytes(q), KVC_USAGE_CACHE)))
            goto nomem;
        memcpy(dst->sink_kv, src->sink_kv, qs_sink_bytes(q));
        dst->sink_pos = (int32_t *)(dst->sink_kv + 2 * (size_t)q->o.sink * q->raw_row);
        cnt->sink += qs_sink_bytes(q);
    }
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
        if (s->raw) {
            if (!(t->raw = kvcp_alloc(q->host, q->raw_bytes, KVC_USAGE_CACHE)))
                goto nomem;
            memcpy(t->raw, s->raw, q->raw_bytes);
            cnt->raw += q->raw_bytes;
        }
        if (s->q) {
            if (!(t->q = kvcp_alloc(q->host, qb, KVC_USAGE_CACHE)))
                goto nomem;
            memcpy(t->q, s->q, qb);
            cnt->q += qb;
        }
        if (s->pos) {
            if (!(t->pos = kvcp_alloc(q->host, pos_bytes(q), KVC_USAGE_CACHE)))
                goto nomem;
            memcpy(t->pos, s->pos, pos_bytes(q));
            cnt->pos += pos_bytes(q);
        }
    }
    dst->n = src->n;
    dst->n_sink = src->n_sink;
    dst->nq = src->nq;
    dst->raw_from = src->raw_from;
    dst->last_pos = src->last_pos;
    dst->n_blocks = src->n_blocks;
    return KVC_OK;
nomem:
    kvcp_qs_release(q, dst, cnt, layer);
    return KVC_E_NOMEM;
}

uint64_t kvcp_qs_payload_bytes(const kvcp_qs *q, const kvcp_qs_layer *L, uint32_t layer)
{
    const uint32_t m = qs_main(L);
    const uint32_t nq = L->nq < m ? L->nq : m;
    const uint64_t raw_tok = 2 * q->raw_row * sizeof(uint16_t);
    uint64_t codes = 0;
    for (uint32_t h = 0; h < q->g->n_kv; h++)
        codes += (uint64_t)q->lf[layer].k[h].row_bytes + q->lf[layer].v[h].row_bytes;
    /* quantized tokens' codes, raw rows (live and pending), sinks */
    return (uint64_t)nq * codes + (uint64_t)(m - L->raw_from) * raw_tok +
           (uint64_t)L->n_sink * raw_tok;
}
