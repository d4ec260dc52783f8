/*
 * test_model.c -- the reference model host: forward-pass pieces against
 * hand-computed values, a tiny random Llama against a float64 reference
 * written here from the equations, batched prefill == token-by-token
 * decode, the `full` plugin == the built-in exact path, the layer-by-layer
 * pass == eval, the preparation feed (exact and sequential, ABI 1.1), and
 * on SmolLM2 (skipped when the model is absent): perplexity
 * through `full` equal to the exact path and fp16 within 0.1%, and the KL
 * divergence from the exact path (kvch_perplexity_vs, `kvc ppl --kld`):
 * 0 for full, small and positive for fp16.
 */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "kvch.h"
#include "model_path.h"
#include "run.h"

/* ---- pieces, by hand --------------------------------------------------------- */

START_TEST(rmsnorm_by_hand)
{
    /* x = [1, 2, 3, 4]: mean(x^2) = 30/4 = 7.5; eps 0.5 -> 1/sqrt(8) */
    const float x[4] = {1, 2, 3, 4}, w[4] = {1, 0.5f, -1, 2};
    float y[4];
    kvch_rmsnorm(x, w, 0.5f, 1, 4, y);
    const double s = 1.0 / sqrt(8.0);
    const double want[4] = {1 * s, 2 * s * 0.5, -3 * s, 8 * s};
    for (int i = 0; i < 4; i++)
        ck_assert_double_eq_tol(y[i], want[i], 1e-6);
    /* two rows are normalized independently, in place */
    float z[8] = {1, 2, 3, 4, 2, 4, 6, 8};
    kvch_rmsnorm(z, w, 0.5f, 2, 4, z);
    ck_assert_double_eq_tol(z[0], want[0], 1e-6);
    /* row 2: mean(x^2) = 30, 1/sqrt(30.5) */
    ck_assert_double_eq_tol(z[7], 8 * 2 / sqrt(30.5), 1e-6);
}
END_TEST

START_TEST(swiglu_by_hand)
{
    float g[3] = {0, 1, -2};
    const float u[3] = {5, 2, 3};
    kvch_swiglu(g, u, 3);
    ck_assert_double_eq_tol(g[0], 0.0, 1e-7);
    ck_assert_double_eq_tol(g[1], 1.0 / (1.0 + exp(-1.0)) * 2.0, 1e-6);
    ck_assert_double_eq_tol(g[2], -2.0 / (1.0 + exp(2.0)) * 3.0, 1e-6);
}
END_TEST

START_TEST(linear_by_hand)
{
    /* W [2][3], x [2][3]: y = x W^T + b */
    const float w[6] = {1, 2, 3, -1, 0, 1}, x[6] = {1, 1, 1, 2, 0, -1}, b[2] = {0.5f, -1};
    float y[4];
    kvch_linear(x, w, b, 2, 3, 2, y);
    const float want[4] = {6.5f, -1.0f, -0.5f, -4.0f};
    for (int i = 0; i < 4; i++)
        ck_assert_float_eq_tol(y[i], want[i], 1e-6f);
    kvch_linear(x, w, NULL, 2, 3, 2, y);
    ck_assert_float_eq_tol(y[0], 6.0f, 1e-6f);
}
END_TEST

START_TEST(log_softmax_by_hand)
{
    const float row[3] = {1, 2, 3};
    double lse = log(exp(1.0) + exp(2.0) + exp(3.0));
    ck_assert_double_eq_tol(kvch_log_softmax_at(row, 3, 2), 3.0 - lse, 1e-9);
    ck_assert_double_eq_tol(kvch_log_softmax_at(row, 3, 0), 1.0 - lse, 1e-9);
    /* large logits do not overflow */
    const float big[2] = {1000, 1000};
    ck_assert_double_eq_tol(kvch_log_softmax_at(big, 2, 1), -log(2.0), 1e-9);
}
END_TEST

/* ---- a tiny random Llama ----------------------------------------------------- */

static uint64_t rng = 12345;
static float rnd(void) /* [-1, 1) */
{
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((double)(rng >> 40) / (double)(1ull << 23) - 1.0);
}

static float *rand_arr(size_t n, float scale, float offset)
{
    float *p = malloc(n * sizeof *p);
    ck_assert_ptr_nonnull(p);
    for (size_t i = 0; i < n; i++)
        p[i] = offset + scale * rnd();
    return p;
}

/* 2 layers, width 16, 4 query heads over 2 KV heads of 4, vocab 32. */
static kvch_llama *tiny_model(int with_bias)
{
    kvch_llama *m = calloc(1, sizeof *m);
    ck_assert_ptr_nonnull(m);
    kvch_llama_hparams *hp = &m->hp;
    strcpy(hp->arch, "llama");
    hp->n_layer = 2;
    hp->n_embd = 16;
    hp->n_ff = 24;
    hp->n_head = 4;
    hp->n_head_kv = 2;
    hp->head_dim = 4;
    hp->n_vocab = 32;
    hp->n_ctx_train = 256;
    hp->rms_eps = 1e-5f;
    hp->rope_style = KVC_ROPE_ADJACENT;
    hp->rope_dims = 4;
    hp->rope_theta = 10000.0f;
    hp->rope_scale = 1.0f;
    const size_t E = 16, Q = 16, KV = 8, F = 24;
    m->tok_embd = rand_arr(32 * E, 1.0f, 0);
    m->out_norm = rand_arr(E, 0.2f, 1.0f);
    m->output = rand_arr(32 * E, 0.5f, 0);
    m->layers = calloc(2, sizeof *m->layers);
    for (int l = 0; l < 2; l++) {
        kvch_llama_layer *L = &m->layers[l];
        L->attn_norm = rand_arr(E, 0.2f, 1.0f);
        L->wq = rand_arr(Q * E, 0.5f, 0);
        L->wk = rand_arr(KV * E, 0.5f, 0);
        L->wv = rand_arr(KV * E, 0.5f, 0);
        L->wo = rand_arr(E * Q, 0.3f, 0);
        if (with_bias) {
            L->bq = rand_arr(Q, 0.3f, 0);
            L->bk = rand_arr(KV, 0.3f, 0);
            L->bv = rand_arr(KV, 0.3f, 0);
        }
        L->ffn_norm = rand_arr(E, 0.2f, 1.0f);
        L->w_gate = rand_arr(F * E, 0.4f, 0);
        L->w_up = rand_arr(F * E, 0.4f, 0);
        L->w_down = rand_arr(E * F, 0.3f, 0);
    }
    hp->has_qkv_bias = with_bias;
    return m;
}

/* y[o] = sum_i W[o][i] x[i] (+ b[o]), in double. */
static void ref_linear(const float *w, const float *b, const double *x, size_t in, size_t out,
                       double *y)
{
    for (size_t o = 0; o < out; o++) {
        double s = b ? b[o] : 0.0;
        for (size_t i = 0; i < in; i++)
            s += (double)w[o * in + i] * x[i];
        y[o] = s;
    }
}

