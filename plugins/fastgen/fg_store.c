/* kvc-fastgen.so storage: the dense ragged per-head stores, the pending
 * queue of appended-but-not-stepped tokens, the runs of stepped positions. */
#include <string.h>

#include "fastgen.h"

/* ---- head stores ------------------------------------------------------------- */

static void *slot_ptr(void *base, uint32_t i, size_t width)
{
    return (char *)base + (size_t)i * width;
}

int32_t fg_head_pos(const kvc_instance *in, const fg_head *h, uint32_t i)
{
    return fg_blk_pos(in, fg_tok_block(in, h, i))[i % in->cfg.block_tokens];
}

kvc_status fg_head_reserve(const kvc_instance *in, fg_head *h, fg_bytes *cnt, uint64_t tokens)
{
    const uint32_t B = in->cfg.block_tokens;
    uint64_t need = (h->n + tokens + B - 1) / B;
    if (need <= (uint64_t)h->n_blocks + h->n_spare)
        return KVC_OK;
    if (need > UINT32_MAX / 2)
        return KVC_E_NOMEM;
    if (need > h->cap_blocks) {
        uint32_t cap = h->cap_blocks ? h->cap_blocks : 4;
        while (cap < need)
            cap *= 2;
        void **tab = kvcp_alloc(&in->host, cap * sizeof(void *), KVC_USAGE_CACHE);
        if (!tab)
            return KVC_E_NOMEM;
        if (h->n_blocks + h->n_spare)
            memcpy(tab, h->blocks, (h->n_blocks + h->n_spare) * sizeof(void *));
        kvcp_free(&in->host, h->blocks, h->cap_blocks * sizeof(void *));
        cnt->tables += (cap - h->cap_blocks) * sizeof(void *);
        h->blocks = tab;
        h->cap_blocks = cap;
    }
    while ((uint64_t)h->n_blocks + h->n_spare < need) {
        void *blk = kvcp_alloc(&in->host, in->block_bytes, KVC_USAGE_CACHE);
        if (!blk) {
            fg_head_trim(in, h, cnt);
            return KVC_E_NOMEM;
        }
        cnt->blocks += in->block_bytes;
        h->blocks[h->n_blocks + h->n_spare++] = blk;
    }
    return KVC_OK;
}

kvc_status fg_head_table(const kvc_instance *in, fg_head *h, fg_bytes *cnt, uint32_t cap)
{
    if (h->cap_blocks || !cap)
        return KVC_OK;
    void **tab = kvcp_alloc(&in->host, cap * sizeof(void *), KVC_USAGE_CACHE);
    if (!tab)
        return KVC_E_NOMEM;
    cnt->tables += cap * sizeof(void *);
    h->blocks = tab;
    h->cap_blocks = cap;
    return KVC_OK;
}

void fg_head_trim(const kvc_instance *in, fg_head *h, fg_bytes *cnt)
{
    while (h->n_spare) {
        uint32_t b = h->n_blocks + --h->n_spare;
        kvcp_free(&in->host, h->blocks[b], in->block_bytes);
        h->blocks[b] = NULL;
        cnt->blocks -= in->block_bytes;
    }
}

void fg_head_push(const kvc_instance *in, fg_head *h, const void *k, const void *v, int32_t pos,
                  uint8_t flags, float score)
{
    const uint32_t B = in->cfg.block_tokens;
    uint32_t slot = h->n % B;
    if (slot == 0) {
        h->n_blocks++; /* the first spare (reserved) */
        h->n_spare--;
    }
    void *blk = h->blocks[h->n / B];
    const char *kb = k, *vb = v;
    memcpy(slot_ptr(fg_blk_k(in, blk), slot, in->krow), kb, in->krow);
    memcpy(slot_ptr(fg_blk_ksz(in, blk), slot, in->kszb), kb + in->krow, in->kszb);
    memcpy(slot_ptr(fg_blk_v(in, blk), slot, in->vrow), vb, in->vrow);
    memcpy(slot_ptr(fg_blk_vsz(in, blk), slot, in->vszb), vb + in->vrow, in->vszb);
    fg_blk_pos(in, blk)[slot] = pos;
    fg_blk_score(in, blk)[slot] = score;
    fg_blk_flags(in, blk)[slot] = flags;
    h->n++;
}

