/*
 * run.c -- perplexity, generation and the preparation feed over a loaded
 * model and a KV store.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "errmsg.h"
#include "run.h"

#define MODEL_NAME "SmolLM2-135M-Instruct.Q4_1.gguf"


static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- files and the model ---------------------------------------------------- */

kvc_status kvch_read_file(const char *path, char **buf, size_t *len, char *err, size_t cap)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return kvch_fail(err, cap, KVC_E_INVALID, "%s: %s", path, strerror(errno));
    size_t n = 0, have = 1 << 16;
    char *b = malloc(have);
    for (;;) {
        if (!b) {
            fclose(f);
            return kvch_fail(err, cap, KVC_E_NOMEM, "%s: out of memory", path);
        }
        n += fread(b + n, 1, have - n - 1, f);
        if (n < have - 1)
            break;
        char *nb = realloc(b, have * 2);
        if (!nb)
            free(b);
        b = nb;
        have *= 2;
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        free(b);
        return kvch_fail(err, cap, KVC_E_INVALID, "%s: read error", path);
    }
    b[n] = '\0';
    *buf = b;
    *len = n;
    return KVC_OK;
}

const char *kvch_default_model(char *buf, size_t cap)
{
    const char *m = getenv("KVC_MODEL"), *d = getenv("KVC_MODEL_DIR"), *h = getenv("HOME");
    if (m && *m)
        snprintf(buf, cap, "%s", m);
    else if (d && *d)
        snprintf(buf, cap, "%s/%s", d, MODEL_NAME);
    else
        snprintf(buf, cap, "%s/.cache/kvc/%s", h ? h : "", MODEL_NAME);
    return buf;
}

kvc_status kvch_model_open(const char *path, kvch_model *m, char *err, size_t cap)
{
    char def[4096];
    memset(m, 0, sizeof *m);
    if (!path) {
        path = kvch_default_model(def, sizeof def);
        if (access(path, R_OK) != 0)
            return kvch_fail(err, cap, KVC_E_INVALID,
                        "model %s: %s; run scripts/fetch-model.sh to download it, or give "
                        "--model PATH (or set KVC_MODEL)",
                        path, strerror(errno));
    }
    double t0 = now_s();
    char e[512];
    kvc_status s = kvch_gguf_open(path, &m->gguf, e, sizeof e);
    if (!s && (s = kvch_llama_load(m->gguf, &m->llama, e, sizeof e)) == KVC_OK)
        s = kvch_tok_from_gguf(m->gguf, &m->tok, e, sizeof e);
    if (s) {
        kvch_model_close(m);
        return kvch_fail(err, cap, s, "%s: %s", path, e);
    }
    if ((uint32_t)kvch_tok_n_vocab(m->tok) > m->llama->hp.n_vocab) {
        kvch_model_close(m);
        return kvch_fail(err, cap, KVC_E_CORRUPT, "%s: %d tokens in the vocabulary, %u embedding rows",
                    path, (int)kvch_tok_n_vocab(m->tok), m->llama->hp.n_vocab);
    }
    m->load_s = now_s() - t0;
    return KVC_OK;
}

void kvch_model_close(kvch_model *m)
{
    if (!m)
        return;
    kvch_tok_free(m->tok);
    kvch_llama_free(m->llama);
    kvch_gguf_close(m->gguf);
    memset(m, 0, sizeof *m);
}

/* ---- perplexity ---------------------------------------------------------------- */

/* One store's side of a perplexity run: its logits buffer and NLL sums. */
typedef struct ppl_side {
    kvch_kv *kv;
    kvch_ppl_result *r;
    float *logits; /* (n_gen, n_vocab): the chunk's scored positions */
    double nll, nll2;
} ppl_side;

/* Scores chunk ch (tokens t [n_ctx], flags fl or NULL) on one store: a fresh
 * sequence, the first half as one prompt eval, the second half batched or
 * token by token into side->logits, its NLL added to the sums and its
 * timing to side->r. On the last chunk, the store's bytes per token. */
