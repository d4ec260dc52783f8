/*
 * test_lowrank.c -- kvc-lorc.so and kvc-svdllm.so through the ABI only,
 * loaded with dlopen by the host library (paths of kvc-full.so, kvc-lorc.so,
 * kvc-svdllm.so given as argv[1..3] by meson):
 *   rank-r recovery     weights of exact rank r are reproduced at rank r and
 *                       not at r - 1 (float64 attention reference);
 *   whitening theorem   svdllm's error on anisotropic activations is below
 *                       lorc's at equal rank (on calibration rows, where it
 *                       is a theorem, and on held-out rows);
 *   artifact round trip bit-identical outputs, conflicting options and
 *                       damaged artifacts refused with the right status;
 *   progressive ranks   LoRC's allocation fits the budget and favours the
 *                       shallow layers;
 *   errors              out-of-order calls, budgets, option conflicts;
 *   seq_describe        one line per KV head: tokens held, the group's ranks.
 * Every plugin byte goes through the host's tracking allocator; each test
 * ends with zero live bytes.
 */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"

static uint64_t g_seed;
static const char *g_path_full, *g_path_lorc, *g_path_svdllm;

/* The small geometry of every test: 4 query heads on 2 KV heads of 16,
 * hidden 64; W_k and W_v have M = 32 rows (one group: all the KV heads). */
#define N_HEADS 4u
#define N_KV 2u
#define HD 16u
#define HID 64u
#define M (N_KV * HD)
#define QROW (N_HEADS * HD)
#define THETA 10000.0f

static kvc_geometry geo(uint32_t n_layers)
{
    kvc_geometry g;
    memset(&g, 0, sizeof g);
    g.struct_size = sizeof g;
    g.n_layers = n_layers;
    g.n_heads = N_HEADS;
    g.n_kv_heads = N_KV;
    g.head_dim = HD;
    g.hidden_size = HID;
    g.max_positions = 4096;
    g.rope_style = KVC_ROPE_ADJACENT;
    g.rope_theta = THETA;
    return g;
}

static void open_env(th_env *e, const char *path)
{
    char err[512];
    ck_assert_msg(th_open(e, path, err, sizeof err) == 0, "load %s: %s", path, err);
}

/* create() with "name=value" options (NULL-terminated, may be NULL) and an
 * artifact (may be NULL). */
static kvc_status create_art(const th_env *e, const kvc_geometry *g, const char *const *opts,
                             const void *art, size_t art_size, kvc_instance **out, char *msg,
                             size_t msg_size)
{
    const char *names[16], *values[16];
    char store[16][64];
    uint32_t n = 0;
    for (; opts && opts[n] && n < 16; n++) {
        snprintf(store[n], sizeof store[n], "%s", opts[n]);
        char *eq = strchr(store[n], '=');
        if (eq)
            *eq = 0;
        names[n] = store[n];
        values[n] = eq ? eq + 1 : "";
    }
    kvc_create_info ci;
    memset(&ci, 0, sizeof ci);
    ci.struct_size = sizeof ci;
    ci.host = &e->host;
    ci.geometry = g;
    ci.n_options = n;
    ci.option_names = names;
    ci.option_values = values;
    ci.artifact = art;
    ci.artifact_size = art_size;
    ci.device = KVC_MEM_HOST;
    ci.dtype = KVC_DTYPE_F32;
    msg[0] = 0;
    return e->p->create(&ci, out, msg, msg_size);
}

static kvc_instance *create_ok(const th_env *e, const kvc_geometry *g, const char *const *opts)
{
    kvc_instance *in = NULL;
    char msg[512];
    kvc_status st = create_art(e, g, opts, NULL, 0, &in, msg, sizeof msg);
    ck_assert_msg(st == KVC_OK && in, "create (%s): status %d: %s", e->p->id, st, msg);
    return in;
}

/* ---- random data --------------------------------------------------------------- */

static float *fmalloc(size_t n)
{
    float *p = malloc(n * sizeof(float));
    ck_assert_ptr_nonnull(p);
    return p;
}

static float *frand(uint64_t *rng, size_t n)
{
    float *p = fmalloc(n);
    th_fill(rng, p, n);
    return p;
}

/* w [rows][cols] = A [rows][r] B [r][cols], A, B uniform: rank exactly r
 * (up to the final rounding to float). */
static void rank_r_matrix(uint64_t *rng, size_t rows, size_t cols, size_t r, float *w)
{
    float *a = frand(rng, rows * r), *b = frand(rng, r * cols);
    for (size_t i = 0; i < rows; i++)
        for (size_t j = 0; j < cols; j++) {
            double s = 0;
            for (size_t t = 0; t < r; t++)
                s += (double)a[i * r + t] * b[t * cols + j];
            w[i * cols + j] = (float)s;
        }
    free(a), free(b);
}

/* q [rows][cols] with orthonormal columns (modified Gram-Schmidt, double). */
static void orthonormal(uint64_t *rng, size_t rows, size_t cols, double *q)
{
    for (size_t i = 0; i < rows * cols; i++)
        q[i] = th_uniform(rng);
    for (size_t c = 0; c < cols; c++) {
        for (size_t p = 0; p < c; p++) {
            double d = 0;
            for (size_t i = 0; i < rows; i++)
                d += q[i * cols + c] * q[i * cols + p];
            for (size_t i = 0; i < rows; i++)
                q[i * cols + c] -= d * q[i * cols + p];
        }
        double n = 0;
        for (size_t i = 0; i < rows; i++)
            n += q[i * cols + c] * q[i * cols + c];
        n = sqrt(n);
        ck_assert(n > 1e-6);
        for (size_t i = 0; i < rows; i++)
            q[i * cols + c] /= n;
    }
}

/* w [M][HID] = U diag(s) V^T with s geometric from 1 down to 10^-c: condition
 * number exactly 10^c. */
static void conditioned_matrix(uint64_t *rng, double c, float *w)
{
    double *u = malloc(M * M * sizeof(double)), *v = malloc(HID * M * sizeof(double));
    ck_assert(u && v);
    orthonormal(rng, M, M, u);
    orthonormal(rng, HID, M, v);
    for (size_t i = 0; i < M; i++)
        for (size_t j = 0; j < HID; j++) {
            double s = 0;
            for (size_t k = 0; k < M; k++)
                s += u[i * M + k] * pow(10.0, -c * (double)k / (M - 1)) * v[j * M + k];
            w[i * HID + j] = (float)s;
        }
    free(u), free(v);
}

/* y [n][M] = x [n][HID] W^T, exact in double, rounded once. */
static void project(const float *w, const float *x, size_t n, float *y)
{
    for (size_t t = 0; t < n; t++)
        for (size_t i = 0; i < M; i++) {
            double s = 0;
            for (size_t j = 0; j < HID; j++)
                s += (double)w[i * HID + j] * x[t * HID + j];
            y[t * M + i] = (float)s;
        }
}

/* Rows with a few "massive activation" dimensions 50x the others. */
static const unsigned BIG_DIMS[] = {3, 17, 40, 58};
static void anisotropic_rows(uint64_t *rng, size_t n, float *x)
{
    th_fill(rng, x, n * HID);
    for (size_t t = 0; t < n; t++)
        for (size_t b = 0; b < sizeof BIG_DIMS / sizeof BIG_DIMS[0]; b++)
            x[t * HID + BIG_DIMS[b]] *= 50.0f;
}

/* Strictly increasing positions from 0 with random gaps. */
static int32_t *positions(uint64_t *rng, size_t n, int gaps)
{
    int32_t *p = malloc(n * sizeof(int32_t));
    ck_assert_ptr_nonnull(p);
    int32_t next = 0;
    for (size_t i = 0; i < n; i++) {
        p[i] = next;
        next += 1 + (gaps && th_next(rng) % 4 == 0 ? (int32_t)(th_next(rng) % 3) : 0);
    }
    return p;
}

/* ---- per-layer weights ------------------------------------------------------------ */

typedef struct lweights {
    float *wq, *wk, *wv, *wo;
} lweights;

