/* The paged token store (pages.h): allocation, rollback, truncate, copy. */
#include <string.h>

#include "pages.h"

void kvcp_pages_init(kvcp_pages *L)
{
    memset(L, 0, sizeof *L);
    L->last_pos = -1;
}

static void block_release(const kvcp_page_fmt *f, kvcp_block *b, kvcp_page_bytes *cnt)
{
    if (b->data) {
        kvcp_free(f->host, b->data, f->block_bytes);
        cnt->blocks -= f->block_bytes;
    }
    if (b->pos) {
        size_t pb = (size_t)f->block_tokens * sizeof(int32_t);
        kvcp_free(f->host, b->pos, pb);
        cnt->pos -= pb;
    }
    memset(b, 0, sizeof *b);
}

void kvcp_pages_release(const kvcp_page_fmt *f, kvcp_pages *L, kvcp_page_bytes *cnt)
{
    for (uint32_t b = 0; b < L->n_blocks; b++)
        block_release(f, &L->blocks[b], cnt);
    if (L->blocks) {
        kvcp_free(f->host, L->blocks, (size_t)L->cap_blocks * sizeof(kvcp_block));
        cnt->table -= (size_t)L->cap_blocks * sizeof(kvcp_block);
    }
    kvcp_pages_init(L);
}

