/*
 * The quantized store's layers in sequence blobs (qstore.h). Per layer,
 * little-endian:
 *   u32 n, n_sink, kq, vq, kraw_from, vraw_from
 *   i32 positions [n]
 *   sinks: K rows [n_sink][n_kv][d] fp16, then V rows
 *   per Q block b (b * block < max(kq, vq)), per head, with rk and rv the rows of
 *   b whose key / value is quantized (a per-channel key block: all or
 *   none):
 *     u32 k_nout, v_nout
 *     K codes [rk][row_bytes], K scales (per channel: [d][2] when rk > 0;
 *     per token: [rk][groups][2]) fp16, K outliers [k_nout] (u16 j, c,
 *     value), V codes [rv][row_bytes], V scales [rv][groups][2], V
 *     outliers [v_nout]
 *   raw keys of main tokens [kraw_from, main): per token, per head, a raw
 *   key row (fp16 [d], or 8-bit codes [d]); raw values of [vraw_from,
 *   main): per token, per head, fp16 [d], or 8-bit codes [d] and their
 *   fp16 scale and zero.
 * Only what the tokens use is written, so equal contents give equal bytes.
 */
#include <string.h>

#include "qs_internal.h"

static void w_u16s(kvcp_writer *w, const uint16_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        uint8_t b[2] = {(uint8_t)(p[i] & 0xff), (uint8_t)(p[i] >> 8)};
        kvcp_w_bytes(w, b, 2);
    }
}

static void r_u16s(const uint8_t *src, uint16_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (uint16_t)(src[2 * i] | (src[2 * i + 1] << 8));
}

static void w_outs(kvcp_writer *w, const kvck_qout *o, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++) {
        uint16_t v[3] = {o[i].j, o[i].c, o[i].value};
        w_u16s(w, v, 3);
    }
}

/* Rows of block b whose key (value) is quantized. */
static uint32_t rows_of(const kvcp_qs *q, uint32_t nq, uint32_t b)
{
    uint32_t r = nq > b * q->o.block ? nq - b * q->o.block : 0;
    return r < q->o.block ? r : q->o.block;
}
static uint32_t key_rows(const kvcp_qs *q, const kvcp_qs_layer *L, uint32_t b)
{
    uint32_t r = rows_of(q, L->kq, b);
    return q->o.k_mode == KVCK_QS_CHANNEL && r ? q->o.block : r;
}
static size_t key_scales(const kvcp_qs *q, const kvck_qfmt *f, uint32_t rk)
{
    return q->o.k_mode == KVCK_QS_CHANNEL ? (rk ? kvck_q_scale_bytes(f, KVCK_QS_CHANNEL, 1) : 0)
                                          : kvck_q_scale_bytes(f, KVCK_QS_TOKEN, rk);
}