/* Copies slot si of block src into slot di of block dst, every region. */
static void move_slot(const kvc_instance *in, void *dst, uint32_t di, void *src, uint32_t si)
{
    memcpy(slot_ptr(fg_blk_k(in, dst), di, in->krow), slot_ptr(fg_blk_k(in, src), si, in->krow),
           in->krow);
    memcpy(slot_ptr(fg_blk_ksz(in, dst), di, in->kszb),
           slot_ptr(fg_blk_ksz(in, src), si, in->kszb), in->kszb);
    memcpy(slot_ptr(fg_blk_v(in, dst), di, in->vrow), slot_ptr(fg_blk_v(in, src), si, in->vrow),
           in->vrow);
    memcpy(slot_ptr(fg_blk_vsz(in, dst), di, in->vszb),
           slot_ptr(fg_blk_vsz(in, src), si, in->vszb), in->vszb);
    fg_blk_pos(in, dst)[di] = fg_blk_pos(in, src)[si];
    fg_blk_score(in, dst)[di] = fg_blk_score(in, src)[si];
    fg_blk_flags(in, dst)[di] = fg_blk_flags(in, src)[si];
}

void fg_head_remove(const kvc_instance *in, fg_head *h, uint32_t i)
{
    const uint32_t B = in->cfg.block_tokens;
    uint32_t last = h->n - 1;
    if (i != last)
        move_slot(in, h->blocks[i / B], i % B, h->blocks[last / B], last % B);
    h->n--;
    if (h->n % B == 0) {
        /* The last block emptied: a spare until fg_head_trim frees it. */
        h->n_blocks--;
        h->n_spare++;
    }
}

/* ---- storage rows ---------------------------------------------------------------- */

void fg_storage_rows(const kvc_instance *in, const void *k, const void *v, uint8_t *krow,
                     uint8_t *vrow)
{
    const size_t d = in->g.head_dim;
    if (!in->quant) {
        memcpy(krow, k, in->krow);
        memcpy(vrow, v, in->vrow);
        return;
    }
    float x[KVCK_MAX_HEAD_DIM];
    kvck_f16_to_f32_n(k, x, d);
    kvck_q_quantize(&in->kf, KVCK_QS_TOKEN, 1, x, d, NULL, krow, (uint16_t *)(krow + in->krow));
    kvck_f16_to_f32_n(v, x, d);
    kvck_q_quantize(&in->vf, KVCK_QS_TOKEN, 1, x, d, NULL, vrow, (uint16_t *)(vrow + in->vrow));
}

/* Slot i of one block region pair (codes or values, scales) as floats. */
static void slot_floats(const kvc_instance *in, const kvck_qfmt *f, const void *rows,
                        const void *sz, size_t row, size_t szb, uint32_t i, float *dst)
{
    const size_t d = in->g.head_dim;
    const char *r = (const char *)rows + (size_t)i * row;
    if (in->quant)
        kvck_q_dequantize(f, KVCK_QS_TOKEN, 1, (const uint8_t *)r,
                          (const uint16_t *)((const char *)sz + (size_t)i * szb), dst, d);
    else if (in->elem == 4)
        memcpy(dst, r, d * sizeof(float));
    else
        kvck_f16_to_f32_n((const uint16_t *)r, dst, d);
}

void fg_slot_keys(const kvc_instance *in, void *blk, uint32_t i, float *dst)
{
    slot_floats(in, &in->kf, fg_blk_k(in, blk), fg_blk_ksz(in, blk), in->krow, in->kszb, i, dst);
}

void fg_slot_values(const kvc_instance *in, void *blk, uint32_t i, float *dst)
{
    slot_floats(in, &in->vf, fg_blk_v(in, blk), fg_blk_vsz(in, blk), in->vrow, in->vszb, i, dst);
}

void fg_head_release(const kvc_instance *in, fg_head *h, fg_bytes *cnt)
{
    for (uint32_t b = 0; b < h->n_blocks + h->n_spare; b++)
        kvcp_free(&in->host, h->blocks[b], in->block_bytes);
    cnt->blocks -= (uint64_t)(h->n_blocks + h->n_spare) * in->block_bytes;
    if (h->blocks) {
        kvcp_free(&in->host, h->blocks, h->cap_blocks * sizeof(void *));
        cnt->tables -= h->cap_blocks * sizeof(void *);
    }
    h->blocks = NULL;
    h->n = h->n_blocks = h->n_spare = h->cap_blocks = 0;
}

