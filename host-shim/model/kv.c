/*
 * kv.c -- the two KV stores the forward pass attends through: a plugin
 * sequence (append/attend of the ABI), and the built-in exact store.
 *
 * The exact store keeps post-RoPE fp32 keys and values in blocks of
 * EXACT_BLOCK tokens, head-major inside a block, and walks them with the
 * same streaming kernel and the same query chunking as kvc-full.so: so the
 * `full` plugin in fp32 and this path compute the same sums in the same
 * order, and a difference between them is a plugin bug, not rounding.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvck.h"
#include "errmsg.h"
#include "kvch.h"
#include "llama.h"

#define EXACT_BLOCK 64u   /* tokens per block, as kvc-full.so's default */
#define EXACT_Q_CHUNK 64u /* queries per pass over the blocks, as kvc-full.so */

typedef struct exact_block {
    float *k;    /* [n_kv][EXACT_BLOCK][head_dim], post-RoPE */
    float *v;    /* [n_kv][EXACT_BLOCK][head_dim] */
    int32_t pos[EXACT_BLOCK];
} exact_block;

typedef struct exact_layer {
    exact_block *blocks; /* [cap_blocks] */
    uint32_t n_blocks, cap_blocks;
    uint32_t n;          /* tokens held */
} exact_layer;

struct kvch_kv {
    /* plugin store */
    const kvc_plugin *p;
    kvc_instance *inst;
    kvc_seq *seq;
    /* exact store */
    kvc_geometry geo;
    float inv_freq[KVCK_MAX_HEAD_DIM / 2];
    kvck_rope rope;
    float scale;
    exact_layer *layers; /* [n_layers] */
    float *scratch;      /* attend scratch, grown on demand */
    size_t scratch_floats;
    float *k_rot;        /* [n][n_kv][head_dim] append scratch */
    size_t k_rot_floats;
};


/* ---- plugin store ---------------------------------------------------------- */

kvc_status kvch_kv_plugin(const kvc_plugin *p, kvc_instance *inst, kvch_kv **out, char *err,
                          size_t cap)
{
    if (!p || !inst || !out)
        return kvch_fail(err, cap, KVC_E_INVALID, "kv: NULL argument");
    kvch_kv *kv = calloc(1, sizeof *kv);
    if (!kv)
        return kvch_fail(err, cap, KVC_E_NOMEM, "kv: out of memory");
    kv->p = p;
    kv->inst = inst;
    kvc_status s = p->seq_open(inst, &kv->seq);
    if (s) {
        free(kv);
        return kvch_fail(err, cap, s, "kv: %s: seq_open failed (status %d)", p->id, (int)s);
    }
    *out = kv;
    return KVC_OK;
}

/* ---- exact store ----------------------------------------------------------- */

kvc_status kvch_kv_exact(const kvc_geometry *geo, kvch_kv **out, char *err, size_t cap)
{
    if (!geo || !out || geo->n_layers == 0 || geo->n_kv_heads == 0 ||
        geo->n_heads % geo->n_kv_heads)
        return kvch_fail(err, cap, KVC_E_INVALID, "kv: bad geometry");
    kvch_kv *kv = calloc(1, sizeof *kv);
    if (!kv)
        return kvch_fail(err, cap, KVC_E_NOMEM, "kv: out of memory");
    kv->geo = *geo;
    if (geo->rope_inv_freq) {
        uint32_t dims = geo->rope_dims ? geo->rope_dims : geo->head_dim;
        memcpy(kv->inv_freq, geo->rope_inv_freq, dims / 2 * sizeof(float));
    }
    if (kvck_rope_init(&kv->rope, geo->rope_style, (int)geo->head_dim, (int)geo->rope_dims,
                       geo->rope_theta, geo->rope_inv_freq ? kv->inv_freq : NULL,
                       geo->rope_mscale) != 0) {
        free(kv);
        return kvch_fail(err, cap, KVC_E_INVALID, "kv: RoPE shape not supported");
    }
    kv->scale = geo->attn_scale > 0.0f ? geo->attn_scale : 1.0f / sqrtf((float)geo->head_dim);
    kv->layers = calloc(geo->n_layers, sizeof *kv->layers);
    if (!kv->layers) {
        free(kv);
        return kvch_fail(err, cap, KVC_E_NOMEM, "kv: out of memory");
    }
    *out = kv;
    return KVC_OK;
}

