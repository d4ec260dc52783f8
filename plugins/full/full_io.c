/*
 * kvc-full.so export/import. Payload (format 1, little-endian):
 *   geometry record (kvcp_geom_write)
 *   u32 storage dtype (0 fp32, 1 fp16, 2 quantized)
 *   quantized: u32 the store's fingerprint (kvcp_qs_fingerprint), then per
 *   layer the store's record (kvcp_qs_write); else
 *   per layer: u32 n; i32 positions[n];
 *              K [n_kv][n][head_dim] and V [n_kv][n][head_dim] in storage dtype
 * Values are exported exactly as stored, so export -> import is lossless
 * and attention after import is bit-identical.
 */
#include <string.h>

#include "full.h"

/* Writes the payload; with w->buf == NULL it only counts. */
static void write_payload(void *ctx, kvcp_writer *w)
{
    const kvc_seq *s = ctx;
    float row[KVCK_MAX_HEAD_DIM];
    const kvc_instance *in = s->inst;
    const kvcp_geom *g = &in->g;
    const size_t row_bytes = (size_t)g->head_dim * in->elem;
    kvcp_geom_write(w, g);
    if (in->quant) {
        kvcp_w_u32(w, FULL_QUANT);
        kvcp_qss_write(&in->qs, &s->q, w);
        return;
    }
    kvcp_w_u32(w, (uint32_t)in->dtype);
    for (uint32_t l = 0; l < g->n_layers; l++) {
        const kvcp_pages *L = &s->layers[l];
        kvcp_w_u32(w, L->n);
        for (uint32_t t = 0; t < L->n; t++)
            kvcp_w_i32(w, kvcp_block_pos(&L->blocks[t / in->block_tokens], t % in->block_tokens));
        for (int kv = 0; kv < 2; kv++)
            for (uint32_t h = 0; h < g->n_kv; h++)
                for (uint32_t t = 0; t < L->n; t++) {
                    const kvcp_block *fb = &L->blocks[t / in->block_tokens];
                    const char *base = kv ? full_block_v(in, fb, h) : full_block_k(in, fb, h);
                    if (w->buf)
                        memcpy(row, base + (size_t)(t % in->block_tokens) * row_bytes, row_bytes);
                    kvcp_w_bytes(w, row, row_bytes);
                }
    }
}

kvc_status full_export(kvc_seq *s, void *buf, size_t buf_size, size_t *size)
{
    if (!s)
        return KVC_E_INVALID;
    return kvcp_blob_write(write_payload, s, KVCP_BLOB_SEQUENCE, FULL_EXPORT_VERSION, FULL_ID, buf,
                           buf_size, size, "export", s->msg, sizeof s->msg);
}

/* Reads one layer from r into L (empty), via float scratch. */
static kvc_status import_layer(kvc_seq *s, kvcp_reader *r, uint32_t l, kvcp_pages *L,
                               kvcp_page_bytes *cnt)
{
    const kvc_instance *in = s->inst;
    const kvcp_geom *g = &in->g;
    uint32_t n = kvcp_r_u32(r);
    if (r->err)
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_CORRUPT, "import: blob ends at layer %u", l);
    if (n == 0)
        return KVC_OK;
    if (n > g->max_positions)
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_CORRUPT,
                         "import: layer %u claims %u tokens, above max_positions %u", l, n,
                         g->max_positions);
    const size_t d = g->head_dim, row_bytes = d * in->elem;
    const size_t vals = (size_t)n * g->n_kv * d;
    const uint8_t *pos_raw = kvcp_r_view(r, (size_t)n * 4);
    const uint8_t *k_raw = kvcp_r_view(r, vals * in->elem);
    const uint8_t *v_raw = kvcp_r_view(r, vals * in->elem);
    if (r->err)
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_CORRUPT,
                         "import: blob ends inside layer %u's %u tokens", l, n);
    size_t bytes = (size_t)n * sizeof(int32_t) + 2 * vals * sizeof(float);
    char *tmp = kvcp_alloc(&in->host, bytes, KVC_USAGE_SCRATCH);
    if (!tmp)
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_NOMEM, "import: out of memory (layer %u)", l);
    int32_t *pos = (int32_t *)tmp;
    float *k = (float *)(tmp + (size_t)n * sizeof(int32_t)); /* [n][n_kv][d] */
    float *v = k + vals;
    kvc_status st = KVC_OK;
    if ((st = kvcp_import_positions(g, pos_raw, n, l, pos, s->msg, sizeof s->msg)))
        goto out;
    for (uint32_t h = 0; h < g->n_kv; h++)
        for (uint32_t t = 0; t < n; t++) {
            size_t src = ((size_t)h * n + t) * row_bytes, dst = ((size_t)t * g->n_kv + h) * d;
            if (in->dtype == FULL_F32) {
                memcpy(k + dst, k_raw + src, row_bytes);
                memcpy(v + dst, v_raw + src, row_bytes);
            } else {
                uint16_t hk[KVCK_MAX_HEAD_DIM], hv[KVCK_MAX_HEAD_DIM];
                memcpy(hk, k_raw + src, row_bytes);
                memcpy(hv, v_raw + src, row_bytes);
                kvck_f16_to_f32_n(hk, k + dst, d);
                kvck_f16_to_f32_n(hv, v + dst, d);
            }
        }
    if (!kvck_all_finite(k, 2 * vals)) {
        st = kvcp_fail(s->msg, sizeof s->msg, KVC_E_CORRUPT,
                       "import: layer %u holds NaN or Inf values", l);
        goto out;
    }
    st = full_store_rotated(in, L, cnt, n, pos, k, v);
    if (st)
        kvcp_fail(s->msg, sizeof s->msg, st, "import: out of memory (layer %u)", l);
