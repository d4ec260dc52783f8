/*
 * The paged latent store: append projects keys and values to latents (one
 * GEMM per group and K/V for the whole batch) and stores the rows in
 * blocks; truncate frees whole blocks; fork copies. Append is
 * all-or-nothing: every block, table and position array is allocated
 * before the first row is written.
 */
#include <string.h>

#include <cblas.h>

#include "lowrank.h"

uint32_t lr_off_k(const lr_layer *L, uint32_t g)
{
    return g * (L->rk + L->rv);
}

uint32_t lr_off_v(const lr_layer *L, uint32_t g)
{
    return g * (L->rk + L->rv) + L->rk;
}

void lr_read_row(const kvc_instance *in, uint32_t layer, const lr_block *bk, uint32_t i,
                 float *dst)
{
    size_t e = in->layers[layer].row_elems;
    if (in->cfg.dtype == LR_F32)
        memcpy(dst, (const float *)bk->data + (size_t)i * e, e * sizeof(float));
    else
        kvck_f16_to_f32_n((const uint16_t *)bk->data + (size_t)i * e, dst, e);
}

static void write_row(const kvc_instance *in, uint32_t layer, lr_block *bk, uint32_t i,
                      const float *src)
{
    size_t e = in->layers[layer].row_elems;
    if (in->cfg.dtype == LR_F32)
        memcpy((float *)bk->data + (size_t)i * e, src, e * sizeof(float));
    else
        kvck_f32_to_f16_n(src, (uint16_t *)bk->data + (size_t)i * e, e);
}

static void block_release(const kvc_instance *in, size_t bbytes, lr_block *b, lr_bytes *cnt)
{
    if (b->data) {
        kvcp_free(&in->host, b->data, bbytes);
        cnt->blocks -= bbytes;
    }
    if (b->pos) {
        size_t pb = (size_t)in->cfg.block_tokens * sizeof(int32_t);
        kvcp_free(&in->host, b->pos, pb);
        cnt->pos -= pb;
    }
    memset(b, 0, sizeof *b);
}

void lr_layers_release(const kvc_instance *in, lr_seq_layer *layers, lr_bytes *cnt)
{
    if (!layers)
        return;
    for (uint32_t l = 0; l < in->g.n_layers; l++) {
        lr_seq_layer *L = &layers[l];
        size_t bbytes = lr_block_bytes(in, l);
        for (uint32_t b = 0; b < L->n_blocks; b++)
            block_release(in, bbytes, &L->blocks[b], cnt);
        if (L->blocks) {
            kvcp_free(&in->host, L->blocks, (size_t)L->cap_blocks * sizeof(lr_block));
            cnt->table -= (size_t)L->cap_blocks * sizeof(lr_block);
        }
        memset(L, 0, sizeof *L);
        L->last_pos = -1;
    }
}

kvc_status lr_store_rows(const kvc_instance *in, uint32_t layer, lr_seq_layer *L, lr_bytes *cnt,
                         uint32_t n, const int32_t *positions, const float *rows)
{
    const uint32_t B = in->cfg.block_tokens;
    const size_t pos_bytes = (size_t)B * sizeof(int32_t), bbytes = lr_block_bytes(in, layer);
    const size_t e = in->layers[layer].row_elems;
    const uint64_t total = (uint64_t)L->n + n;
    const uint32_t need_blocks = (uint32_t)((total + B - 1) / B);

    lr_block *tab = L->blocks, *newtab = NULL;
    uint32_t newcap = L->cap_blocks;
    if (need_blocks > L->cap_blocks) {
        newcap = L->cap_blocks ? L->cap_blocks : LR_TABLE_INIT;
        while (newcap < need_blocks)
            newcap *= 2;
        newtab = kvcp_alloc(&in->host, (size_t)newcap * sizeof(lr_block), KVC_USAGE_CACHE);
        if (!newtab)
            return KVC_E_NOMEM;
        if (L->n_blocks)
            memcpy(newtab, tab, (size_t)L->n_blocks * sizeof(lr_block));
        tab = newtab;
    }
    uint64_t add_blocks = 0, add_pos = 0;
    int last_got_pos = 0;
    for (uint32_t b = L->n_blocks; b < need_blocks; b++) {
        tab[b].data = kvcp_alloc(&in->host, bbytes, KVC_USAGE_CACHE);
        if (!tab[b].data)
            goto nomem;
        add_blocks += bbytes;
    }
    for (uint32_t t = 0; t < n; t++) {
        uint64_t slot = (uint64_t)L->n + t;
        lr_block *fb = &tab[slot / B];
        uint32_t i = (uint32_t)(slot % B);
        if (i == 0)
            fb->pos0 = positions[t];
        else if (!fb->pos && positions[t] != fb->pos0 + (int32_t)i) {
            fb->pos = kvcp_alloc(&in->host, pos_bytes, KVC_USAGE_CACHE);
            if (!fb->pos)
                goto nomem;
            add_pos += pos_bytes;
            if (slot / B < L->n_blocks)
                last_got_pos = 1;
            for (uint32_t j = 0; j < i; j++)
                fb->pos[j] = fb->pos0 + (int32_t)j;
        }
        if (fb->pos)
            fb->pos[i] = positions[t];
    }
    /* Commit: nothing fails from here. */
    for (uint32_t t = 0; t < n; t++) {
        uint64_t slot = (uint64_t)L->n + t;
        write_row(in, layer, &tab[slot / B], (uint32_t)(slot % B), rows + (size_t)t * e);
    }
    if (newtab) {
        if (L->blocks) {
            kvcp_free(&in->host, L->blocks, (size_t)L->cap_blocks * sizeof(lr_block));
            cnt->table -= (size_t)L->cap_blocks * sizeof(lr_block);
        }
        L->blocks = newtab;
        L->cap_blocks = newcap;
        cnt->table += (size_t)newcap * sizeof(lr_block);
    }
    L->n = (uint32_t)total;
    L->n_blocks = need_blocks;
    L->last_pos = positions[n - 1];
    cnt->blocks += add_blocks;
    cnt->pos += add_pos;
    return KVC_OK;

nomem:
    for (uint32_t b = L->n_blocks; b < need_blocks; b++) {
        if (tab[b].data)
            kvcp_free(&in->host, tab[b].data, bbytes);
        if (tab[b].pos)
            kvcp_free(&in->host, tab[b].pos, pos_bytes);
        memset(&tab[b], 0, sizeof tab[b]);
    }
    if (last_got_pos) {
        lr_block *fb = &tab[L->n_blocks - 1];
        kvcp_free(&in->host, fb->pos, pos_bytes);
        fb->pos = NULL;
    }
    if (newtab)
        kvcp_free(&in->host, newtab, (size_t)newcap * sizeof(lr_block));
    return KVC_E_NOMEM;
}

