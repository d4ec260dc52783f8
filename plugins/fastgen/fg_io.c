/*
 * kvc-fastgen.so fork, export, import. Export payload (format 2,
 * little-endian):
 *   geometry record (kvcp_geom_write)
 *   config: u32 dtype, u32 block_tokens, f32 T, r_local, r_frequent,
 *           kv_ratio, u32 n_cand, (u32 bits, f32 scale)[n_cand],
 *           u32 k_bits, v_bits, group, k_had, v_had (0 unquantized)
 *   per layer: u32 profiled, u64 n_seen, i32 last_pos, i32 last_step_pos,
 *     u32 n_runs, u32 cap_runs, (i32 pos0, u32 n)[n_runs],
 *     per KV head: u32 policy, f32 recovered, f32 share, f32 scale, u32 n,
 *       u32 cap_blocks, u32 spare_blocks,
 *       per kept token: i32 pos, f32 score, u8 flags, K and V storage rows (values
 *       of the storage type, or codes then fp16 scales and zero points)
 *     u32 n_pending, per pending token: i32 pos, u8 flags,
 *       K [n_kv][d], V [n_kv][d] (storage type)
 * Everything is exported as held (cumulative scores and policies too), so
 * an imported sequence continues exactly as the exported one would; the
 * tables' capacities and the spare blocks too (format 2), so its stats are
 * the same: budget mode evicts, so a head's table is sized by its peak, not
 * by what it holds when exported.
 */
#include <string.h>

#include "fastgen.h"

/* ---- export -------------------------------------------------------------------- */

static void write_config(kvcp_writer *w, const fg_config *c)
{
    kvcp_w_u32(w, (uint32_t)c->dtype);
    kvcp_w_u32(w, c->block_tokens);
    kvcp_w_f32(w, (float)c->T);
    kvcp_w_f32(w, (float)c->r_local);
    kvcp_w_f32(w, (float)c->r_frequent);
    kvcp_w_f32(w, (float)c->kv_ratio);
    kvcp_w_u32(w, c->n_cand);
    for (uint32_t i = 0; i < c->n_cand; i++) {
        kvcp_w_u32(w, c->cand[i]);
        kvcp_w_f32(w, c->cand_scale[i]);
    }
    kvcp_w_u32(w, c->k_bits);
    kvcp_w_u32(w, c->v_bits);
    kvcp_w_u32(w, c->group);
    kvcp_w_u32(w, c->k_had);
    kvcp_w_u32(w, c->v_had);
}

static void write_payload(void *ctx, kvcp_writer *w)
{
    const kvc_seq *s = ctx;
    const kvc_instance *in = s->inst;
    const kvcp_geom *g = &in->g;
    const uint32_t B = in->cfg.block_tokens;
    const size_t prow = (size_t)g->n_kv * g->head_dim * in->elem;
    kvcp_geom_write(w, g);
    write_config(w, &in->cfg);
    for (uint32_t l = 0; l < g->n_layers; l++) {
        const fg_layer *L = &s->layers[l];
        kvcp_w_u32(w, (uint32_t)L->profiled);
        kvcp_w_u64(w, L->n_seen);
        kvcp_w_i32(w, L->last_pos);
        kvcp_w_i32(w, L->last_step_pos);
        kvcp_w_u32(w, L->n_runs);
        kvcp_w_u32(w, L->cap_runs);
        for (uint32_t r = 0; r < L->n_runs; r++) {
            kvcp_w_i32(w, L->runs[r].pos0);
            kvcp_w_u32(w, L->runs[r].n);
        }
        for (uint32_t h = 0; h < g->n_kv; h++) {
            const fg_head *hd = &L->heads[h];
            kvcp_w_u32(w, hd->policy);
            kvcp_w_f32(w, hd->recovered);
            kvcp_w_f32(w, hd->share);
            kvcp_w_f32(w, hd->scale);
            kvcp_w_u32(w, hd->n);
            kvcp_w_u32(w, hd->cap_blocks);
            kvcp_w_u32(w, hd->n_spare);
            for (uint32_t j = 0; j < hd->n; j++) {
                void *blk = hd->blocks[j / B];
                uint32_t i = j % B;
                kvcp_w_i32(w, fg_blk_pos(in, blk)[i]);
                kvcp_w_f32(w, fg_blk_score(in, blk)[i]);
                kvcp_w_bytes(w, &fg_blk_flags(in, blk)[i], 1);
                kvcp_w_bytes(w, (char *)fg_blk_k(in, blk) + i * in->krow, in->krow);
                kvcp_w_bytes(w, (char *)fg_blk_ksz(in, blk) + i * in->kszb, in->kszb);
                kvcp_w_bytes(w, (char *)fg_blk_v(in, blk) + i * in->vrow, in->vrow);
                kvcp_w_bytes(w, (char *)fg_blk_vsz(in, blk) + i * in->vszb, in->vszb);
            }
        }
        kvcp_w_u32(w, L->n_pending);
        for (const fg_pending *c = L->pend; c; c = c->next)
            for (uint32_t t = c->used; t < c->n; t++) {
                kvcp_w_i32(w, c->pos[t]);
                kvcp_w_bytes(w, &c->flags[t], 1);
                kvcp_w_bytes(w, (char *)c->k + t * prow, prow);
                kvcp_w_bytes(w, (char *)c->v + t * prow, prow);
            }
    }
}

