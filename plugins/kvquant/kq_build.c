/*
 * kvc-kvquant.so: from the calibration statistics and the options to the
 * store (kvquant.h).
 *
 * Key widths (alloc=sensitivity): a key channel's quantization error adds
 * q_c * e_c to a score, so a channel costs about E[q_c^2] * range_c^2 *
 * u(b_c), u(b) = 1 / (12 (2^b - 1)^2) the error of a uniform b-bit grid
 * over a unit range, range_c its typical block range. RoPE turns each pair
 * of channels together, so the query energy is averaged over the pair.
 * Widths from {1, 2, 3, 4, 5, 6, 8} are handed out greedily, the most
 * error removed per bit first, until the head's channels average k_bits.
 * Channels are then stored sorted by width (one segment per width).
 *
 * Levels (levels=fit): per layer, keys and values, and width, the levels
 * that minimize the (query-energy weighted, for keys) squared error of
 * where calibration values fall in their group's range: 1-D k-means on a
 * histogram, ends pinned at 0 and 1 (a group's minimum and maximum stay
 * exact).
 *
 * kv_ratio without k_bits / v_bits: for each value width, the largest
 * average key width that fits, scored by predicted error (keys' relative
 * to 4 uniform bits, plus values' relative to 4 bits: on SmolLM2 the two
 * cost about alike there); the best score wins.
 */
#include <math.h>
#include <string.h>

#include "kvquant.h"

static const unsigned WIDTHS[] = {1, 2, 3, 4, 5, 6, 8};
#define N_WIDTHS (sizeof WIDTHS / sizeof WIDTHS[0])

/* Squared error of a uniform `bits` grid over a unit range. */
static double unit_err(unsigned bits)
{
    const double L = (double)((1u << bits) - 1u);
    return 1.0 / (12.0 * L * L);
}

/* Channel weights of head h of layer l: query energy averaged over the
 * rotary pair, times the mean squared block range. */
static void channel_weights(const kvc_instance *in, uint32_t l, uint32_t h, double *w)
{
    const kvcp_geom *g = &in->g;
    const uint32_t d = g->head_dim, dims = g->rope_dims ? g->rope_dims : d;
    const kq_stats *s = &in->stats[l];
    const float *qe = s->q_energy + (size_t)h * d, *r2 = s->k_range2 + (size_t)h * d;
    for (uint32_t c = 0; c < d; c++) {
        uint32_t mate = c;
        if (g->rope_style == KVC_ROPE_ADJACENT && c < dims)
            mate = c ^ 1u;
        else if (g->rope_style == KVC_ROPE_HALVES && c < dims)
            mate = c < dims / 2 ? c + dims / 2 : c - dims / 2;
        w[c] = 0.5 * ((double)qe[c] + qe[mate]) * r2[c] + 1e-30;
    }
}

/* Greedy widths bits [d] averaging `avg` (alloc=sensitivity); returns the
 * predicted error sum w_c u(b_c). */
static double allocate(const double *w, uint32_t d, double avg, uint8_t *bits)
{
    uint8_t wi[KVCK_MAX_HEAD_DIM]; /* index into WIDTHS */
    long budget = lround(avg * d) - (long)d; /* every channel starts at 1 bit */
    for (uint32_t c = 0; c < d; c++)
        wi[c] = 0;
    for (;;) {
        double best = 0;
        int bc = -1;
        for (uint32_t c = 0; c < d; c++) {
            if (wi[c] + 1u >= N_WIDTHS)
                continue;
            const long cost = (long)WIDTHS[wi[c] + 1] - (long)WIDTHS[wi[c]];
            if (cost > budget)
                continue;
            const double gain =
                w[c] * (unit_err(WIDTHS[wi[c]]) - unit_err(WIDTHS[wi[c] + 1])) / (double)cost;
            if (gain > best) {
                best = gain;
                bc = (int)c;
            }
        }
        if (bc < 0)
            break;
        budget -= (long)WIDTHS[wi[bc] + 1] - (long)WIDTHS[wi[bc]];
        wi[bc]++;
    }
    double err = 0;
    for (uint32_t c = 0; c < d; c++) {
        bits[c] = (uint8_t)WIDTHS[wi[c]];
        err += w[c] * unit_err(bits[c]);
    }
    return err;
}

