/*
 * kvc-full.so storage: paged blocks per layer. Append is all-or-nothing:
 * every block, table and position array it needs is allocated before the
 * first value is written, so an allocation failure leaves the sequence as
 * it was.
 */
#include <string.h>

#include "full.h"

static void write_row(const kvc_instance *in, void *base, uint32_t i, const float *src)
{
    size_t d = in->g.head_dim;
    if (in->dtype == FULL_F32)
        memcpy((float *)base + (size_t)i * d, src, d * sizeof(float));
    else
        kvck_f32_to_f16_n(src, (uint16_t *)base + (size_t)i * d, d);
}

void full_read_row(const kvc_instance *in, const void *base, uint32_t i, float *dst)
{
    size_t d = in->g.head_dim;
    if (in->dtype == FULL_F32)
        memcpy(dst, (const float *)base + (size_t)i * d, d * sizeof(float));
    else
        kvck_f16_to_f32_n((const uint16_t *)base + (size_t)i * d, dst, d);
}

static void block_release(const kvc_instance *in, full_block *b, uint64_t *bytes_blocks,
                          uint64_t *bytes_pos)
{
    if (b->kv) {
        kvcp_free(&in->host, b->kv, in->block_bytes);
        *bytes_blocks -= in->block_bytes;
    }
    if (b->pos) {
        kvcp_free(&in->host, b->pos, (size_t)in->block_tokens * sizeof(int32_t));
        *bytes_pos -= (size_t)in->block_tokens * sizeof(int32_t);
    }
    memset(b, 0, sizeof *b);
}

void full_layers_release(const kvc_instance *in, full_layer *layers, uint64_t *bytes_blocks,
                         uint64_t *bytes_pos, uint64_t *bytes_table)
{
    if (!layers)
        return;
    for (uint32_t l = 0; l < in->g.n_layers; l++) {
        full_layer *L = &layers[l];
        for (uint32_t b = 0; b < L->n_blocks; b++)
            block_release(in, &L->blocks[b], bytes_blocks, bytes_pos);
        if (L->blocks) {
            kvcp_free(&in->host, L->blocks, (size_t)L->cap_blocks * sizeof(full_block));
            *bytes_table -= (size_t)L->cap_blocks * sizeof(full_block);
        }
        memset(L, 0, sizeof *L);
        L->last_pos = -1;
    }
}

kvc_status full_store_rotated(const kvc_instance *in, full_layer *L, uint64_t *bytes_blocks,
                              uint64_t *bytes_pos, uint64_t *bytes_table, uint32_t n,
                              const int32_t *positions, const float *k_rot, const float *v)
{
    const uint32_t B = in->block_tokens;
    const size_t pos_bytes = (size_t)B * sizeof(int32_t);
    const uint64_t total = (uint64_t)L->n + n;
    const uint32_t need_blocks = (uint32_t)((total + B - 1) / B);

    /* 1. The block table, doubled until it fits. */
    full_block *tab = L->blocks;
    full_block *newtab = NULL;
    uint32_t newcap = L->cap_blocks;
    if (need_blocks > L->cap_blocks) {
        newcap = L->cap_blocks ? L->cap_blocks : FULL_TABLE_INIT;
        while (newcap < need_blocks)
            newcap *= 2;
        newtab = kvcp_alloc(&in->host, (size_t)newcap * sizeof(full_block), KVC_USAGE_CACHE);
        if (!newtab)
            return KVC_E_NOMEM;
        if (L->n_blocks)
            memcpy(newtab, tab, (size_t)L->n_blocks * sizeof(full_block));
        tab = newtab;
    }

    /* 2. New blocks, and position arrays where a gap appears. */
    uint64_t add_blocks = 0, add_pos = 0;
    int last_got_pos = 0; /* the existing partial block got a position array */
    for (uint32_t b = L->n_blocks; b < need_blocks; b++) {
        tab[b].kv = kvcp_alloc(&in->host, in->block_bytes, KVC_USAGE_CACHE);
        if (!tab[b].kv)
            goto nomem;
        add_blocks += in->block_bytes;
    }
    for (uint32_t t = 0; t < n; t++) {
        uint64_t slot = (uint64_t)L->n + t;
        full_block *fb = &tab[slot / B];
        uint32_t i = (uint32_t)(slot % B);
        if (i == 0)
            fb->pos0 = positions[t]; /* a new block starts here */
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
            fb->pos[i] = positions[t]; /* a slot past L->n: harmless if we roll back */
    }

    /* 3. Commit: nothing can fail from here on. */
    for (uint32_t t = 0; t < n; t++) {
        uint64_t slot = (uint64_t)L->n + t;
        full_block *fb = &tab[slot / B];
        uint32_t i = (uint32_t)(slot % B);
        for (uint32_t h = 0; h < in->g.n_kv; h++) {
            size_t off = ((size_t)t * in->g.n_kv + h) * in->g.head_dim;
            write_row(in, full_block_k(in, fb, h), i, k_rot + off);
            write_row(in, full_block_v(in, fb, h), i, v + off);
        }
    }
    if (newtab) {
        if (L->blocks) {
            kvcp_free(&in->host, L->blocks, (size_t)L->cap_blocks * sizeof(full_block));
            *bytes_table -= (size_t)L->cap_blocks * sizeof(full_block);
        }
        L->blocks = newtab;
        L->cap_blocks = newcap;
        *bytes_table += (size_t)newcap * sizeof(full_block);
    }
    L->n = (uint32_t)total;
    L->n_blocks = need_blocks;
    L->last_pos = positions[n - 1];
    *bytes_blocks += add_blocks;
    *bytes_pos += add_pos;
    return KVC_OK;

nomem:
    for (uint32_t b = L->n_blocks; b < need_blocks; b++) {
        if (tab[b].kv)
            kvcp_free(&in->host, tab[b].kv, in->block_bytes);
        if (tab[b].pos)
            kvcp_free(&in->host, tab[b].pos, pos_bytes);
        memset(&tab[b], 0, sizeof tab[b]);
    }
    if (last_got_pos) {
        full_block *fb = &tab[L->n_blocks - 1];
        kvcp_free(&in->host, fb->pos, pos_bytes);
        fb->pos = NULL;
    }
    if (newtab)
        kvcp_free(&in->host, newtab, (size_t)newcap * sizeof(full_block));
    return KVC_E_NOMEM;
}