kvc_status fg_export(kvc_seq *s, void *buf, size_t buf_size, size_t *size)
{
    if (!s)
        return KVC_E_INVALID;
    return kvcp_blob_write(write_payload, s, KVCP_BLOB_SEQUENCE, FG_EXPORT_VERSION, FG_ID, buf,
                           buf_size, size, "export", s->msg, sizeof s->msg);
}

/* ---- import -------------------------------------------------------------------- */

#define CORRUPT(...) kvcp_fail(s->msg, sizeof s->msg, KVC_E_CORRUPT, __VA_ARGS__)

static kvc_status read_config(kvc_seq *s, kvcp_reader *r)
{
    const fg_config *c = &s->inst->cfg;
    kvcp_writer w;
    uint8_t mine[24 * 4 + 8 * FG_MAX_CAND_ALL];
    kvcp_w_init(&w, mine, sizeof mine);
    write_config(&w, c);
    const void *theirs = kvcp_r_view(r, w.pos);
    if (!theirs)
        return CORRUPT("import: blob ends in the configuration record");
    if (memcmp(theirs, mine, w.pos))
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_INVALID,
                         "import: the blob was exported with other options (dtype, "
                         "block_tokens, T, r_local, r_frequent, kv_ratio or policies differ)");
    return KVC_OK;
}

/* 1 when the n bytes of fp16 scales and zero points at p are finite. */
static int scales_finite(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i + 1 < n; i += 2)
        if ((p[i + 1] & 0x7c) == 0x7c)
            return 0;
    return 1;
}