/* 1 when b is one of the stored widths. */
static int is_width(double b)
{
    for (size_t i = 0; i < N_WIDTHS; i++)
        if (b == WIDTHS[i])
            return 1;
    return 0;
}

/* Levels of layer l, keys (kv 0) or values (kv 1), width w: [256]. */
static float *levels_of(const kvc_instance *in, uint32_t l, int kv, unsigned w)
{
    return in->levels + (((size_t)l * 2 + (size_t)kv) * 9 + w) * 256;
}

/* Weighted 1-D k-means of the histogram's bin centres into 2^bits levels,
 * the first pinned at 0 and the last at 1. */
static void fit_levels(const float *hist, unsigned bits, float *lev)
{
    const unsigned L = (1u << bits) - 1u;
    for (unsigned j = 0; j <= L; j++)
        lev[j] = (float)j / (float)L;
    if (L < 2)
        return;
    double sum[256], mass[256];
    for (int it = 0; it < 60; it++) {
        memset(sum, 0, sizeof sum);
        memset(mass, 0, sizeof mass);
        unsigned j = 0;
        for (unsigned i = 0; i < KQ_HIST; i++) {
            const double t = (i + 0.5) / KQ_HIST;
            while (j < L && t > 0.5 * (lev[j] + lev[j + 1]))
                j++;
            sum[j] += hist[i] * t;
            mass[j] += hist[i];
        }
        for (j = 1; j < L; j++)
            if (mass[j] > 0)
                lev[j] = (float)(sum[j] / mass[j]);
    }
    /* Keep them strictly ascending (an empty cell kept its old level). */
    for (unsigned j = 1; j < L; j++)
        if (!(lev[j] > lev[j - 1]))
            lev[j] = lev[j - 1] + 1e-6f;
    if (lev[L - 1] >= 1.0f)
        for (unsigned j = 1; j < L; j++)
            lev[j] = (float)j / (float)L;
}

/* A key format from widths [d]: channels sorted by width (descending,
 * stable), one segment per width; perm[i] = the channel stored at i. */
static int key_format(const kvc_instance *in, uint32_t l, const uint8_t *bits, uint32_t d,
                      kvck_qfmt *f, uint16_t *perm)
{
    memset(f, 0, sizeof *f);
    uint32_t at = 0;
    f->d = d;
    f->group = d;
    for (int i = (int)N_WIDTHS - 1; i >= 0; i--) {
        const unsigned w = WIDTHS[i];
        const uint32_t first = at;
        for (uint32_t c = 0; c < d; c++)
            if (bits[c] == w)
                perm[at++] = (uint16_t)c;
        if (at == first)
            continue;
        kvck_qseg *s = &f->seg[f->n_seg++];
        s->first = first;
        s->len = at - first;
        s->bits = w;
        s->levels = in->cfg.levels == KQ_LEVELS_FIT ? levels_of(in, l, 0, w) : NULL;
    }
    return kvck_qfmt_finish(f);
}

static int value_format(const kvc_instance *in, uint32_t l, unsigned bits, kvck_qfmt *f)
{
    const uint32_t d = in->g.head_dim;
    if (kvck_qfmt_uniform(f, d, bits, in->cfg.group < d ? in->cfg.group : d))
        return -1;
    if (in->cfg.levels == KQ_LEVELS_FIT) {
        f->seg[0].levels = levels_of(in, l, 1, bits);
        return kvck_qfmt_finish(f);
    }
    return 0;
}

/* Formats of every layer and head for average key width k and value
 * width v into kf, vf [L][H] and perms; *err_k = predicted key error
 * relative to 4 uniform bits. -1 when a format cannot be made. */
static int formats_for(const kvc_instance *in, double k, unsigned v, kvck_qfmt *kf,
                       kvck_qfmt *vf, uint16_t *perm, double *err_k)
{
    const kvcp_geom *g = &in->g;
    const uint32_t d = g->head_dim;
    double e = 0, e4 = 0, w[KVCK_MAX_HEAD_DIM];
    uint8_t bits[KVCK_MAX_HEAD_DIM];
    for (uint32_t l = 0; l < g->n_layers; l++)
        for (uint32_t h = 0; h < g->n_kv; h++) {
            const size_t i = (size_t)l * g->n_kv + h;
            channel_weights(in, l, h, w);
            if (in->cfg.alloc == KQ_ALLOC_SENSITIVITY) {
                e += allocate(w, d, k, bits);
            } else {
                for (uint32_t c = 0; c < d; c++) {
                    bits[c] = (uint8_t)lround(k);
                    e += w[c] * unit_err(bits[c]);
                }
            }
            for (uint32_t c = 0; c < d; c++)
                e4 += w[c] * unit_err(4);
            if (key_format(in, l, bits, d, &kf[i], perm + i * d) ||
                value_format(in, l, v, &vf[i]))
                return -1;
        }
    *err_k = e4 > 0 ? e / e4 : 0;
    return 0;
}