kvc_status full_append(kvc_seq *s, uint32_t layer, uint32_t n, const int32_t *positions,
                       const void *k_pre, const void *v, const uint8_t *flags)
{
    (void)flags; /* an exact cache keeps every token */
    if (!s)
        return KVC_E_INVALID;
    const kvc_instance *in = s->inst;
    const kvcp_geom *g = &in->g;
    if (layer >= g->n_layers)
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_INVALID, "append: layer %u >= n_layers %u",
                         layer, g->n_layers);
    if (n == 0 || n > g->max_positions)
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_INVALID,
                         "append: token count %u is not in [1, max_positions %u]", n,
                         g->max_positions);
    if (!positions || !k_pre || !v)
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_INVALID,
                         "append: positions, k_pre and v must not be NULL");
    full_layer *L = &s->layers[layer];
    kvc_status st = kvcp_check_positions(g, positions, n, L->last_pos, s->msg, sizeof s->msg);
    if (st)
        return st;
    size_t count = (size_t)n * g->n_kv * g->head_dim;
    if (!kvck_all_finite(k_pre, count) || !kvck_all_finite(v, count))
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_INVALID,
                         "append: k_pre or v holds NaN or Inf (layer %u)", layer);

    float *k_rot = kvcp_alloc(&in->host, count * sizeof(float), KVC_USAGE_SCRATCH);
    if (!k_rot)
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_NOMEM,
                         "append: out of memory for %u tokens' rotated keys", n);
    kvck_rope_apply(&g->rope, n, g->n_kv, positions, k_pre, k_rot);
    st = full_store_rotated(in, L, &s->bytes_blocks, &s->bytes_pos, &s->bytes_table, n,
                            positions, k_rot, v);
    kvcp_free(&in->host, k_rot, count * sizeof(float));
    if (st)
        return kvcp_fail(s->msg, sizeof s->msg, st,
                         "append: out of memory for %u tokens on layer %u (nothing appended)", n,
                         layer);
    return KVC_OK;
}

/* Tokens of L with position < `position`. */
static uint32_t count_before(const kvc_instance *in, const full_layer *L, int32_t position)
{
    const uint32_t B = in->block_tokens;
    uint32_t keep = 0;
    for (uint32_t b = 0; b < L->n_blocks; b++) {
        const full_block *fb = &L->blocks[b];
        uint32_t in_block = (b + 1 == L->n_blocks) ? L->n - b * B : B;
        for (uint32_t i = 0; i < in_block; i++) {
            if (full_block_pos(fb, i) >= position)
                return keep;
            keep++;
        }
    }
    return keep;
}