kvc_status kvcp_pages_append(const kvcp_page_fmt *f, kvcp_pages *L, kvcp_page_bytes *cnt,
                             uint32_t n, const int32_t *positions, kvcp_page_write write,
                             void *ctx)
{
    const uint32_t B = f->block_tokens;
    const size_t pos_bytes = (size_t)B * sizeof(int32_t);
    const uint64_t total = (uint64_t)L->n + n;
    const uint32_t need_blocks = (uint32_t)((total + B - 1) / B);

    /* 1. The block table, doubled until it fits. */
    kvcp_block *tab = L->blocks, *newtab = NULL;
    uint32_t newcap = L->cap_blocks;
    if (need_blocks > L->cap_blocks) {
        newcap = L->cap_blocks ? L->cap_blocks : KVCP_TABLE_INIT;
        while (newcap < need_blocks)
            newcap *= 2;
        newtab = kvcp_alloc(f->host, (size_t)newcap * sizeof(kvcp_block), KVC_USAGE_CACHE);
        if (!newtab)
            return KVC_E_NOMEM;
        if (L->n_blocks)
            memcpy(newtab, tab, (size_t)L->n_blocks * sizeof(kvcp_block));
        tab = newtab;
    }
    /* 2. New blocks, and position arrays where a gap appears. */
    uint64_t add_blocks = 0, add_pos = 0;
    int last_got_pos = 0; /* the existing partial block got a position array */
    for (uint32_t b = L->n_blocks; b < need_blocks; b++) {
        tab[b].data = kvcp_alloc(f->host, f->block_bytes, KVC_USAGE_CACHE);
        if (!tab[b].data)
            goto nomem;
        add_blocks += f->block_bytes;
    }
    for (uint32_t t = 0; t < n; t++) {
        uint64_t slot = (uint64_t)L->n + t;
        kvcp_block *fb = &tab[slot / B];
        uint32_t i = (uint32_t)(slot % B);
        if (i == 0)
            fb->pos0 = positions[t]; /* a new block starts here */
        else if (!fb->pos && positions[t] != fb->pos0 + (int32_t)i) {
            fb->pos = kvcp_alloc(f->host, pos_bytes, KVC_USAGE_CACHE);
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
        write(ctx, tab[slot / B].data, (uint32_t)(slot % B), t);
    }
    if (newtab) {
        if (L->blocks) {
            kvcp_free(f->host, L->blocks, (size_t)L->cap_blocks * sizeof(kvcp_block));
            cnt->table -= (size_t)L->cap_blocks * sizeof(kvcp_block);
        }
        L->blocks = newtab;
        L->cap_blocks = newcap;
        cnt->table += (size_t)newcap * sizeof(kvcp_block);
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
            kvcp_free(f->host, tab[b].data, f->block_bytes);
        if (tab[b].pos)
            kvcp_free(f->host, tab[b].pos, pos_bytes);
        memset(&tab[b], 0, sizeof tab[b]);
    }
    if (last_got_pos) {
        kvcp_block *fb = &tab[L->n_blocks - 1];
        kvcp_free(f->host, fb->pos, pos_bytes);
        fb->pos = NULL;
    }
    if (newtab)
        kvcp_free(f->host, newtab, (size_t)newcap * sizeof(kvcp_block));
    return KVC_E_NOMEM;
}

/* Tokens of L with position < `position`. */
static uint32_t count_before(const kvcp_pages *L, uint32_t B, int32_t position)
{
    uint32_t keep = 0;
    for (uint32_t b = 0; b < L->n_blocks; b++) {
        const kvcp_block *fb = &L->blocks[b];
        uint32_t in_block = kvcp_block_count(L, b, B);
        for (uint32_t i = 0; i < in_block; i++) {
            if (kvcp_block_pos(fb, i) >= position)
                return keep;
            keep++;
        }
    }
    return keep;
}

void kvcp_pages_truncate(const kvcp_page_fmt *f, kvcp_pages *L, kvcp_page_bytes *cnt,
                         int32_t position)
{
    const uint32_t B = f->block_tokens;
    if (L->n == 0 || L->last_pos < position)
        return;
    uint32_t keep = position <= 0 ? 0 : count_before(L, B, position);
    if (keep == 0) {
        kvcp_pages_release(f, L, cnt);
        return;
    }
    uint32_t keep_blocks = (keep + B - 1) / B;
    for (uint32_t b = keep_blocks; b < L->n_blocks; b++)
        block_release(f, &L->blocks[b], cnt);
    L->n = keep;
    L->n_blocks = keep_blocks;
    L->last_pos = kvcp_block_pos(&L->blocks[(keep - 1) / B], (keep - 1) % B);
}

kvc_status kvcp_pages_copy(const kvcp_page_fmt *f, const kvcp_pages *src, kvcp_pages *dst,
                           kvcp_page_bytes *cnt)
{
    const size_t pos_bytes = (size_t)f->block_tokens * sizeof(int32_t);
    kvcp_pages_init(dst);
    if (!src->n_blocks)
        return KVC_OK;
    dst->blocks = kvcp_alloc(f->host, (size_t)src->cap_blocks * sizeof(kvcp_block),
                             KVC_USAGE_CACHE);
    if (!dst->blocks)
        return KVC_E_NOMEM;
    dst->cap_blocks = src->cap_blocks;
    cnt->table += (size_t)src->cap_blocks * sizeof(kvcp_block);
    for (uint32_t b = 0; b < src->n_blocks; b++) {
        kvcp_block *db = &dst->blocks[b];
        const kvcp_block *sb = &src->blocks[b];
        db->pos0 = sb->pos0;
        db->data = kvcp_alloc(f->host, f->block_bytes, KVC_USAGE_CACHE);
        if (!db->data)
            goto nomem;
        dst->n_blocks = b + 1; /* so a failure below releases what exists */
        cnt->blocks += f->block_bytes;
        memcpy(db->data, sb->data, f->block_bytes);
        if (sb->pos) {
            db->pos = kvcp_alloc(f->host, pos_bytes, KVC_USAGE_CACHE);
            if (!db->pos)
                goto nomem;
            cnt->pos += pos_bytes;
            memcpy(db->pos, sb->pos, pos_bytes);
        }
    }
    dst->n = src->n;
    dst->last_pos = src->last_pos;
    return KVC_OK;
nomem:
    kvcp_pages_release(f, dst, cnt);
    return KVC_E_NOMEM;
}

kvc_status kvcp_pages_check_append(const kvcp_geom *g, const kvcp_pages *layers, uint32_t layer,
                                   uint32_t n, const int32_t *positions, const void *k_pre,
                                   const void *v, char *msg, size_t cap)
{
    int64_t last = layer < g->n_layers ? layers[layer].last_pos : -1;
    return kvcp_check_append(g, layer, n, positions, k_pre, v, last, msg, cap);
}