static kvc_status ppl_chunk(kvch_llama_ctx *c, const kvch_llama *m, ppl_side *side,
                            const int32_t *t, const uint8_t *fl, uint32_t ch, uint32_t n_chunks,
                            const kvch_ppl_params *p, char *err, size_t cap)
{
    const uint32_t n_ctx = p->n_ctx, first = n_ctx / 2, n_gen = n_ctx - 1 - first;
    const size_t V = m->hp.n_vocab;
    kvch_kv *kv = side->kv;
    kvch_ppl_result *r = side->r;
    float *logits = side->logits;
    kvc_status s;
    if ((s = kvch_kv_reset(kv, err, cap)))
        return s;
    double t0 = now_s();
    if ((s = kvch_llama_eval(c, kv, t, fl, first, 0, NULL, 0, err, cap)))
        return s;
    double t1 = now_s();
    if (p->token_by_token) {
        for (uint32_t i = 0; i < n_gen && !s; i++)
            s = kvch_llama_eval(c, kv, t + first + i, fl ? fl + first + i : NULL, 1,
                                (int32_t)(first + i), logits + (size_t)i * V, 1, err, cap);
    } else {
        s = kvch_llama_eval(c, kv, t + first, fl ? fl + first : NULL, n_gen, (int32_t)first,
                            logits, n_gen, err, cap);
    }
    if (s)
        return s;
    double t2 = now_s();
    r->prefill_s += t1 - t0;
    r->gen_s += t2 - t1;
    r->prefill_tokens += first;
    r->gen_tokens += n_gen;
    for (uint32_t i = 0; i < n_gen; i++) {
        double lp = kvch_log_softmax_at(logits + (size_t)i * V, V, (size_t)t[first + i + 1]);
        side->nll -= lp;
        side->nll2 += lp * lp;
    }
    r->n_scored += n_gen;
    r->n_chunks = ch + 1;
    if (ch + 1 == n_chunks) {
        kvc_seq_stats st;
        if ((s = kvch_kv_stats(kv, &st)))
            return s;
        double toks = (double)st.tokens_appended / m->hp.n_layer;
        r->kv_bytes_per_token = toks > 0 ? (double)st.bytes_resident / toks : 0.0;
        r->fp16_bytes_per_token = toks > 0 ? (double)st.bytes_fp16_full / toks : 0.0;
    }
    return KVC_OK;
}

static void ppl_finish(const ppl_side *side)
{
    kvch_ppl_result *r = side->r;
    double mean = side->nll / (double)r->n_scored,
           var = side->nll2 / (double)r->n_scored - mean * mean;
    r->ppl = exp(mean);
    r->ppl_err = var > 0 && r->n_scored > 1 ? r->ppl * sqrt(var / (double)(r->n_scored - 1)) : 0;
}

kvc_status kvch_perplexity(kvch_llama_ctx *c, kvch_kv *kv, const kvch_llama *m,
                           const int32_t *tokens, const uint8_t *flags, size_t n_tokens,
                           const kvch_ppl_params *p, kvch_ppl_result *r, char *err, size_t cap)
{
    return kvch_perplexity_vs(c, kv, NULL, m, tokens, flags, n_tokens, p, r, NULL, NULL, err,
                              cap);
}

