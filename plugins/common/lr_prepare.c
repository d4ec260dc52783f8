/*
 * Factors of the low-rank plugins, from what the host feeds:
 *   weights      the shard's W_k, W_v rows ([m_total][hidden] copies);
 *   calibration  fp32 Gram matrices of the attention inputs (SVD-LLM's
 *                whitening), of post-RoPE keys (key_space=post), and for
 *                the refit the compressed-input Gram and the cross term
 *                with the exact rows (x_ref, ABI 1.1).
 * finalize_layer factors in fp64 through LAPACKE (kvck_linalg.h):
 *   plain    SVD of W_g                      -> U (LoRC)
 *   whiten   S = chol(X^T X [+ shift I]), SVD of W_g S -> U (SVD-LLM)
 *   post     eigenvectors of sum k_rot k_rot^T -> U
 *   down = U_r^T, up = U_r, or with refit
 *   up = argmin_B sum_t |W x_ref,t - B U_r^T W x'_t|^2
 *      = (W C W^T U_r) (U_r^T W G' W^T U_r)^-1,  C = sum x_ref x'^T, G' = sum x' x'^T.
 * Ranks: uniform from kv_ratio, or LoRC's progressive allocation (below).
 */
#include <math.h>
#include <string.h>

#include <cblas.h>

#include "kvck_linalg.h"
#include "lowrank.h"

/* ---- memory ------------------------------------------------------------------- */

static size_t dd_bytes(const kvc_instance *in)
{
    return (size_t)in->g.hidden_size * in->g.hidden_size * sizeof(float);
}

void lr_prep_free(kvc_instance *in, lr_layer *L)
{
    lr_prep *p = &L->prep;
    const size_t wbytes = (size_t)in->g.n_kv * in->g.head_dim * in->g.hidden_size * sizeof(float);
    lr_ifree(in, p->wk, wbytes, &in->bytes_prep);
    lr_ifree(in, p->wv, wbytes, &in->bytes_prep);
    lr_ifree(in, p->gram, dd_bytes(in), &in->bytes_prep);
    lr_ifree(in, p->gram_c, dd_bytes(in), &in->bytes_prep);
    lr_ifree(in, p->cross, dd_bytes(in), &in->bytes_prep);
    lr_ifree(in, p->kcov, (size_t)in->n_groups * in->m * in->m * sizeof(float), &in->bytes_prep);
    memset(p, 0, sizeof *p);
}

static void factor_free(kvc_instance *in, lr_factor *f)
{
    const size_t m = in->m;
    lr_ifree(in, f->down, (size_t)f->r * m * sizeof(float), &in->bytes_params);
    lr_ifree(in, f->up, (size_t)f->r * m * sizeof(float), &in->bytes_params);
    lr_ifree(in, f->sigma, m * sizeof(float), &in->bytes_params);
    memset(f, 0, sizeof *f);
}

void lr_factors_free(kvc_instance *in, lr_layer *L)
{
    for (int kv = 0; kv < 2; kv++) {
        lr_factor *f = kv ? L->v : L->k;
        if (!f)
            continue;
        for (uint32_t g = 0; g < in->n_groups; g++)
            factor_free(in, &f[g]);
        lr_ifree(in, f, in->n_groups * sizeof(lr_factor), &in->bytes_params);
    }
    L->k = L->v = NULL;
}

kvc_status lr_factors_alloc(kvc_instance *in, lr_layer *L, uint32_t rk, uint32_t rv)
{
    const size_t m = in->m;
    L->k = lr_ialloc(in, in->n_groups * sizeof(lr_factor), &in->bytes_params);
    L->v = lr_ialloc(in, in->n_groups * sizeof(lr_factor), &in->bytes_params);
    if (!L->k || !L->v)
        goto nomem;
    for (int kv = 0; kv < 2; kv++)
        for (uint32_t g = 0; g < in->n_groups; g++) {
            lr_factor *f = kv ? &L->v[g] : &L->k[g];
            uint32_t r = kv ? rv : rk;
            f->down = lr_ialloc(in, (size_t)r * m * sizeof(float), &in->bytes_params);
            f->up = lr_ialloc(in, (size_t)r * m * sizeof(float), &in->bytes_params);
            f->sigma = lr_ialloc(in, m * sizeof(float), &in->bytes_params);
            f->r = r; /* set even when partly allocated, so free sizes match */
            if (!f->down || !f->up || !f->sigma)
                goto nomem;
        }
    return KVC_OK;
nomem:
    lr_factors_free(in, L);
    return KVC_E_NOMEM;
}