static void lw_random_qo(uint64_t *rng, lweights *w)
{
    w->wq = frand(rng, (size_t)QROW * HID);
    w->wo = frand(rng, (size_t)HID * QROW);
    w->wk = fmalloc((size_t)M * HID);
    w->wv = fmalloc((size_t)M * HID);
}

static void lw_free(lweights *w)
{
    free(w->wq), free(w->wk), free(w->wv), free(w->wo);
    memset(w, 0, sizeof *w);
}

static kvc_layer_weights lw_view(const lweights *w)
{
    kvc_layer_weights v;
    memset(&v, 0, sizeof v);
    v.struct_size = sizeof v;
    v.w_q = w->wq;
    v.w_k = w->wk;
    v.w_v = w->wv;
    v.w_o = w->wo;
    return v;
}

/* Feeds every layer's weights (and, when calib != NULL, the layer's
 * n_cal rows calib[l] in chunks of 100 with positions 0..n_cal-1), then
 * finalize(). */
static kvc_instance *build(const th_env *e, const kvc_geometry *g, const char *const *opts,
                           const lweights *w, float *const *calib, size_t n_cal)
{
    kvc_instance *in = create_ok(e, g, opts);
    int32_t *pos = malloc((n_cal ? n_cal : 1) * sizeof(int32_t));
    ck_assert_ptr_nonnull(pos);
    for (size_t i = 0; i < n_cal; i++)
        pos[i] = (int32_t)i;
    for (uint32_t l = 0; l < g->n_layers; l++) {
        kvc_layer_weights lw = lw_view(&w[l]);
        kvc_status st = e->p->prepare_layer(in, l, &lw, NULL);
        ck_assert_msg(st == KVC_OK, "prepare_layer(%u) weights: %d %s", l, st,
                      e->p->instance_message(in));
        for (size_t c0 = 0; calib && c0 < n_cal; c0 += 100) {
            kvc_calib_chunk ch;
            memset(&ch, 0, sizeof ch);
            ch.struct_size = sizeof ch;
            ch.n_rows = (uint32_t)(n_cal - c0 < 100 ? n_cal - c0 : 100);
            ch.x = calib[l] + c0 * HID;
            ch.positions = pos + c0;
            st = e->p->prepare_layer(in, l, NULL, &ch);
            ck_assert_msg(st == KVC_OK, "prepare_layer(%u) calibration: %d %s", l, st,
                          e->p->instance_message(in));
        }
    }
    kvc_status st = e->p->finalize(in);
    ck_assert_msg(st == KVC_OK, "finalize: %d %s", st, e->p->instance_message(in));
    free(pos);
    return in;
}

/* ---- float64 reference ---------------------------------------------------------------- */

/* Adjacent-pair RoPE from the definition: inv_freq[i] = theta^(-2i/d) as the
 * float the ABI's geometry carries, angle pos * inv_freq in double. */
static void rope_d(double *x, int32_t pos)
{
    for (uint32_t i = 0; i < HD / 2; i++) {
        double f = (double)(float)pow((double)THETA, -2.0 * i / HD);
        double a = (double)pos * f, c = cos(a), s = sin(a);
        double x0 = x[2 * i], x1 = x[2 * i + 1];
        x[2 * i] = x0 * c - x1 * s;
        x[2 * i + 1] = x0 * s + x1 * c;
    }
}

/* Post-RoPE keys [n][N_KV][HD] (double) of pre-RoPE keys k. */
static double *rotated(const float *k, const int32_t *pos, size_t n)
{
    double *r = malloc(n * M * sizeof(double));
    ck_assert_ptr_nonnull(r);
    for (size_t t = 0; t < n; t++)
        for (uint32_t h = 0; h < N_KV; h++) {
            double *x = r + t * M + h * HD;
            for (uint32_t d = 0; d < HD; d++)
                x[d] = k[t * M + h * HD + d];
            rope_d(x, pos[t]);
        }
    return r;
}

/* softmax(q.k / sqrt(HD)) v, causal by position, GQA groups of N_HEADS/N_KV. */
static void ref_attend(size_t n_q, const int32_t *qpos, const float *q, size_t n_k,
                       const int32_t *kpos, const float *k, const float *v, double *out)
{
    double *kr = rotated(k, kpos, n_k);
    double *p = malloc(n_k * sizeof(double));
    ck_assert_ptr_nonnull(p);
    const double scale = 1.0 / sqrt((double)HD);
    for (size_t i = 0; i < n_q; i++)
        for (uint32_t h = 0; h < N_HEADS; h++) {
            const uint32_t kvh = h / (N_HEADS / N_KV);
            double qr[HD];
            for (uint32_t d = 0; d < HD; d++)
                qr[d] = q[i * QROW + h * HD + d];
            rope_d(qr, qpos[i]);
            double mx = -INFINITY;
            for (size_t j = 0; j < n_k; j++) {
                if (kpos[j] > qpos[i]) {
                    p[j] = -INFINITY;
                    continue;
                }
                double s = 0;
                for (uint32_t d = 0; d < HD; d++)
                    s += qr[d] * kr[j * M + kvh * HD + d];
                p[j] = s * scale;
                mx = fmax(mx, p[j]);
            }
            double den = 0;
            for (size_t j = 0; j < n_k; j++) {
                p[j] = kpos[j] > qpos[i] ? 0.0 : exp(p[j] - mx);
                den += p[j];
            }
            double *o = out + i * QROW + h * HD;
            for (uint32_t d = 0; d < HD; d++) {
                double s = 0;
                for (size_t j = 0; j < n_k; j++)
                    s += p[j] * v[j * M + kvh * HD + d];
                o[d] = den > 0 ? s / den : 0.0;
            }
        }
    free(p), free(kr);
}

/* ---- plugin-side helpers ----------------------------------------------------------------- */

/* Appends n tokens to `layer` in two calls (a prefill and the rest). */
static void append_all(const th_env *e, kvc_seq *s, uint32_t layer, size_t n, const int32_t *pos,
                       const float *k, const float *v)
{
    size_t first = n > 1 ? (n * 2) / 3 : n;
    kvc_status st = e->p->append(s, layer, (uint32_t)first, pos, k, v, NULL);
    ck_assert_msg(st == KVC_OK, "append: %d %s", st, e->p->seq_message(s));
    if (first < n) {
        st = e->p->append(s, layer, (uint32_t)(n - first), pos + first, k + first * M,
                          v + first * M, NULL);
        ck_assert_msg(st == KVC_OK, "append: %d %s", st, e->p->seq_message(s));
    }
}

static void attend_all(const th_env *e, kvc_seq *s, uint32_t layer, size_t n, const int32_t *pos,
                       const float *q, float *out)
{
    kvc_status st = e->p->attend(s, layer, (uint32_t)n, pos, q, out);
    ck_assert_msg(st == KVC_OK, "attend: %d %s", st, e->p->seq_message(s));
}

/* materialize() of `layer` into token-major k_rot, v [n][M]; checks every
 * head holds the n tokens at pos. */
static void materialize_tokens(const th_env *e, kvc_seq *s, uint32_t layer, size_t n,
                               const int32_t *pos, float *k_rot, float *v)
{
    uint32_t counts[N_KV];
    kvc_materialized mt;
    memset(&mt, 0, sizeof mt);
    mt.struct_size = sizeof mt;
    mt.n_tokens = counts;
    kvc_status st = e->p->materialize(s, layer, &mt);
    ck_assert_msg(st == KVC_OK, "materialize (counts): %d %s", st, e->p->seq_message(s));
    for (uint32_t h = 0; h < N_KV; h++)
        ck_assert_uint_eq(counts[h], n);
    int32_t *mp = malloc(N_KV * n * sizeof(int32_t));
    float *mk = fmalloc(N_KV * n * HD), *mv = fmalloc(N_KV * n * HD);
    mt.capacity = (uint32_t)n;
    mt.positions = mp;
    mt.k = mk;
    mt.v = mv;
    st = e->p->materialize(s, layer, &mt);
    ck_assert_msg(st == KVC_OK, "materialize: %d %s", st, e->p->seq_message(s));
    for (uint32_t h = 0; h < N_KV; h++)
        for (size_t t = 0; t < n; t++) {
            ck_assert_int_eq(mp[h * n + t], pos[t]);
            memcpy(k_rot + t * M + h * HD, mk + (h * n + t) * HD, HD * sizeof(float));
            memcpy(v + t * M + h * HD, mv + (h * n + t) * HD, HD * sizeof(float));
        }
    free(mp), free(mk), free(mv);
}