/* rows [n][row_elems] = latents of k (pre- or post-RoPE as configured) and
 * v [n][n_kv][head_dim]: per group, h = x . down^T over the batch. */
static void project(const kvc_instance *in, uint32_t layer, uint32_t n, const float *k,
                    const float *v, float *rows)
{
    const lr_layer *L = &in->layers[layer];
    const int ld_in = (int)(in->g.n_kv * in->g.head_dim), ld_out = (int)L->row_elems;
    const int m = (int)in->m;
    for (uint32_t g = 0; g < in->n_groups; g++) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n, (int)L->rk, m, 1.0f,
                    k + (size_t)g * m, ld_in, L->k[g].down, m, 0.0f, rows + lr_off_k(L, g),
                    ld_out);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n, (int)L->rv, m, 1.0f,
                    v + (size_t)g * m, ld_in, L->v[g].down, m, 0.0f, rows + lr_off_v(L, g),
                    ld_out);
    }
}

kvc_status lr_append(kvc_seq *s, uint32_t layer, uint32_t n, const int32_t *positions,
                     const void *k_pre, const void *v, const uint8_t *flags)
{
    (void)flags; /* every token is kept */
    if (!s)
        return KVC_E_INVALID;
    const kvc_instance *in = s->inst;
    const kvcp_geom *g = &in->g;
    if (layer >= g->n_layers)
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_INVALID, "append: layer %u >= n_layers %u",
                         layer, g->n_layers);
    if (!in->layers[layer].finalized)
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_STATE,
                         "append: layer %u has no factors yet (prepare and finalize it, or "
                         "create from an artifact)", layer);
    if (n == 0 || n > g->max_positions)
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_INVALID,
                         "append: token count %u is not in [1, max_positions %u]", n,
                         g->max_positions);
    if (!positions || !k_pre || !v)
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_INVALID,
                         "append: positions, k_pre and v must not be NULL");
    lr_seq_layer *L = &s->layers[layer];
    kvc_status st = kvcp_check_positions(g, positions, n, L->last_pos, s->msg, sizeof s->msg);
    if (st)
        return st;
    const size_t count = (size_t)n * g->n_kv * g->head_dim;
    if (!kvck_all_finite(k_pre, count) || !kvck_all_finite(v, count))
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_INVALID,
                         "append: k_pre or v holds NaN or Inf (layer %u)", layer);
    const int post = in->cfg.key_space == LR_POST_ROPE;
    const size_t e = in->layers[layer].row_elems;
    size_t bytes = ((size_t)n * e + (post ? count : 0)) * sizeof(float);
    float *scratch = kvcp_alloc(&in->host, bytes, KVC_USAGE_SCRATCH);
    if (!scratch)
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_NOMEM,
                         "append: out of memory for %u tokens' latents", n);
    float *rows = scratch;              /* [n][row_elems] */
    const float *keys = k_pre;
    if (post) {
        float *k_rot = scratch + (size_t)n * e; /* [n][n_kv][head_dim] */
        kvck_rope_apply(&g->rope, n, g->n_kv, positions, k_pre, k_rot);
        keys = k_rot;
    }
    project(in, layer, n, keys, v, rows);
    st = lr_store_rows(in, layer, L, &s->bytes, n, positions, rows);
    kvcp_free(&in->host, scratch, bytes);
    if (st)
        return kvcp_fail(s->msg, sizeof s->msg, st,
                         "append: out of memory for %u tokens on layer %u (nothing appended)", n,
                         layer);
    return KVC_OK;
}