kvc_status fg_head_copy(const kvc_instance *in, const fg_head *src, fg_head *dst, fg_bytes *cnt)
{
    *dst = *src;
    dst->blocks = NULL;
    dst->n = dst->n_blocks = dst->n_spare = dst->cap_blocks = 0;
    if (!src->n_blocks)
        return KVC_OK;
    dst->blocks = kvcp_alloc(&in->host, src->cap_blocks * sizeof(void *), KVC_USAGE_CACHE);
    if (!dst->blocks)
        return KVC_E_NOMEM;
    dst->cap_blocks = src->cap_blocks;
    cnt->tables += src->cap_blocks * sizeof(void *);
    for (uint32_t b = 0; b < src->n_blocks; b++) {
        void *blk = kvcp_alloc(&in->host, in->block_bytes, KVC_USAGE_CACHE);
        if (!blk) {
            fg_head_release(in, dst, cnt);
            return KVC_E_NOMEM;
        }
        memcpy(blk, src->blocks[b], in->block_bytes);
        dst->blocks[b] = blk;
        dst->n_blocks++;
        cnt->blocks += in->block_bytes;
    }
    dst->n = src->n;
    return KVC_OK;
}

/* ---- pending queue ------------------------------------------------------------- */

/* Carves a chunk's arrays after its header. */
static void chunk_carve(const kvc_instance *in, fg_pending *c, uint32_t n)
{
    const size_t row = (size_t)in->g.n_kv * in->g.head_dim * in->elem;
    char *p = (char *)(c + 1);
    c->pos = (int32_t *)p;
    p += (size_t)n * sizeof(int32_t);
    c->k = p;
    p += (size_t)n * row;
    c->v = p;
    p += (size_t)n * row;
    c->flags = (uint8_t *)p;
}

static size_t chunk_bytes(const kvc_instance *in, uint32_t n)
{
    const size_t row = (size_t)in->g.n_kv * in->g.head_dim * in->elem;
    return sizeof(fg_pending) + (size_t)n * (sizeof(int32_t) + 2 * row + 1);
}

kvc_status fg_pending_push(const kvc_instance *in, fg_layer *L, fg_bytes *cnt, uint32_t n,
                           const int32_t *pos, const uint8_t *flags, const float *k_rot,
                           const float *v)
{
    size_t bytes = chunk_bytes(in, n);
    fg_pending *c = kvcp_alloc(&in->host, bytes, KVC_USAGE_CACHE);
    if (!c)
        return KVC_E_NOMEM;
    c->n = n;
    c->bytes = bytes;
    chunk_carve(in, c, n);
    memcpy(c->pos, pos, (size_t)n * sizeof(int32_t));
    if (flags)
        memcpy(c->flags, flags, n);
    size_t count = (size_t)n * in->g.n_kv * in->g.head_dim;
    if (in->cfg.dtype == FG_F32) {
        memcpy(c->k, k_rot, count * sizeof(float));
        memcpy(c->v, v, count * sizeof(float));
    } else {
        kvck_f32_to_f16_n(k_rot, c->k, count);
        kvck_f32_to_f16_n(v, c->v, count);
    }
    if (L->pend_tail)
        L->pend_tail->next = c;
    else
        L->pend = c;
    L->pend_tail = c;
    L->n_pending += n;
    L->last_pos = pos[n - 1];
    cnt->pending += bytes;
    return KVC_OK;
}

static void chunk_free(const kvc_instance *in, fg_pending *c, fg_bytes *cnt)
{
    cnt->pending -= c->bytes;
    kvcp_free(&in->host, c, c->bytes);
}

void fg_pending_pop_used(const kvc_instance *in, fg_layer *L, fg_bytes *cnt)
{
    while (L->pend && L->pend->used == L->pend->n) {
        fg_pending *c = L->pend;
        L->pend = c->next;
        if (!L->pend)
            L->pend_tail = NULL;
        chunk_free(in, c, cnt);
    }
}

void fg_pending_truncate(const kvc_instance *in, fg_layer *L, fg_bytes *cnt, int32_t p)
{
    fg_pending **link = &L->pend, *prev = NULL;
    while (*link) {
        fg_pending *c = *link;
        uint32_t keep = c->used;
        while (keep < c->n && c->pos[keep] < p)
            keep++;
        L->n_pending -= c->n - keep;
        c->n = keep;
        if (c->used == c->n) {
            *link = c->next;
            chunk_free(in, c, cnt);
            continue;
        }
        prev = c;
        link = &c->next;
    }
    L->pend_tail = prev;
}

void fg_pending_release(const kvc_instance *in, fg_layer *L, fg_bytes *cnt)
{
    while (L->pend) {
        fg_pending *c = L->pend;
        L->pend = c->next;
        chunk_free(in, c, cnt);
    }
    L->pend_tail = NULL;
    L->n_pending = 0;
}

