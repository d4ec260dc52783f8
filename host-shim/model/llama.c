/*
 * llama.c -- Llama-family hyperparameters and weights from a GGUF, every
 * weight dequantized once to fp32 (the forward pass is fp32 end to end, so
 * a plugin is measured against exact arithmetic, not against a quantized
 * matmul's rounding).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "errmsg.h"
#include "llama.h"


/* Architectures whose tensors and RoPE this host knows. */
typedef struct arch_info {
    const char *name;
    int32_t rope_style;
} arch_info;

static const arch_info ARCHES[] = {
    {"llama", KVC_ROPE_ADJACENT},   /* convert_hf_to_gguf permutes Q/K to adjacent pairs */
    {"mistral", KVC_ROPE_ADJACENT}, /* same converter path as llama */
    {"qwen2", KVC_ROPE_HALVES},     /* NeoX rotation, Q/K/V biases */
};

/* "{arch}.{suffix}" */
static const char *akey(const kvch_llama_hparams *hp, const char *suffix, char *buf, size_t cap)
{
    snprintf(buf, cap, "%s.%s", hp->arch, suffix);
    return buf;
}

static kvc_status read_hparams(const kvch_gguf *g, kvch_llama_hparams *hp, char *err, size_t cap)
{
    char k[128];
    size_t len = 0;
    const char *arch = kvch_gguf_get_str(g, "general.architecture", &len);
    if (!arch)
        return kvch_fail(err, cap, KVC_E_CORRUPT, "model: general.architecture is missing");
    if (len >= sizeof hp->arch)
        len = sizeof hp->arch - 1;
    memcpy(hp->arch, arch, len);
    hp->arch[len] = '\0';
    const arch_info *ai = NULL;
    for (size_t i = 0; i < sizeof ARCHES / sizeof ARCHES[0]; i++)
        if (strcmp(ARCHES[i].name, hp->arch) == 0)
            ai = &ARCHES[i];
    if (!ai)
        return kvch_fail(err, cap, KVC_E_UNSUPPORTED,
                    "model: architecture \"%s\" is not supported (llama, mistral, qwen2 are)",
                    hp->arch);
    hp->rope_style = ai->rope_style;
    const char *name = kvch_gguf_get_str(g, "general.name", &len);
    if (name) {
        if (len >= sizeof hp->name)
            len = sizeof hp->name - 1;
        memcpy(hp->name, name, len);
        hp->name[len] = '\0';
    }

    struct {
        const char *suffix;
        uint32_t *dst;
    } req[] = {
        {"block_count", &hp->n_layer},
        {"embedding_length", &hp->n_embd},
        {"feed_forward_length", &hp->n_ff},
        {"attention.head_count", &hp->n_head},
        {"context_length", &hp->n_ctx_train},
    };
    for (size_t i = 0; i < sizeof req / sizeof req[0]; i++)
        if (kvch_gguf_get_u32(g, akey(hp, req[i].suffix, k, sizeof k), req[i].dst) != 0 ||
            *req[i].dst == 0)
            return kvch_fail(err, cap, KVC_E_CORRUPT, "model: %s is missing or zero", k);
    hp->n_head_kv = hp->n_head;
    if (kvch_gguf_type(g, akey(hp, "attention.head_count_kv", k, sizeof k)) >= 0 &&
        (kvch_gguf_get_u32(g, k, &hp->n_head_kv) != 0 || hp->n_head_kv == 0 ||
         hp->n_head % hp->n_head_kv != 0))
        return kvch_fail(err, cap, KVC_E_CORRUPT,
                    "model: %s must be a nonzero divisor of the head count %u", k, hp->n_head);
    hp->head_dim = hp->n_embd / hp->n_head;
    if (kvch_gguf_type(g, akey(hp, "attention.key_length", k, sizeof k)) >= 0 &&
        kvch_gguf_get_u32(g, k, &hp->head_dim) != 0)
        return kvch_fail(err, cap, KVC_E_CORRUPT, "model: %s is not an integer", k);
    uint32_t vlen = hp->head_dim;
    if (kvch_gguf_type(g, akey(hp, "attention.value_length", k, sizeof k)) >= 0 &&
        (kvch_gguf_get_u32(g, k, &vlen) != 0 || vlen != hp->head_dim))
        return kvch_fail(err, cap, KVC_E_UNSUPPORTED,
                    "model: %s differs from the key length %u (not supported)", k, hp->head_dim);
    if (hp->head_dim == 0 || hp->head_dim % 2)
        return kvch_fail(err, cap, KVC_E_CORRUPT, "model: head dimension %u must be even and > 0",
                    hp->head_dim);
    if (kvch_gguf_get_f32(g, akey(hp, "attention.layer_norm_rms_epsilon", k, sizeof k),
                          &hp->rms_eps) != 0 ||
        !(hp->rms_eps > 0.0f))
        return kvch_fail(err, cap, KVC_E_CORRUPT, "model: %s is missing or not positive", k);
    hp->rope_theta = 10000.0f;
    if (kvch_gguf_type(g, akey(hp, "rope.freq_base", k, sizeof k)) >= 0 &&
        (kvch_gguf_get_f32(g, k, &hp->rope_theta) != 0 || !(hp->rope_theta > 0.0f)))
        return kvch_fail(err, cap, KVC_E_CORRUPT, "model: %s must be a positive number", k);
    hp->rope_dims = hp->head_dim;
    if (kvch_gguf_type(g, akey(hp, "rope.dimension_count", k, sizeof k)) >= 0 &&
        (kvch_gguf_get_u32(g, k, &hp->rope_dims) != 0 || hp->rope_dims % 2 ||
         hp->rope_dims > hp->head_dim))
        return kvch_fail(err, cap, KVC_E_CORRUPT, "model: %s must be even and <= head dim %u", k,
                    hp->head_dim);
    hp->rope_scale = 1.0f;
    const char *st = kvch_gguf_get_str(g, akey(hp, "rope.scaling.type", k, sizeof k), &len);
    if (st && !(len == 4 && memcmp(st, "none", 4) == 0)) {
        if (!(len == 6 && memcmp(st, "linear", 6) == 0))
            return kvch_fail(err, cap, KVC_E_UNSUPPORTED,
                        "model: rope scaling \"%.*s\" is not supported (none, linear are)",
                        (int)len, st);
        if (kvch_gguf_get_f32(g, akey(hp, "rope.scaling.factor", k, sizeof k), &hp->rope_scale) !=
                0 ||
            !(hp->rope_scale > 0.0f))
            return kvch_fail(err, cap, KVC_E_CORRUPT, "model: %s must be a positive number", k);
    }
    return KVC_OK;
}