static kvc_seq_stats seq_stats(const th_env *e, const kvc_seq *s)
{
    kvc_seq_stats st;
    memset(&st, 0, sizeof st);
    st.struct_size = sizeof st;
    ck_assert_int_eq(e->p->seq_stats(s, &st), KVC_OK);
    return st;
}

static kvc_instance_stats inst_stats(const th_env *e, const kvc_instance *in)
{
    kvc_instance_stats st;
    memset(&st, 0, sizeof st);
    st.struct_size = sizeof st;
    ck_assert_int_eq(e->p->instance_stats(in, &st), KVC_OK);
    return st;
}

static double rel_err_d(const float *a, const double *b, size_t n)
{
    return th_rel_err(a, b, n);
}

/* ======================================================================================= */
/* 1. rank-r recovery                                                                       */
/* ======================================================================================= */

enum { R1_LAYERS = 2, R1_RANK = 5, R1_TOKENS = 150, R1_CAL = 200 };

typedef struct r1_data {
    lweights w[R1_LAYERS];
    int32_t *pos;
    float *q[R1_LAYERS], *k[R1_LAYERS], *v[R1_LAYERS]; /* pre-RoPE k = W_k x, v = W_v x */
    double *ref[R1_LAYERS];                            /* float64 attention */
    float *cal[R1_LAYERS];                             /* [R1_CAL][HID] for svdllm */
} r1_data;

static void r1_init(r1_data *d, uint64_t *rng)
{
    memset(d, 0, sizeof *d);
    d->pos = positions(rng, R1_TOKENS, 1);
    float *x = fmalloc((size_t)R1_TOKENS * HID);
    for (uint32_t l = 0; l < R1_LAYERS; l++) {
        lw_random_qo(rng, &d->w[l]);
        rank_r_matrix(rng, M, HID, R1_RANK, d->w[l].wk);
        rank_r_matrix(rng, M, HID, R1_RANK, d->w[l].wv);
        th_fill(rng, x, (size_t)R1_TOKENS * HID);
        d->k[l] = fmalloc((size_t)R1_TOKENS * M);
        d->v[l] = fmalloc((size_t)R1_TOKENS * M);
        project(d->w[l].wk, x, R1_TOKENS, d->k[l]);
        project(d->w[l].wv, x, R1_TOKENS, d->v[l]);
        /* Scale keys so the softmax is peaked (|scores| ~ 2-3). */
        for (size_t i = 0; i < (size_t)R1_TOKENS * M; i++)
            d->k[l][i] *= 0.5f;
        d->q[l] = frand(rng, (size_t)R1_TOKENS * QROW);
        d->cal[l] = frand(rng, (size_t)R1_CAL * HID);
        d->ref[l] = malloc((size_t)R1_TOKENS * QROW * sizeof(double));
        ref_attend(R1_TOKENS, d->pos, d->q[l], R1_TOKENS, d->pos, d->k[l], d->v[l], d->ref[l]);
    }
    free(x);
}

static void r1_free(r1_data *d)
{
    for (uint32_t l = 0; l < R1_LAYERS; l++) {
        lw_free(&d->w[l]);
        free(d->q[l]), free(d->k[l]), free(d->v[l]), free(d->ref[l]), free(d->cal[l]);
    }
    free(d->pos);
}

/* Worst relative attention error over the layers of `path` at the given
 * options (NULL opts and no weights for kvc-full); also the materialized
 * values' error in *v_err when v_err != NULL. */
static double r1_run(const r1_data *d, const char *path, const char *const *opts, int prepare,
                     double *v_err)
{
    th_env e;
    open_env(&e, path);
    kvc_geometry g = geo(R1_LAYERS);
    kvc_instance *in = prepare ? build(&e, &g, opts, d->w, prepare > 1 ? d->cal : NULL,
                                       prepare > 1 ? R1_CAL : 0)
                               : create_ok(&e, &g, opts);
    kvc_seq *s;
    ck_assert_int_eq(e.p->seq_open(in, &s), KVC_OK);
    float *out = fmalloc((size_t)R1_TOKENS * QROW);
    float *mk = fmalloc((size_t)R1_TOKENS * M), *mv = fmalloc((size_t)R1_TOKENS * M);
    double worst = 0, worst_v = 0;
    for (uint32_t l = 0; l < R1_LAYERS; l++) {
        append_all(&e, s, l, R1_TOKENS, d->pos, d->k[l], d->v[l]);
        attend_all(&e, s, l, R1_TOKENS, d->pos, d->q[l], out);
        worst = fmax(worst, rel_err_d(out, d->ref[l], (size_t)R1_TOKENS * QROW));
        materialize_tokens(&e, s, l, R1_TOKENS, d->pos, mk, mv);
        worst_v = fmax(worst_v, th_rel_err_f(mv, d->v[l], (size_t)R1_TOKENS * M));
    }
    if (v_err)
        *v_err = worst_v;
    free(out), free(mk), free(mv);
    e.p->seq_close(s);
    e.p->destroy(in);
    ck_assert_uint_eq(th_live_bytes(&e), 0);
    th_close(&e);
    return worst;
}

START_TEST(lorc_recovers_exact_rank_r_weights)
{
    uint64_t rng = g_seed + 11;
    r1_data d;
    r1_init(&d, &rng);

    /* The reference itself agrees with kvc-full (same RoPE convention). */
    double full = r1_run(&d, g_path_full, NULL, 0, NULL);
    printf("  rank-r: kvc-full vs float64 reference: %.3g\n", full);
    ck_assert_msg(full <= 1e-5, "kvc-full vs reference %.3g", full);

    char rk[32], rv[32];
    snprintf(rk, sizeof rk, "rank_k=%d", R1_RANK);
    snprintf(rv, sizeof rv, "rank_v=%d", R1_RANK);
    const char *opts[] = {rk, rv, "dtype=fp32", NULL};
    double v_err;
    double err = r1_run(&d, g_path_lorc, opts, 1, &v_err);
    printf("  rank-r: lorc rank %d on rank-%d weights: attention %.3g, values %.3g\n", R1_RANK,
           R1_RANK, err, v_err);
    ck_assert_msg(err <= 1e-5, "lorc at rank %d: relative error %.3g > 1e-5", R1_RANK, err);
    ck_assert_msg(v_err <= 1e-5, "lorc at rank %d: values error %.3g > 1e-5", R1_RANK, v_err);

    snprintf(rk, sizeof rk, "rank_k=%d", R1_RANK - 1);
    snprintf(rv, sizeof rv, "rank_v=%d", R1_RANK - 1);
    double err_lo = r1_run(&d, g_path_lorc, opts, 1, &v_err);
    printf("  rank-r: lorc rank %d on rank-%d weights: attention %.3g, values %.3g\n",
           R1_RANK - 1, R1_RANK, err_lo, v_err);
    ck_assert_msg(err_lo > 1e-3, "lorc at rank %d: error %.3g, truncation invisible", R1_RANK - 1,
                  err_lo);
    ck_assert_msg(v_err > 1e-2, "lorc at rank %d: values error %.3g", R1_RANK - 1, v_err);

    /* Keys alone truncated: values exact, attention still off. */
    snprintf(rv, sizeof rv, "rank_v=%d", R1_RANK);
    double err_k = r1_run(&d, g_path_lorc, opts, 1, &v_err);
    printf("  rank-r: lorc rank_k %d rank_v %d: attention %.3g, values %.3g\n", R1_RANK - 1,
           R1_RANK, err_k, v_err);
    ck_assert_msg(v_err <= 1e-5, "values at full rank r: %.3g", v_err);
    ck_assert_msg(err_k > 1e-3, "keys truncated to rank %d: attention error %.3g", R1_RANK - 1,
                  err_k);

    /* Default options (full rank, fp32) are exact for both plugins. */
    double lf = r1_run(&d, g_path_lorc, NULL, 1, &v_err);
    ck_assert_msg(lf <= 1e-5 && v_err <= 1e-5, "lorc full rank: %.3g / %.3g", lf, v_err);
    double sf = r1_run(&d, g_path_svdllm, NULL, 2, &v_err);
    printf("  rank-r: full rank (defaults): lorc %.3g, svdllm %.3g\n", lf, sf);
    ck_assert_msg(sf <= 1e-5 && v_err <= 1e-5, "svdllm full rank: %.3g / %.3g", sf, v_err);
    /* svdllm at rank r on rank-r weights: W S has rank r too. */
    snprintf(rk, sizeof rk, "rank_k=%d", R1_RANK);
    snprintf(rv, sizeof rv, "rank_v=%d", R1_RANK);
    double sr = r1_run(&d, g_path_svdllm, opts, 2, &v_err);
    printf("  rank-r: svdllm rank %d: attention %.3g, values %.3g\n", R1_RANK, sr, v_err);
    ck_assert_msg(sr <= 1e-5 && v_err <= 1e-5, "svdllm rank r: %.3g / %.3g", sr, v_err);
    r1_free(&d);
}
END_TEST

