/*
 * forward.c -- the Llama forward pass in fp32: embeddings, per layer
 * RMSNorm -> Q/K/V projections (CBLAS GEMM over the whole batch) -> the KV
 * store's append + attend (RoPE is the store's job: Q and K leave here
 * before RoPE) -> output projection, RMSNorm -> SwiGLU MLP; final norm and
 * the (possibly tied) output projection for the logits that are asked for.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#include "errmsg.h"
#include "llama.h"

struct kvch_llama_ctx {
    const kvch_llama *m;
    uint32_t max_batch;
    kvch_layer_hook hook;
    void *hook_user;
    /* activations, for up to max_batch tokens */
    float *x;     /* (batch, n_embd) residual stream */
    float *xn;    /* (batch, n_embd) normed input of a block */
    float *q;     /* (batch, n_head * head_dim) pre-RoPE queries */
    float *k;     /* (batch, n_head_kv * head_dim) pre-RoPE keys */
    float *v;     /* (batch, n_head_kv * head_dim) values */
    float *att;   /* (batch, n_head * head_dim) attention output */
    float *gate;  /* (batch, n_ff) */
    float *up;    /* (batch, n_ff) */
    int32_t *pos; /* (batch) */
};


/* ---- pieces ------------------------------------------------------------------ */

void kvch_rmsnorm(const float *x, const float *w, float eps, size_t n, size_t d, float *y)
{
    for (size_t r = 0; r < n; r++) {
        const float *xr = x + r * d;
        float *yr = y + r * d;
        double ss = 0.0;
        for (size_t i = 0; i < d; i++)
            ss += (double)xr[i] * xr[i];
        float inv = (float)(1.0 / sqrt(ss / (double)d + (double)eps));
        for (size_t i = 0; i < d; i++)
            yr[i] = xr[i] * inv * w[i];
    }
}

void kvch_swiglu(float *g, const float *u, size_t n)
{
    for (size_t i = 0; i < n; i++)
        g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

/* y [n][out] = x [n][in] W^T + beta * y, W [out][in]. One token (decode)
 * goes through GEMV: BLAS's GEMM is not tuned for a single row. */
static void matmul_t(const float *x, const float *w, size_t n, size_t in, size_t out, float beta,
                     float *y)
{
    if (n == 1)
        cblas_sgemv(CblasRowMajor, CblasNoTrans, (int)out, (int)in, 1.0f, w, (int)in, x, 1, beta,
                    y, 1);
    else
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n, (int)out, (int)in, 1.0f, x,
                    (int)in, w, (int)in, beta, y, (int)out);
}

void kvch_linear(const float *x, const float *w, const float *b, size_t n, size_t in, size_t out,
                 float *y)
{
    matmul_t(x, w, n, in, out, 0.0f, y);
    if (b)
        for (size_t r = 0; r < n; r++)
            for (size_t j = 0; j < out; j++)
                y[r * out + j] += b[j];
}

double kvch_log_softmax_norm(const float *row, size_t n, double *log_z)
{
    float mx = row[0];
    for (size_t i = 1; i < n; i++)
        mx = row[i] > mx ? row[i] : mx;
    double sum = 0.0;
    for (size_t i = 0; i < n; i++)
        sum += exp((double)row[i] - mx);
    *log_z = log(sum);
    return mx;
}

double kvch_log_softmax_at(const float *row, size_t n, size_t target)
{
    double log_z, mx = kvch_log_softmax_norm(row, n, &log_z);
    return (double)row[target] - mx - log_z;
}

/* ---- context ----------------------------------------------------------------- */

