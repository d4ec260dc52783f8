/*
 * kvc-full.so with k_bits/v_bits: keys and values in the shared quantized
 * store (plugins/common/qstore.h), one kvcp_qs_layer per layer. The
 * operations mirror the dtype ones in full_store.c, full_attend.c and
 * full_io.c.
 */
#include <string.h>

#include "full.h"

kvc_status full_q_seq_init(kvc_seq *s)
{
    const kvc_instance *in = s->inst;
    s->qlayers = kvcp_alloc(&in->host, (size_t)in->g.n_layers * sizeof(kvcp_qs_layer),
                            KVC_USAGE_CACHE);
    if (!s->qlayers)
        return KVC_E_NOMEM;
    for (uint32_t l = 0; l < in->g.n_layers; l++)
        kvcp_qs_layer_init(&s->qlayers[l]);
    return KVC_OK;
}

static void release_layers(const kvc_instance *in, kvcp_qs_layer *layers, kvcp_qs_bytes *cnt)
{
    for (uint32_t l = 0; l < in->g.n_layers; l++)
        kvcp_qs_release(&in->qs, &layers[l], cnt, l);
}

void full_q_seq_free(kvc_seq *s)
{
    const kvc_instance *in = s->inst;
    if (!s->qlayers)
        return;
    release_layers(in, s->qlayers, &s->qbytes);
    kvcp_free(&in->host, s->qlayers, (size_t)in->g.n_layers * sizeof(kvcp_qs_layer));
    s->qlayers = NULL;
}

kvc_status full_q_append(kvc_seq *s, uint32_t layer, uint32_t n, const int32_t *positions,
                         const void *k_pre, const void *v)
{
    const kvc_instance *in = s->inst;
    const kvcp_geom *g = &in->g;
    if (layer >= g->n_layers)
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_INVALID, "append: layer %u >= n_layers %u",
                         layer, g->n_layers);
    kvcp_qs_layer *L = &s->qlayers[layer];
    kvc_status st = kvcp_check_append(g, layer, n, positions, k_pre, v, L->last_pos, s->msg,
                                      sizeof s->msg);
    if (st)
        return st;
    size_t bytes = kvcp_qs_append_scratch_floats(&in->qs, n) * sizeof(float);
    float *scratch = kvcp_alloc(&in->host, bytes, KVC_USAGE_SCRATCH);
    if (!scratch)
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_NOMEM,
                         "append: out of memory for %u tokens' scratch", n);
    st = kvcp_qs_append(&in->qs, L, &s->qbytes, layer, n, positions, k_pre, v, scratch);
    kvcp_free(&in->host, scratch, bytes);
    if (st)
        return kvcp_fail(s->msg, sizeof s->msg, st,
                         "append: out of memory for %u tokens on layer %u (nothing appended)", n,
                         layer);
    return KVC_OK;
}

kvc_status full_q_attend(kvc_seq *s, uint32_t layer, uint32_t n_q, const int32_t *positions,
                         const void *q_pre, void *out)
{
    const kvc_instance *in = s->inst;
    kvc_status st = kvcp_qs_attend(&in->qs, &s->qlayers[layer], &s->qbytes, layer, n_q,
                                   positions, q_pre, out);
    if (st)
        return kvcp_fail(s->msg, sizeof s->msg, st, "attend: out of memory for scratch");
    return KVC_OK;
}

kvc_status full_q_materialize(kvc_seq *s, uint32_t layer, kvc_materialized *out)
{
    const kvc_instance *in = s->inst;
    const kvcp_geom *g = &in->g;
    const kvcp_qs_layer *L = &s->qlayers[layer];
    const uint32_t n = L->n;
    if (out->positions && out->capacity < n)
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_BUFFER,
                         "materialize: capacity %u is below the %u tokens held", out->capacity, n);
    for (uint32_t h = 0; h < g->n_kv; h++)
        out->n_tokens[h] = n;
    if (!out->positions || !n)
        return KVC_OK;
    const size_t row = (size_t)g->n_kv * g->head_dim, d = g->head_dim, cap = out->capacity;
    const size_t bytes = (size_t)n * (sizeof(int32_t) + 2 * row * sizeof(float));
    char *tmp = kvcp_alloc(&in->host, bytes, KVC_USAGE_SCRATCH);
    if (!tmp)
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_NOMEM, "materialize: out of memory");
    int32_t *pos = (int32_t *)tmp;
    float *k = (float *)(tmp + (size_t)n * sizeof(int32_t)); /* [n][n_kv][d] */
    float *v = k + (size_t)n * row;
    kvc_status st = kvcp_qs_expand(&in->qs, L, layer, pos, k, v);
    if (!st)
        for (uint32_t h = 0; h < g->n_kv; h++)
            for (uint32_t t = 0; t < n; t++) {
                out->positions[h * cap + t] = pos[t];
                if (out->k)
                    memcpy(out->k + (h * cap + t) * d, k + (size_t)t * row + h * d,
                           d * sizeof(float));
                if (out->v)
                    memcpy(out->v + (h * cap + t) * d, v + (size_t)t * row + h * d,
                           d * sizeof(float));
            }
    kvcp_free(&in->host, tmp, bytes);
    if (st)
        return kvcp_fail(s->msg, sizeof s->msg, st, "materialize: out of memory");
    return KVC_OK;
}