void kvcp_qs_write(const kvcp_qs *q, const kvcp_qs_layer *L, uint32_t layer, kvcp_writer *w)
{
    const uint32_t B = q->o.block, d = q->g->head_dim, H = q->g->n_kv, m = qs_main(L);
    const kvcp_qs_lfmt *lf = &q->lf[layer];
    kvcp_w_u32(w, L->n);
    kvcp_w_u32(w, L->n_sink);
    kvcp_w_u32(w, L->kq);
    kvcp_w_u32(w, L->vq);
    kvcp_w_u32(w, L->kraw_from);
    kvcp_w_u32(w, L->vraw_from);
    for (uint32_t i = 0; i < L->n; i++)
        kvcp_w_i32(w, kvcp_qs_pos(q, L, i));
    if (L->n_sink) {
        w_u16s(w, qs_sink_k(q, L, 0), (size_t)L->n_sink * q->row);
        w_u16s(w, qs_sink_v(q, L, 0), (size_t)L->n_sink * q->row);
    }
    const uint32_t q_end = L->vq > L->kq ? L->vq : L->kq;
    for (uint32_t b = 0; b * B < q_end; b++) {
        const uint32_t rk = key_rows(q, L, b), rv = rows_of(q, L->vq, b);
        for (uint32_t h = 0; h < H; h++) {
            qs_qhead p;
            qs_qhead_at(q, layer, L->blocks[b].q, h, &p);
            const kvck_qfmt *kf = &lf->k[h], *vf = &lf->v[h];
            kvcp_w_u32(w, *p.k_nout);
            kvcp_w_u32(w, *p.v_nout);
            kvcp_w_bytes(w, p.k_codes, (size_t)rk * kf->row_bytes);
            w_u16s(w, p.k_sz, key_scales(q, kf, rk) / 2);
            w_outs(w, p.k_out, *p.k_nout);
            kvcp_w_bytes(w, p.v_codes, (size_t)rv * vf->row_bytes);
            w_u16s(w, p.v_sz, kvck_q_scale_bytes(vf, KVCK_QS_TOKEN, rv) / 2);
            w_outs(w, p.v_out, *p.v_nout);
        }
    }
    for (uint32_t t = L->kraw_from; t < m; t++)
        for (uint32_t h = 0; h < H; h++)
            kvcp_w_bytes(w, qs_rawk(q, &L->blocks[t / B], h) + (size_t)(t % B) * q->rawk_row,
                         q->rawk_row);
    for (uint32_t t = L->vraw_from; t < m; t++)
        for (uint32_t h = 0; h < H; h++) {
            const kvcp_qs_block *blk = &L->blocks[t / B];
            const uint8_t *row = qs_rawv(q, blk, h) + (size_t)(t % B) * q->rawv_row;
            if (q->o.v_raw8) {
                kvcp_w_bytes(w, row, q->rawv_row);
                w_u16s(w, qs_rawv_sz(q, blk, h) + 2 * (size_t)(t % B), 2);
            } else {
                w_u16s(w, (const uint16_t *)row, d);
            }
        }
}

/* 1 when every fp16 value of p [n] is finite. */
static int f16_finite(const uint16_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if ((p[i] & 0x7c00u) == 0x7c00u)
            return 0;
    return 1;
}

#define CORRUPT(...) (st = kvcp_fail(msg, cap, KVC_E_CORRUPT, __VA_ARGS__))

/* Reads n fp16 values into dst, checking they are finite. */
static int read_f16(kvcp_reader *r, uint16_t *dst, size_t n)
{
    const uint8_t *src = kvcp_r_view(r, n * 2);
    if (!src)
        return -1;
    r_u16s(src, dst, n);
    return f16_finite(dst, n) ? 0 : -1;
}

static int read_bytes(kvcp_reader *r, void *dst, size_t n)
{
    const uint8_t *src = kvcp_r_view(r, n);
    if (!src)
        return -1;
    memcpy(dst, src, n);
    return 0;
}

static int read_outs(kvcp_reader *r, kvck_qout *o, uint32_t n, uint32_t rows, uint32_t d)
{
    const uint8_t *src = kvcp_r_view(r, (size_t)n * 6);
    if (!src)
        return -1;
    for (uint32_t i = 0; i < n; i++) {
        uint16_t v[3];
        r_u16s(src + 6 * (size_t)i, v, 3);
        if (v[0] >= rows || v[1] >= d || (v[2] & 0x7c00u) == 0x7c00u ||
            (i && v[0] < o[i - 1].j))
            return -1;
        o[i] = (kvck_qout){v[0], v[1], v[2], 0};
    }
    return 0;
}

/* The counts of a layer record are consistent: sinks as the length
 * implies, kraw_from <= kq <= main, vraw_from <= vq <= main, at least what
 * the length quantizes (more is allowed: a truncate keeps quantized rows
 * quantized). */
static int counts_ok(const kvcp_qs *q, uint32_t n, uint32_t n_sink, uint32_t kq, uint32_t vq,
                     uint32_t kraw, uint32_t vraw)
{
    const uint32_t sink = n < q->o.sink ? n : q->o.sink;
    if (n > q->g->max_positions || n_sink != sink)
        return 0;
    const uint32_t m = n - n_sink;
    return kraw <= kq && kq <= m && vq <= m && vraw <= vq && kq >= kvcp_qs_kq_count(q, n) &&
           vq >= kvcp_qs_vq_count(q, n);
}