out:
    kvcp_free(&in->host, tmp, bytes);
    return st;
}

kvc_status full_import(kvc_seq *s, const void *blob, size_t size)
{
    if (!s)
        return KVC_E_INVALID;
    const kvc_instance *in = s->inst;
    kvcp_reader r;
    uint32_t version;
    kvc_status st = kvcp_blob_open(blob, size, KVCP_BLOB_SEQUENCE, FULL_EXPORT_VERSION, FULL_ID,
                                   &r, &version, s->msg, sizeof s->msg);
    if (st)
        return st;
    st = kvcp_geom_read_check(&r, &in->g, s->msg, sizeof s->msg);
    if (st)
        return st;
    uint32_t dtype = kvcp_r_u32(&r);
    if (r.err)
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_CORRUPT, "import: blob ends before dtype");
    if ((dtype == FULL_QUANT) != (in->quant != 0))
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_INVALID,
                         "import: blob holds %s storage, this instance %s",
                         dtype == FULL_QUANT ? "quantized" : "fp32/fp16",
                         in->quant ? "quantizes" : "does not quantize");
    if (in->quant)
        return kvcp_qss_read(&in->qs, &s->q, &r, s->msg);
    if (dtype != (uint32_t)in->dtype)
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_INVALID,
                         "import: blob holds %s values, this instance stores %s",
                         dtype == FULL_F16 ? "fp16" : dtype == FULL_F32 ? "fp32" : "unknown",
                         in->dtype == FULL_F16 ? "fp16" : "fp32");

    size_t layers_bytes = (size_t)in->g.n_layers * sizeof(kvcp_pages);
    kvcp_pages *fresh = kvcp_alloc(&in->host, layers_bytes, KVC_USAGE_CACHE);
    if (!fresh)
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_NOMEM, "import: out of memory");
    kvcp_page_bytes cnt = {0, 0, 0};
    for (uint32_t l = 0; l < in->g.n_layers; l++)
        kvcp_pages_init(&fresh[l]);
    for (uint32_t l = 0; l < in->g.n_layers && !st; l++)
        st = import_layer(s, &r, l, &fresh[l], &cnt);
    if (!st && r.pos != r.size)
        st = kvcp_fail(s->msg, sizeof s->msg, KVC_E_CORRUPT,
                       "import: %zu unexpected bytes after the last layer", r.size - r.pos);
    if (st) {
        full_layers_release(in, fresh, &cnt);
        kvcp_free(&in->host, fresh, layers_bytes);
        return st;
    }
    full_layers_release(in, s->layers, &s->bytes);
    kvcp_free(&in->host, s->layers, layers_bytes);
    s->layers = fresh;
    s->bytes = cnt;
    return KVC_OK;
}