/* Finds `name`, checks its shape is {ne0, ne1} (ne1 == 0: 1-D), and
 * dequantizes it into a fresh fp32 array. */
static kvc_status load_tensor(const kvch_gguf *g, kvch_llama *m, const char *name, uint64_t ne0,
                              uint64_t ne1, int optional, float **out, char *err, size_t cap)
{
    const kvch_gguf_tensor *t = kvch_gguf_tensor_by_name(g, name);
    if (!t) {
        if (optional)
            return KVC_OK;
        return kvch_fail(err, cap, KVC_E_CORRUPT, "model: tensor %s is missing", name);
    }
    uint32_t want_dims = ne1 ? 2 : 1;
    if (t->n_dims != want_dims || t->ne[0] != ne0 || (ne1 && t->ne[1] != ne1))
        return kvch_fail(err, cap, KVC_E_CORRUPT,
                    "model: tensor %s has shape {%llu, %llu} (%u dims), the hyperparameters "
                    "say {%llu, %llu}",
                    name, (unsigned long long)t->ne[0],
                    (unsigned long long)(t->n_dims > 1 ? t->ne[1] : 1), t->n_dims,
                    (unsigned long long)ne0, (unsigned long long)(ne1 ? ne1 : 1));
    size_t bytes = (size_t)t->n_elements * sizeof(float);
    float *p = malloc(bytes);
    if (!p)
        return kvch_fail(err, cap, KVC_E_NOMEM, "model: out of memory for tensor %s (%zu bytes)", name,
                    bytes);
    if (kvch_gguf_dequantize(t, p, err, cap) != 0) {
        free(p);
        return KVC_E_UNSUPPORTED;
    }
    m->bytes_weights += bytes;
    *out = p;
    return KVC_OK;
}