/* ---- ranks -------------------------------------------------------------------- */

kvc_status lr_uniform_ranks(const kvc_instance *in, uint32_t *rk, uint32_t *rv, char *msg,
                            size_t cap)
{
    const lr_config *c = &in->cfg;
    const uint32_t m = in->m;
    if (c->kv_ratio <= 0) {
        *rk = c->rank_k ? c->rank_k : m;
        *rv = c->rank_v ? c->rank_v : m;
        return KVC_OK;
    }
    const double f = (double)kvcp_fp16_bytes_per_token_layer(&in->g);
    const double meta = lr_meta_per_token(in);
    double avail = (c->kv_ratio * f - meta) / (double)in->elem;
    int64_t e_g = avail > 0 ? (int64_t)floor(avail) / in->n_groups : 0;
    double min_ratio = (2.0 * in->n_groups * in->elem + meta) / f;
    if (c->rank_k && c->rank_v) {
        if ((int64_t)c->rank_k + c->rank_v > e_g)
            return kvcp_fail(msg, cap, KVC_E_INVALID,
                             "rank_k %u + rank_v %u do not fit kv_ratio %g (%lld latents per "
                             "token per group fit)",
                             c->rank_k, c->rank_v, c->kv_ratio, (long long)e_g);
        *rk = c->rank_k;
        *rv = c->rank_v;
        return KVC_OK;
    }
    if (e_g < 2 || (c->rank_k && e_g - c->rank_k < 1) || (c->rank_v && e_g - c->rank_v < 1))
        return kvcp_fail(msg, cap, KVC_E_INVALID,
                         "kv_ratio %g leaves %lld %s latents per token per group: rank 1 for K "
                         "and V needs kv_ratio >= %.4f (positions and block tables counted)",
                         c->kv_ratio, (long long)(e_g < 0 ? 0 : e_g),
                         c->dtype == LR_F16 ? "fp16" : "fp32", min_ratio);
    uint32_t k = c->rank_k ? c->rank_k
                 : c->rank_v ? (uint32_t)(e_g - c->rank_v)
                             : (uint32_t)((e_g + 1) / 2);
    if (k > m)
        k = m;
    int64_t left = e_g - k;
    uint32_t v = c->rank_v ? c->rank_v : (uint32_t)(left > m ? m : left);
    /* Keys first took the odd latent; when values hit m, keys get the rest. */
    if (!c->rank_k && v == m && e_g - v > k)
        k = (uint32_t)(e_g - v > m ? m : e_g - v);
    *rk = k;
    *rv = v;
    return KVC_OK;
}

/* LoRC's progressive allocation, as this code reads the paper: the error a
 * layer's truncation makes is amplified by every later layer, bounded by
 * the product of their condition numbers. With kappa_j = s_max/s_min of
 * layer j's W (K or V separately), the cumulative log condition number
 *   c_l = sum_{j=l}^{L-1} log kappa_j
 * is largest for the first layer. Normalised s_l = (c_l - min c) /
 * (max c - min c) in [0, 1], layer l keeps
 *   r_l = clamp(round(m * (a + spread * s_l)), 1, m)
 * with `a` the largest offset (bisection) whose ranks fit the budget
 * `total` = sum of the uniform ranks; leftover ranks go to the shallowest
 * layers first. spread = 0 gives uniform ranks. */