kvc_status kvch_llama_ctx_new(const kvch_llama *m, uint32_t max_batch, kvch_llama_ctx **out,
                              char *err, size_t cap)
{
    if (!m || !out || max_batch == 0)
        return kvch_fail(err, cap, KVC_E_INVALID, "context: NULL model or zero batch");
    const kvch_llama_hparams *hp = &m->hp;
    kvch_llama_ctx *c = calloc(1, sizeof *c);
    if (!c)
        return kvch_fail(err, cap, KVC_E_NOMEM, "context: out of memory");
    c->m = m;
    c->max_batch = max_batch;
    const size_t B = max_batch, qd = (size_t)hp->n_head * hp->head_dim,
                 kvd = (size_t)hp->n_head_kv * hp->head_dim;
    c->x = malloc(B * hp->n_embd * sizeof(float));
    c->xn = malloc(B * hp->n_embd * sizeof(float));
    c->q = malloc(B * qd * sizeof(float));
    c->k = malloc(B * kvd * sizeof(float));
    c->v = malloc(B * kvd * sizeof(float));
    c->att = malloc(B * qd * sizeof(float));
    c->gate = malloc(B * hp->n_ff * sizeof(float));
    c->up = malloc(B * hp->n_ff * sizeof(float));
    c->pos = malloc(B * sizeof(int32_t));
    if (!c->x || !c->xn || !c->q || !c->k || !c->v || !c->att || !c->gate || !c->up || !c->pos) {
        kvch_llama_ctx_free(c);
        return kvch_fail(err, cap, KVC_E_NOMEM, "context: out of memory for a batch of %u tokens",
                    max_batch);
    }
    *out = c;
    return KVC_OK;
}

void kvch_llama_ctx_free(kvch_llama_ctx *c)
{
    if (!c)
        return;
    free(c->x);
    free(c->xn);
    free(c->q);
    free(c->k);
    free(c->v);
    free(c->att);
    free(c->gate);
    free(c->up);
    free(c->pos);
    free(c);
}

void kvch_llama_ctx_hook(kvch_llama_ctx *c, kvch_layer_hook hook, void *user)
{
    c->hook = hook;
    c->hook_user = user;
}

/* ---- the pass ------------------------------------------------------------------ */

void kvch_llama_embed(const kvch_llama *m, const int32_t *tokens, uint32_t n, float *x)
{
    const size_t E = m->hp.n_embd;
    for (uint32_t i = 0; i < n; i++)
        memcpy(x + i * E, m->tok_embd + (size_t)tokens[i] * E, E * sizeof(float));
}

/* Layer `il` over n <= max_batch tokens at c->pos: x (n, n_embd) is the
 * residual stream, updated in place; the attention input goes to xn (n,
 * n_embd) (c->xn or the caller's). The one copy of a layer's arithmetic:
 * eval and kvch_llama_eval_layer both come here, so they agree bit for
 * bit. */
static kvc_status layer_step(kvch_llama_ctx *c, kvch_kv *kv, uint32_t il, uint32_t n,
                             const uint8_t *flags, float *x, float *xn, char *err, size_t cap)
{
    const kvch_llama *m = c->m;
    const kvch_llama_hparams *hp = &m->hp;
    const kvch_llama_layer *L = &m->layers[il];
    const size_t E = hp->n_embd, F = hp->n_ff, qd = (size_t)hp->n_head * hp->head_dim,
                 kvd = (size_t)hp->n_head_kv * hp->head_dim;
    kvc_status s;
    /* attention block */
    kvch_rmsnorm(x, L->attn_norm, hp->rms_eps, n, E, xn);
    if (c->hook && (s = c->hook(c->hook_user, il, n, c->pos, xn)))
        return s; /* the hook words its own error */
    kvch_linear(xn, L->wq, L->bq, n, E, qd, c->q);
    kvch_linear(xn, L->wk, L->bk, n, E, kvd, c->k);
    kvch_linear(xn, L->wv, L->bv, n, E, kvd, c->v);
    if ((s = kvch_kv_append(kv, il, n, c->pos, c->k, c->v, flags, err, cap)) ||
        (s = kvch_kv_attend(kv, il, n, c->pos, c->q, c->att, err, cap)))
        return s;
    /* x += att Wo^T */
    matmul_t(c->att, L->wo, n, qd, E, 1.0f, x);
    /* MLP block: x += (silu(xn Wg^T) * (xn Wu^T)) Wd^T */
    kvch_rmsnorm(x, L->ffn_norm, hp->rms_eps, n, E, c->xn);
    kvch_linear(c->xn, L->w_gate, NULL, n, E, F, c->gate);
    kvch_linear(c->xn, L->w_up, NULL, n, E, F, c->up);
    kvch_swiglu(c->gate, c->up, (size_t)n * F);
    matmul_t(c->gate, L->w_down, n, F, E, 1.0f, x);
    return KVC_OK;
}