static kvc_status load_layer(const kvch_gguf *g, kvch_llama *m, uint32_t il, char *err, size_t cap)
{
    const kvch_llama_hparams *hp = &m->hp;
    kvch_llama_layer *L = &m->layers[il];
    const uint64_t E = hp->n_embd, Q = (uint64_t)hp->n_head * hp->head_dim,
                   KV = (uint64_t)hp->n_head_kv * hp->head_dim, F = hp->n_ff;
    struct {
        const char *suffix;
        uint64_t ne0, ne1;
        int optional;
        float **dst;
    } t[] = {
        {"attn_norm.weight", E, 0, 0, &L->attn_norm},
        {"attn_q.weight", E, Q, 0, &L->wq},
        {"attn_k.weight", E, KV, 0, &L->wk},
        {"attn_v.weight", E, KV, 0, &L->wv},
        {"attn_output.weight", Q, E, 0, &L->wo},
        {"attn_q.bias", Q, 0, 1, &L->bq},
        {"attn_k.bias", KV, 0, 1, &L->bk},
        {"attn_v.bias", KV, 0, 1, &L->bv},
        {"ffn_norm.weight", E, 0, 0, &L->ffn_norm},
        {"ffn_gate.weight", E, F, 0, &L->w_gate},
        {"ffn_up.weight", E, F, 0, &L->w_up},
        {"ffn_down.weight", F, E, 0, &L->w_down},
    };
    char name[96];
    for (size_t i = 0; i < sizeof t / sizeof t[0]; i++) {
        snprintf(name, sizeof name, "blk.%u.%s", il, t[i].suffix);
        kvc_status s = load_tensor(g, m, name, t[i].ne0, t[i].ne1, t[i].optional, t[i].dst, err,
                                   cap);
        if (s)
            return s;
    }
    if ((L->bq != NULL) != (L->bk != NULL) || (L->bk != NULL) != (L->bv != NULL))
        return kvch_fail(err, cap, KVC_E_CORRUPT, "model: layer %u has some of the Q/K/V biases only",
                    il);
    return KVC_OK;
}

