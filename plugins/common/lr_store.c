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

/* Writes token t's latent row into a block slot (fp32 or fp16). */
typedef struct row_writer {
    const kvc_instance *in;
    size_t e;          /* row_elems */
    const float *rows; /* [n][e] */
} row_writer;

static void write_row(void *ctx, void *data, uint32_t slot, uint32_t t)
{
    const row_writer *w = ctx;
    const float *src = w->rows + (size_t)t * w->e;
    if (w->in->cfg.dtype == LR_F32)
        memcpy((float *)data + (size_t)slot * w->e, src, w->e * sizeof(float));
    else
        kvck_f32_to_f16_n(src, (uint16_t *)data + (size_t)slot * w->e, w->e);
}

void lr_layers_release(const kvc_instance *in, kvcp_pages *layers, kvcp_page_bytes *cnt)
{
    if (!layers)
        return;
    for (uint32_t l = 0; l < in->g.n_layers; l++) {
        kvcp_page_fmt f = lr_page_fmt(in, l);
        kvcp_pages_release(&f, &layers[l], cnt);
    }
}

kvc_status lr_store_rows(const kvc_instance *in, uint32_t layer, kvcp_pages *L, kvcp_page_bytes *cnt,
                         uint32_t n, const int32_t *positions, const float *rows)
{
    kvcp_page_fmt f = lr_page_fmt(in, layer);
    row_writer w = {in, in->layers[layer].row_elems, rows};
    return kvcp_pages_append(&f, L, cnt, n, positions, write_row, &w);
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
    kvc_status st = kvcp_pages_check_append(g, s->layers, layer, n, positions, k_pre, v, s->msg,
                                            sizeof s->msg);
    if (st)
        return st;
    if (!in->layers[layer].finalized)
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_STATE,
                         "append: layer %u has no factors yet (prepare and finalize it, or "
                         "create from an artifact)", layer);
    kvcp_pages *L = &s->layers[layer];
    const size_t count = (size_t)n * g->n_kv * g->head_dim;
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

kvc_status lr_truncate(kvc_seq *s, int32_t position)
{
    if (!s)
        return KVC_E_INVALID;
    const kvc_instance *in = s->inst;
    for (uint32_t l = 0; l < in->g.n_layers; l++) {
        kvcp_page_fmt f = lr_page_fmt(in, l);
        kvcp_pages_truncate(&f, &s->layers[l], &s->bytes, position);
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
    const size_t layers_bytes = (size_t)in->g.n_layers * sizeof(kvcp_pages);
    kvcp_pages *copy = kvcp_alloc(&in->host, layers_bytes, KVC_USAGE_CACHE);
    kvcp_page_bytes cnt = {0, 0, 0};
    if (!copy)
        goto nomem;
    for (uint32_t l = 0; l < in->g.n_layers; l++)
        kvcp_pages_init(&copy[l]);
    for (uint32_t l = 0; l < in->g.n_layers; l++) {
        kvcp_page_fmt f = lr_page_fmt(in, l);
        if (kvcp_pages_copy(&f, &src->layers[l], &copy[l], &cnt))
            goto nomem;
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