static kvc_status read_layer(kvc_seq *s, kvc_seq *t, kvcp_reader *r, uint32_t l)
{
    const kvc_instance *in = s->inst;
    const kvcp_geom *g = &in->g;
    const size_t prow = (size_t)g->n_kv * g->head_dim * in->elem;
    fg_layer *L = &t->layers[l];
    L->profiled = kvcp_r_u32(r) != 0;
    L->n_seen = kvcp_r_u64(r);
    L->last_pos = kvcp_r_i32(r);
    L->last_step_pos = kvcp_r_i32(r);
    uint32_t n_runs = kvcp_r_u32(r), cap_runs = kvcp_r_u32(r);
    /* Capacities grow by doubling, from 2 runs and 4 blocks. */
    if (r->err || n_runs > L->n_seen || n_runs > g->max_positions || cap_runs < n_runs ||
        cap_runs > 2 * (uint64_t)g->max_positions + 2)
        return CORRUPT("import: layer %u header is damaged", l);
    if (fg_runs_table(in, L, &t->bytes, cap_runs))
        return KVC_E_NOMEM;
    uint64_t total = 0;
    int64_t prev = -1;
    for (uint32_t i = 0; i < n_runs; i++) {
        int32_t p0 = kvcp_r_i32(r);
        uint32_t n = kvcp_r_u32(r);
        if (r->err || n == 0 || p0 <= prev || (uint64_t)p0 + n > g->max_positions)
            return CORRUPT("import: layer %u position runs are damaged", l);
        L->runs[L->n_runs++] = (fg_run){p0, n};
        total += n;
        prev = (int64_t)p0 + n - 1;
    }
    if (total != L->n_seen || prev != L->last_step_pos)
        return CORRUPT("import: layer %u counts %llu stepped tokens but its runs hold %llu", l,
                       (unsigned long long)L->n_seen, (unsigned long long)total);
    for (uint32_t h = 0; h < g->n_kv; h++) {
        fg_head *hd = &L->heads[h];
        hd->policy = kvcp_r_u32(r);
        hd->recovered = kvcp_r_f32(r);
        hd->share = kvcp_r_f32(r);
        hd->scale = kvcp_r_f32(r);
        uint32_t n = kvcp_r_u32(r), cap = kvcp_r_u32(r), spare = kvcp_r_u32(r);
        const uint32_t B = in->cfg.block_tokens;
        const uint64_t used = ((uint64_t)n + B - 1) / B,
                       most = 2 * ((uint64_t)g->max_positions / B + 2) + 4;
        if (r->err || n > L->n_seen || (hd->policy & ~31u) || !(hd->policy & 31u) ||
            !(hd->scale > 0 && hd->scale <= 1) || used + spare > cap || cap > most)
            return CORRUPT("import: layer %u head %u header is damaged", l, h);
        if (fg_head_table(in, hd, &t->bytes, cap) ||
            fg_head_reserve(in, hd, &t->bytes, (uint64_t)n + (uint64_t)spare * B))
            return KVC_E_NOMEM;
        for (uint32_t j = 0; j < n; j++) {
            int32_t pos = kvcp_r_i32(r);
            float score = kvcp_r_f32(r);
            const uint8_t *fl = kvcp_r_view(r, 1);
            const uint8_t *k = kvcp_r_view(r, in->krow + in->kszb);
            const uint8_t *v = kvcp_r_view(r, in->vrow + in->vszb);
            if (r->err || pos < 0 || pos > L->last_step_pos ||
                !scales_finite(k + in->krow, in->kszb) || !scales_finite(v + in->vrow, in->vszb))
                return CORRUPT("import: layer %u head %u token %u is damaged", l, h, j);
            fg_head_push(in, hd, k, v, pos, *fl, score);
        }
    }
    uint32_t n_pend = kvcp_r_u32(r);
    if (r->err || n_pend > g->max_positions)
        return CORRUPT("import: layer %u pending count is damaged", l);
    if (!n_pend)
        return L->last_pos == L->last_step_pos
                   ? KVC_OK
                   : CORRUPT("import: layer %u last position %d without pending tokens", l,
                             L->last_pos);
    /* Pending tokens go back as one queued chunk, in the storage type. */
    int32_t *pos = kvcp_alloc(&in->host, (size_t)n_pend * sizeof(int32_t), KVC_USAGE_SCRATCH);
    uint8_t *flags = kvcp_alloc(&in->host, n_pend, KVC_USAGE_SCRATCH);
    float *k = kvcp_alloc(&in->host, (size_t)n_pend * g->n_kv * g->head_dim * sizeof(float),
                          KVC_USAGE_SCRATCH);
    float *v = kvcp_alloc(&in->host, (size_t)n_pend * g->n_kv * g->head_dim * sizeof(float),
                          KVC_USAGE_SCRATCH);
    kvc_status st = KVC_OK;
    if (!pos || !flags || !k || !v) {
        st = KVC_E_NOMEM;
        goto done;
    }
    for (uint32_t t2 = 0; t2 < n_pend; t2++) {
        pos[t2] = kvcp_r_i32(r);
        const uint8_t *fl = kvcp_r_view(r, 1);
        const void *kr = kvcp_r_view(r, prow), *vr = kvcp_r_view(r, prow);
        if (r->err || pos[t2] <= (t2 ? pos[t2 - 1] : L->last_step_pos) ||
            (uint32_t)pos[t2] >= g->max_positions) {
            st = CORRUPT("import: layer %u pending token %u is damaged", l, t2);
            goto done;
        }
        flags[t2] = *fl;
        size_t cnt = (size_t)g->n_kv * g->head_dim;
        if (in->cfg.dtype == FG_F32) {
            memcpy(k + t2 * cnt, kr, prow);
            memcpy(v + t2 * cnt, vr, prow);
        } else {
            kvck_f16_to_f32_n(kr, k + t2 * cnt, cnt);
            kvck_f16_to_f32_n(vr, v + t2 * cnt, cnt);
        }
    }
    if (pos[n_pend - 1] != L->last_pos) {
        st = CORRUPT("import: layer %u last position %d is not its last pending token's", l,
                     L->last_pos);
        goto done;
    }
    int32_t keep_last = L->last_pos;
    st = fg_pending_push(in, L, &t->bytes, n_pend, pos, flags, k, v);
    L->last_pos = keep_last;
done:
    kvcp_free(&in->host, pos, (size_t)n_pend * sizeof(int32_t));
    kvcp_free(&in->host, flags, n_pend);
    kvcp_free(&in->host, k, (size_t)n_pend * g->n_kv * g->head_dim * sizeof(float));
    kvcp_free(&in->host, v, (size_t)n_pend * g->n_kv * g->head_dim * sizeof(float));
    return st;
}