static void ref_rmsnorm(const double *x, const float *w, double eps, size_t d, double *y)
{
    double ss = 0;
    for (size_t i = 0; i < d; i++)
        ss += x[i] * x[i];
    double inv = 1.0 / sqrt(ss / d + eps);
    for (size_t i = 0; i < d; i++)
        y[i] = x[i] * inv * w[i];
}

/* Rotates adjacent pairs (2i, 2i+1) of each head by pos * theta^(-2i/d). */
static void ref_rope(double *x, size_t n_heads, size_t d, double theta, int pos)
{
    for (size_t h = 0; h < n_heads; h++)
        for (size_t i = 0; i < d / 2; i++) {
            double a = pos * pow(theta, -2.0 * i / d), c = cos(a), s = sin(a);
            double *p = x + h * d + 2 * i, x0 = p[0], x1 = p[1];
            p[0] = x0 * c - x1 * s;
            p[1] = x0 * s + x1 * c;
        }
}

/* The whole model from its equations, double precision: logits [n][V]. */
static void ref_forward(const kvch_llama *m, const int32_t *tok, size_t n, double *logits)
{
    const kvch_llama_hparams *hp = &m->hp;
    const size_t E = hp->n_embd, d = hp->head_dim, H = hp->n_head, HK = hp->n_head_kv,
                 F = hp->n_ff, V = hp->n_vocab;
    double *x = calloc(n * E, sizeof *x), *xn = malloc(E * sizeof *xn);
    double *q = malloc(n * H * d * sizeof *q), *k = malloc(n * HK * d * sizeof *k);
    double *v = malloc(n * HK * d * sizeof *v), *att = malloc(H * d * sizeof *att);
    double *o = malloc(E * sizeof *o), *g = malloc(F * sizeof *g), *u = malloc(F * sizeof *u);
    double *sc = malloc(n * sizeof *sc);
    for (size_t t = 0; t < n; t++)
        for (size_t i = 0; i < E; i++)
            x[t * E + i] = m->tok_embd[(size_t)tok[t] * E + i];
    for (uint32_t l = 0; l < hp->n_layer; l++) {
        const kvch_llama_layer *L = &m->layers[l];
        for (size_t t = 0; t < n; t++) {
            ref_rmsnorm(x + t * E, L->attn_norm, hp->rms_eps, E, xn);
            ref_linear(L->wq, L->bq, xn, E, H * d, q + t * H * d);
            ref_linear(L->wk, L->bk, xn, E, HK * d, k + t * HK * d);
            ref_linear(L->wv, L->bv, xn, E, HK * d, v + t * HK * d);
            ref_rope(q + t * H * d, H, d, hp->rope_theta, (int)t);
            ref_rope(k + t * HK * d, HK, d, hp->rope_theta, (int)t);
        }
        for (size_t t = 0; t < n; t++) {
            for (size_t h = 0; h < H; h++) {
                size_t kh = h / (H / HK);
                double mx = -INFINITY, sum = 0;
                for (size_t j = 0; j <= t; j++) {
                    double s = 0;
                    for (size_t i = 0; i < d; i++)
                        s += q[(t * H + h) * d + i] * k[(j * HK + kh) * d + i];
                    sc[j] = s / sqrt((double)d);
                    mx = sc[j] > mx ? sc[j] : mx;
                }
                for (size_t j = 0; j <= t; j++)
                    sum += (sc[j] = exp(sc[j] - mx));
                for (size_t i = 0; i < d; i++) {
                    double a = 0;
                    for (size_t j = 0; j <= t; j++)
                        a += sc[j] * v[(j * HK + kh) * d + i];
                    att[h * d + i] = a / sum;
                }
            }
            ref_linear(L->wo, NULL, att, H * d, E, o);
            for (size_t i = 0; i < E; i++)
                x[t * E + i] += o[i];
            ref_rmsnorm(x + t * E, L->ffn_norm, hp->rms_eps, E, xn);
            ref_linear(L->w_gate, NULL, xn, E, F, g);
            ref_linear(L->w_up, NULL, xn, E, F, u);
            for (size_t i = 0; i < F; i++)
                g[i] = g[i] / (1 + exp(-g[i])) * u[i];
            ref_linear(L->w_down, NULL, g, F, E, o);
            for (size_t i = 0; i < E; i++)
                x[t * E + i] += o[i];
        }
    }
    for (size_t t = 0; t < n; t++) {
        ref_rmsnorm(x + t * E, m->out_norm, hp->rms_eps, E, xn);
        ref_linear(m->output, NULL, xn, E, V, logits + t * V);
    }
    free(x), free(xn), free(q), free(k), free(v), free(att), free(o), free(g), free(u), free(sc);
}

static double rel_err(const float *a, const double *ref, size_t n)
{
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        num += (a[i] - ref[i]) * (a[i] - ref[i]);
        den += ref[i] * ref[i];
    }
    return sqrt(num / den);
}

static double rel_err_f(const float *a, const float *b, size_t n)
{
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        num += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
        den += (double)b[i] * b[i];
    }
    return sqrt(num / den);
}

#define TINY_N 70 /* more than one 64-token block */

static void tiny_tokens(int32_t *t, size_t n)
{
    for (size_t i = 0; i < n; i++)
        t[i] = (int32_t)((i * 7 + 3) % 32);
}

/* Logits of the tiny model over the exact store, in micro-batches of
 * max_batch, or token by token when step. */
static void tiny_eval(const kvch_llama *m, kvch_kv *kv, uint32_t max_batch, int step,
                      const int32_t *tok, size_t n, float *logits)
{
    char err[256];
    kvch_llama_ctx *c = NULL;
    ck_assert_int_eq(kvch_llama_ctx_new(m, max_batch, &c, err, sizeof err), KVC_OK);
    if (step) {
        for (size_t t = 0; t < n; t++)
            ck_assert_msg(kvch_llama_eval(c, kv, tok + t, NULL, 1, (int32_t)t,
                                          logits + t * m->hp.n_vocab, 1, err, sizeof err) == KVC_OK,
                          "%s", err);
    } else {
        ck_assert_msg(kvch_llama_eval(c, kv, tok, NULL, (uint32_t)n, 0, logits, (uint32_t)n, err,
                                      sizeof err) == KVC_OK,
                      "%s", err);
    }
    kvch_llama_ctx_free(c);
}

START_TEST(tiny_model_matches_float64_reference)
{
    kvch_llama *m = tiny_model(_i);
    const size_t V = m->hp.n_vocab;
    int32_t tok[TINY_N];
    tiny_tokens(tok, TINY_N);
    double *ref = malloc(TINY_N * V * sizeof *ref);
    float *got = malloc(TINY_N * V * sizeof *got);
    ref_forward(m, tok, TINY_N, ref);
    kvc_geometry geo;
    kvch_llama_geometry(m, 0, &geo);
    kvch_kv *kv = NULL;
    char err[256];
    ck_assert_int_eq(kvch_kv_exact(&geo, &kv, err, sizeof err), KVC_OK);
    tiny_eval(m, kv, 32, 0, tok, TINY_N, got); /* three micro-batches: 32, 32, 6 */
    double e = rel_err(got, ref, TINY_N * V);
    ck_assert_msg(e < 1e-5, "logits vs float64 reference: relative error %.3e", e);
    kvch_kv_free(kv);
    kvch_llama_free(m);
    free(ref);
    free(got);
}
END_TEST