static void progressive(const double *logk, uint32_t L, uint32_t m, double spread,
                        uint64_t total, uint32_t *r, double *s /* [L] scratch */)
{
    double acc = 0, cmin = INFINITY, cmax = -INFINITY;
    for (uint32_t l = L; l-- > 0;) {
        acc += logk[l];
        s[l] = acc;
        cmin = fmin(cmin, acc);
        cmax = fmax(cmax, acc);
    }
    for (uint32_t l = 0; l < L; l++)
        s[l] = cmax > cmin ? (s[l] - cmin) / (cmax - cmin) : 0.0;
    double lo = -1.0 - spread, hi = 1.0;
    for (int it = 0; it < 80; it++) {
        double a = 0.5 * (lo + hi);
        uint64_t sum = 0;
        for (uint32_t l = 0; l < L; l++) {
            double x = round(m * (a + spread * s[l]));
            sum += x < 1 ? 1 : x > m ? m : (uint64_t)x;
        }
        if (sum <= total)
            lo = a;
        else
            hi = a;
    }
    uint64_t sum = 0;
    for (uint32_t l = 0; l < L; l++) {
        double x = round(m * (lo + spread * s[l]));
        r[l] = x < 1 ? 1 : x > m ? m : (uint32_t)x;
        sum += r[l];
    }
    while (sum < total) {
        /* One more to the shallowest (largest s) layer below m. */
        int best = -1;
        for (uint32_t l = 0; l < L; l++)
            if (r[l] < m && (best < 0 || s[l] > s[best]))
                best = (int)l;
        if (best < 0)
            break;
        r[best]++;
        sum++;
        s[best] -= 1e-9; /* spread the leftovers instead of piling on one layer */
    }
}

/* Singular values of a [rows][cols] float matrix (fp64 SVD). */
static int singular_values(const float *w, size_t rows, size_t cols, double *a, double *sv,
                           double *u, double *work, size_t lwork)
{
    for (size_t i = 0; i < rows * cols; i++)
        a[i] = w[i];
    return kvck_svd_left(rows, cols, a, sv, u, work, lwork);
}

/* Allocates progressive ranks for every layer from every layer's weights. */
static kvc_status allocate_progressive(kvc_instance *in)
{
    const kvcp_geom *g = &in->g;
    const uint32_t L = g->n_layers, m = in->m;
    for (uint32_t l = 0; l < L; l++)
        if (!in->layers[l].prep.wk)
            return kvcp_fail(in->msg, sizeof in->msg, KVC_E_STATE,
                             "progressive ranks need every layer's weights before the first "
                             "finalize_layer; layer %u has none", l);
    uint32_t rk, rv;
    kvc_status st = lr_uniform_ranks(in, &rk, &rv, in->msg, sizeof in->msg);
    if (st)
        return st;
    const size_t rows = (size_t)g->n_kv * g->head_dim, cols = g->hidden_size;
    const size_t mn = rows < cols ? rows : cols;
    const size_t lwork = kvck_svd_left_lwork(rows, cols);
    const size_t doubles = rows * cols + mn + rows * rows + lwork + 4 * (size_t)L;
    size_t bytes = doubles * sizeof(double) + 2 * (size_t)L * sizeof(uint32_t);
    double *buf = kvcp_alloc(&in->host, bytes, KVC_USAGE_SCRATCH);
    if (!buf)
        return kvcp_fail(in->msg, sizeof in->msg, KVC_E_NOMEM,
                         "out of memory for progressive rank allocation");
    double *a = buf, *sv = a + rows * cols, *u = sv + mn, *work = u + rows * rows;
    double *logk = work + lwork, *logv = logk + L, *s = logv + L;
    uint32_t *r_k = (uint32_t *)(s + 2 * (size_t)L), *r_v = r_k + L;
    for (uint32_t l = 0; l < L && !st; l++)
        for (int kv = 0; kv < 2; kv++) {
            const float *w = kv ? in->layers[l].prep.wv : in->layers[l].prep.wk;
            if (singular_values(w, rows, cols, a, sv, u, work, lwork)) {
                st = kvcp_fail(in->msg, sizeof in->msg, KVC_E_INTERNAL,
                               "SVD of layer %u's W_%c failed (LAPACK)", l, kv ? 'v' : 'k');
                break;
            }
            double lo = fmax(sv[mn - 1], 1e-12 * sv[0]);
            (kv ? logv : logk)[l] = sv[0] > 0 ? log(sv[0] / lo) : 0.0;
        }
    if (!st) {
        progressive(logk, L, m, in->cfg.spread, (uint64_t)rk * L, r_k, s);
        progressive(logv, L, m, in->cfg.spread, (uint64_t)rv * L, r_v, s);
        for (uint32_t l = 0; l < L; l++) {
            in->layers[l].rk = r_k[l];
            in->layers[l].rv = r_v[l];
            in->layers[l].row_elems = in->n_groups * (r_k[l] + r_v[l]);
        }
        in->ranks_set = 1;
        lr_declare_budget(in);
    }
    kvcp_free(&in->host, buf, bytes);
    return st;
}