kvc_status fg_import(kvc_seq *s, const void *blob, size_t size)
{
    if (!s)
        return KVC_E_INVALID;
    if (!blob)
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_INVALID, "import: blob is NULL");
    kvcp_reader r;
    uint32_t version;
    kvc_status st = kvcp_blob_open(blob, size, KVCP_BLOB_SEQUENCE, FG_EXPORT_VERSION, FG_ID, &r,
                                   &version, s->msg, sizeof s->msg);
    if (st)
        return st;
    if ((st = kvcp_geom_read_check(&r, &s->inst->g, s->msg, sizeof s->msg)))
        return st;
    if ((st = read_config(s, &r)))
        return st;
    kvc_seq *t = fg_seq_alloc(s->inst);
    if (!t)
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_NOMEM, "import: out of memory");
    for (uint32_t l = 0; l < s->inst->g.n_layers && !st; l++)
        st = read_layer(s, t, &r, l);
    if (!st && r.pos != r.size)
        st = CORRUPT("import: %zu bytes left after the last layer", r.size - r.pos);
    if (st == KVC_E_NOMEM)
        kvcp_fail(s->msg, sizeof s->msg, st, "import: out of memory");
    if (!st)
        fg_seq_swap(s, t);
    fg_seq_free(t); /* the old contents, or the partial import */
    return st;
}

/* ---- fork ---------------------------------------------------------------------- */

static kvc_status copy_layer(const kvc_instance *in, const fg_layer *src, fg_layer *dst,
                             fg_bytes *cnt)
{
    if (src->n_runs && fg_runs_reserve(in, dst, cnt, src->n_runs))
        return KVC_E_NOMEM;
    if (src->n_runs)
        memcpy(dst->runs, src->runs, src->n_runs * sizeof(fg_run));
    dst->n_runs = src->n_runs;
    for (uint32_t h = 0; h < in->g.n_kv; h++)
        if (fg_head_copy(in, &src->heads[h], &dst->heads[h], cnt))
            return KVC_E_NOMEM;
    for (const fg_pending *c = src->pend; c; c = c->next) {
        fg_pending *d = kvcp_alloc(&in->host, c->bytes, KVC_USAGE_CACHE);
        if (!d)
            return KVC_E_NOMEM;
        memcpy(d, c, c->bytes);
        /* Re-point the arrays into the copy. */
        d->next = NULL;
        d->pos = (int32_t *)((char *)d + ((char *)c->pos - (char *)c));
        d->flags = (uint8_t *)((char *)d + ((char *)c->flags - (char *)c));
        d->k = (char *)d + ((char *)c->k - (char *)c);
        d->v = (char *)d + ((char *)c->v - (char *)c);
        if (dst->pend_tail)
            dst->pend_tail->next = d;
        else
            dst->pend = d;
        dst->pend_tail = d;
        cnt->pending += d->bytes;
    }
    dst->n_pending = src->n_pending;
    dst->profiled = src->profiled;
    dst->n_seen = src->n_seen;
    dst->last_pos = src->last_pos;
    dst->last_step_pos = src->last_step_pos;
    return KVC_OK;
}

kvc_status fg_fork(const kvc_seq *src, kvc_seq *dst)
{
    if (!src || !dst)
        return KVC_E_INVALID;
    if (src->inst != dst->inst)
        return kvcp_fail(dst->msg, sizeof dst->msg, KVC_E_INVALID,
                         "fork: the sequences belong to different instances");
    if (src == dst)
        return KVC_OK;
    kvc_instance *in = dst->inst;
    kvc_seq *t = fg_seq_alloc(in);
    if (!t)
        return kvcp_fail(dst->msg, sizeof dst->msg, KVC_E_NOMEM, "fork: out of memory");
    kvc_status st = KVC_OK;
    for (uint32_t l = 0; l < in->g.n_layers && !st; l++)
        st = copy_layer(in, &src->layers[l], &t->layers[l], &t->bytes);
    if (st)
        kvcp_fail(dst->msg, sizeof dst->msg, st, "fork: out of memory");
    else
        fg_seq_swap(dst, t);
    fg_seq_free(t);
    return st;
}