/* ======================================================================================= */
/* 2. whitening theorem                                                                     */
/* ======================================================================================= */

enum { W_LAYERS = 2, W_CAL = 600, W_HELD = 256, W_RANK = 8 };

typedef struct w_data {
    lweights w[W_LAYERS];
    float *cal[W_LAYERS];  /* [W_CAL][HID] calibration rows */
    float *held[W_LAYERS]; /* [W_HELD][HID] held-out rows, same distribution */
} w_data;

static void w_init(w_data *d, uint64_t *rng)
{
    memset(d, 0, sizeof *d);
    for (uint32_t l = 0; l < W_LAYERS; l++) {
        lw_random_qo(rng, &d->w[l]);
        th_fill(rng, d->w[l].wk, (size_t)M * HID);
        th_fill(rng, d->w[l].wv, (size_t)M * HID);
        d->cal[l] = fmalloc((size_t)W_CAL * HID);
        d->held[l] = fmalloc((size_t)W_HELD * HID);
        anisotropic_rows(rng, W_CAL, d->cal[l]);
        anisotropic_rows(rng, W_HELD, d->held[l]);
    }
}

static void w_free(w_data *d)
{
    for (uint32_t l = 0; l < W_LAYERS; l++) {
        lw_free(&d->w[l]);
        free(d->cal[l]), free(d->held[l]);
    }
}

/* Relative Frobenius errors of the materialized K (vs RoPE(W_k x)) and V
 * (vs W_v x) of rows x [n][HID] on `layer` of instance `in`. */
static void kv_errors(const th_env *e, kvc_instance *in, const lweights *w, uint32_t layer,
                      const float *x, size_t n, double *ek, double *ev)
{
    int32_t *pos = malloc(n * sizeof(int32_t));
    for (size_t i = 0; i < n; i++)
        pos[i] = (int32_t)i;
    float *k = fmalloc(n * M), *v = fmalloc(n * M), *mk = fmalloc(n * M), *mv = fmalloc(n * M);
    project(w->wk, x, n, k);
    project(w->wv, x, n, v);
    kvc_seq *s;
    ck_assert_int_eq(e->p->seq_open(in, &s), KVC_OK);
    append_all(e, s, layer, n, pos, k, v);
    materialize_tokens(e, s, layer, n, pos, mk, mv);
    double *kr = rotated(k, pos, n);
    *ek = rel_err_d(mk, kr, n * M);
    *ev = th_rel_err_f(mv, v, n * M);
    e->p->seq_close(s);
    free(kr), free(pos), free(k), free(v), free(mk), free(mv);
}

START_TEST(svdllm_whitening_beats_plain_svd_at_equal_rank)
{
    uint64_t rng = g_seed + 22;
    w_data d;
    w_init(&d, &rng);
    kvc_geometry g = geo(W_LAYERS);
    th_env el, es, ef;
    open_env(&el, g_path_lorc);
    open_env(&es, g_path_svdllm);
    const char *lopts[] = {"rank_k=8", "rank_v=8", "alloc=uniform", "dtype=fp32", NULL};
    const char *sopts[] = {"rank_k=8", "rank_v=8", "dtype=fp32", NULL};
    kvc_instance *lin = build(&el, &g, lopts, d.w, NULL, 0);
    kvc_instance *sin_ = build(&es, &g, sopts, d.w, d.cal, W_CAL);

    /* Sanity of the key reference: kvc-full's materialized keys equal
     * RoPE(W_k x) from the definition, its values W_v x. */
    open_env(&ef, g_path_full);
    kvc_instance *fin = create_ok(&ef, &g, NULL);
    double fk, fv;
    kv_errors(&ef, fin, &d.w[0], 0, d.held[0], W_HELD, &fk, &fv);
    printf("  whitening: kvc-full materialize vs reference: K %.3g V %.3g\n", fk, fv);
    ck_assert_msg(fk <= 1e-6 && fv == 0.0, "kvc-full: K %.3g V %.3g", fk, fv);
    ef.p->destroy(fin);
    ck_assert_uint_eq(th_live_bytes(&ef), 0);
    th_close(&ef);

    for (uint32_t l = 0; l < W_LAYERS; l++) {
        double lk, lv, sk, sv;
        /* On the calibration rows svdllm's projection is the optimal rank-8
         * one (Eckart-Young on W S): never worse than plain SVD's. */
        kv_errors(&el, lin, &d.w[l], l, d.cal[l], W_CAL, &lk, &lv);
        kv_errors(&es, sin_, &d.w[l], l, d.cal[l], W_CAL, &sk, &sv);
        printf("  whitening: layer %u calibration rows: K lorc %.4f svdllm %.4f | V lorc %.4f "
               "svdllm %.4f\n", l, lk, sk, lv, sv);
        ck_assert_msg(sk <= lk * (1 + 1e-4) && sv <= lv * (1 + 1e-4),
                      "layer %u calibration: svdllm K %.6f V %.6f above lorc K %.6f V %.6f", l, sk,
                      sv, lk, lv);
        /* Held-out rows of the same distribution. */
        kv_errors(&el, lin, &d.w[l], l, d.held[l], W_HELD, &lk, &lv);
        kv_errors(&es, sin_, &d.w[l], l, d.held[l], W_HELD, &sk, &sv);
        printf("  whitening: layer %u held-out rows:    K lorc %.4f svdllm %.4f | V lorc %.4f "
               "svdllm %.4f\n", l, lk, sk, lv, sv);
        ck_assert_msg(sv <= 0.9 * lv, "layer %u held-out V: svdllm %.4f not below 0.9 x lorc %.4f",
                      l, sv, lv);
        ck_assert_msg(sk <= 0.9 * lk, "layer %u held-out K: svdllm %.4f not below 0.9 x lorc %.4f",
                      l, sk, lk);
        /* Truncation is real for both (full-rank W, rank 8 of 32). */
        ck_assert_msg(sv > 1e-3 && lv > 0.1, "layer %u: V errors %.3g / %.3g", l, sv, lv);
    }
    el.p->destroy(lin);
    es.p->destroy(sin_);
    ck_assert_uint_eq(th_live_bytes(&el), 0);
    ck_assert_uint_eq(th_live_bytes(&es), 0);
    th_close(&el);
    th_close(&es);
    w_free(&d);
}
END_TEST

/* ======================================================================================= */
/* 3. artifact round trip                                                                   */
/* ======================================================================================= */

/* Appends the held-out rows' keys/values to every layer of a fresh sequence
 * and attends queries at the same positions; out [W_LAYERS][W_HELD][QROW]. */