/* The declared ratio of formats kf, vf [L][H]: the largest layer's. */
static double ratio_of(const kvc_instance *in, const kvck_qfmt *kf, const kvck_qfmt *vf)
{
    const kvcp_geom *g = &in->g;
    size_t worst = 0;
    for (uint32_t l = 0; l < g->n_layers; l++) {
        size_t b = kvcp_qs_block_bytes(kf + (size_t)l * g->n_kv, vf + (size_t)l * g->n_kv,
                                       g->n_kv, KVCK_QS_CHANNEL, in->cfg.block,
                                       in->cfg.outliers, in->cfg.outliers);
        worst = b > worst ? b : worst;
    }
    return kvcp_qs_ratio_of(g, worst, in->cfg.block);
}

/* kv_ratio's choice: *k, *v. INVALID when nothing fits. */
static kvc_status choose(kvc_instance *in, kvck_qfmt *kf, kvck_qfmt *vf, uint16_t *perm,
                         double *k_out, unsigned *v_out, char *msg, size_t cap)
{
    static const unsigned VS[] = {8, 6, 5, 4, 3, 2};
    double best = INFINITY, smallest = INFINITY;
    for (size_t vi = 0; vi < sizeof VS / sizeof VS[0]; vi++) {
        const unsigned v = VS[vi];
        /* Largest k in sixteenths that fits (the ratio grows with k). */
        int lo = 16, hi = 128; /* k = 1 .. 8 */
        double ek = 0;
        if (formats_for(in, 1.0, v, kf, vf, perm, &ek))
            return kvcp_fail(msg, cap, KVC_E_INTERNAL, "kvquant: no formats for k 1 / v %u", v);
        double r = ratio_of(in, kf, vf);
        smallest = r < smallest ? r : smallest;
        if (r > in->cfg.kv_ratio)
            continue;
        while (lo < hi) {
            int mid = (lo + hi + 1) / 2;
            if (formats_for(in, mid / 16.0, v, kf, vf, perm, &ek))
                return kvcp_fail(msg, cap, KVC_E_INTERNAL, "kvquant: no formats for k %g",
                                 mid / 16.0);
            if (ratio_of(in, kf, vf) <= in->cfg.kv_ratio)
                lo = mid;
            else
                hi = mid - 1;
        }
        const double k = lo / 16.0;
        formats_for(in, k, v, kf, vf, perm, &ek);
        const double score = ek + unit_err(v) / unit_err(4);
        if (score < best) {
            best = score;
            *k_out = k;
            *v_out = v;
        }
    }
    if (best == INFINITY)
        return kvcp_fail(msg, cap, KVC_E_INVALID,
                         "kv_ratio %g is below what kvquant's smallest setting needs (%.4f of fp16: "
                         "1-bit keys, 2-bit values, scales, positions and block tables counted)",
                         in->cfg.kv_ratio, smallest);
    return KVC_OK;
}

/* Bytes kq_build allocates beside the store. */
static size_t build_bytes(const kvcp_geom *g)
{
    const size_t lh = (size_t)g->n_layers * g->n_kv, d = g->head_dim;
    return 2 * lh * sizeof(kvck_qfmt) + lh * d * sizeof(uint16_t) + lh * d * 4 +
           (size_t)g->n_layers * 2 * 9 * 256 * sizeof(float);
}

