/*
 * kvc-kvquant.so preparation: statistics from the weights and the
 * calibration rows the host feeds (kvquant.h). Per calibration chunk (the
 * attention inputs X of one window, in position order):
 *   Q = X W_q^T, K = X W_k^T (pre-RoPE), V = X W_v^T for the shard's heads;
 *   query energy    sum of q_c^2 over rows and the KV head's query heads;
 *   key ranges      per channel, the squared range over each block of
 *                   `block` consecutive rows, and the extremes;
 *   key histogram   where each key falls in its channel's block range,
 *                   weighted by the channel's query energy in the chunk;
 *   value histogram where each Hadamard-rotated value falls in its
 *                   group's range.
 * finalize_layer turns sums into means and frees the layer's weights.
 */
#include <math.h>
#include <string.h>

#include <cblas.h>

#include "kvquant.h"

static size_t per_layer_values(const kvcp_geom *g)
{
    return (size_t)g->n_kv * g->head_dim;
}

size_t kq_stats_bytes(const kvcp_geom *g)
{
    return (4 * per_layer_values(g) + 2 * KQ_HIST) * sizeof(float);
}

kvc_status kq_stats_alloc(kvc_instance *in)
{
    const kvcp_geom *g = &in->g;
    in->stats = kvcp_alloc(&in->host, (size_t)g->n_layers * sizeof(kq_stats), KVC_USAGE_INSTANCE);
    in->finalized = kvcp_alloc(&in->host, g->n_layers, KVC_USAGE_INSTANCE);
    if (!in->stats || !in->finalized)
        return KVC_E_NOMEM;
    in->bytes_params += (uint64_t)g->n_layers * (sizeof(kq_stats) + 1);
    const size_t hd = per_layer_values(g);
    for (uint32_t l = 0; l < g->n_layers; l++) {
        float *p = kvcp_alloc(&in->host, kq_stats_bytes(g), KVC_USAGE_INSTANCE);
        if (!p)
            return KVC_E_NOMEM;
        in->bytes_params += kq_stats_bytes(g);
        kq_stats *s = &in->stats[l];
        s->q_energy = p;
        s->k_range2 = p + hd;
        s->k_min = p + 2 * hd;
        s->k_max = p + 3 * hd;
        s->k_hist = p + 4 * hd;
        s->v_hist = p + 4 * hd + KQ_HIST;
        for (size_t i = 0; i < hd; i++) {
            s->k_min[i] = INFINITY;
            s->k_max[i] = -INFINITY;
        }
    }
    return KVC_OK;
}

/* Bytes of one layer's weight copies. */
static size_t weight_bytes(const kvcp_geom *g)
{
    const size_t q = (size_t)g->n_q * g->head_dim, kv = per_layer_values(g);
    return ((q + 2 * kv) * g->hidden_size + q + 2 * kv) * sizeof(float);
}

static void prep_free_layer(kvc_instance *in, uint32_t l)
{
    if (!in->prep || !in->prep[l].wq)
        return;
    kvcp_free(&in->host, in->prep[l].wq, weight_bytes(&in->g));
    in->bytes_prep -= weight_bytes(&in->g);
    memset(&in->prep[l], 0, sizeof in->prep[l]);
}

void kq_prep_free(kvc_instance *in)
{
    const kvcp_geom *g = &in->g;
    if (!in->prep)
        return;
    for (uint32_t l = 0; l < g->n_layers; l++)
        prep_free_layer(in, l);
    kvcp_free(&in->host, in->prep, (size_t)g->n_layers * sizeof(kq_weights));
    in->bytes_prep -= (size_t)g->n_layers * sizeof(kq_weights);
    in->prep = NULL;
    in->prep_counted = 0;
}

void kq_stats_free(kvc_instance *in)
{
    const kvcp_geom *g = &in->g;
    kq_prep_free(in);
    if (in->stats) {
        for (uint32_t l = 0; l < g->n_layers; l++)
            kvcp_free(&in->host, in->stats[l].q_energy, kq_stats_bytes(g));
        kvcp_free(&in->host, in->stats, (size_t)g->n_layers * sizeof(kq_stats));
    }
    kvcp_free(&in->host, in->finalized, g->n_layers);
    in->stats = NULL;
    in->finalized = NULL;
}

static kvc_status prep_state(kvc_instance *in, uint32_t layer, const char *what)
{
    if (in->from_artifact)
        return kvcp_fail(in->msg, sizeof in->msg, KVC_E_STATE,
                         "%s: the instance was created from an artifact; nothing to prepare",
                         what);
    if (layer >= in->g.n_layers)
        return kvcp_fail(in->msg, sizeof in->msg, KVC_E_INVALID, "%s: layer %u >= n_layers %u",
                         what, layer, in->g.n_layers);
    if (in->finalized[layer])
        return kvcp_fail(in->msg, sizeof in->msg, KVC_E_STATE, "%s: layer %u is already finalized",
                         what, layer);
    return KVC_OK;
}