static void run_outputs(const th_env *e, kvc_instance *in, const w_data *d, const float *q,
                        const int32_t *pos, float *out)
{
    kvc_seq *s;
    ck_assert_int_eq(e->p->seq_open(in, &s), KVC_OK);
    float *k = fmalloc((size_t)W_HELD * M), *v = fmalloc((size_t)W_HELD * M);
    for (uint32_t l = 0; l < W_LAYERS; l++) {
        project(d->w[l].wk, d->held[l], W_HELD, k);
        project(d->w[l].wv, d->held[l], W_HELD, v);
        append_all(e, s, l, W_HELD, pos, k, v);
        attend_all(e, s, l, W_HELD, pos, q + (size_t)l * W_HELD * QROW,
                   out + (size_t)l * W_HELD * QROW);
    }
    free(k), free(v);
    e->p->seq_close(s);
}

static void expect_refused(const th_env *e, const kvc_geometry *g, const char *const *opts,
                           const void *art, size_t size, kvc_status want, const char *needle,
                           const char *what)
{
    kvc_instance *in = (kvc_instance *)&in; /* must stay untouched */
    kvc_instance *const sentinel = in;
    char msg[512];
    uint64_t live = th_live_bytes(e);
    kvc_status st = create_art(e, g, opts, art, size, &in, msg, sizeof msg);
    printf("  artifact: %s -> %d \"%s\"\n", what, st, msg);
    ck_assert_msg(st == want, "%s: status %d, want %d (%s)", what, st, want, msg);
    ck_assert_msg(in == sentinel, "%s: *out was written on failure", what);
    ck_assert_msg(msg[0], "%s: no message", what);
    if (needle)
        ck_assert_msg(strstr(msg, needle), "%s: message \"%s\" does not name %s", what, msg,
                      needle);
    ck_assert_msg(th_live_bytes(e) == live, "%s: failed create leaked %llu bytes", what,
                  (unsigned long long)(th_live_bytes(e) - live));
}

START_TEST(svdllm_artifact_round_trip_and_refusals)
{
    uint64_t rng = g_seed + 33;
    w_data d;
    w_init(&d, &rng);
    kvc_geometry g = geo(W_LAYERS);
    th_env es, el;
    open_env(&es, g_path_svdllm);
    open_env(&el, g_path_lorc);
    const char *sopts[] = {"rank_k=8", "rank_v=8", NULL};
    kvc_instance *a = build(&es, &g, sopts, d.w, d.cal, W_CAL);

    /* Size, then too small (BUFFER, size given), then the copy. */
    size_t size = 0, size2 = 0;
    ck_assert_int_eq(es.p->save(a, NULL, 0, &size), KVC_OK);
    ck_assert_uint_gt(size, (size_t)W_LAYERS * 2 * 2 * M * W_RANK * sizeof(float));
    uint8_t *art = malloc(size + 1);
    ck_assert_int_eq(es.p->save(a, art, size - 1, &size2), KVC_E_BUFFER);
    ck_assert_uint_eq(size2, size);
    ck_assert(strlen(es.p->instance_message(a)) > 0);
    size2 = 0;
    ck_assert_int_eq(es.p->save(a, art, size, &size2), KVC_OK);
    ck_assert_uint_eq(size2, size);
    printf("  artifact: %zu bytes\n", size);

    kvc_instance *b = NULL;
    char msg[512];
    kvc_status st = create_art(&es, &g, NULL, art, size, &b, msg, sizeof msg);
    ck_assert_msg(st == KVC_OK && b, "create from artifact: %d %s", st, msg);

    /* Same appends and queries: bit-identical outputs. */
    int32_t *pos = positions(&rng, W_HELD, 1);
    float *q = frand(&rng, (size_t)W_LAYERS * W_HELD * QROW);
    const size_t n_out = (size_t)W_LAYERS * W_HELD * QROW;
    float *oa = fmalloc(n_out), *ob = fmalloc(n_out);
    run_outputs(&es, a, &d, q, pos, oa);
    run_outputs(&es, b, &d, q, pos, ob);
    ck_assert_msg(memcmp(oa, ob, n_out * sizeof(float)) == 0,
                  "outputs of the loaded artifact differ from the prepared instance's");
    kvc_instance_stats sa = inst_stats(&es, a), sb = inst_stats(&es, b);
    printf("  artifact: kv_ratio prepared %.6f loaded %.6f, params %llu / %llu bytes\n",
           sa.kv_ratio, sb.kv_ratio, (unsigned long long)sa.bytes_params,
           (unsigned long long)sb.bytes_params);
    ck_assert(sa.kv_ratio == sb.kv_ratio);
    ck_assert_uint_eq(sa.bytes_params, sb.bytes_params);
    ck_assert_uint_eq(sa.seq_overhead_bytes, sb.seq_overhead_bytes);
    /* Saving the loaded instance reproduces the artifact byte for byte. */
    size_t size_b = 0;
    ck_assert_int_eq(es.p->save(b, NULL, 0, &size_b), KVC_OK);
    ck_assert_uint_eq(size_b, size);
    uint8_t *art_b = malloc(size_b);
    ck_assert_int_eq(es.p->save(b, art_b, size_b, &size_b), KVC_OK);
    ck_assert_msg(memcmp(art, art_b, size) == 0, "re-saved artifact differs");
    free(art_b);
    /* A loaded instance takes no preparation. */
    kvc_layer_weights lw = lw_view(&d.w[0]);
    ck_assert_int_eq(es.p->prepare_layer(b, 0, &lw, NULL), KVC_E_STATE);
    ck_assert(strlen(es.p->instance_message(b)) > 0);

    /* The options it was made with are accepted again. */
    kvc_instance *c = NULL;
    const char *same[] = {"rank_k=8", NULL};
    st = create_art(&es, &g, same, art, size, &c, msg, sizeof msg);
    ck_assert_msg(st == KVC_OK, "artifact with its own rank_k=8: %d %s", st, msg);
    es.p->destroy(c);

    const char *conflict_rank[] = {"rank_k=4", NULL};
    expect_refused(&es, &g, conflict_rank, art, size, KVC_E_INVALID, "rank_k",
                   "rank_k=4 on a rank-8 artifact");
    const char *conflict_ratio[] = {"kv_ratio=0.3", NULL};
    expect_refused(&es, &g, conflict_ratio, art, size, KVC_E_INVALID, "kv_ratio",
                   "kv_ratio=0.3 on an artifact without one");
    expect_refused(&el, &g, NULL, art, size, KVC_E_INVALID, "svdllm",
                   "svdllm artifact into lorc");
    expect_refused(&es, &g, NULL, art, size - 1, KVC_E_CORRUPT, NULL, "truncated by one byte");
    expect_refused(&es, &g, NULL, art, size / 2, KVC_E_CORRUPT, NULL, "truncated to half");
    art[size] = 0;
    expect_refused(&es, &g, NULL, art, size + 1, KVC_E_CORRUPT, NULL, "one trailing byte");
    art[size - 5] ^= 0x10;
    expect_refused(&es, &g, NULL, art, size, KVC_E_CORRUPT, NULL, "flipped byte near the end");
    art[size - 5] ^= 0x10;
    art[size / 2] ^= 0x01;
    expect_refused(&es, &g, NULL, art, size, KVC_E_CORRUPT, NULL, "flipped byte in the middle");
    art[size / 2] ^= 0x01;
    kvc_geometry g3 = geo(W_LAYERS + 1);
    expect_refused(&es, &g3, NULL, art, size, KVC_E_INVALID, NULL, "other geometry (3 layers)");

    /* The original instance is unharmed by all of this. */
    float *oc = fmalloc(n_out);
    run_outputs(&es, b, &d, q, pos, oc);
    ck_assert(memcmp(oa, oc, n_out * sizeof(float)) == 0);

    es.p->destroy(a);
    es.p->destroy(b);
    ck_assert_uint_eq(th_live_bytes(&es), 0);
    ck_assert_uint_eq(th_live_bytes(&el), 0);
    th_close(&es);
    th_close(&el);
    free(art), free(pos), free(q), free(oa), free(ob), free(oc);
    w_free(&d);
}
END_TEST