void kq_build_free(kvc_instance *in)
{
    const kvcp_geom *g = &in->g;
    const size_t lh = (size_t)g->n_layers * g->n_kv, d = g->head_dim;
    if (in->kfmt)
        in->bytes_params -= build_bytes(g);
    kvcp_qs_free(&in->qs);
    kvcp_free(&in->host, in->kfmt, 2 * lh * sizeof(kvck_qfmt));
    kvcp_free(&in->host, in->kperm, lh * d * sizeof(uint16_t));
    kvcp_free(&in->host, in->kraw_sz, lh * d * 4);
    kvcp_free(&in->host, in->levels, (size_t)g->n_layers * 2 * 9 * 256 * sizeof(float));
    in->kfmt = in->vfmt = NULL;
    in->kperm = in->kraw_sz = NULL;
    in->levels = NULL;
    in->ready = 0;
}

/* Fixed scales of raw keys: each channel's calibration extremes widened
 * by a tenth of the range on both sides (values beyond clamp: they are at
 * most a block's worth of the newest keys, and rare). */
static void raw_scales(const kvc_instance *in, uint16_t *sz)
{
    const kvcp_geom *g = &in->g;
    const size_t hd = (size_t)g->n_kv * g->head_dim;
    for (uint32_t l = 0; l < g->n_layers; l++)
        for (size_t i = 0; i < hd; i++) {
            const kq_stats *s = &in->stats[l];
            float lo = s->k_min[i], hi = s->k_max[i];
            if (!(hi >= lo)) /* never seen */
                lo = hi = 0;
            const float pad = 0.1f * (hi - lo) + 1e-3f;
            uint16_t *p = sz + ((size_t)l * hd + i) * 2;
            p[1] = kvck_f32_to_f16(lo - pad); /* zero */
            p[0] = kvck_f32_to_f16(hi + pad - kvck_f16_to_f32(p[1])); /* scale */
        }
}

kvc_status kq_build(kvc_instance *in, char *msg, size_t cap)
{
    const kvcp_geom *g = &in->g;
    const size_t lh = (size_t)g->n_layers * g->n_kv, d = g->head_dim;
    const kq_config *c = &in->cfg;
    kq_build_free(in);
    in->kfmt = kvcp_alloc(&in->host, 2 * lh * sizeof(kvck_qfmt), KVC_USAGE_INSTANCE);
    in->kperm = kvcp_alloc(&in->host, lh * d * sizeof(uint16_t), KVC_USAGE_INSTANCE);
    in->kraw_sz = kvcp_alloc(&in->host, lh * d * 4, KVC_USAGE_INSTANCE);
    in->levels = kvcp_alloc(&in->host, (size_t)g->n_layers * 2 * 9 * 256 * sizeof(float),
                            KVC_USAGE_INSTANCE);
    if (!in->kfmt || !in->kperm || !in->kraw_sz || !in->levels) {
        kvcp_free(&in->host, in->kfmt, 2 * lh * sizeof(kvck_qfmt));
        in->kfmt = NULL;
        kq_build_free(in);
        return kvcp_fail(msg, cap, KVC_E_NOMEM, "out of memory for kvquant's formats");
    }
    in->bytes_params += build_bytes(g);
    in->vfmt = in->kfmt + lh;
    for (uint32_t l = 0; l < g->n_layers; l++)
        for (unsigned w = 1; w <= 8; w++) {
            fit_levels(in->stats[l].k_hist, w, levels_of(in, l, 0, w));
            fit_levels(in->stats[l].v_hist, w, levels_of(in, l, 1, w));
        }
    double k = c->k_bits;
    unsigned v = c->v_bits;
    double ek = 0;
    kvc_status st = KVC_OK;
    if (c->kv_ratio > 0 && k == 0)
        st = choose(in, in->kfmt, in->vfmt, in->kperm, &k, &v, msg, cap);
    if (!st && c->alloc == KQ_ALLOC_UNIFORM && !is_width(k))
        st = kvcp_fail(msg, cap, KVC_E_INVALID,
                       "alloc=uniform needs a stored width for k_bits (1, 2, 3, 4, 5, 6 or 8), "
                       "got %g",
                       k);
    if (!st && formats_for(in, k, v, in->kfmt, in->vfmt, in->kperm, &ek))
        st = kvcp_fail(msg, cap, KVC_E_INVALID, "kvquant: no row formats for k_bits %g v_bits %u",
                       k, v);
    if (st) {
        kq_build_free(in);
        return st;
    }
    raw_scales(in, in->kraw_sz);
    in->k_bits_built = k;
    in->v_bits_built = v;
    kvcp_qs_opts o;
    memset(&o, 0, sizeof o);
    o.block = c->block;
    o.sink = c->sink;
    o.v_window = c->window; /* keys: the block being filled is their window */
    o.v_raw8 = c->raw8v;
    o.k_mode = KVCK_QS_CHANNEL;
    o.k_pre = 1;
    o.v_hadamard = 1;
    o.k_outliers = o.v_outliers = c->outliers;
    o.seed = KVCP_QS_SEED;
    o.k_fmt = in->kfmt;
    o.v_fmt = in->vfmt;
    o.k_perm = in->kperm;
    o.k_raw_sz = c->raw8 ? in->kraw_sz : NULL;
    o.k_raw_bits = c->raw8;
    if ((st = kvcp_qs_init(&in->qs, &in->host, &in->g, &o, msg, cap))) {
        kq_build_free(in);
        return st;
    }
    in->kv_ratio = kvcp_qs_token_ratio(&in->qs);
    if (c->kv_ratio > 0 && in->kv_ratio > c->kv_ratio * (1 + 1e-12)) {
        double got = in->kv_ratio;
        kq_build_free(in);
        return kvcp_fail(msg, cap, KVC_E_INVALID,
                         "kv_ratio %g is below what k_bits %g / v_bits %u need (%.4f of fp16)",
                         c->kv_ratio, k, v, got);
    }
    in->seq_overhead = sizeof(struct kvc_seq) + kvcp_qss_fixed_bytes(&in->qs) +
                       kvcp_qs_seq_overhead(&in->qs);
    in->ready = 1;
    return KVC_OK;
}