kvc_status kvch_perplexity_vs(kvch_llama_ctx *c, kvch_kv *kv, kvch_kv *ref, const kvch_llama *m,
                              const int32_t *tokens, const uint8_t *flags, size_t n_tokens,
                              const kvch_ppl_params *p, kvch_ppl_result *r,
                              kvch_ppl_result *r_ref, kvch_kld *kld, char *err, size_t cap)
{
    const uint32_t n_ctx = p->n_ctx, first = n_ctx / 2, n_gen = n_ctx - 1 - first;
    const size_t V = m->hp.n_vocab;
    if (n_ctx < 4 || n_ctx % 2)
        return kvch_fail(err, cap, KVC_E_INVALID, "perplexity: context %u must be even and >= 4",
                    n_ctx);
    if (ref && !r_ref)
        return kvch_fail(err, cap, KVC_E_INVALID, "perplexity: a reference store and no result");
    if (kld && !ref)
        return kvch_fail(err, cap, KVC_E_INVALID, "perplexity: KL divergence needs a reference");
    size_t avail = n_tokens / n_ctx;
    if (avail == 0)
        return kvch_fail(err, cap, KVC_E_INVALID,
                    "perplexity: the text has %zu tokens, fewer than one chunk of %u", n_tokens,
                    n_ctx);
    uint32_t n_chunks = p->n_chunks && p->n_chunks < avail ? p->n_chunks : (uint32_t)avail;
    ppl_side me = {kv, r, malloc((size_t)n_gen * V * sizeof(float)), 0, 0};
    ppl_side rs = {ref, r_ref, ref ? malloc((size_t)n_gen * V * sizeof(float)) : NULL, 0, 0};
    if (!me.logits || (ref && !rs.logits)) {
        free(me.logits);
        free(rs.logits);
        return kvch_fail(err, cap, KVC_E_NOMEM, "perplexity: out of memory for logits");
    }

    memset(r, 0, sizeof *r);
    if (r_ref)
        memset(r_ref, 0, sizeof *r_ref);
    kvc_status s = KVC_OK;
    for (uint32_t ch = 0; ch < n_chunks && !s; ch++) {
        const int32_t *t = tokens + (size_t)ch * n_ctx;
        const uint8_t *fl = flags ? flags + (size_t)ch * n_ctx : NULL;
        /* The reference first: kv's calls are the same as without one. */
        if (ref && (s = ppl_chunk(c, m, &rs, t, fl, ch, n_chunks, p, err, cap))) {
            char why[512];
            snprintf(why, sizeof why, "%s", err && cap ? err : "");
            s = kvch_fail(err, cap, s, "reference store: %s", why);
            break;
        }
        if ((s = ppl_chunk(c, m, &me, t, fl, ch, n_chunks, p, err, cap)))
            break;
        if (kld && (s = kvch_kld_add(kld, rs.logits, me.logits, n_gen, V, t + first + 1, err,
                                     cap)))
            break;
        if (p->chunk_done && (s = p->chunk_done(p->chunk_user, ch, kv, err, cap)))
            break;
        if (p->progress)
            p->progress(p->user, ch + 1, n_chunks, exp(me.nll / (double)r->n_scored));
    }
    free(me.logits);
    free(rs.logits);
    if (s)
        return s;
    ppl_finish(&me);
    if (ref)
        ppl_finish(&rs);
    return KVC_OK;
}

/* ---- generation -------------------------------------------------------------------- */