void fg_pending_split(const kvc_instance *in, const fg_layer *L, uint64_t *payload,
                      uint64_t *other)
{
    const uint64_t row = 2ull * in->g.n_kv * in->g.head_dim * in->elem;
    uint64_t pay = 0, all = 0;
    for (const fg_pending *c = L->pend; c; c = c->next) {
        pay += (uint64_t)(c->n - c->used) * row;
        all += c->bytes;
    }
    *payload += pay;
    *other += all - pay;
}

/* ---- runs of stepped positions --------------------------------------------------- */

kvc_status fg_runs_reserve(const kvc_instance *in, fg_layer *L, fg_bytes *cnt, uint32_t extra)
{
    if ((uint64_t)L->n_runs + extra > L->cap_runs) {
        uint64_t cap = L->cap_runs ? L->cap_runs : 2;
        while (cap < (uint64_t)L->n_runs + extra)
            cap *= 2;
        if (cap > UINT32_MAX / 2)
            return KVC_E_NOMEM;
        fg_run *a = kvcp_alloc(&in->host, cap * sizeof(fg_run), KVC_USAGE_CACHE);
        if (!a)
            return KVC_E_NOMEM;
        if (L->n_runs)
            memcpy(a, L->runs, L->n_runs * sizeof(fg_run));
        kvcp_free(&in->host, L->runs, L->cap_runs * sizeof(fg_run));
        cnt->tables += (size_t)(cap - L->cap_runs) * sizeof(fg_run);
        L->runs = a;
        L->cap_runs = (uint32_t)cap;
    }
    return KVC_OK;
}

kvc_status fg_runs_table(const kvc_instance *in, fg_layer *L, fg_bytes *cnt, uint32_t cap)
{
    if (L->cap_runs || !cap)
        return KVC_OK;
    fg_run *a = kvcp_alloc(&in->host, (size_t)cap * sizeof(fg_run), KVC_USAGE_CACHE);
    if (!a)
        return KVC_E_NOMEM;
    cnt->tables += (size_t)cap * sizeof(fg_run);
    L->runs = a;
    L->cap_runs = cap;
    return KVC_OK;
}

/* 1 when stepping `pos` starts a new run. */
int fg_runs_breaks(const fg_layer *L, int32_t pos)
{
    if (!L->n_runs)
        return 1;
    const fg_run *r = &L->runs[L->n_runs - 1];
    return pos != r->pos0 + (int32_t)r->n;
}

void fg_runs_push(fg_layer *L, int32_t pos)
{
    if (!fg_runs_breaks(L, pos))
        L->runs[L->n_runs - 1].n++;
    else
        L->runs[L->n_runs++] = (fg_run){pos, 1};
}

uint64_t fg_runs_truncate(fg_layer *L, int32_t p)
{
    uint64_t total = 0;
    uint32_t keep = 0;
    for (; keep < L->n_runs; keep++) {
        fg_run *r = &L->runs[keep];
        if (r->pos0 >= p)
            break;
        if ((int64_t)r->pos0 + r->n > p)
            r->n = (uint32_t)(p - r->pos0);
        total += r->n;
    }
    L->n_runs = keep;
    return total;
}

void fg_runs_release(const kvc_instance *in, fg_layer *L, fg_bytes *cnt)
{
    if (L->runs) {
        kvcp_free(&in->host, L->runs, L->cap_runs * sizeof(fg_run));
        cnt->tables -= L->cap_runs * sizeof(fg_run);
    }
    L->runs = NULL;
    L->n_runs = L->cap_runs = 0;
}

void fg_layer_reset_steps(const kvc_instance *in, fg_layer *L, fg_bytes *cnt)
{
    for (uint32_t h = 0; h < in->g.n_kv; h++) {
        fg_head_release(in, &L->heads[h], cnt);
        L->heads[h].policy = FG_FULL;
        L->heads[h].recovered = 1.0f;
        L->heads[h].share = -1.0f;
        L->heads[h].scale = 1.0f;
    }
    fg_runs_release(in, L, cnt);
    L->profiled = 0;
    L->n_seen = 0;
    L->last_step_pos = -1;
}

void fg_layer_release(const kvc_instance *in, fg_layer *L, fg_bytes *cnt)
{
    fg_layer_reset_steps(in, L, cnt);
    fg_pending_release(in, L, cnt);
    L->last_pos = -1;
}