kvc_status kq_ratio_floor(const kvc_host *host, const kvcp_geom *g, const kq_config *c,
                          double *ratio)
{
    /* Keys all at the largest stored width not above k_bits (1 when
     * kv_ratio picks), values at v_bits (2 when kv_ratio picks). Exact for
     * uniform widths and for kv_ratio's own choice (which starts from
     * 1-bit keys); a sensitivity allocation is bounded above below. */
    unsigned kw = 1, vw = c->k_bits > 0 ? c->v_bits : 2;
    for (size_t i = 0; i < N_WIDTHS; i++)
        if (WIDTHS[i] <= c->k_bits)
            kw = WIDTHS[i];
    const size_t bytes = 2 * (size_t)g->n_kv * sizeof(kvck_qfmt);
    kvck_qfmt *f = kvcp_alloc(host, bytes, KVC_USAGE_SCRATCH);
    if (!f)
        return KVC_E_NOMEM;
    kvck_qfmt *vf = f + g->n_kv;
    int bad = 0;
    for (uint32_t h = 0; h < g->n_kv; h++)
        bad |= kvck_qfmt_uniform(&f[h], g->head_dim, kw, g->head_dim) ||
               kvck_qfmt_uniform(&vf[h], g->head_dim, vw,
                                 c->group < g->head_dim ? c->group : g->head_dim);
    if (!bad) {
        size_t q_bytes = kvcp_qs_block_bytes(f, vf, g->n_kv, KVCK_QS_CHANNEL, c->block,
                                             c->outliers, c->outliers);
        if (c->k_bits > 0 && c->alloc == KQ_ALLOC_SENSITIVITY) {
            /* The widths come from calibration, so create cannot know the
             * row; it can bound it. allocate() spends at most
             * lround(k_bits * d) bits on a row, and each bit plane of each
             * of the at most N_WIDTHS segments pads to a byte: 10 planes
             * (widths 3, 5 and 6 have two), under a byte each. A kv_ratio
             * create accepts is then one kq_build meets (KVC-REQ-9:
             * refused at create), at the price of refusing some within
             * that padding of the exact need. */
            const size_t d = g->head_dim, planes = 10;
            const size_t row_max = ((size_t)lround(c->k_bits * (double)d) + 7 * planes) / 8;
            const size_t row_uni = f[0].row_bytes;
            if (row_max > row_uni) /* + up8 after the codes may grow by 7 */
                q_bytes += g->n_kv * ((row_max - row_uni) * c->block + 7);
        }
        *ratio = kvcp_qs_ratio_of(g, q_bytes, c->block);
    }
    kvcp_free(host, f, bytes);
    return bad ? KVC_E_INVALID : KVC_OK;
}