/* ======================================================================================= */
/* 4. progressive ranks                                                                     */
/* ======================================================================================= */

enum { P_LAYERS = 6, P_TOKENS = 40 };

/* Per-layer payload bytes per token (seq with tokens on layer l only) and
 * the average over a sequence holding the same tokens on every layer. */
typedef struct p_result {
    double per_layer[P_LAYERS];
    double avg;
    double kv_ratio;
} p_result;

static p_result p_run(const lweights *w, const char *const *opts, double ratio)
{
    th_env e;
    open_env(&e, g_path_lorc);
    kvc_geometry g = geo(P_LAYERS);
    kvc_instance *in = build(&e, &g, opts, w, NULL, 0);
    uint64_t rng = g_seed + 404;
    int32_t *pos = positions(&rng, P_TOKENS, 1); /* gaps: positions are stored */
    float *k = frand(&rng, (size_t)P_TOKENS * M), *v = frand(&rng, (size_t)P_TOKENS * M);
    p_result r;
    memset(&r, 0, sizeof r);
    kvc_instance_stats is = inst_stats(&e, in);
    r.kv_ratio = is.kv_ratio;

    kvc_seq *all;
    const uint64_t live0 = th_live_bytes(&e);
    ck_assert_int_eq(e.p->seq_open(in, &all), KVC_OK);
    for (uint32_t l = 0; l < P_LAYERS; l++)
        append_all(&e, all, l, P_TOKENS, pos, k, v);
    kvc_seq_stats sa = seq_stats(&e, all);
    /* KVC-REQ-7: what the sequence reports is what it holds at the host. */
    ck_assert_uint_eq(sa.bytes_resident, th_live_bytes(&e) - live0);
    ck_assert_uint_eq(sa.bytes_resident, sa.bytes_payload + sa.bytes_metadata +
                                             sa.bytes_reserved + sa.bytes_fixed);
    ck_assert_uint_eq(sa.tokens_appended, (uint64_t)P_TOKENS * P_LAYERS);
    r.avg = (double)sa.bytes_payload / (double)sa.tokens_appended;
    /* The budget promise (KVC-REQ-9). */
    ck_assert_msg((double)sa.bytes_resident <=
                      is.kv_ratio * (double)sa.bytes_fp16_full + (double)is.seq_overhead_bytes,
                  "resident %llu > %.4f x %llu + %llu", (unsigned long long)sa.bytes_resident,
                  is.kv_ratio, (unsigned long long)sa.bytes_fp16_full,
                  (unsigned long long)is.seq_overhead_bytes);
    e.p->seq_close(all);

    double sum = 0;
    for (uint32_t l = 0; l < P_LAYERS; l++) {
        kvc_seq *s;
        ck_assert_int_eq(e.p->seq_open(in, &s), KVC_OK);
        append_all(&e, s, l, P_TOKENS, pos, k, v);
        kvc_seq_stats st = seq_stats(&e, s);
        ck_assert_uint_eq(st.tokens_appended, P_TOKENS);
        ck_assert_uint_eq(st.bytes_resident, th_live_bytes(&e) - live0);
        /* KVC-REQ-9 also for a sequence that filled one (shallow) layer only. */
        ck_assert_msg((double)st.bytes_resident <=
                          is.kv_ratio * (double)st.bytes_fp16_full +
                              (double)is.seq_overhead_bytes,
                      "layer %u only: resident %llu above the promise", l,
                      (unsigned long long)st.bytes_resident);
        r.per_layer[l] = (double)st.bytes_payload / P_TOKENS;
        sum += r.per_layer[l];
        e.p->seq_close(s);
    }
    /* The per-layer sequences add up to the all-layer one. */
    ck_assert_msg(fabs(sum / P_LAYERS - r.avg) < 1e-9, "per-layer %.3f vs all-layer %.3f",
                  sum / P_LAYERS, r.avg);
    const double fp16 = 2.0 * N_KV * HD * 2; /* bytes per token per layer */
    ck_assert_msg(r.avg <= ratio * fp16, "average payload %.2f B/token/layer > %.2f x %.0f",
                  r.avg, ratio, fp16);
    ck_assert_msg(r.kv_ratio <= ratio + 1e-12, "declared kv_ratio %.6f above requested %.4f",
                  r.kv_ratio, ratio);
    e.p->destroy(in);
    ck_assert_uint_eq(th_live_bytes(&e), 0);
    th_close(&e);
    free(pos), free(k), free(v);
    return r;
}

static void p_print(const char *what, const p_result *r)
{
    printf("  progressive: %-22s payload B/token by layer:", what);
    for (uint32_t l = 0; l < P_LAYERS; l++)
        printf(" %.0f", r->per_layer[l]);
    printf(" | avg %.2f, declared kv_ratio %.4f\n", r->avg, r->kv_ratio);
}

START_TEST(lorc_progressive_ranks_fit_budget_and_favour_shallow_layers)
{
    uint64_t rng = g_seed + 44;
    /* log10 condition numbers per layer, K and V differently. */
    static const double ck[P_LAYERS] = {1.0, 4.0, 2.0, 6.0, 3.0, 0.5};
    static const double cv[P_LAYERS] = {3.0, 0.5, 5.0, 1.0, 2.0, 4.0};
    lweights w[P_LAYERS];
    for (uint32_t l = 0; l < P_LAYERS; l++) {
        lw_random_qo(&rng, &w[l]);
        conditioned_matrix(&rng, ck[l], w[l].wk);
        conditioned_matrix(&rng, cv[l], w[l].wv);
    }
    const double ratio = 0.5;
    const char *o_uni[] = {"kv_ratio=0.5", "alloc=uniform", NULL};
    const char *o_def[] = {"kv_ratio=0.5", NULL};
    const char *o_one[] = {"kv_ratio=0.5", "spread=1", NULL};
    const char *o_zero[] = {"kv_ratio=0.5", "spread=0", NULL};
    p_result uni = p_run(w, o_uni, ratio);
    p_result def = p_run(w, o_def, ratio);
    p_result one = p_run(w, o_one, ratio);
    p_result zero = p_run(w, o_zero, ratio);
    p_print("uniform", &uni);
    p_print("progressive spread 0.5", &def);
    p_print("progressive spread 1", &one);
    p_print("progressive spread 0", &zero);

    /* Progressive spends the uniform budget, no more. */
    ck_assert_msg(def.avg <= uni.avg && one.avg <= uni.avg, "progressive avg %.2f / %.2f > %.2f",
                  def.avg, one.avg, uni.avg);
    ck_assert_msg(def.avg >= uni.avg - 2.0 * 2 && one.avg >= uni.avg - 2.0 * 2,
                  "progressive leaves budget unused: %.2f / %.2f vs %.2f", def.avg, one.avg,
                  uni.avg);
    for (uint32_t l = 0; l < P_LAYERS; l++) {
        ck_assert(uni.per_layer[l] == uni.per_layer[0]);
        ck_assert_msg(zero.per_layer[l] == zero.per_layer[0],
                      "spread=0: layer %u holds %.1f B/token, layer 0 %.1f", l,
                      zero.per_layer[l], zero.per_layer[0]);
        if (l) {
            ck_assert_msg(def.per_layer[l] <= def.per_layer[l - 1],
                          "spread 0.5: layer %u holds more (%.1f) than layer %u (%.1f)", l,
                          def.per_layer[l], l - 1, def.per_layer[l - 1]);
            ck_assert_msg(one.per_layer[l] <= one.per_layer[l - 1],
                          "spread 1: layer %u holds more (%.1f) than layer %u (%.1f)", l,
                          one.per_layer[l], l - 1, one.per_layer[l - 1]);
        }
    }
    ck_assert(zero.avg == uni.avg);
    ck_assert_msg(def.per_layer[0] > def.per_layer[P_LAYERS - 1], "spread 0.5: first %.1f last %.1f",
                  def.per_layer[0], def.per_layer[P_LAYERS - 1]);
    ck_assert_msg(one.per_layer[0] - one.per_layer[P_LAYERS - 1] >
                      def.per_layer[0] - def.per_layer[P_LAYERS - 1],
                  "spread 1 is not wider than spread 0.5");
    for (uint32_t l = 0; l < P_LAYERS; l++)
        lw_free(&w[l]);
}
END_TEST