START_TEST(tiny_batched_equals_token_by_token)
{
    kvch_llama *m = tiny_model(0);
    const size_t V = m->hp.n_vocab;
    int32_t tok[TINY_N];
    tiny_tokens(tok, TINY_N);
    float *a = malloc(TINY_N * V * sizeof *a), *b = malloc(TINY_N * V * sizeof *b);
    kvc_geometry geo;
    kvch_llama_geometry(m, 0, &geo);
    kvch_kv *kv = NULL;
    char err[256];
    ck_assert_int_eq(kvch_kv_exact(&geo, &kv, err, sizeof err), KVC_OK);
    tiny_eval(m, kv, 128, 0, tok, TINY_N, a);
    ck_assert_int_eq(kvch_kv_reset(kv, err, sizeof err), KVC_OK);
    tiny_eval(m, kv, 128, 1, tok, TINY_N, b);
    double e = rel_err_f(a, b, TINY_N * V);
    ck_assert_msg(e < 1e-6, "batched vs token by token: relative error %.3e", e);
    /* the store reports what it holds: 70 tokens in each of 2 layers */
    kvc_seq_stats st;
    ck_assert_int_eq(kvch_kv_stats(kv, &st), KVC_OK);
    ck_assert_uint_eq(st.tokens_appended, 2 * TINY_N);
    ck_assert_uint_eq(st.bytes_fp16_full, 2ull * TINY_N * 2 * 4 * 2 * 2);
    kvch_kv_free(kv);
    kvch_llama_free(m);
    free(a);
    free(b);
}
END_TEST

/* Loads kvc-full.so (KVC_PLUGIN_PATH points at the build's plugins/full)
 * and opens an instance on geo with one option. */
typedef struct plug {
    kvch_plugin *lib;
    const kvc_plugin *p;
    kvch_tracker *tr;
    kvc_host host;
    kvc_instance *inst;
} plug;

static void plug_open(plug *pl, const kvc_geometry *geo, const char *opt)
{
    char err[512];
    ck_assert_msg(kvch_load("full", &pl->lib, err, sizeof err) == KVC_OK, "%s", err);
    pl->p = kvch_plugin_desc(pl->lib);
    pl->tr = kvch_tracker_new();
    kvch_tracker_host(pl->tr, NULL, &pl->host);
    kvch_options o = {0};
    if (opt)
        ck_assert_int_eq(kvch_options_add(&o, opt, err, sizeof err), 0);
    kvc_create_info ci = {.struct_size = sizeof ci, .host = &pl->host, .geometry = geo,
                          .device = KVC_MEM_HOST, .dtype = KVC_DTYPE_F32};
    kvch_options_apply(&o, &ci);
    ck_assert_msg(pl->p->create(&ci, &pl->inst, err, sizeof err) == KVC_OK, "%s", err);
    kvch_options_clear(&o);
}

static void plug_close(plug *pl)
{
    pl->p->destroy(pl->inst);
    kvch_tracker_stats ts;
    kvch_tracker_get(pl->tr, &ts);
    ck_assert_uint_eq(ts.live, 0);
    kvch_tracker_free(pl->tr);
    kvch_unload(pl->lib);
}

START_TEST(tiny_full_plugin_equals_exact_path)
{
    kvch_llama *m = tiny_model(1);
    const size_t V = m->hp.n_vocab;
    int32_t tok[TINY_N];
    tiny_tokens(tok, TINY_N);
    float *a = malloc(TINY_N * V * sizeof *a), *b = malloc(TINY_N * V * sizeof *b);
    kvc_geometry geo;
    kvch_llama_geometry(m, 0, &geo);
    char err[256];
    kvch_kv *ex = NULL, *pk = NULL;
    ck_assert_int_eq(kvch_kv_exact(&geo, &ex, err, sizeof err), KVC_OK);
    plug pl;
    plug_open(&pl, &geo, NULL);
    ck_assert_int_eq(kvch_kv_plugin(pl.p, pl.inst, &pk, err, sizeof err), KVC_OK);
    tiny_eval(m, ex, 40, 0, tok, TINY_N, a);
    tiny_eval(m, pk, 40, 0, tok, TINY_N, b);
    /* same kernel, same blocks, same order: the same bits */
    ck_assert_msg(memcmp(a, b, TINY_N * V * sizeof *a) == 0,
                  "full (fp32) differs from the exact path: relative %.3e",
                  rel_err_f(b, a, TINY_N * V));
    kvc_seq_stats st;
    ck_assert_int_eq(kvch_kv_stats(pk, &st), KVC_OK);
    ck_assert_uint_eq(st.tokens_appended, 2 * TINY_N);
    kvch_kv_free(pk);
    kvch_kv_free(ex);
    plug_close(&pl);
    kvch_llama_free(m);
    free(a);
    free(b);
}
END_TEST

/* ---- the preparation feed, into a recording plugin ---------------------------- */

#define REC_ROWS 64 /* calibration rows recorded per layer */

typedef struct rec {
    const kvch_llama *m;
    uint32_t weights_calls[2], rows[2], chunks[2];
    int weights_ok, finalized, bad_order;
    double x_sum[2];
    /* ABI 1.1: the rows fed, and the sequential order */
    float x[2][REC_ROWS * 16], x_ref[2][REC_ROWS * 16];
    uint32_t ref_chunks[2];  /* chunks with x_ref set */
    int last_final;          /* last layer finalized, -1 before any */
    uint32_t finalize_layer_calls, appends[2], attends[2];
    int seqs_open;           /* sequences open now */
    int perturb;             /* halve the values appended: a lossy store */
} rec;
static rec R;

static void rec_reset(const kvch_llama *m)
{
    memset(&R, 0, sizeof R);
    R.m = m;
    R.last_final = -1;
}

static kvc_status rec_prepare(kvc_instance *inst, uint32_t layer, const kvc_layer_weights *w,
                              const kvc_calib_chunk *c)
{
    (void)inst;
    if (layer >= 2 || R.finalized)
        return KVC_E_STATE;
    if (w) {
        R.weights_calls[layer]++;
        const kvch_llama_layer *L = &R.m->layers[layer];
        R.weights_ok += w->w_q == L->wq && w->w_k == L->wk && w->w_v == L->wv &&
                        w->w_o == L->wo && w->struct_size == sizeof *w;
    }
    if (c) {
        if (!R.weights_calls[layer])
            R.bad_order = 1; /* weights come before calibration */
        for (uint32_t i = 0; i < c->n_rows; i++)
            if (c->positions[i] != (int32_t)((R.rows[layer] + i) % 20))
                R.bad_order = 1;
        for (size_t i = 0; i < (size_t)c->n_rows * 16; i++)
            R.x_sum[layer] += c->x[i];
        /* x_ref read only when the host's struct has it (KVC-REQ-20) */
        const float *ref = KVC_HAS_FIELD(c, kvc_calib_chunk, x_ref) ? c->x_ref : NULL;
        if (ref) {
            R.ref_chunks[layer]++;
            /* sequential: layer l's chunks come after finalize_layer(l - 1)
             * and before finalize_layer(l), with no sequence open */
            if ((int)layer != R.last_final + 1 || R.seqs_open)
                R.bad_order = 1;
        }
        if (R.rows[layer] + c->n_rows <= REC_ROWS) {
            memcpy(R.x[layer] + R.rows[layer] * 16, c->x, c->n_rows * 16 * sizeof(float));
            if (ref)
                memcpy(R.x_ref[layer] + R.rows[layer] * 16, ref, c->n_rows * 16 * sizeof(float));
        }
        R.rows[layer] += c->n_rows;
        R.chunks[layer]++;
    }
    return KVC_OK;
}
static kvc_status rec_finalize_layer(kvc_instance *inst, uint32_t layer)
{
    (void)inst;
    R.finalize_layer_calls++;
    /* in order, each after its own chunks */
    if ((int)layer != R.last_final + 1 || layer >= 2 || !R.chunks[layer] || R.seqs_open)
        R.bad_order = 1;
    R.last_final = (int)layer;
    return KVC_OK;
}