/* ---- feeding -------------------------------------------------------------------- */

static kvc_status prep_state(kvc_instance *in, uint32_t layer, const char *what)
{
    if (in->from_artifact)
        return kvcp_fail(in->msg, sizeof in->msg, KVC_E_STATE,
                         "%s: the instance was created from an artifact; nothing to prepare",
                         what);
    if (layer >= in->g.n_layers)
        return kvcp_fail(in->msg, sizeof in->msg, KVC_E_INVALID, "%s: layer %u >= n_layers %u",
                         what, layer, in->g.n_layers);
    if (in->layers[layer].finalized)
        return kvcp_fail(in->msg, sizeof in->msg, KVC_E_STATE, "%s: layer %u is already finalized",
                         what, layer);
    return KVC_OK;
}

static kvc_status feed_weights(kvc_instance *in, uint32_t layer, const kvc_layer_weights *w)
{
    const kvcp_geom *g = &in->g;
    if (w->struct_size < KVCP_V10_SIZE(kvc_layer_weights, b_v))
        return kvcp_fail(in->msg, sizeof in->msg, KVC_E_VERSION,
                         "kvc_layer_weights.struct_size %u is below the ABI 1.0 size",
                         (unsigned)w->struct_size);
    if (!w->w_k || !w->w_v)
        return kvcp_fail(in->msg, sizeof in->msg, KVC_E_INVALID,
                         "prepare_layer(%u): weights without w_k or w_v", layer);
    const size_t rows = (size_t)g->n_kv * g->head_dim, cols = g->hidden_size;
    const size_t off = (size_t)g->kv_first * g->head_dim * cols;
    if (!kvck_all_finite(w->w_k + off, rows * cols) || !kvck_all_finite(w->w_v + off, rows * cols))
        return kvcp_fail(in->msg, sizeof in->msg, KVC_E_INVALID,
                         "prepare_layer(%u): w_k or w_v holds NaN or Inf", layer);
    lr_prep *p = &in->layers[layer].prep;
    const size_t bytes = rows * cols * sizeof(float);
    if (!p->wk && !(p->wk = lr_ialloc(in, bytes, &in->bytes_prep)))
        goto nomem;
    if (!p->wv && !(p->wv = lr_ialloc(in, bytes, &in->bytes_prep)))
        goto nomem;
    memcpy(p->wk, w->w_k + off, bytes);
    memcpy(p->wv, w->w_v + off, bytes);
    return KVC_OK;
nomem:
    return kvcp_fail(in->msg, sizeof in->msg, KVC_E_NOMEM,
                     "prepare_layer(%u): out of memory for the weights", layer);
}

/* Zeroed fp32 buffer *slot of `bytes`, allocated on first use. */
static int ensure(kvc_instance *in, float **slot, size_t bytes)
{
    if (!*slot)
        *slot = lr_ialloc(in, bytes, &in->bytes_prep); /* kvcp_alloc zero-fills */
    return *slot != NULL;
}