/* ======================================================================================= */
/* 5. errors                                                                                */
/* ======================================================================================= */

START_TEST(out_of_order_calls_and_bad_budgets_are_refused)
{
    uint64_t rng = g_seed + 55;
    kvc_geometry g = geo(2);
    lweights w[2];
    for (uint32_t l = 0; l < 2; l++) {
        lw_random_qo(&rng, &w[l]);
        th_fill(&rng, w[l].wk, (size_t)M * HID);
        th_fill(&rng, w[l].wv, (size_t)M * HID);
    }
    float *k = frand(&rng, 4 * M), *v = frand(&rng, 4 * M), *q = frand(&rng, 4 * QROW);
    float out[4 * QROW];
    const int32_t pos[4] = {0, 1, 2, 3};
    th_env el, es;
    open_env(&el, g_path_lorc);
    open_env(&es, g_path_svdllm);

    /* append / attend before finalize: STATE with a message. */
    const char *o4[] = {"rank_k=4", "rank_v=4", NULL};
    kvc_instance *in = create_ok(&el, &g, o4);
    kvc_seq *s;
    ck_assert_int_eq(el.p->seq_open(in, &s), KVC_OK);
    ck_assert_int_eq(el.p->append(s, 0, 4, pos, k, v, NULL), KVC_E_STATE);
    printf("  errors: append before finalize: \"%s\"\n", el.p->seq_message(s));
    ck_assert(strlen(el.p->seq_message(s)) > 0);
    ck_assert_int_eq(el.p->attend(s, 0, 4, pos, q, out), KVC_E_STATE);
    ck_assert(strlen(el.p->seq_message(s)) > 0);
    size_t sz = 0;
    ck_assert_int_eq(el.p->save(in, NULL, 0, &sz), KVC_E_STATE);
    /* finalize_layer with no weights: STATE. */
    ck_assert_int_eq(el.p->finalize_layer(in, 0), KVC_E_STATE);
    printf("  errors: finalize_layer without weights: \"%s\"\n", el.p->instance_message(in));
    ck_assert(strlen(el.p->instance_message(in)) > 0);
    ck_assert_int_eq(el.p->finalize(in), KVC_E_STATE);
    /* Still usable: feed, finalize, then append and attend work. */
    for (uint32_t l = 0; l < 2; l++) {
        kvc_layer_weights lw = lw_view(&w[l]);
        ck_assert_int_eq(el.p->prepare_layer(in, l, &lw, NULL), KVC_OK);
    }
    ck_assert_int_eq(el.p->finalize_layer(in, 1), KVC_OK);
    /* Layer 1 is ready, layer 0 not yet (sequential order). */
    ck_assert_int_eq(el.p->append(s, 1, 4, pos, k, v, NULL), KVC_OK);
    ck_assert_int_eq(el.p->attend(s, 1, 4, pos, q, out), KVC_OK);
    ck_assert_int_eq(el.p->append(s, 0, 4, pos, k, v, NULL), KVC_E_STATE);
    ck_assert_int_eq(el.p->finalize(in), KVC_OK);
    ck_assert_int_eq(el.p->append(s, 0, 4, pos, k, v, NULL), KVC_OK);
    kvc_layer_weights lw0 = lw_view(&w[0]);
    ck_assert_int_eq(el.p->prepare_layer(in, 0, &lw0, NULL), KVC_E_STATE);
    el.p->seq_close(s);
    el.p->destroy(in);

    /* Progressive ranks need every layer's weights before the first finalize. */
    const char *oprog[] = {"kv_ratio=0.5", NULL};
    in = create_ok(&el, &g, oprog);
    ck_assert_int_eq(el.p->prepare_layer(in, 0, &lw0, NULL), KVC_OK);
    ck_assert_int_eq(el.p->finalize_layer(in, 0), KVC_E_STATE);
    printf("  errors: progressive, layer 1 unfed: \"%s\"\n", el.p->instance_message(in));
    ck_assert(strstr(el.p->instance_message(in), "layer 1"));
    el.p->destroy(in);

    /* svdllm: weights but no calibration. */
    in = create_ok(&es, &g, o4);
    ck_assert_int_eq(es.p->prepare_layer(in, 0, &lw0, NULL), KVC_OK);
    ck_assert_int_eq(es.p->finalize_layer(in, 0), KVC_E_STATE);
    printf("  errors: svdllm without calibration: \"%s\"\n", es.p->instance_message(in));
    ck_assert(strstr(es.p->instance_message(in), "calibration"));
    es.p->destroy(in);

    /* kv_ratio too small: INVALID naming the minimum, which is right. */
    const th_env *envs[2] = {&el, &es};
    for (int i = 0; i < 2; i++) {
        const th_env *e = envs[i];
        char msg[512];
        const char *tiny[] = {"kv_ratio=0.01", NULL};
        kvc_instance *x = NULL;
        kvc_status st = create_art(e, &g, tiny, NULL, 0, &x, msg, sizeof msg);
        printf("  errors: %s kv_ratio=0.01 -> %d \"%s\"\n", e->p->id, st, msg);
        ck_assert_int_eq(st, KVC_E_INVALID);
        ck_assert_ptr_null(x);
        const char *ge = strstr(msg, "kv_ratio >= ");
        ck_assert_msg(ge, "message \"%s\" gives no minimum", msg);
        double mn = strtod(ge + strlen("kv_ratio >= "), NULL);
        ck_assert(mn > 0.01 && mn < 1.0);
        char at[64];
        snprintf(at, sizeof at, "kv_ratio=%.6f", mn + 1e-4);
        const char *ok_opts[] = {at, NULL};
        x = create_ok(e, &g, ok_opts);
        kvc_instance_stats is = inst_stats(e, x);
        ck_assert(is.kv_ratio <= mn + 1e-4 + 1e-12);
        e->p->destroy(x);
        snprintf(at, sizeof at, "kv_ratio=%.6f", mn - 1e-3);
        x = NULL;
        ck_assert_int_eq(create_art(e, &g, ok_opts, NULL, 0, &x, msg, sizeof msg),
                         KVC_E_INVALID);
        ck_assert_ptr_null(x);
    }

    /* key_space=post with refit=true: INVALID. */
    {
        char msg[512];
        const char *bad[] = {"key_space=post", "refit=true", NULL};
        kvc_instance *x = NULL;
        kvc_status st = create_art(&es, &g, bad, NULL, 0, &x, msg, sizeof msg);
        printf("  errors: key_space=post refit=true -> %d \"%s\"\n", st, msg);
        ck_assert_int_eq(st, KVC_E_INVALID);
        ck_assert_ptr_null(x);
        ck_assert(strstr(msg, "refit") && strstr(msg, "key_space"));
        /* lorc takes no key_space at all. */
        const char *lbad[] = {"key_space=post", NULL};
        st = create_art(&el, &g, lbad, NULL, 0, &x, msg, sizeof msg);
        ck_assert_int_eq(st, KVC_E_INVALID);
        ck_assert(strstr(msg, "key_space"));
        /* rank above a group's rows. */
        const char *big[] = {"rank_k=33", NULL};
        st = create_art(&el, &g, big, NULL, 0, &x, msg, sizeof msg);
        ck_assert_int_eq(st, KVC_E_INVALID);
        ck_assert(strstr(msg, "rank_k"));
        ck_assert_ptr_null(x);
    }

    ck_assert_uint_eq(th_live_bytes(&el), 0);
    ck_assert_uint_eq(th_live_bytes(&es), 0);
    th_close(&el);
    th_close(&es);
    for (uint32_t l = 0; l < 2; l++)
        lw_free(&w[l]);
    free(k), free(v), free(q);
}
END_TEST

