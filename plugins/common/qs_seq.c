/*
 * A sequence held in the quantized store (qstore.h): one kvcp_qs_layer per
 * layer and the byte counts, with the ABI's sequence operations on them
 * (checks, scratch, messages), for every plugin that keeps its tokens
 * there (full with k_bits/v_bits, kvquant).
 */
#include <string.h>

#include "qstore.h"

kvc_status kvcp_qss_init(const kvcp_qs *q, kvcp_qs_seq *s)
{
    memset(s, 0, sizeof *s);
    s->layers = kvcp_alloc(q->host, (size_t)q->g->n_layers * sizeof(kvcp_qs_layer),
                           KVC_USAGE_CACHE);
    if (!s->layers)
        return KVC_E_NOMEM;
    for (uint32_t l = 0; l < q->g->n_layers; l++)
        kvcp_qs_layer_init(&s->layers[l]);
    return KVC_OK;
}

static void release_layers(const kvcp_qs *q, kvcp_qs_layer *layers, kvcp_qs_bytes *cnt)
{
    for (uint32_t l = 0; l < q->g->n_layers; l++)
        kvcp_qs_release(q, &layers[l], cnt, l);
}

void kvcp_qss_free(const kvcp_qs *q, kvcp_qs_seq *s)
{
    if (!s->layers)
        return;
    release_layers(q, s->layers, &s->bytes);
    kvcp_free(q->host, s->layers, (size_t)q->g->n_layers * sizeof(kvcp_qs_layer));
    s->layers = NULL;
}

size_t kvcp_qss_fixed_bytes(const kvcp_qs *q)
{
    return (size_t)q->g->n_layers * sizeof(kvcp_qs_layer);
}

kvc_status kvcp_qss_append(const kvcp_qs *q, kvcp_qs_seq *s, uint32_t layer, uint32_t n,
                           const int32_t *positions, const void *k_pre, const void *v, char *msg)
{
    const kvcp_geom *g = q->g;
    if (layer >= g->n_layers)
        return kvcp_fail(msg, KVCP_MSG_SIZE, KVC_E_INVALID, "append: layer %u >= n_layers %u",
                         layer, g->n_layers);
    kvcp_qs_layer *L = &s->layers[layer];
    kvc_status st = kvcp_check_append(g, layer, n, positions, k_pre, v, L->last_pos, msg,
                                      KVCP_MSG_SIZE);
    if (st)
        return st;
    size_t bytes = kvcp_qs_append_scratch_floats(q, n) * sizeof(float);
    float *scratch = kvcp_alloc(q->host, bytes, KVC_USAGE_SCRATCH);
    if (!scratch)
        return kvcp_fail(msg, KVCP_MSG_SIZE, KVC_E_NOMEM,
                         "append: out of memory for %u tokens' scratch", n);
    st = kvcp_qs_append(q, L, &s->bytes, layer, n, positions, k_pre, v, scratch);
    kvcp_free(q->host, scratch, bytes);
    if (st)
        return kvcp_fail(msg, KVCP_MSG_SIZE, st,
                         "append: out of memory for %u tokens on layer %u (nothing appended)", n,
                         layer);
    return KVC_OK;
}

kvc_status kvcp_qss_attend(const kvcp_qs *q, kvcp_qs_seq *s, uint32_t layer, uint32_t n_q,
                           const int32_t *positions, const void *q_pre, void *out, char *msg)
{
    kvc_status st = kvcp_check_attend(q->g, layer, n_q, positions, q_pre, out, msg,
                                      KVCP_MSG_SIZE);
    if (st)
        return st;
    st = kvcp_qs_attend(q, &s->layers[layer], &s->bytes, layer, n_q, positions, q_pre, out);
    if (st)
        return kvcp_fail(msg, KVCP_MSG_SIZE, st, "attend: out of memory for scratch");
    return KVC_OK;
}

kvc_status kvcp_qss_materialize(const kvcp_qs *q, kvcp_qs_seq *s, uint32_t layer,
                                kvc_materialized *out, char *msg)
{
    const kvcp_geom *g = q->g;
    kvc_status st = kvcp_check_materialize(g, layer, out, msg, KVCP_MSG_SIZE);
    if (st)
        return st;
    const kvcp_qs_layer *L = &s->layers[layer];
    const uint32_t n = L->n;
    if (out->positions && out->capacity < n)
        return kvcp_fail(msg, KVCP_MSG_SIZE, KVC_E_BUFFER,
                         "materialize: capacity %u is below the %u tokens held", out->capacity, n);
    for (uint32_t h = 0; h < g->n_kv; h++)
        out->n_tokens[h] = n;
    if (!out->positions || !n)
        return KVC_OK;
    const size_t row = (size_t)g->n_kv * g->head_dim, d = g->head_dim, cap = out->capacity;
    const size_t bytes = (size_t)n * (sizeof(int32_t) + 2 * row * sizeof(float));
    char *tmp = kvcp_alloc(q->host, bytes, KVC_USAGE_SCRATCH);
    if (!tmp)
        return kvcp_fail(msg, KVCP_MSG_SIZE, KVC_E_NOMEM, "materialize: out of memory");
    int32_t *pos = (int32_t *)tmp;
    float *k = (float *)(tmp + (size_t)n * sizeof(int32_t)); /* [n][n_kv][d] */
    float *v = k + (size_t)n * row;
    st = kvcp_qs_expand(q, L, layer, pos, k, v);
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
    kvcp_free(q->host, tmp, bytes);
    if (st)
        return kvcp_fail(msg, KVCP_MSG_SIZE, st, "materialize: out of memory");
    return KVC_OK;
}