static kvc_status feed_calib(kvc_instance *in, uint32_t layer, const kvc_calib_chunk *c)
{
    const kvcp_geom *g = &in->g;
    if (c->struct_size < KVCP_V10_SIZE(kvc_calib_chunk, positions))
        return kvcp_fail(in->msg, sizeof in->msg, KVC_E_VERSION,
                         "kvc_calib_chunk.struct_size %u is below the ABI 1.0 size",
                         (unsigned)c->struct_size);
    if (!c->n_rows || !c->x || !c->positions)
        return kvcp_fail(in->msg, sizeof in->msg, KVC_E_INVALID,
                         "prepare_layer(%u): calibration chunk without rows, x or positions",
                         layer);
    const float *x_ref = NULL;
#if KVC_ABI_VERSION_MINOR >= 1
    if (KVC_HAS_FIELD(c, kvc_calib_chunk, x_ref))
        x_ref = c->x_ref;
#endif
    const size_t n = c->n_rows, d = g->hidden_size;
    if (!kvck_all_finite(c->x, n * d) || (x_ref && !kvck_all_finite(x_ref, n * d)))
        return kvcp_fail(in->msg, sizeof in->msg, KVC_E_INVALID,
                         "prepare_layer(%u): calibration rows hold NaN or Inf", layer);
    /* Calibration windows may be longer than the serving max_positions:
     * positions only place RoPE (key_space=post), which any position has. */
    for (size_t i = 0; i < n; i++)
        if (c->positions[i] < 0)
            return kvcp_fail(in->msg, sizeof in->msg, KVC_E_INVALID,
                             "prepare_layer(%u): calibration position %d is negative", layer,
                             (int)c->positions[i]);
    if (!in->meth->needs_calib)
        return KVC_OK; /* LoRC reads weights only */
    lr_prep *p = &in->layers[layer].prep;
    const float *xe = x_ref ? x_ref : c->x; /* the exact model's rows */
    const int post = in->cfg.key_space == LR_POST_ROPE;
    const size_t m = in->m, mt = (size_t)g->n_kv * g->head_dim;
    if (post && !p->wk)
        return kvcp_fail(in->msg, sizeof in->msg, KVC_E_STATE,
                         "prepare_layer(%u): key_space=post needs the layer's weights before its "
                         "calibration rows", layer);
    if (!ensure(in, &p->gram, dd_bytes(in)) ||
        (post && !ensure(in, &p->kcov, (size_t)in->n_groups * m * m * sizeof(float))) ||
        (x_ref && in->cfg.refit &&
         (!ensure(in, &p->gram_c, dd_bytes(in)) || !ensure(in, &p->cross, dd_bytes(in)))))
        return kvcp_fail(in->msg, sizeof in->msg, KVC_E_NOMEM,
                         "prepare_layer(%u): out of memory for calibration statistics", layer);
    float *keys = NULL;
    size_t kbytes = n * mt * sizeof(float);
    if (post && !(keys = kvcp_alloc(&in->host, kbytes, KVC_USAGE_SCRATCH)))
        return kvcp_fail(in->msg, sizeof in->msg, KVC_E_NOMEM,
                         "prepare_layer(%u): out of memory for %zu calibration keys", layer, n);
    kvck_gram_accum_f32(n, d, xe, p->gram);
    if (x_ref && in->cfg.refit) {
        kvck_gram_accum_f32(n, d, c->x, p->gram_c);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)d, (int)d, (int)n, 1.0f, x_ref,
                    (int)d, c->x, (int)d, 1.0f, p->cross, (int)d);
    }
    if (post) {
        /* keys [n][n_kv*head_dim] = xe W_k^T, rotated at their positions. */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n, (int)mt, (int)d, 1.0f, xe,
                    (int)d, p->wk, (int)d, 0.0f, keys, (int)mt);
        kvck_rope_apply(&g->rope, n, g->n_kv, c->positions, keys, keys);
        for (uint32_t gi = 0; gi < in->n_groups; gi++)
            cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, (int)m, (int)n, 1.0f,
                        keys + (size_t)gi * m, (int)mt, 1.0f, p->kcov + (size_t)gi * m * m,
                        (int)m);
        kvcp_free(&in->host, keys, kbytes);
    }
    p->rows += n;
    if (x_ref)
        p->ref_rows += n;
    return KVC_OK;
}