/* ======================================================================================= */
/* 6. seq_describe (ABI 1.2)                                                                */
/* ======================================================================================= */

/* The value of `key=` in the first line of text (-1 when absent). */
static long word_value(const char *text, const char *key)
{
    const char *nl = strchr(text, '\n');
    size_t kl = strlen(key);
    for (const char *c = text; *c && (!nl || c < nl); c++)
        if ((c == text || c[-1] == ' ') && strncmp(c, key, kl) == 0 && c[kl] == '=')
            return strtol(c + kl + 1, NULL, 10);
    return -1;
}

START_TEST(seq_describe_reports_tokens_and_group_ranks)
{
    uint64_t rng = g_seed + 66;
    enum { L = 3 };
    kvc_geometry g = geo(L);
    lweights w[L];
    for (uint32_t l = 0; l < L; l++) {
        lw_random_qo(&rng, &w[l]);
        conditioned_matrix(&rng, 1.0 + 2.0 * l, w[l].wk);
        conditioned_matrix(&rng, 0.5 + l, w[l].wv);
    }
    const size_t n = 40;
    int32_t *pos = positions(&rng, n, 1);
    float *k = frand(&rng, n * M), *v = frand(&rng, n * M), *q = frand(&rng, n * QROW);
    float *out = fmalloc(n * QROW);
    char why[1024];

    /* Explicit ranks: every head of every layer says them. */
    const char *paths[2] = {g_path_lorc, g_path_svdllm};
    for (int i = 0; i < 2; i++) {
        th_env e;
        open_env(&e, paths[i]);
        ck_assert_msg(KVC_HAS_FIELD(e.p, kvc_plugin, seq_describe) && e.p->seq_describe,
                      "%s: no seq_describe", e.p->id);
        if (i == 1) { /* svdllm needs calibration rows */
            float *cal[L];
            for (uint32_t l = 0; l < L; l++)
                cal[l] = frand(&rng, 150 * HID);
            const char *o[] = {"rank_k=4", "rank_v=6", NULL};
            kvc_instance *in = build(&e, &g, o, w, cal, 150);
            for (uint32_t l = 0; l < L; l++)
                free(cal[l]);
            kvc_seq *s;
            ck_assert_int_eq(e.p->seq_open(in, &s), KVC_OK);
            append_all(&e, s, 1, n, pos, k, v);
            ck_assert_msg(th_check_describe(&e, s, L, 1, N_KV, (uint32_t)n, "rank_k=4", NULL,
                                            why, sizeof why) == 0,
                          "svdllm layer 1: %s", why);
            ck_assert_msg(th_check_describe(&e, s, L, 0, N_KV, 0, "rank_v=6", NULL, why,
                                            sizeof why) == 0,
                          "svdllm layer 0: %s", why);
            e.p->seq_close(s);
            e.p->destroy(in);
        } else {
            const char *o[] = {"rank_k=4", "rank_v=6", NULL};
            kvc_instance *in = build(&e, &g, o, w, NULL, 0);
            kvc_seq *s;
            ck_assert_int_eq(e.p->seq_open(in, &s), KVC_OK);
            for (uint32_t l = 0; l < L; l++) {
                size_t held = n - 10 * l;
                append_all(&e, s, l, held, pos, k, v);
                attend_all(&e, s, l, held, pos, q, out);
                char *text = NULL;
                ck_assert_msg(th_check_describe(&e, s, L, l, N_KV, (uint32_t)held, "rank_k=4",
                                                &text, why, sizeof why) == 0,
                              "lorc layer %u: %s", l, why);
                ck_assert_msg(strstr(text, "rank_v=6"), "lorc layer %u: %s", l, text);
                if (l == 0)
                    printf("  seq_describe: lorc layer 0: %s", text);
                free(text);
            }
            /* Errors name the layer on the sequence. */
            size_t sz = 0;
            ck_assert_int_eq(e.p->seq_describe(s, L, NULL, 0, &sz), KVC_E_INVALID);
            ck_assert_ptr_nonnull(strstr(e.p->seq_message(s), "layer"));
            e.p->seq_close(s);
            e.p->destroy(in);
        }
        ck_assert_uint_eq(th_live_bytes(&e), 0);
        th_close(&e);
    }

    /* Progressive ranks (lorc, fp32 latents): each layer's rank_k + rank_v
     * is what that layer's payload holds per token (one group). */
    th_env e;
    open_env(&e, g_path_lorc);
    const char *o[] = {"kv_ratio=0.6", "dtype=fp32", "spread=1", NULL};
    kvc_instance *in = build(&e, &g, o, w, NULL, 0);
    kvc_seq *s;
    ck_assert_int_eq(e.p->seq_open(in, &s), KVC_OK);
    uint64_t before = seq_stats(&e, s).bytes_payload;
    long first_sum = -1;
    int differ = 0;
    for (uint32_t l = 0; l < L; l++) {
        append_all(&e, s, l, n, pos, k, v);
        uint64_t now = seq_stats(&e, s).bytes_payload;
        char *text = NULL;
        ck_assert_msg(th_check_describe(&e, s, L, l, N_KV, (uint32_t)n, NULL, &text, why,
                                        sizeof why) == 0,
                      "progressive layer %u: %s", l, why);
        long rk = word_value(text, "rank_k"), rv = word_value(text, "rank_v");
        printf("  seq_describe: progressive layer %u: rank_k %ld rank_v %ld\n", l, rk, rv);
        ck_assert_msg(rk > 0 && rv > 0, "layer %u: %s", l, text);
        ck_assert_msg((uint64_t)(rk + rv) * n * sizeof(float) == now - before,
                      "layer %u: rank_k %ld + rank_v %ld, but the layer's payload is %llu B for "
                      "%zu tokens", l, rk, rv, (unsigned long long)(now - before), n);
        /* Both heads are one group: the same ranks. */
        const char *second = strchr(text, '\n') + 1;
        ck_assert_msg(word_value(second, "rank_k") == rk && word_value(second, "rank_v") == rv,
                      "heads of one group differ: %s", text);
        if (first_sum < 0)
            first_sum = rk + rv;
        differ |= rk + rv != first_sum;
        before = now;
        free(text);
    }
    ck_assert_msg(differ, "progressive ranks with spread 1 are equal in every layer");
    e.p->seq_close(s);
    e.p->destroy(in);
    ck_assert_uint_eq(th_live_bytes(&e), 0);
    th_close(&e);
    for (uint32_t l = 0; l < L; l++)
        lw_free(&w[l]);
    free(pos), free(k), free(v), free(q), free(out);
}
END_TEST

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: %s kvc-full.so kvc-lorc.so kvc-svdllm.so\n", argv[0]);
        return EXIT_FAILURE;
    }
    g_path_full = argv[1];
    g_path_lorc = argv[2];
    g_path_svdllm = argv[3];
    const char *env = getenv("KVC_TEST_SEED");
    g_seed = env ? strtoull(env, NULL, 10) : 20261123ull;
    printf("test_lowrank: seed %llu (replay with KVC_TEST_SEED)\n", (unsigned long long)g_seed);
    Suite *su = suite_create("lowrank");
    TCase *math = tcase_create("math");
    tcase_set_timeout(math, 120);
    tcase_add_test(math, lorc_recovers_exact_rank_r_weights);
    tcase_add_test(math, svdllm_whitening_beats_plain_svd_at_equal_rank);
    tcase_add_test(math, lorc_progressive_ranks_fit_budget_and_favour_shallow_layers);
    suite_add_tcase(su, math);
    TCase *io = tcase_create("artifact");
    tcase_set_timeout(io, 120);
    tcase_add_test(io, svdllm_artifact_round_trip_and_refusals);
    suite_add_tcase(su, io);
    TCase *bad = tcase_create("errors");
    tcase_set_timeout(bad, 120);
    tcase_add_test(bad, out_of_order_calls_and_bad_budgets_are_refused);
    tcase_add_test(bad, seq_describe_reports_tokens_and_group_ranks);
    suite_add_tcase(su, bad);
    SRunner *sr = srunner_create(su);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