kvc_status kvcp_qs_read(const kvcp_qs *q, kvcp_qs_layer *L, kvcp_qs_bytes *cnt, uint32_t layer,
                        kvcp_reader *r, char *msg, size_t cap)
{
    const kvcp_geom *g = q->g;
    const uint32_t B = q->o.block, d = g->head_dim, H = g->n_kv;
    const kvcp_qs_lfmt *lf = &q->lf[layer];
    kvc_status st = KVC_OK;
    int32_t *pos = NULL;
    size_t pos_alloc = 0;
    uint32_t n = kvcp_r_u32(r), n_sink = kvcp_r_u32(r), kq = kvcp_r_u32(r), vq = kvcp_r_u32(r),
             kraw = kvcp_r_u32(r), vraw = kvcp_r_u32(r);
    if (r->err)
        return CORRUPT("import: blob ends at layer %u", layer);
    if (!counts_ok(q, n, n_sink, kq, vq, kraw, vraw))
        return CORRUPT("import: layer %u: inconsistent counts (n %u, sinks %u, quantized keys "
                       "%u values %u, raw from %u / %u)",
                       layer, n, n_sink, kq, vq, kraw, vraw);
    if (n == 0)
        return KVC_OK;
    const uint8_t *praw = kvcp_r_view(r, (size_t)n * 4);
    if (!praw)
        return CORRUPT("import: blob ends inside layer %u's positions", layer);
    pos_alloc = (size_t)n * sizeof(int32_t);
    if (!(pos = kvcp_alloc(q->host, pos_alloc, KVC_USAGE_SCRATCH)))
        return kvcp_fail(msg, cap, KVC_E_NOMEM, "import: out of memory (layer %u)", layer);
    if ((st = kvcp_import_positions(g, praw, n, layer, pos, msg, cap)))
        goto out;
    const uint32_t m = n - n_sink, nb = (m + B - 1) / B;
    if (n_sink) {
        if (!(L->sink_kv = kvcp_alloc(q->host, qs_sink_bytes(q), KVC_USAGE_CACHE)))
            goto nomem;
        L->sink_pos = (int32_t *)(L->sink_kv + 2 * (size_t)q->o.sink * q->row);
        cnt->sink += qs_sink_bytes(q);
        memcpy(L->sink_pos, pos, (size_t)n_sink * sizeof(int32_t));
        if (read_f16(r, qs_sink_k(q, L, 0), (size_t)n_sink * q->row) ||
            read_f16(r, qs_sink_v(q, L, 0), (size_t)n_sink * q->row)) {
            CORRUPT("import: layer %u: sink rows damaged or truncated", layer);
            goto out;
        }
    }
    if (nb) {
        uint32_t c = KVCP_TABLE_INIT;
        while (c < nb)
            c *= 2;
        if (!(L->blocks = kvcp_alloc(q->host, (size_t)c * sizeof(kvcp_qs_block), KVC_USAGE_CACHE)))
            goto nomem;
        L->cap_blocks = c;
        cnt->table += (size_t)c * sizeof(kvcp_qs_block);
    }
    L->n = n;
    L->n_sink = n_sink;
    L->kq = kq;
    L->vq = vq;
    L->kraw_from = kraw;
    L->vraw_from = vraw;
    L->last_pos = pos[n - 1];
    /* Blocks as an append would have left them. */
    for (uint32_t b = 0; b < nb; b++) {
        kvcp_qs_block *blk = &L->blocks[b];
        const uint32_t cntb = m - b * B < B ? m - b * B : B;
        const int32_t *bp = pos + n_sink + (size_t)b * B;
        L->n_blocks = b + 1;
        blk->pos0 = bp[0];
        int gap = 0;
        for (uint32_t i = 1; i < cntb; i++)
            gap |= bp[i] != bp[0] + (int32_t)i;
        if (gap) {
            if (!(blk->pos = kvcp_alloc(q->host, (size_t)B * sizeof(int32_t), KVC_USAGE_CACHE)))
                goto nomem;
            cnt->pos += (size_t)B * sizeof(int32_t);
            memcpy(blk->pos, bp, (size_t)cntb * sizeof(int32_t));
        }
        if (b * B < vq || b * B < kq) {
            if (!(blk->q = kvcp_alloc(q->host, lf->q_bytes, KVC_USAGE_CACHE)))
                goto nomem;
            cnt->q += lf->q_bytes;
        }
        if (b * B + cntb > kraw) { /* holds a token with a raw key */
            if (!(blk->rawk = kvcp_alloc(q->host, q->rawk_bytes, KVC_USAGE_CACHE)))
                goto nomem;
            cnt->raw += q->rawk_bytes;
        }
        if (b * B + cntb > vraw) {
            if (!(blk->rawv = kvcp_alloc(q->host, q->rawv_bytes, KVC_USAGE_CACHE)))
                goto nomem;
            cnt->raw += q->rawv_bytes;
        }
    }
    for (uint32_t b = 0; b * B < vq || b * B < kq; b++) {
        const uint32_t rk = key_rows(q, L, b), rv = rows_of(q, vq, b);
        for (uint32_t h = 0; h < H; h++) {
            qs_qhead p;
            qs_qhead_at(q, layer, L->blocks[b].q, h, &p);
            const kvck_qfmt *kf = &lf->k[h], *vf = &lf->v[h];
            *p.k_nout = kvcp_r_u32(r);
            *p.v_nout = kvcp_r_u32(r);
            if (r->err || *p.k_nout > lf->k_out_cap || *p.v_nout > lf->v_out_cap ||
                read_bytes(r, p.k_codes, (size_t)rk * kf->row_bytes) ||
                read_f16(r, p.k_sz, key_scales(q, kf, rk) / 2) ||
                read_outs(r, p.k_out, *p.k_nout, rk, d) ||
                read_bytes(r, p.v_codes, (size_t)rv * vf->row_bytes) ||
                read_f16(r, p.v_sz, kvck_q_scale_bytes(vf, KVCK_QS_TOKEN, rv) / 2) ||
                read_outs(r, p.v_out, *p.v_nout, rv, d)) {
                CORRUPT("import: layer %u block %u head %u: quantized rows damaged or truncated",
                        layer, b, h);
                goto out;
            }
        }
    }
    for (uint32_t t = kraw; t < m; t++)
        for (uint32_t h = 0; h < H; h++) {
            uint8_t *dst = qs_rawk(q, &L->blocks[t / B], h) + (size_t)(t % B) * q->rawk_row;
            int bad = q->raw_sz ? read_bytes(r, dst, q->rawk_row) : read_f16(r, (uint16_t *)dst, d);
            if (bad) {
                CORRUPT("import: layer %u: raw keys damaged or truncated", layer);
                goto out;
            }
        }
    for (uint32_t t = vraw; t < m; t++)
        for (uint32_t h = 0; h < H; h++) {
            const kvcp_qs_block *blk = &L->blocks[t / B];
            uint8_t *row = qs_rawv(q, blk, h) + (size_t)(t % B) * q->rawv_row;
            int bad = q->o.v_raw8 ? read_bytes(r, row, q->rawv_row) ||
                                        read_f16(r, qs_rawv_sz(q, blk, h) + 2 * (size_t)(t % B), 2)
                                  : read_f16(r, (uint16_t *)row, d);
            if (bad) {
                CORRUPT("import: layer %u: raw values damaged or truncated", layer);
                goto out;
            }
        }
    goto out;
nomem:
    st = kvcp_fail(msg, cap, KVC_E_NOMEM, "import: out of memory (layer %u)", layer);
out:
    kvcp_free(q->host, pos, pos_alloc);
    if (st)
        kvcp_qs_release(q, L, cnt, layer);
    return st;
}