kvc_status lr_prepare_layer(kvc_instance *in, uint32_t layer, const kvc_layer_weights *w,
                            const kvc_calib_chunk *c)
{
    if (!in)
        return KVC_E_INVALID;
    kvc_status st = prep_state(in, layer, "prepare_layer");
    if (st)
        return st;
    if (!w && !c)
        return kvcp_fail(in->msg, sizeof in->msg, KVC_E_INVALID,
                         "prepare_layer(%u): neither weights nor calibration given", layer);
    if (w && (st = feed_weights(in, layer, w)))
        return st;
    if (c && (st = feed_calib(in, layer, c)))
        return st;
    return KVC_OK;
}

/* ---- factoring ---------------------------------------------------------------------- */

/* Scratch of one finalize_layer, in doubles. */
typedef struct fz {
    double *a;    /* [m][d] the matrix whose left singular vectors we want */
    double *u;    /* [m][m] */
    double *sv;   /* [max(m,d)] */
    double *gm;   /* [d][d] Gram (fp64) */
    double *s;    /* [d][d] Cholesky factor S */
    double *cross; /* [d][d] refit: C */
    double *gc;   /* [d][d] refit: G' */
    double *t;    /* [m][d] */
    double *c1, *c2, *c3, *c4; /* [m][m] each */
    double *work;
    size_t lwork;
} fz;

/* down = U_r^T, up = U_r, sigma = sv (zero past min(m, cols)). */
static void take(const kvc_instance *in, lr_factor *f, const double *u, const double *sv,
                 size_t nsv)
{
    const size_t m = in->m, r = f->r;
    for (size_t i = 0; i < m; i++)
        for (size_t j = 0; j < r; j++) {
            f->up[i * r + j] = (float)u[i * m + j];
            f->down[j * m + i] = (float)u[i * m + j];
        }
    for (size_t i = 0; i < m; i++)
        f->sigma[i] = i < nsv ? (float)sv[i] : 0.0f;
}

/* a [m][d] = W_g (rows of the group) in fp64, times S when whitening. */
static void group_matrix(const kvc_instance *in, const float *w, uint32_t gi, const double *S,
                         fz *z)
{
    const size_t m = in->m, d = in->g.hidden_size;
    const float *wg = w + (size_t)gi * m * d;
    if (!S) {
        for (size_t i = 0; i < m * d; i++)
            z->a[i] = wg[i];
        return;
    }
    for (size_t i = 0; i < m * d; i++)
        z->t[i] = wg[i];
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, (int)d, (int)d, 1.0, z->t,
                (int)d, S, (int)d, 0.0, z->a, (int)d);
}