void full_q_truncate(kvc_seq *s, int32_t position)
{
    const kvc_instance *in = s->inst;
    for (uint32_t l = 0; l < in->g.n_layers; l++)
        kvcp_qs_truncate(&in->qs, &s->qlayers[l], &s->qbytes, l, position);
}

kvc_status full_q_fork(const kvc_seq *src, kvc_seq *dst)
{
    const kvc_instance *in = src->inst;
    const size_t layers_bytes = (size_t)in->g.n_layers * sizeof(kvcp_qs_layer);
    kvcp_qs_layer *copy = kvcp_alloc(&in->host, layers_bytes, KVC_USAGE_CACHE);
    kvcp_qs_bytes cnt = {0};
    if (!copy)
        goto nomem;
    for (uint32_t l = 0; l < in->g.n_layers; l++)
        kvcp_qs_layer_init(&copy[l]);
    for (uint32_t l = 0; l < in->g.n_layers; l++)
        if (kvcp_qs_copy(&in->qs, &src->qlayers[l], &copy[l], &cnt, l))
            goto nomem;
    full_q_seq_free(dst);
    dst->qlayers = copy;
    dst->qbytes = cnt;
    return KVC_OK;
nomem:
    if (copy) {
        release_layers(in, copy, &cnt);
        kvcp_free(&in->host, copy, layers_bytes);
    }
    return kvcp_fail(dst->msg, sizeof dst->msg, KVC_E_NOMEM, "fork: out of memory (dst unchanged)");
}

uint32_t full_q_tokens(const kvc_seq *s, uint32_t layer)
{
    return s->qlayers[layer].n;
}

void full_q_stats(const kvc_seq *s, kvc_seq_stats *st)
{
    const kvc_instance *in = s->inst;
    const kvcp_qs *q = &in->qs;
    const kvcp_qs_bytes *b = &s->qbytes;
    uint64_t tokens = 0, payload = 0, pending = 0, q_meta = 0;
    for (uint32_t l = 0; l < in->g.n_layers; l++) {
        const kvcp_qs_layer *L = &s->qlayers[l];
        tokens += L->n;
        payload += kvcp_qs_payload_bytes(q, L, l);
        pending += kvcp_qs_pending_bytes(q, L);
        /* Each Q block's scales and outlier slots: everything but codes. */
        uint64_t codes = 0;
        for (uint32_t h = 0; h < in->g.n_kv; h++)
            codes += (uint64_t)q->lf[l].k[h].row_bytes + q->lf[l].v[h].row_bytes;
        uint32_t q_blocks = 0;
        for (uint32_t k = 0; k < L->n_blocks; k++)
            q_blocks += L->blocks[k].q != NULL;
        q_meta += (uint64_t)q_blocks * (q->lf[l].q_bytes - (uint64_t)q->o.block * codes);
    }
    const uint64_t total = b->raw + b->q + b->sink + b->pos + b->table;
    st->tokens_appended = tokens;
    st->head_tokens_resident = tokens * in->g.n_kv;
    st->bytes_payload = payload;
    st->bytes_metadata = b->pos + b->table + q_meta;
    st->bytes_reserved = total - payload - st->bytes_metadata;
    st->bytes_fixed = sizeof(struct kvc_seq) + (uint64_t)in->g.n_layers * sizeof(kvcp_qs_layer);
    st->bytes_resident = total + st->bytes_fixed;
    st->bytes_fp16_full = tokens * kvcp_fp16_bytes_per_token_layer(&in->g);
    st->bytes_pending = pending;
}

void full_q_write(const kvc_seq *s, kvcp_writer *w)
{
    const kvc_instance *in = s->inst;
    for (uint32_t l = 0; l < in->g.n_layers; l++)
        kvcp_qs_write(&in->qs, &s->qlayers[l], l, w);
}

kvc_status full_q_read(kvc_seq *s, kvcp_reader *r)
{
    const kvc_instance *in = s->inst;
    const size_t layers_bytes = (size_t)in->g.n_layers * sizeof(kvcp_qs_layer);
    kvcp_qs_layer *fresh = kvcp_alloc(&in->host, layers_bytes, KVC_USAGE_CACHE);
    if (!fresh)
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_NOMEM, "import: out of memory");
    kvcp_qs_bytes cnt = {0};
    kvc_status st = KVC_OK;
    for (uint32_t l = 0; l < in->g.n_layers; l++)
        kvcp_qs_layer_init(&fresh[l]);
    for (uint32_t l = 0; l < in->g.n_layers && !st; l++)
        st = kvcp_qs_read(&in->qs, &fresh[l], &cnt, l, r, s->msg, sizeof s->msg);
    if (!st && r->pos != r->size)
        st = kvcp_fail(s->msg, sizeof s->msg, KVC_E_CORRUPT,
                       "import: %zu unexpected bytes after the last layer", r->size - r->pos);
    if (st) {
        release_layers(in, fresh, &cnt);
        kvcp_free(&in->host, fresh, layers_bytes);
        return st;
    }
    full_q_seq_free(s);
    s->qlayers = fresh;
    s->qbytes = cnt;
    return KVC_OK;
}