/* The recorder's sequences: the built-in exact store (so its attention is
 * exact, bit for bit), optionally made lossy by halving V. */
static kvc_status rec_seq_open(kvc_instance *inst, kvc_seq **out)
{
    (void)inst;
    kvc_geometry geo;
    kvch_llama_geometry(R.m, 0, &geo);
    kvch_kv *kv = NULL;
    kvc_status s = kvch_kv_exact(&geo, &kv, NULL, 0);
    if (s)
        return s;
    R.seqs_open++;
    *out = (kvc_seq *)kv;
    return KVC_OK;
}
static void rec_seq_close(kvc_seq *seq)
{
    if (!seq)
        return;
    R.seqs_open--;
    kvch_kv_free((kvch_kv *)seq);
}
static const char *rec_seq_msg(const kvc_seq *seq)
{
    (void)seq;
    return "";
}
static kvc_status rec_append(kvc_seq *seq, uint32_t layer, uint32_t n, const int32_t *pos,
                             const void *k_pre, const void *v, const uint8_t *flags)
{
    /* the host advances through the layer it just finalized, only */
    if ((int)layer != R.last_final || R.finalized)
        R.bad_order = 1;
    R.appends[layer]++;
    float vh[REC_ROWS * 8]; /* (n, 2 kv heads * 4) */
    ck_assert_uint_le(n, REC_ROWS);
    for (size_t i = 0; i < (size_t)n * 8; i++)
        vh[i] = ((const float *)v)[i] * (R.perturb ? 0.5f : 1.0f);
    return kvch_kv_append((kvch_kv *)seq, layer, n, pos, k_pre, vh, flags, NULL, 0);
}
static kvc_status rec_attend(kvc_seq *seq, uint32_t layer, uint32_t n, const int32_t *pos,
                             const void *q_pre, void *out)
{
    if ((int)layer != R.last_final || R.finalized)
        R.bad_order = 1;
    R.attends[layer]++;
    return kvch_kv_attend((kvch_kv *)seq, layer, n, pos, q_pre, out, NULL, 0);
}
static kvc_status rec_finalize(kvc_instance *inst)
{
    (void)inst;
    R.finalized = 1;
    return KVC_OK;
}
static const char *rec_msg(const kvc_instance *inst)
{
    (void)inst;
    return "";
}

START_TEST(prepare_feeds_weights_then_activations)
{
    kvch_llama *m = tiny_model(0);
    rec_reset(m);
    kvc_plugin p = {.struct_size = sizeof p, .id = "recorder",
                    .caps = KVC_CAP_CPU | KVC_CAP_NEEDS_WEIGHTS | KVC_CAP_NEEDS_CALIBRATION,
                    .prepare_layer = rec_prepare, .finalize = rec_finalize,
                    .instance_message = rec_msg};
    int32_t tok[50];
    tiny_tokens(tok, 50);
    kvch_prepare_params pp = {.n_ctx = 20};
    kvch_prepare_result r;
    char err[256];
    /* 50 tokens in windows of 20: 20, 20, 10, positions restarting at 0 */
    ck_assert_msg(kvch_prepare(&p, (kvc_instance *)&R, m, tok, 50, &pp, &r, err, sizeof err) ==
                      KVC_OK,
                  "%s", err);
    ck_assert_uint_eq(r.calib_tokens, 50);
    ck_assert_uint_eq(r.calib_windows, 3);
    for (int l = 0; l < 2; l++) {
        ck_assert_uint_eq(R.weights_calls[l], 1);
        ck_assert_uint_eq(R.rows[l], 50);
        ck_assert_uint_eq(R.chunks[l], 3);
        ck_assert(R.x_sum[l] != 0.0);
    }
    ck_assert_int_eq(R.weights_ok, 2);
    ck_assert_int_eq(R.bad_order, 0);
    ck_assert_int_eq(R.finalized, 1);

    /* --calib-tokens caps the rows; weights-only plugins run no forward pass */
    rec_reset(m);
    pp.max_tokens = 30;
    ck_assert_int_eq(kvch_prepare(&p, (kvc_instance *)&R, m, tok, 50, &pp, &r, err, sizeof err),
                     KVC_OK);
    ck_assert_uint_eq(R.rows[0], 30);
    rec_reset(m);
    p.caps = KVC_CAP_CPU | KVC_CAP_NEEDS_WEIGHTS;
    ck_assert_int_eq(kvch_prepare(&p, (kvc_instance *)&R, m, NULL, 0, &pp, &r, err, sizeof err),
                     KVC_OK);
    ck_assert_uint_eq(R.rows[0], 0);
    ck_assert_uint_eq(R.weights_calls[1], 1);
    /* a calibration plugin without text is an error, in words */
    p.caps = KVC_CAP_CPU | KVC_CAP_NEEDS_CALIBRATION;
    rec_reset(m);
    ck_assert_int_eq(kvch_prepare(&p, (kvc_instance *)&R, m, NULL, 0, &pp, &r, err, sizeof err),
                     KVC_E_INVALID);
    ck_assert_ptr_nonnull(strstr(err, "calibration"));
    kvch_llama_free(m);
}
END_TEST

static const kvc_plugin rec_plugin = {
    .struct_size = sizeof(kvc_plugin), .id = "recorder",
    .caps = KVC_CAP_CPU | KVC_CAP_NEEDS_WEIGHTS | KVC_CAP_NEEDS_CALIBRATION,
    .prepare_layer = rec_prepare, .finalize_layer = rec_finalize_layer,
    .finalize = rec_finalize, .instance_message = rec_msg, .seq_open = rec_seq_open,
    .seq_close = rec_seq_close, .seq_message = rec_seq_msg, .append = rec_append,
    .attend = rec_attend};

static int rows_equal(const float *a, const float *b, size_t n_rows)
{
    return memcmp(a, b, n_rows * 16 * sizeof(float)) == 0;
}