/* up = (W C W^T U_r)(U_r^T W G' W^T U_r)^-1 for group gi (see the top). */
static int refit(const kvc_instance *in, const float *w, uint32_t gi,
                 const double *u, lr_factor *f, fz *z)
{
    const size_t m = in->m, d = in->g.hidden_size, r = f->r;
    const float *wg = w + (size_t)gi * m * d;
    double *W = z->t + 0, *cross = z->cross, *gc = z->gc, *Wt = z->a;
    for (size_t i = 0; i < m * d; i++)
        W[i] = wg[i];
    /* c1 = W C W^T, c2 = W G' W^T: [m][m] (Wt [m][d] is a product's scratch) */
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, (int)d, (int)d, 1.0, W, (int)d,
                cross, (int)d, 0.0, Wt, (int)d);
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)m, (int)m, (int)d, 1.0, Wt,
                (int)d, W, (int)d, 0.0, z->c1, (int)m);
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, (int)d, (int)d, 1.0, W, (int)d,
                gc, (int)d, 0.0, Wt, (int)d);
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)m, (int)m, (int)d, 1.0, Wt,
                (int)d, W, (int)d, 0.0, z->c2, (int)m);
    /* R [m][r] = c1 U_r; M [r][r] = U_r^T c2 U_r (U_r: first r columns, ld m) */
    double *R = z->c3, *M = z->sv, *T = z->c4;
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, (int)r, (int)m, 1.0, z->c1,
                (int)m, u, (int)m, 0.0, R, (int)r);
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, (int)r, (int)m, 1.0, z->c2,
                (int)m, u, (int)m, 0.0, T, (int)r);
    cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)r, (int)r, (int)m, 1.0, u, (int)m,
                T, (int)r, 0.0, M, (int)r);
    if (kvck_spd_solve_right(r, m, M, R, z->work, z->lwork))
        return -1;
    for (size_t i = 0; i < m * r; i++)
        f->up[i] = (float)R[i];
    return 0;
}

static kvc_status factor_layer(kvc_instance *in, uint32_t layer)
{
    lr_layer *L = &in->layers[layer];
    lr_prep *p = &L->prep;
    const kvcp_geom *g = &in->g;
    const size_t m = in->m, d = g->hidden_size, mx = m > d ? m : d;
    const int whiten = in->meth->factor == LR_WHITEN, post = in->cfg.key_space == LR_POST_ROPE;
    const int do_refit = in->cfg.refit && p->ref_rows > 0;
    if (!p->wk)
        return kvcp_fail(in->msg, sizeof in->msg, KVC_E_STATE,
                         "finalize_layer(%u): no weights were fed for this layer", layer);
    if (in->meth->needs_calib && !p->rows)
        return kvcp_fail(in->msg, sizeof in->msg, KVC_E_STATE,
                         "finalize_layer(%u): no calibration rows were fed for this layer", layer);
    if (in->cfg.refit && !p->ref_rows)
        kvcp_log(&in->host, KVC_LOG_WARN,
                 "%s: layer %u: refit asked, but no calibration came with x_ref (sequential "
                 "calibration); factors are not refitted", in->meth->id, layer);

    size_t lwork = kvck_svd_left_lwork(m, d);
    size_t lw2 = kvck_chol_shifted_lwork(d), lw3 = kvck_sym_eig_lwork(m),
           lw4 = kvck_spd_solve_right_lwork(m);
    lwork = lwork > lw2 ? lwork : lw2;
    lwork = lwork > lw3 ? lwork : lw3;
    lwork = lwork > lw4 ? lwork : lw4;
    const size_t doubles = m * d + m * m + mx * mx + 4 * d * d + m * d + 4 * m * m + lwork;
    const size_t bytes = doubles * sizeof(double);
    double *buf = kvcp_alloc(&in->host, bytes, KVC_USAGE_SCRATCH);
    if (!buf)
        return kvcp_fail(in->msg, sizeof in->msg, KVC_E_NOMEM,
                         "finalize_layer(%u): out of memory for %zu bytes of factor scratch",
                         layer, bytes);
    fz z;
    z.a = buf;
    z.u = z.a + m * d;
    z.sv = z.u + m * m;
    z.gm = z.sv + mx * mx;
    z.s = z.gm + d * d;
    z.cross = z.s + d * d;
    z.gc = z.cross + d * d;
    z.t = z.gc + d * d;
    z.c1 = z.t + m * d;
    z.c2 = z.c1 + m * m;
    z.c3 = z.c2 + m * m;
    z.c4 = z.c3 + m * m;
    z.work = z.c4 + m * m;
    z.lwork = lwork;
    kvc_status st = lr_factors_alloc(in, L, L->rk, L->rv);
    if (st) {
        kvcp_free(&in->host, buf, bytes);
        return kvcp_fail(in->msg, sizeof in->msg, st, "finalize_layer(%u): out of memory for "
                                                      "factors", layer);
    }
    const double *S = NULL;
    if (whiten) {
        kvck_gram_to_f64(d, p->gram, z.gm);
        if (kvck_chol_shifted(d, z.gm, z.s, &L->shift_k, z.work, z.lwork)) {
            st = kvcp_fail(in->msg, sizeof in->msg, KVC_E_INTERNAL,
                           "finalize_layer(%u): Cholesky of the calibration Gram failed even "
                           "with a diagonal shift", layer);
            goto out;
        }
        S = z.s;
    }
    if (do_refit) {
        for (size_t i = 0; i < d * d; i++)
            z.cross[i] = p->cross[i];
        kvck_gram_to_f64(d, p->gram_c, z.gc);
    }
    const size_t nsv = m < d ? m : d;
    for (uint32_t gi = 0; gi < in->n_groups && !st; gi++) {
        for (int kv = 0; kv < 2; kv++) {
            lr_factor *f = kv ? &L->v[gi] : &L->k[gi];
            const float *w = kv ? p->wv : p->wk;
            int rc;
            size_t have = nsv;
            if (!kv && post) {
                kvck_gram_to_f64(m, p->kcov + (size_t)gi * m * m, z.u);
                rc = kvck_sym_eig(m, z.u, z.sv, z.work, z.lwork);
                for (size_t i = 0; i < m; i++)
                    z.sv[i] = sqrt(z.sv[i] > 0 ? z.sv[i] : 0);
                have = m;
            } else {
                group_matrix(in, w, gi, S, &z);
                rc = kvck_svd_left(m, d, z.a, z.sv, z.u, z.work, z.lwork);
            }
            if (rc) {
                st = kvcp_fail(in->msg, sizeof in->msg, KVC_E_INTERNAL,
                               "finalize_layer(%u): %s of group %u's %c factors failed (LAPACK "
                               "info %d)", layer, !kv && post ? "eigendecomposition" : "SVD", gi,
                               kv ? 'V' : 'K', rc);
                break;
            }
            take(in, f, z.u, z.sv, have);
            if (do_refit && refit(in, w, gi, z.u, f, &z)) {
                st = kvcp_fail(in->msg, sizeof in->msg, KVC_E_INTERNAL,
                               "finalize_layer(%u): least-squares refit of group %u's %c "
                               "up-projection failed", layer, gi, kv ? 'V' : 'K');
                break;
            }
        }
    }
out:
    kvcp_free(&in->host, buf, bytes);
    if (st)
        lr_factors_free(in, L);
    return st;
}