static void exact_clear(kvch_kv *kv)
{
    for (uint32_t l = 0; l < kv->geo.n_layers; l++) {
        exact_layer *L = &kv->layers[l];
        for (uint32_t b = 0; b < L->n_blocks; b++) {
            free(L->blocks[b].k);
            free(L->blocks[b].v);
        }
        L->n_blocks = 0;
        L->n = 0;
    }
}

static void *grow(void *p, size_t *have, size_t need, size_t elem)
{
    if (need <= *have)
        return p;
    void *q = realloc(p, need * elem);
    if (q)
        *have = need;
    return q;
}

static kvc_status exact_append(kvch_kv *kv, uint32_t layer, uint32_t n, const int32_t *pos,
                               const float *k_pre, const float *v, char *err, size_t cap)
{
    const size_t nkv = kv->geo.n_kv_heads, d = kv->geo.head_dim;
    exact_layer *L = &kv->layers[layer];
    int32_t last = -1;
    if (L->n) {
        const exact_block *b = &L->blocks[L->n_blocks - 1];
        last = b->pos[(L->n - 1) % EXACT_BLOCK];
    }
    for (uint32_t i = 0; i < n; i++) {
        if (pos[i] <= last || (uint32_t)pos[i] >= kv->geo.max_positions)
            return kvch_fail(err, cap, KVC_E_INVALID,
                        "exact: position %d must follow %d and be below %u", (int)pos[i],
                        (int)last, kv->geo.max_positions);
        last = pos[i];
    }
    float *kr = grow(kv->k_rot, &kv->k_rot_floats, (size_t)n * nkv * d, sizeof(float));
    if (!kr)
        return kvch_fail(err, cap, KVC_E_NOMEM, "exact: out of memory");
    kv->k_rot = kr;
    /* Every block this append needs exists before anything is written: on
     * NOMEM nothing was appended. */
    uint32_t need = (uint32_t)(((uint64_t)L->n + n + EXACT_BLOCK - 1) / EXACT_BLOCK);
    if (need > L->cap_blocks) {
        uint32_t nc = L->cap_blocks ? L->cap_blocks : 16;
        while (nc < need)
            nc *= 2;
        exact_block *nb = realloc(L->blocks, nc * sizeof *nb);
        if (!nb)
            return kvch_fail(err, cap, KVC_E_NOMEM, "exact: out of memory");
        L->blocks = nb;
        L->cap_blocks = nc;
    }
    for (uint32_t b = L->n_blocks; b < need; b++) {
        exact_block *blk = &L->blocks[b];
        blk->k = malloc(nkv * EXACT_BLOCK * d * sizeof(float));
        blk->v = malloc(nkv * EXACT_BLOCK * d * sizeof(float));
        if (!blk->k || !blk->v) {
            for (uint32_t j = L->n_blocks; j <= b; j++) {
                free(L->blocks[j].k);
                free(L->blocks[j].v);
            }
            return kvch_fail(err, cap, KVC_E_NOMEM, "exact: out of memory");
        }
    }
    L->n_blocks = need;
    kvck_rope_apply(&kv->rope, n, nkv, pos, k_pre, kr);
    for (uint32_t i = 0; i < n; i++) {
        uint32_t slot = L->n % EXACT_BLOCK;
        exact_block *b = &L->blocks[L->n / EXACT_BLOCK];
        for (size_t h = 0; h < nkv; h++) {
            memcpy(b->k + (h * EXACT_BLOCK + slot) * d, kr + ((size_t)i * nkv + h) * d,
                   d * sizeof(float));
            memcpy(b->v + (h * EXACT_BLOCK + slot) * d, v + ((size_t)i * nkv + h) * d,
                   d * sizeof(float));
        }
        b->pos[slot] = pos[i];
        L->n++;
    }
    return KVC_OK;
}