START_TEST(prepare_sequential_feeds_layer_by_layer)
{
    kvch_llama *m = tiny_model(0);
    int32_t tok[50];
    tiny_tokens(tok, 50);
    kvch_prepare_result r;
    char err[256];
    /* the ordinary pass: what the exact model feeds, x_ref NULL */
    static float plain[2][REC_ROWS * 16];
    rec_reset(m);
    kvch_prepare_params pp = {.n_ctx = 20};
    ck_assert_msg(kvch_prepare(&rec_plugin, (kvc_instance *)&R, m, tok, 50, &pp, &r, err,
                               sizeof err) == KVC_OK, "%s", err);
    ck_assert_int_eq(r.sequential, 0);
    ck_assert_uint_eq(R.finalize_layer_calls, 0);
    for (int l = 0; l < 2; l++) {
        ck_assert_uint_eq(R.chunks[l], 3);
        ck_assert_uint_eq(R.ref_chunks[l], 0);
    }
    ck_assert_int_eq(R.seqs_open, 0);
    memcpy(plain, R.x, sizeof plain);

    /* sequential through an exact store: 50 tokens in windows 20, 20, 10 */
    rec_reset(m);
    pp.sequential = 1;
    ck_assert_msg(kvch_prepare(&rec_plugin, (kvc_instance *)&R, m, tok, 50, &pp, &r, err,
                               sizeof err) == KVC_OK, "%s", err);
    ck_assert_int_eq(r.sequential, 1);
    ck_assert_uint_eq(r.calib_tokens, 50);
    ck_assert_uint_eq(r.calib_windows, 3);
    ck_assert_int_eq(R.bad_order, 0);
    ck_assert_int_eq(R.weights_ok, 2);
    ck_assert_uint_eq(R.finalize_layer_calls, 2);
    ck_assert_int_eq(R.last_final, 1);
    ck_assert_int_eq(R.finalized, 1);
    ck_assert_int_eq(R.seqs_open, 0);
    for (int l = 0; l < 2; l++) {
        ck_assert_uint_eq(R.rows[l], 50);
        ck_assert_uint_eq(R.chunks[l], 3);
        ck_assert_uint_eq(R.ref_chunks[l], 3);
        /* x_ref is what the ordinary pass feeds, bit for bit */
        ck_assert_msg(rows_equal(R.x_ref[l], plain[l], 50), "layer %d: x_ref != exact rows", l);
        /* an exact store keeps the compressed stream on the exact one */
        ck_assert_msg(rows_equal(R.x[l], R.x_ref[l], 50), "layer %d: x != x_ref", l);
    }
    /* the plugin's sequences carried layer 0 only (the last layer's output
     * feeds nothing): one append + attend per window */
    ck_assert_uint_eq(R.appends[0], 3);
    ck_assert_uint_eq(R.attends[0], 3);
    ck_assert_uint_eq(R.appends[1], 0);

    /* a lossy store: layer 0 is still exact, layer 1 sees layer 0's error */
    rec_reset(m);
    R.perturb = 1;
    ck_assert_msg(kvch_prepare(&rec_plugin, (kvc_instance *)&R, m, tok, 50, &pp, &r, err,
                               sizeof err) == KVC_OK, "%s", err);
    ck_assert_int_eq(R.bad_order, 0);
    ck_assert(rows_equal(R.x[0], R.x_ref[0], 50));
    ck_assert(rows_equal(R.x_ref[1], plain[1], 50));
    double e = rel_err_f(R.x[1], R.x_ref[1], 50 * 16);
    ck_assert_msg(e > 1e-3, "layer 1: x should carry layer 0's error, relative %.3e", e);

    /* without NEEDS_CALIBRATION, sequential is ignored */
    kvc_plugin p = rec_plugin;
    p.caps = KVC_CAP_CPU | KVC_CAP_NEEDS_WEIGHTS;
    rec_reset(m);
    ck_assert_int_eq(kvch_prepare(&p, (kvc_instance *)&R, m, NULL, 0, &pp, &r, err, sizeof err),
                     KVC_OK);
    ck_assert_int_eq(r.sequential, 0);
    ck_assert_uint_eq(R.finalize_layer_calls, 0);
    ck_assert_uint_eq(R.rows[0], 0);
    /* a token outside the vocabulary is refused before any feed */
    rec_reset(m);
    tok[7] = 32;
    ck_assert_int_eq(kvch_prepare(&rec_plugin, (kvc_instance *)&R, m, tok, 50, &pp, &r, err,
                                  sizeof err), KVC_E_INVALID);
    ck_assert_ptr_nonnull(strstr(err, "vocabulary"));
    ck_assert_uint_eq(R.rows[0], 0);
    kvch_llama_free(m);
}
END_TEST

/* A failing finalize_layer stops the feed with the plugin's words. */
static kvc_status rec_finalize_layer_fails(kvc_instance *inst, uint32_t layer)
{
    (void)inst;
    return layer == 1 ? KVC_E_INTERNAL : rec_finalize_layer(inst, layer);
}
static const char *rec_msg_fail(const kvc_instance *inst)
{
    (void)inst;
    return "factorization failed";
}

START_TEST(prepare_sequential_reports_plugin_errors)
{
    kvch_llama *m = tiny_model(0);
    int32_t tok[30];
    tiny_tokens(tok, 30);
    kvc_plugin p = rec_plugin;
    p.finalize_layer = rec_finalize_layer_fails;
    p.instance_message = rec_msg_fail;
    kvch_prepare_params pp = {.n_ctx = 20, .sequential = 1};
    kvch_prepare_result r;
    char err[256];
    rec_reset(m);
    ck_assert_int_eq(kvch_prepare(&p, (kvc_instance *)&R, m, tok, 30, &pp, &r, err, sizeof err),
                     KVC_E_INTERNAL);
    ck_assert_ptr_nonnull(strstr(err, "finalize_layer(layer 1)"));
    ck_assert_ptr_nonnull(strstr(err, "factorization failed"));
    ck_assert_int_eq(R.finalized, 0);
    ck_assert_int_eq(R.seqs_open, 0);
    kvch_llama_free(m);
}
END_TEST

/* embed + kvch_llama_eval_layer for every layer + final norm and output equals
 * kvch_llama_eval, bit for bit, also across two micro-batches (pos0 > 0). */