void kvcp_qss_truncate(const kvcp_qs *q, kvcp_qs_seq *s, int32_t position)
{
    for (uint32_t l = 0; l < q->g->n_layers; l++)
        kvcp_qs_truncate(q, &s->layers[l], &s->bytes, l, position);
}

kvc_status kvcp_qss_fork(const kvcp_qs *q, const kvcp_qs_seq *src, kvcp_qs_seq *dst, char *msg)
{
    kvcp_qs_seq copy;
    if (kvcp_qss_init(q, &copy))
        goto nomem;
    for (uint32_t l = 0; l < q->g->n_layers; l++)
        if (kvcp_qs_copy(q, &src->layers[l], &copy.layers[l], &copy.bytes, l)) {
            kvcp_qss_free(q, &copy);
            goto nomem;
        }
    kvcp_qss_free(q, dst);
    *dst = copy;
    return KVC_OK;
nomem:
    return kvcp_fail(msg, KVCP_MSG_SIZE, KVC_E_NOMEM, "fork: out of memory (dst unchanged)");
}

void kvcp_qss_stats(const kvcp_qs *q, const kvcp_qs_seq *s, uint64_t fixed, kvc_seq_stats *st)
{
    const kvcp_geom *g = q->g;
    const kvcp_qs_bytes *b = &s->bytes;
    uint64_t tokens = 0, payload = 0, pending = 0, q_meta = 0;
    for (uint32_t l = 0; l < g->n_layers; l++) {
        const kvcp_qs_layer *L = &s->layers[l];
        tokens += L->n;
        payload += kvcp_qs_payload_bytes(q, L, l);
        pending += kvcp_qs_pending_bytes(q, L);
        /* Each Q block's scales and outlier slots: everything but codes. */
        uint64_t codes = 0;
        for (uint32_t h = 0; h < g->n_kv; h++)
            codes += (uint64_t)q->lf[l].k[h].row_bytes + q->lf[l].v[h].row_bytes;
        uint32_t q_blocks = 0;
        for (uint32_t k = 0; k < L->n_blocks; k++)
            q_blocks += L->blocks[k].q != NULL;
        q_meta += (uint64_t)q_blocks * (q->lf[l].q_bytes - (uint64_t)q->o.block * codes);
    }
    const uint64_t total = b->raw + b->q + b->sink + b->pos + b->table;
    st->tokens_appended = tokens;
    st->head_tokens_resident = tokens * g->n_kv;
    st->bytes_payload = payload;
    st->bytes_metadata = b->pos + b->table + q_meta;
    st->bytes_reserved = total - payload - st->bytes_metadata;
    st->bytes_fixed = fixed + kvcp_qss_fixed_bytes(q);
    st->bytes_resident = total + st->bytes_fixed;
    st->bytes_fp16_full = tokens * kvcp_fp16_bytes_per_token_layer(g);
    st->bytes_pending = pending;
}

void kvcp_qss_write(const kvcp_qs *q, const kvcp_qs_seq *s, kvcp_writer *w)
{
    kvcp_w_u32(w, kvcp_qs_fingerprint(q));
    for (uint32_t l = 0; l < q->g->n_layers; l++)
        kvcp_qs_write(q, &s->layers[l], l, w);
}

kvc_status kvcp_qss_read(const kvcp_qs *q, kvcp_qs_seq *s, kvcp_reader *r, char *msg)
{
    uint32_t fp = kvcp_r_u32(r);
    if (r->err)
        return kvcp_fail(msg, KVCP_MSG_SIZE, KVC_E_CORRUPT,
                         "import: blob ends before the storage fingerprint");
    if (fp != kvcp_qs_fingerprint(q))
        return kvcp_fail(msg, KVCP_MSG_SIZE, KVC_E_INVALID,
                         "import: blob was made with other quantization settings (fingerprint "
                         "%08x, this instance %08x)",
                         fp, kvcp_qs_fingerprint(q));
    kvcp_qs_seq fresh;
    if (kvcp_qss_init(q, &fresh))
        return kvcp_fail(msg, KVCP_MSG_SIZE, KVC_E_NOMEM, "import: out of memory");
    kvc_status st = KVC_OK;
    for (uint32_t l = 0; l < q->g->n_layers && !st; l++)
        st = kvcp_qs_read(q, &fresh.layers[l], &fresh.bytes, l, r, msg, KVCP_MSG_SIZE);
    if (!st && r->pos != r->size)
        st = kvcp_fail(msg, KVCP_MSG_SIZE, KVC_E_CORRUPT,
                       "import: %zu unexpected bytes after the last layer", r->size - r->pos);
    if (st) {
        kvcp_qss_free(q, &fresh);
        return st;
    }
    kvcp_qss_free(q, s);
    *s = fresh;
    return KVC_OK;
}