kvc_status full_truncate(kvc_seq *s, int32_t position)
{
    if (!s)
        return KVC_E_INVALID;
    const kvc_instance *in = s->inst;
    const uint32_t B = in->block_tokens;
    for (uint32_t l = 0; l < in->g.n_layers; l++) {
        full_layer *L = &s->layers[l];
        if (L->n == 0 || L->last_pos < position)
            continue;
        uint32_t keep = position <= 0 ? 0 : count_before(in, L, position);
        uint32_t keep_blocks = (keep + B - 1) / B;
        for (uint32_t b = keep_blocks; b < L->n_blocks; b++)
            block_release(in, &L->blocks[b], &s->bytes_blocks, &s->bytes_pos);
        L->n = keep;
        L->n_blocks = keep_blocks;
        if (keep == 0) {
            kvcp_free(&in->host, L->blocks, (size_t)L->cap_blocks * sizeof(full_block));
            s->bytes_table -= (size_t)L->cap_blocks * sizeof(full_block);
            L->blocks = NULL;
            L->cap_blocks = 0;
            L->last_pos = -1;
        } else {
            L->last_pos = full_block_pos(&L->blocks[(keep - 1) / B], (keep - 1) % B);
        }
    }
    return KVC_OK;
}

kvc_status full_fork(const kvc_seq *src, kvc_seq *dst)
{
    if (!src || !dst)
        return KVC_E_INVALID;
    if (src == dst)
        return KVC_OK;
    const kvc_instance *in = src->inst;
    if (dst->inst != in)
        return kvcp_fail(dst->msg, sizeof dst->msg, KVC_E_INVALID,
                         "fork: source and destination belong to different instances");
    const size_t pos_bytes = (size_t)in->block_tokens * sizeof(int32_t);
    size_t layers_bytes = (size_t)in->g.n_layers * sizeof(full_layer);
    full_layer *copy = kvcp_alloc(&in->host, layers_bytes, KVC_USAGE_CACHE);
    uint64_t nb = 0, np = 0, nt = 0;
    if (!copy)
        goto nomem;
    for (uint32_t l = 0; l < in->g.n_layers; l++)
        copy[l].last_pos = -1;
    for (uint32_t l = 0; l < in->g.n_layers; l++) {
        const full_layer *S = &src->layers[l];
        full_layer *D = &copy[l];
        if (!S->n_blocks)
            continue;
        D->blocks = kvcp_alloc(&in->host, (size_t)S->cap_blocks * sizeof(full_block),
                               KVC_USAGE_CACHE);
        if (!D->blocks)
            goto nomem;
        D->cap_blocks = S->cap_blocks;
        nt += (size_t)S->cap_blocks * sizeof(full_block);
        for (uint32_t b = 0; b < S->n_blocks; b++) {
            full_block *db = &D->blocks[b];
            const full_block *sb = &S->blocks[b];
            db->pos0 = sb->pos0;
            db->kv = kvcp_alloc(&in->host, in->block_bytes, KVC_USAGE_CACHE);
            if (!db->kv)
                goto nomem;
            D->n_blocks = b + 1; /* so a failure below releases what exists */
            nb += in->block_bytes;
            memcpy(db->kv, sb->kv, in->block_bytes);
            if (sb->pos) {
                db->pos = kvcp_alloc(&in->host, pos_bytes, KVC_USAGE_CACHE);
                if (!db->pos)
                    goto nomem;
                np += pos_bytes;
                memcpy(db->pos, sb->pos, pos_bytes);
            }
        }
        D->n = S->n;
        D->last_pos = S->last_pos;
    }
    full_layers_release(in, dst->layers, &dst->bytes_blocks, &dst->bytes_pos, &dst->bytes_table);
    kvcp_free(&in->host, dst->layers, layers_bytes);
    dst->layers = copy;
    dst->bytes_blocks = nb;
    dst->bytes_pos = np;
    dst->bytes_table = nt;
    return KVC_OK;

nomem:
    if (copy) {
        full_layers_release(in, copy, &nb, &np, &nt);
        kvcp_free(&in->host, copy, layers_bytes);
    }
    return kvcp_fail(dst->msg, sizeof dst->msg, KVC_E_NOMEM, "fork: out of memory (dst unchanged)");
}