START_TEST(layer_by_layer_equals_eval)
{
    kvch_llama *m = tiny_model(_i);
    const size_t V = m->hp.n_vocab, E = m->hp.n_embd;
    const uint32_t n = TINY_N, nb = 40; /* batches of 40 and 30 */
    int32_t tok[TINY_N];
    tiny_tokens(tok, TINY_N);
    float *want = malloc(n * V * sizeof *want), *got = malloc(n * V * sizeof *got);
    float *x = malloc(n * E * sizeof *x), *xn = malloc(nb * E * sizeof *xn);
    float *xs = malloc(nb * E * sizeof *xs);
    kvc_geometry geo;
    kvch_llama_geometry(m, 0, &geo);
    kvch_kv *kv = NULL;
    char err[256];
    ck_assert_int_eq(kvch_kv_exact(&geo, &kv, err, sizeof err), KVC_OK);
    tiny_eval(m, kv, nb, 0, tok, n, want);
    ck_assert_int_eq(kvch_kv_reset(kv, err, sizeof err), KVC_OK);

    kvch_llama_ctx *c = NULL;
    ck_assert_int_eq(kvch_llama_ctx_new(m, nb, &c, err, sizeof err), KVC_OK);
    kvch_llama_embed(m, tok, n, x);
    for (uint32_t l = 0; l < m->hp.n_layer; l++)
        for (uint32_t at = 0; at < n; at += nb) {
            uint32_t k = n - at < nb ? n - at : nb;
            memcpy(xs, x + at * E, k * E * sizeof *xs);
            ck_assert_msg(kvch_llama_eval_layer(c, kv, l, k, (int32_t)at, NULL, x + at * E, xn, err,
                                           sizeof err) == KVC_OK, "%s", err);
            /* xn_out is the layer's attention input */
            float *want_xn = malloc(k * E * sizeof *want_xn);
            kvch_rmsnorm(xs, m->layers[l].attn_norm, m->hp.rms_eps, k, E, want_xn);
            ck_assert(memcmp(xn, want_xn, k * E * sizeof *xn) == 0);
            free(want_xn);
        }
    for (uint32_t at = 0; at < n; at += nb) {
        uint32_t k = n - at < nb ? n - at : nb;
        kvch_rmsnorm(x + at * E, m->out_norm, m->hp.rms_eps, k, E, xn);
        kvch_linear(xn, m->output, NULL, k, E, V, got + at * V);
    }
    ck_assert_msg(memcmp(got, want, n * V * sizeof *got) == 0,
                  "layer by layer differs from eval: relative %.3e", rel_err_f(got, want, n * V));

    /* n above the context's batch, a layer out of range: refused, x unchanged */
    memcpy(xs, x, nb * E * sizeof *xs);
    ck_assert_int_eq(kvch_llama_eval_layer(c, kv, 0, nb + 1, 100, NULL, x, NULL, err, sizeof err),
                     KVC_E_INVALID);
    ck_assert_int_eq(kvch_llama_eval_layer(c, kv, m->hp.n_layer, 1, 100, NULL, x, NULL, err,
                                      sizeof err), KVC_E_INVALID);
    ck_assert_ptr_nonnull(strstr(err, "layer"));
    /* a store error (position not after the held ones) leaves x alone */
    ck_assert_int_eq(kvch_llama_eval_layer(c, kv, 0, 1, 0, NULL, x, NULL, err, sizeof err),
                     KVC_E_INVALID);
    ck_assert(memcmp(xs, x, nb * E * sizeof *xs) == 0);
    kvch_llama_ctx_free(c);
    kvch_kv_free(kv);
    kvch_llama_free(m);
    free(want), free(got), free(x), free(xn), free(xs);
}
END_TEST

START_TEST(eval_rejects_bad_tokens)
{
    kvch_llama *m = tiny_model(0);
    kvc_geometry geo;
    kvch_llama_geometry(m, 0, &geo);
    kvch_kv *kv = NULL;
    kvch_llama_ctx *c = NULL;
    char err[256];
    ck_assert_int_eq(kvch_kv_exact(&geo, &kv, err, sizeof err), KVC_OK);
    ck_assert_int_eq(kvch_llama_ctx_new(m, 8, &c, err, sizeof err), KVC_OK);
    int32_t bad[2] = {3, 32};
    ck_assert_int_eq(kvch_llama_eval(c, kv, bad, NULL, 2, 0, NULL, 0, err, sizeof err),
                     KVC_E_INVALID);
    ck_assert_ptr_nonnull(strstr(err, "vocabulary"));
    int32_t ok[1] = {3};
    ck_assert_int_eq(kvch_llama_eval(c, kv, ok, NULL, 1, 5, NULL, 0, err, sizeof err), KVC_OK);
    /* positions must grow: 5 again is refused by the store */
    ck_assert_int_eq(kvch_llama_eval(c, kv, ok, NULL, 1, 5, NULL, 0, err, sizeof err),
                     KVC_E_INVALID);
    kvch_llama_ctx_free(c);
    kvch_kv_free(kv);
    kvch_llama_free(m);
}
END_TEST

/* ---- SmolLM2 ------------------------------------------------------------------- */

static kvch_model M;
static int have_model;
static int32_t *gpl;
static uint8_t *gpl_flags;
static size_t n_gpl;

static void real_setup(void)
{
    const char *path = kvct_model_or_null();
    have_model = 0;
    if (!path)
        return;
    char err[1024], *text = NULL;
    size_t len;
    ck_assert_msg(kvch_model_open(path, &M, err, sizeof err) == KVC_OK, "%s", err);
    ck_assert_int_eq(kvch_read_file("/usr/share/common-licenses/GPL-3", &text, &len, err,
                                    sizeof err), KVC_OK);
    ck_assert_int_eq(kvch_tok_encode(M.tok, text, len, 0, &gpl, &n_gpl), KVC_OK);
    free(text);
    gpl_flags = malloc(n_gpl);
    for (size_t i = 0; i < n_gpl; i++)
        gpl_flags[i] = kvch_tok_flags(M.tok, gpl[i]);
    have_model = 1;
}

static void real_teardown(void)
{
    if (!have_model)
        return;
    kvch_model_close(&M);
    free(gpl);
    free(gpl_flags);
}

/* main() never runs these without the model; a failed setup fails them. */
#define SKIP_WITHOUT_MODEL() ck_assert_msg(have_model, "model setup failed")

static double real_ppl(kvch_kv *kv, uint32_t n_ctx, uint32_t chunks, int step)
{
    char err[1024];
    kvch_llama_ctx *c = NULL;
    ck_assert_int_eq(kvch_llama_ctx_new(M.llama, n_ctx, &c, err, sizeof err), KVC_OK);
    kvch_ppl_params pp = {.n_ctx = n_ctx, .n_chunks = chunks, .token_by_token = step};
    kvch_ppl_result r;
    ck_assert_msg(kvch_perplexity(c, kv, M.llama, gpl, gpl_flags, n_gpl, &pp, &r, err,
                                  sizeof err) == KVC_OK,
                  "%s", err);
    kvch_llama_ctx_free(c);
    ck_assert_uint_eq(r.n_chunks, chunks);
    ck_assert_uint_eq(r.n_scored, chunks * (n_ctx - 1 - n_ctx / 2));
    ck_assert_msg(isfinite(r.ppl) && r.ppl > 1.0 && r.ppl < 100.0, "ppl %f", r.ppl);
    return r.ppl;
}

START_TEST(smollm2_hyperparameters_from_the_file)
{
    SKIP_WITHOUT_MODEL();
    const kvch_llama_hparams *hp = &M.llama->hp;
    ck_assert_str_eq(hp->arch, "llama");
    ck_assert_uint_eq(hp->n_layer, 30);
    ck_assert_uint_eq(hp->n_embd, 576);
    ck_assert_uint_eq(hp->n_ff, 1536);
    ck_assert_uint_eq(hp->n_head, 9);
    ck_assert_uint_eq(hp->n_head_kv, 3);
    ck_assert_uint_eq(hp->head_dim, 64);
    ck_assert_uint_eq(hp->n_vocab, 49152);
    ck_assert_int_eq(hp->rope_style, KVC_ROPE_ADJACENT);
    ck_assert_float_eq(hp->rope_theta, 100000.0f);
    ck_assert_int_eq(hp->tied_output, 1);
    ck_assert_uint_gt(n_gpl, 7000);
}
END_TEST