static kvc_status exact_attend(kvch_kv *kv, uint32_t layer, uint32_t n_q, const int32_t *pos,
                               const float *q_pre, float *out, char *err, size_t cap)
{
    const size_t nh = kv->geo.n_heads, nkv = kv->geo.n_kv_heads, d = kv->geo.head_dim;
    const size_t G = nh / nkv, rows_max = (size_t)EXACT_Q_CHUNK * G;
    const exact_layer *L = &kv->layers[layer];
    size_t need = (size_t)n_q * nh * d + 2 * rows_max * d +
                  kvck_attn_scratch_floats(rows_max, d, EXACT_BLOCK);
    float *sc = grow(kv->scratch, &kv->scratch_floats, need, sizeof(float));
    if (!sc)
        return kvch_fail(err, cap, KVC_E_NOMEM, "exact: out of memory");
    kv->scratch = sc;
    float *q_rot = sc, *q_buf = q_rot + (size_t)n_q * nh * d, *o_buf = q_buf + rows_max * d;
    float *attn = o_buf + rows_max * d;

    kvck_rope_apply(&kv->rope, n_q, nh, pos, q_pre, q_rot);
    for (size_t i = 0; i < (size_t)n_q * nh * d; i++)
        q_rot[i] *= kv->scale;
    for (uint32_t q0 = 0; q0 < n_q; q0 += EXACT_Q_CHUNK) {
        uint32_t nc = n_q - q0 < EXACT_Q_CHUNK ? n_q - q0 : EXACT_Q_CHUNK;
        int32_t qmax = pos[q0];
        for (uint32_t i = 1; i < nc; i++)
            qmax = pos[q0 + i] > qmax ? pos[q0 + i] : qmax;
        for (size_t h = 0; h < nkv; h++) {
            for (uint32_t i = 0; i < nc; i++)
                memcpy(q_buf + (size_t)i * G * d, q_rot + ((size_t)(q0 + i) * nh + h * G) * d,
                       G * d * sizeof(float));
            kvck_attn a;
            kvck_attn_init(&a, (size_t)nc * G, G, d, d, EXACT_BLOCK, kv->geo.sliding_window,
                           pos + q0, attn);
            for (uint32_t b = 0; b < L->n_blocks; b++) {
                const exact_block *blk = &L->blocks[b];
                uint32_t nb = b + 1 == L->n_blocks ? L->n - b * EXACT_BLOCK : EXACT_BLOCK;
                if (blk->pos[0] > qmax)
                    break;
                kvck_attn_block(&a, q_buf, d, blk->k + h * EXACT_BLOCK * d, d,
                                blk->v + h * EXACT_BLOCK * d, d, blk->pos, nb);
            }
            kvck_attn_finish(&a, o_buf, d);
            for (uint32_t i = 0; i < nc; i++)
                memcpy(out + ((size_t)(q0 + i) * nh + h * G) * d, o_buf + (size_t)i * G * d,
                       G * d * sizeof(float));
        }
    }
    return KVC_OK;
}

/* ---- common ---------------------------------------------------------------- */

void kvch_kv_free(kvch_kv *kv)
{
    if (!kv)
        return;
    if (kv->p) {
        kv->p->seq_close(kv->seq);
    } else {
        exact_clear(kv);
        for (uint32_t l = 0; l < kv->geo.n_layers; l++)
            free(kv->layers[l].blocks);
        free(kv->layers);
        free(kv->scratch);
        free(kv->k_rot);
    }
    free(kv);
}

kvc_status kvch_kv_reset(kvch_kv *kv, char *err, size_t cap)
{
    if (!kv->p) {
        exact_clear(kv);
        return KVC_OK;
    }
    /* A fresh sequence, as a server gives each request. */
    kvc_seq *s = NULL;
    kvc_status st = kv->p->seq_open(kv->inst, &s);
    if (st)
        return kvch_fail(err, cap, st, "kv: %s: seq_open failed (status %d)", kv->p->id, (int)st);
    kv->p->seq_close(kv->seq);
    kv->seq = s;
    return KVC_OK;
}