static uint64_t rng_next(uint64_t *s)
{
    /* splitmix64: a small, well-mixed generator; sampling needs no more */
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

typedef struct cand {
    float logit;
    int32_t id;
} cand;

static int cand_desc(const void *a, const void *b)
{
    float x = ((const cand *)a)->logit, y = ((const cand *)b)->logit;
    return x < y ? 1 : x > y ? -1 : 0;
}

/* Picks the next token from logits [V] (modified in place by the penalty). */
static int32_t sample(float *logits, size_t V, const kvch_gen_params *p, const int32_t *recent,
                      size_t n_recent, cand *cands, uint64_t *rng)
{
    if (p->repeat_penalty > 0.0f && p->repeat_penalty != 1.0f)
        for (size_t i = 0; i < n_recent; i++) {
            float *l = &logits[recent[i]];
            *l = *l > 0 ? *l / p->repeat_penalty : *l * p->repeat_penalty;
        }
    if (p->temperature <= 0.0f) {
        size_t best = 0;
        for (size_t i = 1; i < V; i++)
            best = logits[i] > logits[best] ? i : best;
        return (int32_t)best;
    }
    for (size_t i = 0; i < V; i++)
        cands[i] = (cand){logits[i] / p->temperature, (int32_t)i};
    qsort(cands, V, sizeof *cands, cand_desc);
    size_t n = p->top_k && p->top_k < V ? p->top_k : V;
    double sum = 0.0;
    for (size_t i = 0; i < n; i++)
        sum += exp((double)cands[i].logit - cands[0].logit);
    if (p->top_p > 0.0f && p->top_p < 1.0f) {
        double acc = 0.0;
        for (size_t i = 0; i < n; i++) {
            acc += exp((double)cands[i].logit - cands[0].logit) / sum;
            if (acc >= p->top_p) {
                n = i + 1;
                break;
            }
        }
        sum = 0.0;
        for (size_t i = 0; i < n; i++)
            sum += exp((double)cands[i].logit - cands[0].logit);
    }
    double u = (double)(rng_next(rng) >> 11) * 0x1.0p-53 * sum;
    for (size_t i = 0; i < n; i++) {
        u -= exp((double)cands[i].logit - cands[0].logit);
        if (u <= 0.0)
            return cands[i].id;
    }
    return cands[n - 1].id;
}

kvc_status kvch_generate(kvch_llama_ctx *c, kvch_kv *kv, const kvch_model *m,
                         const int32_t *prompt, uint32_t n_prompt, const kvch_gen_params *p,
                         int32_t *out_ids, kvch_gen_result *r, char *err, size_t cap)
{
    const size_t V = m->llama->hp.n_vocab;
    if (!n_prompt)
        return kvch_fail(err, cap, KVC_E_INVALID, "generate: empty prompt");
    memset(r, 0, sizeof *r);
    r->n_prompt = n_prompt;
    float *logits = malloc(V * sizeof(float));         /* (n_vocab) */
    cand *cands = malloc(V * sizeof(cand));            /* (n_vocab) */
    size_t hist_cap = (size_t)n_prompt + p->n_predict; /* (prompt + generated) */
    int32_t *hist = malloc(hist_cap * sizeof(int32_t));
    if (!logits || !cands || !hist) {
        free(logits);
        free(cands);
        free(hist);
        return kvch_fail(err, cap, KVC_E_NOMEM, "generate: out of memory");
    }
    memcpy(hist, prompt, n_prompt * sizeof(int32_t));
    size_t n_hist = n_prompt;
    uint8_t *pflags = malloc(n_prompt);
    if (pflags)
        for (uint32_t i = 0; i < n_prompt; i++)
            pflags[i] = kvch_tok_flags(m->tok, prompt[i]);
    uint64_t rng = p->seed;
    double t0 = now_s();
    kvc_status s = kvch_llama_eval(c, kv, prompt, pflags, n_prompt, 0, logits, 1, err, cap);
    free(pflags);
    r->prefill_s = now_s() - t0;
    t0 = now_s();
    for (uint32_t i = 0; !s && i < p->n_predict; i++) {
        size_t back = p->repeat_last < n_hist ? p->repeat_last : n_hist;
        int32_t id = sample(logits, V, p, hist + n_hist - back, back, cands, &rng);
        int stop = 0;
        for (uint32_t j = 0; j < p->n_stop; j++)
            stop |= p->stop[j] == id;
        if (stop) {
            r->stopped = 1;
            break;
        }
        hist[n_hist++] = id;
        if (out_ids)
            out_ids[r->n_generated] = id;
        r->n_generated++;
        if (p->on_token && p->on_token(p->user, id))
            break;
        if (i + 1 == p->n_predict)
            break;
        uint8_t fl = kvch_tok_flags(m->tok, id);
        s = kvch_llama_eval(c, kv, &id, &fl, 1, (int32_t)(n_hist - 1), logits, 1, err, cap);
    }
    r->decode_s = now_s() - t0;
    if (!s)
        s = kvch_kv_stats(kv, &r->kv);
    free(logits);
    free(cands);
    free(hist);
    return s;
}

/* ---- preparation feed ----------------------------------------------------------------- */

typedef struct feed {
    const kvc_plugin *p;
    kvc_instance *inst;
    char *err;
    size_t cap;
} feed;

/* The forward pass's attention inputs, straight to the plugin. */
static kvc_status feed_hook(void *user, uint32_t layer, uint32_t n, const int32_t *pos,
                            const float *x)
{
    feed *f = user;
    kvc_calib_chunk ch = {.struct_size = sizeof ch, .n_rows = n, .x = x, .positions = pos};
    kvc_status s = f->p->prepare_layer(f->inst, layer, NULL, &ch);
    if (s)
        kvch_fail(f->err, f->cap, s, "%s: prepare_layer(layer %u, %u calibration rows): %s", f->p->id,
             layer, n, f->p->instance_message(f->inst));
    return s;
}

/* Exact passes over calib [n] in windows of win: the plugin gets every
 * layer's attention inputs as they come (x_ref NULL). */
static kvc_status feed_exact(const kvc_plugin *p, kvc_instance *inst, const kvch_llama *m,
                             const int32_t *calib, size_t n, uint32_t win,
                             const kvch_prepare_params *pp, kvch_prepare_result *r, char *err,
                             size_t cap)
{
    kvc_geometry geo;
    kvch_llama_geometry(m, win, &geo);
    kvch_kv *kv = NULL;
    kvch_llama_ctx *c = NULL;
    feed f = {p, inst, err, cap};
    kvc_status s;
    if ((s = kvch_kv_exact(&geo, &kv, err, cap)) ||
        (s = kvch_llama_ctx_new(m, win, &c, err, cap))) {
        kvch_kv_free(kv);
        return s;
    }
    kvch_llama_ctx_hook(c, feed_hook, &f);
    for (size_t at = 0; at < n && !s; at += win) {
        uint32_t nw = n - at < win ? (uint32_t)(n - at) : win;
        if (!(s = kvch_kv_reset(kv, err, cap)))
            s = kvch_llama_eval(c, kv, calib + at, NULL, nw, 0, NULL, 0, err, cap);
        if (!s) {
            r->calib_tokens += nw;
            r->calib_windows++;
            if (pp->progress)
                pp->progress(pp->user, "calibration", at + nw, n);
        }
    }
    kvch_llama_ctx_free(c);
    kvch_kv_free(kv);
    return s;
}

/* Layer-major calibration through the layers already finalized (SVD-LLM's
 * sequential update). Every window keeps two residual streams: the exact
 * model's and the one whose attention so far went through the plugin. For
 * layer l: feed both streams' attention inputs (x = compressed, x_ref =
 * exact), finalize_layer(l), then advance every window through layer l:
 * the exact stream over a fresh exact store, the compressed one over a
 * fresh plugin sequence (each window is its own sequence, and only layer
 * l's K/V are needed). The caller calls finalize(). */
static kvc_status feed_sequential(const kvc_plugin *p, kvc_instance *inst, const kvch_llama *m,
                                  const int32_t *calib, size_t n, uint32_t win,
                                  const kvch_prepare_params *pp, kvch_prepare_result *r,
                                  char *err, size_t cap)
{
    const kvch_llama_hparams *hp = &m->hp;
    const uint32_t L = hp->n_layer;
    const size_t E = hp->n_embd;
    for (size_t i = 0; i < n; i++)
        if (calib[i] < 0 || (uint32_t)calib[i] >= hp->n_vocab)
            return kvch_fail(err, cap, KVC_E_INVALID,
                             "calibration token %d at %zu is outside the vocabulary of %u",
                             (int)calib[i], i, hp->n_vocab);
    kvc_geometry geo;
    kvch_llama_geometry(m, win, &geo);
    /* residual streams, window after window: (n, n_embd) each */
    float *x_ex = malloc(n * E * sizeof(float)); /* the exact model */
    float *x_cp = malloc(n * E * sizeof(float)); /* attention through the plugin */
    /* one window's attention inputs: (win, n_embd) each */
    float *xn_ex = malloc(win * E * sizeof(float));
    float *xn_cp = malloc(win * E * sizeof(float));
    int32_t *pos = malloc(win * sizeof(int32_t)); /* (win) 0 .. win-1 */
    kvch_kv *kv_ex = NULL, *kv_cp = NULL;
    kvch_llama_ctx *c = NULL;
    kvc_status s = KVC_OK;
    if (!x_ex || !x_cp || !xn_ex || !xn_cp || !pos)
        s = kvch_fail(err, cap, KVC_E_NOMEM,
                      "sequential calibration: out of memory for 2 x %zu x %zu floats", n, E);
    if (!s && !(s = kvch_kv_exact(&geo, &kv_ex, err, cap)))
        s = kvch_llama_ctx_new(m, win, &c, err, cap);
    if (!s) {
        for (uint32_t i = 0; i < win; i++)
            pos[i] = (int32_t)i;
        for (size_t at = 0; at < n; at += win)
            kvch_llama_embed(m, calib + at, n - at < win ? (uint32_t)(n - at) : win,
                             x_ex + at * E);
        memcpy(x_cp, x_ex, n * E * sizeof(float));
    }
    for (uint32_t l = 0; l < L && !s; l++) {
        const kvch_llama_layer *ly = &m->layers[l];
        for (size_t at = 0; at < n && !s; at += win) {
            uint32_t nw = n - at < win ? (uint32_t)(n - at) : win;
            /* the attention inputs, as layer l computes them */
            kvch_rmsnorm(x_ex + at * E, ly->attn_norm, hp->rms_eps, nw, E, xn_ex);
            kvch_rmsnorm(x_cp + at * E, ly->attn_norm, hp->rms_eps, nw, E, xn_cp);
            kvc_calib_chunk ch = {.struct_size = sizeof ch, .n_rows = nw, .x = xn_cp,
                                  .positions = pos, .x_ref = xn_ex};
            if ((s = p->prepare_layer(inst, l, NULL, &ch)))
                kvch_fail(err, cap, s,
                          "%s: prepare_layer(layer %u, %u sequential calibration rows): %s",
                          p->id, l, nw, p->instance_message(inst));
        }
        if (s)
            break;
        double t0 = now_s();
        if ((s = p->finalize_layer(inst, l))) {
            kvch_fail(err, cap, s, "%s: finalize_layer(layer %u): %s", p->id, l,
                      p->instance_message(inst));
            break;
        }
        r->finalize_layers_s += now_s() - t0;
        /* advance through layer l (the last layer's output feeds nothing);
         * no plugin sequence stays open across prepare_layer/finalize_layer */
        for (size_t at = 0; at < n && !s && l + 1 < L; at += win) {
            uint32_t nw = n - at < win ? (uint32_t)(n - at) : win;
            if (!(s = kvch_kv_reset(kv_ex, err, cap)))
                s = kvch_llama_eval_layer(c, kv_ex, l, nw, 0, NULL, x_ex + at * E, NULL, err,
                                          cap);
            if (!s)
                s = kv_cp ? kvch_kv_reset(kv_cp, err, cap)
                          : kvch_kv_plugin(p, inst, &kv_cp, err, cap);
            if (!s)
                s = kvch_llama_eval_layer(c, kv_cp, l, nw, 0, NULL, x_cp + at * E, NULL, err,
                                          cap);
        }
        kvch_kv_free(kv_cp);
        kv_cp = NULL;
        if (!s && pp->progress)
            pp->progress(pp->user, "sequential calibration", l + 1, L);
    }
    if (!s) {
        r->calib_tokens = n;
        r->calib_windows = (uint32_t)((n + win - 1) / win);
        r->sequential = 1;
    }
    kvch_kv_free(kv_ex);
    kvch_llama_ctx_free(c);
    free(x_ex);
    free(x_cp);
    free(xn_ex);
    free(xn_cp);
    free(pos);
    return s;
}

kvc_status kvch_prepare(const kvc_plugin *p, kvc_instance *inst, const kvch_llama *m,
                        const int32_t *calib, size_t n_calib, const kvch_prepare_params *pp,
                        kvch_prepare_result *r, char *err, size_t cap)
{
    memset(r, 0, sizeof *r);
    const uint32_t L = m->hp.n_layer;
    kvc_status s = KVC_OK;
    double t0 = now_s();
    if (p->caps & KVC_CAP_NEEDS_WEIGHTS)
        for (uint32_t l = 0; l < L; l++) {
            kvc_layer_weights w;
            kvch_llama_layer_weights(m, l, &w);
            if ((s = p->prepare_layer(inst, l, &w, NULL)))
                return kvch_fail(err, cap, s, "%s: prepare_layer(layer %u, weights): %s", p->id, l,
                            p->instance_message(inst));
            if (pp->progress)
                pp->progress(pp->user, "weights", l + 1, L);
        }
    if (p->caps & KVC_CAP_NEEDS_CALIBRATION) {
        size_t n = pp->max_tokens && pp->max_tokens < n_calib ? (size_t)pp->max_tokens : n_calib;
        if (n == 0)
            return kvch_fail(err, cap, KVC_E_INVALID, "%s needs calibration text and none was given",
                        p->id);
        uint32_t win = pp->n_ctx ? pp->n_ctx : 512;
        s = pp->sequential ? feed_sequential(p, inst, m, calib, n, win, pp, r, err, cap)
                           : feed_exact(p, inst, m, calib, n, win, pp, r, err, cap);
        if (s)
            return s;
    }
    double t1 = now_s();
    r->feed_s = t1 - t0;
    if ((s = p->finalize(inst)))
        return kvch_fail(err, cap, s, "%s: finalize: %s", p->id, p->instance_message(inst));
    r->finalize_s = now_s() - t1;
    return KVC_OK;
}