/* SmolLM2's three stores at one context: exact, full fp32 and full fp16. */
typedef struct three_stores {
    kvch_kv *ex, *pk, *ph;
    plug f32, f16;
} three_stores;

static void stores_open(three_stores *t, uint32_t n_ctx)
{
    kvc_geometry geo;
    kvch_llama_geometry(M.llama, n_ctx, &geo);
    char err[512];
    memset(t, 0, sizeof *t);
    ck_assert_int_eq(kvch_kv_exact(&geo, &t->ex, err, sizeof err), KVC_OK);
    plug_open(&t->f32, &geo, NULL);
    plug_open(&t->f16, &geo, "dtype=fp16");
    ck_assert_int_eq(kvch_kv_plugin(t->f32.p, t->f32.inst, &t->pk, err, sizeof err), KVC_OK);
    ck_assert_int_eq(kvch_kv_plugin(t->f16.p, t->f16.inst, &t->ph, err, sizeof err), KVC_OK);
}

static void stores_close(three_stores *t)
{
    kvch_kv_free(t->pk);
    kvch_kv_free(t->ph);
    kvch_kv_free(t->ex);
    plug_close(&t->f32);
    plug_close(&t->f16);
}

START_TEST(smollm2_full_equals_exact_and_fp16_close)
{
    SKIP_WITHOUT_MODEL();
    const uint32_t n_ctx = 128, chunks = 2;
    three_stores t;
    stores_open(&t, n_ctx);
    kvch_kv *ex = t.ex, *pk = t.pk, *ph = t.ph;
    double p_exact = real_ppl(ex, n_ctx, chunks, 0);
    double p_full = real_ppl(pk, n_ctx, chunks, 0);
    double p_half = real_ppl(ph, n_ctx, chunks, 0);
    printf("SmolLM2 GPL-3 ctx %u x %u chunks: exact %.6f, full %.6f, full fp16 %.6f\n", n_ctx,
           chunks, p_exact, p_full, p_half);
    ck_assert_msg(p_full == p_exact, "full %.9f != exact %.9f", p_full, p_exact);
    ck_assert_msg(fabs(p_half - p_exact) / p_exact < 1e-3, "fp16 %.6f vs %.6f", p_half, p_exact);
    /* the generation half token by token equals the batched one (ABI rule) */
    double p_step = real_ppl(pk, n_ctx, 1, 1), p_batch = real_ppl(pk, n_ctx, 1, 0);
    ck_assert_msg(fabs(p_step - p_batch) / p_batch < 1e-5, "step %.9f batch %.9f", p_step,
                  p_batch);
    stores_close(&t);
}
END_TEST

/* kvch_perplexity_vs of kv against the exact path: kv's result must be
 * kvch_perplexity's to the bit (want), the exact one the exact path's
 * (want_ref); returns the KLD statistics. */
static kvch_kld_stats real_kld(kvch_kv *kv, kvch_kv *ex, uint32_t n_ctx, uint32_t chunks, int step,
                               double want, double want_ref)
{
    char err[1024];
    kvch_llama_ctx *c = NULL;
    ck_assert_int_eq(kvch_llama_ctx_new(M.llama, n_ctx, &c, err, sizeof err), KVC_OK);
    kvch_ppl_params pp = {.n_ctx = n_ctx, .n_chunks = chunks, .token_by_token = step};
    kvch_ppl_result r, rx;
    kvch_kld k = {0};
    kvch_kld_stats st;
    ck_assert_msg(kvch_perplexity_vs(c, kv, ex, M.llama, gpl, gpl_flags, n_gpl, &pp, &r, &rx, &k,
                                     err, sizeof err) == KVC_OK,
                  "%s", err);
    ck_assert_msg(kvch_kld_summary(&k, &st, err, sizeof err) == KVC_OK, "%s", err);
    kvch_kld_free(&k);
    kvch_llama_ctx_free(c);
    ck_assert_msg(r.ppl == want, "with the exact path beside it %.17g, alone %.17g", r.ppl, want);
    ck_assert_msg(rx.ppl == want_ref, "exact beside %.17g, alone %.17g", rx.ppl, want_ref);
    ck_assert_uint_eq(rx.n_scored, r.n_scored);
    ck_assert_uint_eq(st.n, r.n_scored);
    /* the KLD's own NLLs give the same perplexity ratio */
    ck_assert_double_eq_tol(st.ln_ppl_ratio, log(r.ppl / rx.ppl), 1e-9);
    return st;
}

START_TEST(smollm2_kld_full_zero_fp16_small)
{
    SKIP_WITHOUT_MODEL();
    const uint32_t n_ctx = 128, chunks = 2;
    three_stores t;
    stores_open(&t, n_ctx);
    kvch_kv *ex = t.ex, *pk = t.pk, *ph = t.ph;
    char err[512];
    const double p_exact = real_ppl(ex, n_ctx, chunks, 0);
    kvch_kld_stats a = real_kld(pk, ex, n_ctx, chunks, 0, real_ppl(pk, n_ctx, chunks, 0), p_exact);
    printf("KLD full fp32 vs exact: mean %g, max %g, same top %.4f\n", a.mean, a.max, a.same_top);
    ck_assert_msg(a.mean < 1e-9 && a.max < 1e-9, "full fp32: KLD %g, max %g", a.mean, a.max);
    ck_assert_double_eq(a.same_top, 1.0);
    kvch_kld_stats h = real_kld(ph, ex, n_ctx, chunks, 0, real_ppl(ph, n_ctx, chunks, 0), p_exact);
    printf("KLD full fp16 vs exact: mean %g ± %g, median %g, 99%% %g, max %g, same top %.4f\n",
           h.mean, h.err, h.median, h.p99, h.max, h.same_top);
    ck_assert_msg(h.mean > 0.0 && h.mean < 1e-4, "fp16: KLD %g", h.mean);
    ck_assert_msg(h.err > 0.0 && h.err < h.mean, "fp16: KLD error %g", h.err);
    ck_assert(h.median <= h.p99 && h.p99 <= h.max && h.max < 1e-2);
    ck_assert_msg(h.same_top >= 0.99, "fp16: same top %f", h.same_top);
    /* token by token, one chunk: the same holds */
    const double x1 = real_ppl(ex, n_ctx, 1, 1);
    kvch_kld_stats s1 = real_kld(ph, ex, n_ctx, 1, 1, real_ppl(ph, n_ctx, 1, 1), x1);
    ck_assert(s1.mean > 0.0 && s1.mean < 1e-4);
    /* a KLD without a reference store is refused */
    kvch_llama_ctx *c = NULL;
    ck_assert_int_eq(kvch_llama_ctx_new(M.llama, n_ctx, &c, err, sizeof err), KVC_OK);
    kvch_ppl_params pp = {.n_ctx = n_ctx, .n_chunks = 1};
    kvch_ppl_result r;
    kvch_kld k = {0};
    ck_assert_int_eq(kvch_perplexity_vs(c, ph, NULL, M.llama, gpl, gpl_flags, n_gpl, &pp, &r, NULL,
                                        &k, err, sizeof err),
                     KVC_E_INVALID);
    ck_assert_uint_eq(k.n, 0);
    kvch_llama_ctx_free(c);
    stores_close(&t);
}
END_TEST