kvc_status kvch_kv_append(kvch_kv *kv, uint32_t layer, uint32_t n, const int32_t *pos,
                          const float *k_pre, const float *v, const uint8_t *flags, char *err,
                          size_t cap)
{
    if (!kv->p) {
        if (layer >= kv->geo.n_layers || n == 0)
            return kvch_fail(err, cap, KVC_E_INVALID, "exact: layer %u or count %u out of range",
                        layer, n);
        return exact_append(kv, layer, n, pos, k_pre, v, err, cap);
    }
    kvc_status s = kv->p->append(kv->seq, layer, n, pos, k_pre, v, flags);
    if (s)
        return kvch_fail(err, cap, s, "%s: append (layer %u, %u tokens): %s", kv->p->id, layer, n,
                    kv->p->seq_message(kv->seq));
    return KVC_OK;
}

kvc_status kvch_kv_attend(kvch_kv *kv, uint32_t layer, uint32_t n, const int32_t *pos,
                          const float *q_pre, float *out, char *err, size_t cap)
{
    if (!kv->p) {
        if (layer >= kv->geo.n_layers || n == 0)
            return kvch_fail(err, cap, KVC_E_INVALID, "exact: layer %u or count %u out of range",
                        layer, n);
        return exact_attend(kv, layer, n, pos, q_pre, out, err, cap);
    }
    kvc_status s = kv->p->attend(kv->seq, layer, n, pos, q_pre, out);
    if (s)
        return kvch_fail(err, cap, s, "%s: attend (layer %u, %u queries): %s", kv->p->id, layer, n,
                    kv->p->seq_message(kv->seq));
    return KVC_OK;
}

kvc_status kvch_kv_stats(const kvch_kv *kv, kvc_seq_stats *st)
{
    if (kv->p) {
        /* Zero first: a plugin fills only the fields it knows (a pre-1.2
         * one leaves bytes_pending, which is then 0). */
        memset(st, 0, sizeof *st);
        st->struct_size = sizeof *st;
        return kv->p->seq_stats(kv->seq, st);
    }
    memset(st, 0, sizeof *st);
    st->struct_size = sizeof *st;
    const uint64_t per_tok = (uint64_t)kv->geo.n_kv_heads * kv->geo.head_dim;
    for (uint32_t l = 0; l < kv->geo.n_layers; l++) {
        const exact_layer *L = &kv->layers[l];
        st->tokens_appended += L->n;
        st->head_tokens_resident += (uint64_t)L->n * kv->geo.n_kv_heads;
        st->bytes_payload += (uint64_t)L->n * per_tok * 2 * sizeof(float);
        st->bytes_metadata += (uint64_t)L->n * sizeof(int32_t);
        st->bytes_reserved += ((uint64_t)L->n_blocks * EXACT_BLOCK - L->n) *
                              (per_tok * 2 * sizeof(float) + sizeof(int32_t));
        st->bytes_fp16_full += (uint64_t)L->n * per_tok * 2 * 2;
    }
    st->bytes_fixed = sizeof *kv + (uint64_t)kv->geo.n_layers * sizeof(exact_layer);
    st->bytes_resident = st->bytes_payload + st->bytes_metadata + st->bytes_reserved +
                         st->bytes_fixed;
    return KVC_OK;
}

kvc_status kvch_kv_describe(const kvch_kv *kv, uint32_t layer, char **text_out, char *err,
                            size_t cap)
{
    if (!kv || !text_out)
        return kvch_fail(err, cap, KVC_E_INVALID, "kv: describe: NULL argument");
    if (!kv->p)
        return kvch_fail(err, cap, KVC_E_UNSUPPORTED,
                         "kv: the built-in exact store has no seq_describe");
    return kvch_seq_describe(kv->p, kv->seq, layer, text_out, err, cap);
}