kvc_status kvch_llama_eval_layer(kvch_llama_ctx *c, kvch_kv *kv, uint32_t layer, uint32_t n,
                                 int32_t pos0, const uint8_t *flags, float *x, float *xn_out,
                                 char *err, size_t cap)
{
    if (!c || !kv || !x || n == 0 || pos0 < 0)
        return kvch_fail(err, cap, KVC_E_INVALID, "layer: bad arguments (n %u, pos0 %d)", n,
                         (int)pos0);
    if (layer >= c->m->hp.n_layer || n > c->max_batch)
        return kvch_fail(err, cap, KVC_E_INVALID,
                         "layer: layer %u of %u, or %u tokens above the context's batch of %u",
                         layer, c->m->hp.n_layer, n, c->max_batch);
    for (uint32_t i = 0; i < n; i++)
        c->pos[i] = pos0 + (int32_t)i;
    return layer_step(c, kv, layer, n, flags, x, xn_out ? xn_out : c->xn, err, cap);
}

/* One micro-batch of n <= max_batch tokens; logits for its last n_logits. */
static kvc_status eval_batch(kvch_llama_ctx *c, kvch_kv *kv, const int32_t *tokens,
                             const uint8_t *flags, uint32_t n, int32_t pos0, float *logits,
                             uint32_t n_logits, char *err, size_t cap)
{
    const kvch_llama *m = c->m;
    const kvch_llama_hparams *hp = &m->hp;
    const size_t E = hp->n_embd;

    kvch_llama_embed(m, tokens, n, c->x);
    for (uint32_t i = 0; i < n; i++)
        c->pos[i] = pos0 + (int32_t)i;
    for (uint32_t il = 0; il < hp->n_layer; il++) {
        kvc_status s = layer_step(c, kv, il, n, flags, c->x, c->xn, err, cap);
        if (s)
            return s;
    }
    if (logits && n_logits) {
        const float *xl = c->x + (size_t)(n - n_logits) * E;
        kvch_rmsnorm(xl, m->out_norm, hp->rms_eps, n_logits, E, c->xn);
        kvch_linear(c->xn, m->output, NULL, n_logits, E, hp->n_vocab, logits);
    }
    return KVC_OK;
}

kvc_status kvch_llama_eval(kvch_llama_ctx *c, kvch_kv *kv, const int32_t *tokens,
                           const uint8_t *flags, uint32_t n, int32_t pos0, float *logits,
                           uint32_t n_logits, char *err, size_t cap)
{
    if (!c || !kv || !tokens || n == 0 || n_logits > n || pos0 < 0)
        return kvch_fail(err, cap, KVC_E_INVALID, "eval: bad arguments (n %u, n_logits %u, pos0 %d)",
                    n, n_logits, (int)pos0);
    const uint32_t V = c->m->hp.n_vocab;
    for (uint32_t i = 0; i < n; i++)
        if (tokens[i] < 0 || (uint32_t)tokens[i] >= V)
            return kvch_fail(err, cap, KVC_E_INVALID, "eval: token %d at %u is outside the vocabulary "
                        "of %u", (int)tokens[i], i, V);
    for (uint32_t done = 0; done < n;) {
        uint32_t nb = n - done < c->max_batch ? n - done : c->max_batch;
        /* logits wanted from this micro-batch: those among the last n_logits */
        uint32_t first_logit = n - n_logits; /* index of the first token with logits */
        uint32_t lo = first_logit > done ? first_logit : done;
        uint32_t nl = lo < done + nb ? done + nb - lo : 0;
        float *lp = nl ? logits + (size_t)(lo - first_logit) * V : NULL;
        kvc_status s = eval_batch(c, kv, tokens + done, flags ? flags + done : NULL, nb,
                                  pos0 + (int32_t)done, lp, nl, err, cap);
        if (s)
            return s;
        done += nb;
    }
    return KVC_OK;
}