/* The number after "name": in a JSON line; fails when absent. */
static double json_num(const char *json, const char *name)
{
    char key[64];
    snprintf(key, sizeof key, "\"%s\": ", name);
    const char *at = strstr(json, key);
    ck_assert_msg(at != NULL, "no %s in %s", name, json);
    char *end;
    double v = strtod(at + strlen(key), &end);
    ck_assert_msg(end != at + strlen(key), "%s is not a number in %s", name, json);
    return v;
}

/* kvc ppl --json with args after the model: its one line into out. */
static void cli_ppl(const char *args, char *out, size_t cap)
{
    char cmd[8400];
    snprintf(cmd, sizeof cmd, "'%s' ppl --model '%s' --chunks 2 --ctx 128 --json %s 2>&1", KVC_EXE,
             kvct_model_path(), args);
    FILE *p = popen(cmd, "r");
    ck_assert_ptr_nonnull(p);
    size_t n = fread(out, 1, cap - 1, p);
    out[n] = '\0';
    int st = pclose(p);
    printf("kvc ppl %s: %s", args, out);
    ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "%s", out);
}

START_TEST(smollm2_cli_ppl_kld_json)
{
    SKIP_WITHOUT_MODEL();
    static const char *const fields[] = {"exact_ppl", "ppl_rel_diff", "kld_mean", "kld_err",
                                         "kld_median", "kld_p90", "kld_p95", "kld_p99",
                                         "kld_p999", "kld_max", "same_top", "same_top_err"};
    char out[8192], plain[8192];
    cli_ppl("--plugin full --kld", out, sizeof out);
    for (size_t i = 0; i < sizeof fields / sizeof *fields; i++)
        (void)json_num(out, fields[i]);
    ck_assert_msg(json_num(out, "kld_mean") < 1e-9, "%s", out);
    ck_assert_msg(json_num(out, "kld_max") < 1e-9, "%s", out);
    ck_assert_msg(json_num(out, "same_top") == 1.0, "%s", out);
    ck_assert_msg(json_num(out, "ppl_rel_diff") == 0.0, "%s", out);
    cli_ppl("--plugin full --opt dtype=fp16 --kld", out, sizeof out);
    const double m = json_num(out, "kld_mean");
    ck_assert_msg(m > 0.0 && m < 1e-4, "%s", out);
    ck_assert_msg(json_num(out, "kld_p99") >= json_num(out, "kld_median"), "%s", out);
    ck_assert_msg(json_num(out, "same_top") >= 0.99, "%s", out);
    /* the plugin's perplexity is the one of a run without --kld */
    cli_ppl("--plugin full --opt dtype=fp16", plain, sizeof plain);
    ck_assert_msg(json_num(out, "ppl") == json_num(plain, "ppl"), "%s\n%s", out, plain);
    ck_assert_msg(strstr(plain, "kld_mean") == NULL, "%s", plain);
}
END_TEST

START_TEST(smollm2_greedy_chat_answer)
{
    SKIP_WITHOUT_MODEL();
    const char *chat = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                       "<|im_start|>assistant\n";
    int32_t *ids = NULL;
    size_t n = 0;
    ck_assert_int_eq(kvch_tok_encode(M.tok, chat, strlen(chat), 1, &ids, &n), KVC_OK);
    kvc_geometry geo;
    kvch_llama_geometry(M.llama, 256, &geo);
    char err[512];
    kvch_kv *kv = NULL;
    kvch_llama_ctx *c = NULL;
    ck_assert_int_eq(kvch_kv_exact(&geo, &kv, err, sizeof err), KVC_OK);
    ck_assert_int_eq(kvch_llama_ctx_new(M.llama, 64, &c, err, sizeof err), KVC_OK);
    int32_t stop = kvch_tok_find(M.tok, "<|im_end|>"), out[24];
    kvch_gen_params gp = {.n_predict = 24, .repeat_penalty = 1.0f, .stop = &stop, .n_stop = 1};
    kvch_gen_result r;
    ck_assert_msg(kvch_generate(c, kv, &M, ids, (uint32_t)n, &gp, out, &r, err, sizeof err) ==
                      KVC_OK,
                  "%s", err);
    char *text = NULL;
    size_t len = 0;
    ck_assert_int_eq(kvch_tok_decode(M.tok, out, r.n_generated, &text, &len), KVC_OK);
    printf("greedy answer: %s\n", text);
    ck_assert_msg(strstr(text, "Paris") != NULL, "answer without Paris: %s", text);
    free(text);
    free(ids);
    kvch_llama_ctx_free(c);
    kvch_kv_free(kv);
}
END_TEST

/* argv[1] "smollm2": the cases that need the model (exit 77, SKIP, when it
 * is absent); otherwise the self-contained ones. */
int main(int argc, char **argv)
{
    int real = argc > 1 && strcmp(argv[1], "smollm2") == 0;
    Suite *s = suite_create("model");
    if (real) {
        if (!kvct_model_or_null())
            return 77;
        TCase *r = tcase_create("smollm2");
        tcase_add_unchecked_fixture(r, real_setup, real_teardown);
        tcase_set_timeout(r, 900);
        tcase_add_test(r, smollm2_hyperparameters_from_the_file);
        tcase_add_test(r, smollm2_full_equals_exact_and_fp16_close);
        tcase_add_test(r, smollm2_kld_full_zero_fp16_small);
        tcase_add_test(r, smollm2_cli_ppl_kld_json);
        tcase_add_test(r, smollm2_greedy_chat_answer);
        suite_add_tcase(s, r);
    } else {
        TCase *p = tcase_create("pieces");
        tcase_add_test(p, rmsnorm_by_hand);
        tcase_add_test(p, swiglu_by_hand);
        tcase_add_test(p, linear_by_hand);
        tcase_add_test(p, log_softmax_by_hand);
        suite_add_tcase(s, p);
        TCase *t = tcase_create("tiny");
        tcase_add_loop_test(t, tiny_model_matches_float64_reference, 0, 2);
        tcase_add_test(t, tiny_batched_equals_token_by_token);
        tcase_add_test(t, tiny_full_plugin_equals_exact_path);
        tcase_add_test(t, prepare_feeds_weights_then_activations);
        tcase_add_test(t, prepare_sequential_feeds_layer_by_layer);
        tcase_add_test(t, prepare_sequential_reports_plugin_errors);
        tcase_add_loop_test(t, layer_by_layer_equals_eval, 0, 2);
        tcase_add_test(t, eval_rejects_bad_tokens);
        suite_add_tcase(s, t);
    }
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