kvc_status lr_finalize_layer(kvc_instance *in, uint32_t layer)
{
    if (!in)
        return KVC_E_INVALID;
    kvc_status st = prep_state(in, layer, "finalize_layer");
    if (st)
        return st;
    if (!in->ranks_set && (st = allocate_progressive(in)))
        return st;
    if ((st = factor_layer(in, layer)))
        return st;
    lr_layer *L = &in->layers[layer];
    if (layer == 0 || L->prep.rows > in->calib_rows) {
        in->calib_rows = L->prep.rows;
        in->ref_rows = L->prep.ref_rows;
    }
    lr_prep_free(in, L);
    L->finalized = 1;
    uint32_t done = 0;
    for (uint32_t l = 0; l < in->g.n_layers; l++)
        done += in->layers[l].finalized;
    if (done == in->g.n_layers) {
        in->ready = 1;
        lr_fingerprint(in);
    }
    return KVC_OK;
}

kvc_status lr_finalize(kvc_instance *in)
{
    if (!in)
        return KVC_E_INVALID;
    if (in->ready)
        return KVC_OK;
    for (uint32_t l = 0; l < in->g.n_layers; l++) {
        if (in->layers[l].finalized)
            continue;
        kvc_status st = lr_finalize_layer(in, l);
        if (st)
            return st;
    }
    return KVC_OK;
}