/* Copies the shard's rows [first, first + n) of w [..][cols] (and bias). */
static void take_rows(const float *w, const float *b, size_t first, size_t n, size_t cols,
                      float *dst, float *bdst)
{
    memcpy(dst, w + first * cols, n * cols * sizeof(float));
    if (b)
        memcpy(bdst, b + first, n * sizeof(float));
    else
        memset(bdst, 0, n * sizeof(float));
}

static kvc_status feed_weights(kvc_instance *in, uint32_t layer, const kvc_layer_weights *w)
{
    const kvcp_geom *g = &in->g;
    if (w->struct_size < KVCP_V10_SIZE(kvc_layer_weights, b_v))
        return kvcp_fail(in->msg, sizeof in->msg, KVC_E_VERSION,
                         "kvc_layer_weights.struct_size %u is below the ABI 1.0 size",
                         (unsigned)w->struct_size);
    if (!w->w_q || !w->w_k || !w->w_v)
        return kvcp_fail(in->msg, sizeof in->msg, KVC_E_INVALID,
                         "prepare_layer(%u): weights without w_q, w_k or w_v", layer);
    const size_t d = g->head_dim, cols = g->hidden_size;
    const size_t qrows = (size_t)g->n_q * d, kvrows = per_layer_values(g);
    const size_t q0 = (size_t)g->kv_first * g->group * d, k0 = (size_t)g->kv_first * d;
    if (!kvck_all_finite(w->w_q + q0 * cols, qrows * cols) ||
        !kvck_all_finite(w->w_k + k0 * cols, kvrows * cols) ||
        !kvck_all_finite(w->w_v + k0 * cols, kvrows * cols))
        return kvcp_fail(in->msg, sizeof in->msg, KVC_E_INVALID,
                         "prepare_layer(%u): w_q, w_k or w_v holds NaN or Inf", layer);
    if (!in->prep &&
        !(in->prep = kvcp_alloc(&in->host, (size_t)g->n_layers * sizeof(kq_weights),
                                KVC_USAGE_INSTANCE)))
        goto nomem;
    if (!in->prep_counted) {
        in->bytes_prep += (size_t)g->n_layers * sizeof(kq_weights);
        in->prep_counted = 1;
    }
    kq_weights *p = &in->prep[layer];
    if (!p->wq) {
        if (!(p->wq = kvcp_alloc(&in->host, weight_bytes(g), KVC_USAGE_INSTANCE)))
            goto nomem;
        in->bytes_prep += weight_bytes(g);
        p->wk = p->wq + qrows * cols;
        p->wv = p->wk + kvrows * cols;
        p->bq = p->wv + kvrows * cols;
        p->bk = p->bq + qrows;
        p->bv = p->bk + kvrows;
    }
    take_rows(w->w_q, w->b_q, q0, qrows, cols, p->wq, p->bq);
    take_rows(w->w_k, w->b_k, k0, kvrows, cols, p->wk, p->bk);
    take_rows(w->w_v, w->b_v, k0, kvrows, cols, p->wv, p->bv);
    return KVC_OK;
nomem:
    return kvcp_fail(in->msg, sizeof in->msg, KVC_E_NOMEM,
                     "prepare_layer(%u): out of memory for the weights", layer);
}

/* y [n][m] = x [n][cols] W^T + b, W [m][cols]. */
static void project(const float *x, size_t n, size_t cols, const float *w, const float *b,
                    size_t m, float *y)
{
    for (size_t r = 0; r < n; r++)
        memcpy(y + r * m, b, m * sizeof(float));
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n, (int)m, (int)cols, 1.0f, x,
                (int)cols, w, (int)cols, 1.0f, y, (int)m);
}

/* Adds t in [0, 1] with weight w to a histogram. */
static void hist_add(float *hist, float t, float w)
{
    int b = (int)(t * KQ_HIST);
    b = b < 0 ? 0 : b >= (int)KQ_HIST ? (int)KQ_HIST - 1 : b;
    hist[b] += w;
}