kvc_status kvch_llama_load(const kvch_gguf *g, kvch_llama **out, char *err, size_t cap)
{
    if (!g || !out)
        return kvch_fail(err, cap, KVC_E_INVALID, "model: NULL argument");
    kvch_llama *m = calloc(1, sizeof *m);
    if (!m)
        return kvch_fail(err, cap, KVC_E_NOMEM, "model: out of memory");
    kvch_llama_hparams *hp = &m->hp;
    kvc_status s = read_hparams(g, hp, err, cap);
    if (s)
        goto fail;

    const kvch_gguf_tensor *te = kvch_gguf_tensor_by_name(g, "token_embd.weight");
    if (!te || te->n_dims != 2) {
        s = kvch_fail(err, cap, KVC_E_CORRUPT, "model: tensor token_embd.weight is missing or not 2-D");
        goto fail;
    }
    hp->n_vocab = (uint32_t)te->ne[1];
    if (te->ne[1] > INT32_MAX) {
        s = kvch_fail(err, cap, KVC_E_CORRUPT, "model: vocabulary of %llu tokens is too large",
                 (unsigned long long)te->ne[1]);
        goto fail;
    }
    if ((s = load_tensor(g, m, "token_embd.weight", hp->n_embd, hp->n_vocab, 0, &m->tok_embd, err,
                         cap)) ||
        (s = load_tensor(g, m, "output_norm.weight", hp->n_embd, 0, 0, &m->out_norm, err, cap)) ||
        (s = load_tensor(g, m, "output.weight", hp->n_embd, hp->n_vocab, 1, &m->output, err, cap)))
        goto fail;
    hp->tied_output = m->output == NULL;
    if (hp->tied_output)
        m->output = m->tok_embd;

    /* Llama-3 style per-dimension frequency factors divide the base
     * frequencies; linear scaling divides them all by the factor. */
    float *factors = NULL;
    if ((s = load_tensor(g, m, "rope_freqs.weight", hp->rope_dims / 2, 0, 1, &factors, err, cap)))
        goto fail;
    hp->has_rope_freqs = factors != NULL;
    if (factors || hp->rope_scale != 1.0f) {
        m->rope_inv_freq = malloc(hp->rope_dims / 2 * sizeof(float));
        if (!m->rope_inv_freq) {
            free(factors);
            s = kvch_fail(err, cap, KVC_E_NOMEM, "model: out of memory");
            goto fail;
        }
        for (uint32_t i = 0; i < hp->rope_dims / 2; i++) {
            double f = pow((double)hp->rope_theta, -2.0 * i / hp->rope_dims) / hp->rope_scale;
            m->rope_inv_freq[i] = (float)(factors ? f / factors[i] : f);
        }
        free(factors);
    }

    m->layers = calloc(hp->n_layer, sizeof *m->layers);
    if (!m->layers) {
        s = kvch_fail(err, cap, KVC_E_NOMEM, "model: out of memory");
        goto fail;
    }
    for (uint32_t il = 0; il < hp->n_layer; il++)
        if ((s = load_layer(g, m, il, err, cap)))
            goto fail;
    hp->has_qkv_bias = m->layers[0].bq != NULL;
    *out = m;
    return KVC_OK;
fail:
    kvch_llama_free(m);
    return s;
}

void kvch_llama_free(kvch_llama *m)
{
    if (!m)
        return;
    if (m->layers)
        for (uint32_t il = 0; il < m->hp.n_layer; il++) {
            kvch_llama_layer *L = &m->layers[il];
            float *p[] = {L->attn_norm, L->wq, L->wk, L->wv, L->wo, L->bq,
                          L->bk, L->bv, L->ffn_norm, L->w_gate, L->w_up, L->w_down};
            for (size_t i = 0; i < sizeof p / sizeof p[0]; i++)
                free(p[i]);
        }
    free(m->layers);
    if (m->output != m->tok_embd)
        free(m->output);
    free(m->tok_embd);
    free(m->out_norm);
    free(m->rope_inv_freq);
    free(m);
}

void kvch_llama_geometry(const kvch_llama *m, uint32_t max_pos, kvc_geometry *geo)
{
    const kvch_llama_hparams *hp = &m->hp;
    memset(geo, 0, sizeof *geo);
    geo->struct_size = sizeof *geo;
    geo->n_layers = hp->n_layer;
    geo->n_heads = hp->n_head;
    geo->n_kv_heads = hp->n_head_kv;
    geo->head_dim = hp->head_dim;
    geo->hidden_size = hp->n_embd;
    geo->max_positions = max_pos ? max_pos : hp->n_ctx_train;
    geo->rope_style = hp->rope_style;
    geo->rope_dims = hp->rope_dims;
    geo->rope_theta = hp->rope_theta;
    geo->rope_inv_freq = m->rope_inv_freq;
    geo->attn_scale = 1.0f / sqrtf((float)hp->head_dim);
}

void kvch_llama_layer_weights(const kvch_llama *m, uint32_t layer, kvc_layer_weights *w)
{
    const kvch_llama_layer *L = &m->layers[layer];
    memset(w, 0, sizeof *w);
    w->struct_size = sizeof *w;
    w->w_q = L->wq;
    w->w_k = L->wk;
    w->w_v = L->wv;
    w->w_o = L->wo;
    w->b_q = L->bq;
    w->b_k = L->bk;
    w->b_v = L->bv;
}
