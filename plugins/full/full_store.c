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

void full_layers_release(const kvc_instance *in, kvcp_pages *layers, kvcp_page_bytes *cnt)
{
    if (!layers)
        return;
    kvcp_page_fmt f = full_page_fmt(in);
    for (uint32_t l = 0; l < in->g.n_layers; l++)
        kvcp_pages_release(&f, &layers[l], cnt);
}

/* Token t's rotated keys and values into a block slot, head by head. */
typedef struct kv_writer {
    const kvc_instance *in;
    const float *k_rot, *v; /* [n][n_kv][head_dim] */
} kv_writer;

static void write_token(void *ctx, void *data, uint32_t slot, uint32_t t)
{
    const kv_writer *w = ctx;
    const kvc_instance *in = w->in;
    kvcp_block b = {0, NULL, data};
    for (uint32_t h = 0; h < in->g.n_kv; h++) {
        size_t off = ((size_t)t * in->g.n_kv + h) * in->g.head_dim;
        write_row(in, full_block_k(in, &b, h), slot, w->k_rot + off);
        write_row(in, full_block_v(in, &b, h), slot, w->v + off);
    }
}

kvc_status full_store_rotated(const kvc_instance *in, kvcp_pages *L, kvcp_page_bytes *cnt,
                              uint32_t n, const int32_t *positions, const float *k_rot,
                              const float *v)
{
    kvcp_page_fmt f = full_page_fmt(in);
    kv_writer w = {in, k_rot, v};
    return kvcp_pages_append(&f, L, cnt, n, positions, write_token, &w);
}

kvc_status full_append(kvc_seq *s, uint32_t layer, uint32_t n, const int32_t *positions,
                       const void *k_pre, const void *v, const uint8_t *flags)
{
    (void)flags; /* an exact cache keeps every token */
    if (!s)
        return KVC_E_INVALID;
    const kvc_instance *in = s->inst;
    if (in->quant)
        return kvcp_qss_append(&in->qs, &s->q, layer, n, positions, k_pre, v, s->msg);
    const kvcp_geom *g = &in->g;
    kvc_status st = kvcp_pages_check_append(g, s->layers, layer, n, positions, k_pre, v, s->msg,
                                            sizeof s->msg);
    if (st)
        return st;
    kvcp_pages *L = &s->layers[layer];
    size_t count = (size_t)n * g->n_kv * g->head_dim;

    float *k_rot = kvcp_alloc(&in->host, count * sizeof(float), KVC_USAGE_SCRATCH);
    if (!k_rot)
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_NOMEM,
                         "append: out of memory for %u tokens' rotated keys", n);
    kvck_rope_apply(&g->rope, n, g->n_kv, positions, k_pre, k_rot);
    st = full_store_rotated(in, L, &s->bytes, n, positions, k_rot, v);
    kvcp_free(&in->host, k_rot, count * sizeof(float));
    if (st)
        return kvcp_fail(s->msg, sizeof s->msg, st,
                         "append: out of memory for %u tokens on layer %u (nothing appended)", n,
                         layer);
    return KVC_OK;
}

kvc_status full_truncate(kvc_seq *s, int32_t position)
{
    if (!s)
        return KVC_E_INVALID;
    const kvc_instance *in = s->inst;
    if (in->quant) {
        kvcp_qss_truncate(&in->qs, &s->q, position);
        return KVC_OK;
    }
    kvcp_page_fmt f = full_page_fmt(in);
    for (uint32_t l = 0; l < in->g.n_layers; l++)
        kvcp_pages_truncate(&f, &s->layers[l], &s->bytes, position);
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
    if (in->quant)
        return kvcp_qss_fork(&in->qs, &src->q, &dst->q, dst->msg);
    size_t layers_bytes = (size_t)in->g.n_layers * sizeof(kvcp_pages);
    kvcp_pages *copy = kvcp_alloc(&in->host, layers_bytes, KVC_USAGE_CACHE);
    kvcp_page_bytes cnt = {0, 0, 0};
    kvcp_page_fmt f = full_page_fmt(in);
    if (!copy)
        goto nomem;
    for (uint32_t l = 0; l < in->g.n_layers; l++)
        kvcp_pages_init(&copy[l]);
    for (uint32_t l = 0; l < in->g.n_layers; l++)
        if (kvcp_pages_copy(&f, &src->layers[l], &copy[l], &cnt))
            goto nomem;
    full_layers_release(in, dst->layers, &dst->bytes);
    kvcp_free(&in->host, dst->layers, layers_bytes);
    dst->layers = copy;
    dst->bytes = cnt;
    return KVC_OK;

nomem:
    if (copy) {
        full_layers_release(in, copy, &cnt);
        kvcp_free(&in->host, copy, layers_bytes);
    }
    return kvcp_fail(dst->msg, sizeof dst->msg, KVC_E_NOMEM, "fork: out of memory (dst unchanged)");
}