/* Statistics of one chunk: q [n][n_q * d], k, v [n][n_kv * d]. */
static void accumulate(kvc_instance *in, kq_stats *s, size_t n, const float *q, const float *k,
                       float *v, float *chan_w)
{
    const kvcp_geom *g = &in->g;
    const size_t d = g->head_dim, H = g->n_kv, G = g->group, hd = H * d, qd = (size_t)g->n_q * d;
    const uint32_t B = in->cfg.block;
    /* Query energy per key channel, this chunk's too (the key histogram's
     * weights). */
    memset(chan_w, 0, hd * sizeof(float));
    for (size_t r = 0; r < n; r++)
        for (size_t h = 0; h < H; h++)
            for (size_t j = 0; j < G; j++) {
                const float *qr = q + r * qd + (h * G + j) * d;
                for (size_t c = 0; c < d; c++)
                    chan_w[h * d + c] += qr[c] * qr[c];
            }
    for (size_t i = 0; i < hd; i++) {
        s->q_energy[i] += chan_w[i];
        chan_w[i] /= (float)(n * G);
    }
    /* Keys: extremes, block ranges, histogram. */
    for (size_t r = 0; r < n; r++)
        for (size_t i = 0; i < hd; i++) {
            const float x = k[r * hd + i];
            s->k_min[i] = x < s->k_min[i] ? x : s->k_min[i];
            s->k_max[i] = x > s->k_max[i] ? x : s->k_max[i];
        }
    for (size_t b0 = 0; b0 + B <= n; b0 += B) {
        for (size_t i = 0; i < hd; i++) {
            float lo = INFINITY, hi = -INFINITY;
            for (size_t r = b0; r < b0 + B; r++) {
                const float x = k[r * hd + i];
                lo = x < lo ? x : lo;
                hi = x > hi ? x : hi;
            }
            s->k_range2[i] += (hi - lo) * (hi - lo);
            if (hi > lo)
                for (size_t r = b0; r < b0 + B; r++)
                    hist_add(s->k_hist, (k[r * hd + i] - lo) / (hi - lo), chan_w[i]);
        }
        s->blocks++;
    }
    /* Values, rotated as the store rotates them, in groups. */
    const uint32_t grp = in->cfg.group < d ? in->cfg.group : (uint32_t)d;
    float signs[KVCK_MAX_HEAD_DIM];
    kvcp_qs_hadamard_signs(KVCP_QS_SEED, 1, signs, (uint32_t)d);
    for (size_t r = 0; r < n; r++)
        for (size_t h = 0; h < H; h++) {
            float *vr = v + r * hd + h * d;
            kvck_hadamard(vr, d, signs);
            for (size_t c0 = 0; c0 < d; c0 += grp) {
                const size_t c1 = c0 + grp < d ? c0 + grp : d;
                float lo = INFINITY, hi = -INFINITY;
                for (size_t c = c0; c < c1; c++) {
                    lo = vr[c] < lo ? vr[c] : lo;
                    hi = vr[c] > hi ? vr[c] : hi;
                }
                if (hi > lo)
                    for (size_t c = c0; c < c1; c++)
                        hist_add(s->v_hist, (vr[c] - lo) / (hi - lo), 1.0f);
            }
        }
    s->rows += n;
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
    const size_t n = c->n_rows, cols = g->hidden_size;
    if (!kvck_all_finite(c->x, n * cols))
        return kvcp_fail(in->msg, sizeof in->msg, KVC_E_INVALID,
                         "prepare_layer(%u): calibration rows hold NaN or Inf", layer);
    if (!in->prep || !in->prep[layer].wq)
        return kvcp_fail(in->msg, sizeof in->msg, KVC_E_STATE,
                         "prepare_layer(%u): kvquant needs the layer's weights before its "
                         "calibration rows (it projects them to queries, keys and values)",
                         layer);
    const kq_weights *w = &in->prep[layer];
    const size_t d = g->head_dim, qd = (size_t)g->n_q * d, hd = per_layer_values(g);
    const size_t bytes = (n * (qd + 2 * hd) + hd) * sizeof(float);
    float *q = kvcp_alloc(&in->host, bytes, KVC_USAGE_SCRATCH);
    if (!q)
        return kvcp_fail(in->msg, sizeof in->msg, KVC_E_NOMEM,
                         "prepare_layer(%u): out of memory for %zu calibration rows' projections",
                         layer, n);
    float *k = q + n * qd, *v = k + n * hd, *chan_w = v + n * hd;
    project(c->x, n, cols, w->wq, w->bq, qd, q);
    project(c->x, n, cols, w->wk, w->bk, hd, k);
    project(c->x, n, cols, w->wv, w->bv, hd, v);
    accumulate(in, &in->stats[layer], n, q, k, v, chan_w);
    kvcp_free(&in->host, q, bytes);
    return KVC_OK;
}

kvc_status kq_prepare_layer(kvc_instance *in, uint32_t layer, const kvc_layer_weights *w,
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

/* Sum to 1 (an empty histogram stays empty). */
static void normalize(float *hist)
{
    double s = 0;
    for (uint32_t i = 0; i < KQ_HIST; i++)
        s += hist[i];
    if (s > 0)
        for (uint32_t i = 0; i < KQ_HIST; i++)
            hist[i] = (float)(hist[i] / s);
}

kvc_status kq_finalize_layer(kvc_instance *in, uint32_t layer)
{
    if (!in)
        return KVC_E_INVALID;
    kvc_status st = prep_state(in, layer, "finalize_layer");
    if (st)
        return st;
    kq_stats *s = &in->stats[layer];
    if (s->rows == 0 || s->blocks == 0)
        return kvcp_fail(in->msg, sizeof in->msg, KVC_E_STATE,
                         "finalize_layer(%u): no calibration %s yet (kvquant needs weights and at "
                         "least %u rows of one window)",
                         layer, s->rows ? "block" : "rows", in->cfg.block);
    const kvcp_geom *g = &in->g;
    const size_t hd = per_layer_values(g);
    for (size_t i = 0; i < hd; i++) {
        s->q_energy[i] /= (float)(s->rows * g->group);
        s->k_range2[i] /= (float)s->blocks;
    }
    normalize(s->k_hist);
    normalize(s->v_hist);
    prep_free_layer(in, layer);
    in->finalized[layer] = 1;
    return KVC_OK;
}