static uint32_t count_before(const kvc_instance *in, const lr_seq_layer *L, int32_t position)
{
    const uint32_t B = in->cfg.block_tokens;
    uint32_t keep = 0;
    for (uint32_t b = 0; b < L->n_blocks; b++) {
        const lr_block *fb = &L->blocks[b];
        uint32_t in_block = (b + 1 == L->n_blocks) ? L->n - b * B : B;
        for (uint32_t i = 0; i < in_block; i++) {
            if (lr_block_pos(fb, i) >= position)
                return keep;
            keep++;
        }
    }
    return keep;
}

kvc_status lr_truncate(kvc_seq *s, int32_t position)
{
    if (!s)
        return KVC_E_INVALID;
    const kvc_instance *in = s->inst;
    const uint32_t B = in->cfg.block_tokens;
    for (uint32_t l = 0; l < in->g.n_layers; l++) {
        lr_seq_layer *L = &s->layers[l];
        if (L->n == 0 || L->last_pos < position)
            continue;
        uint32_t keep = position <= 0 ? 0 : count_before(in, L, position);
        uint32_t keep_blocks = (keep + B - 1) / B;
        size_t bbytes = lr_block_bytes(in, l);
        for (uint32_t b = keep_blocks; b < L->n_blocks; b++)
            block_release(in, bbytes, &L->blocks[b], &s->bytes);
        L->n = keep;
        L->n_blocks = keep_blocks;
        if (keep == 0) {
            kvcp_free(&in->host, L->blocks, (size_t)L->cap_blocks * sizeof(lr_block));
            s->bytes.table -= (size_t)L->cap_blocks * sizeof(lr_block);
            L->blocks = NULL;
            L->cap_blocks = 0;
            L->last_pos = -1;
        } else {
            L->last_pos = lr_block_pos(&L->blocks[(keep - 1) / B], (keep - 1) % B);
        }
    }
    return KVC_OK;
}

kvc_status lr_fork(const kvc_seq *src, kvc_seq *dst)
{
    if (!src || !dst)
        return KVC_E_INVALID;
    if (src == dst)
        return KVC_OK;
    const kvc_instance *in = src->inst;
    if (dst->inst != in)
        return kvcp_fail(dst->msg, sizeof dst->msg, KVC_E_INVALID,
                         "fork: source and destination belong to different instances");
    const size_t pos_bytes = (size_t)in->cfg.block_tokens * sizeof(int32_t);
    const size_t layers_bytes = (size_t)in->g.n_layers * sizeof(lr_seq_layer);
    lr_seq_layer *copy = kvcp_alloc(&in->host, layers_bytes, KVC_USAGE_CACHE);
    lr_bytes cnt = {0, 0, 0};
    if (!copy)
        goto nomem;
    for (uint32_t l = 0; l < in->g.n_layers; l++)
        copy[l].last_pos = -1;
    for (uint32_t l = 0; l < in->g.n_layers; l++) {
        const lr_seq_layer *S = &src->layers[l];
        lr_seq_layer *D = &copy[l];
        const size_t bbytes = lr_block_bytes(in, l);
        if (!S->n_blocks)
            continue;
        D->blocks = kvcp_alloc(&in->host, (size_t)S->cap_blocks * sizeof(lr_block),
                               KVC_USAGE_CACHE);
        if (!D->blocks)
            goto nomem;
        D->cap_blocks = S->cap_blocks;
        cnt.table += (size_t)S->cap_blocks * sizeof(lr_block);
        for (uint32_t b = 0; b < S->n_blocks; b++) {
            lr_block *db = &D->blocks[b];
            const lr_block *sb = &S->blocks[b];
            db->pos0 = sb->pos0;
            db->data = kvcp_alloc(&in->host, bbytes, KVC_USAGE_CACHE);
            if (!db->data)
                goto nomem;
            D->n_blocks = b + 1;
            cnt.blocks += bbytes;
            memcpy(db->data, sb->data, bbytes);
            if (sb->pos) {
                db->pos = kvcp_alloc(&in->host, pos_bytes, KVC_USAGE_CACHE);
                if (!db->pos)
                    goto nomem;
                cnt.pos += pos_bytes;
                memcpy(db->pos, sb->pos, pos_bytes);
            }
        }
        D->n = S->n;
        D->last_pos = S->last_pos;
    }
    lr_layers_release(in, dst->layers, &dst->bytes);
    kvcp_free(&in->host, dst->layers, layers_bytes);
    dst->layers = copy;
    dst->bytes = cnt;
    return KVC_OK;

nomem:
    if (copy) {
        lr_layers_release(in, copy, &cnt);
        kvcp_free(&in->host, copy, layers_bytes);
    }
    return kvcp_fail(dst->msg, sizeof dst->msg, KVC_E_NOMEM, "fork: out of memory (dst unchanged)");
}
