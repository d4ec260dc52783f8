/* The quantized store's configuration (qstore.h): formats, the Q block
 * layout, Hadamard signs, the RoPE table, and the budget arithmetic. */
#include <math.h>
#include <string.h>
#include <zlib.h>

#include "qstore.h"

/* Round up to 8 bytes: every region of a Q block starts aligned. */
static size_t up8(size_t n)
{
    return (n + 7u) & ~(size_t)7u;
}

/* Outlier slots of one block: round(frac * values), values = block x d. */
static uint32_t out_cap(double frac, uint32_t block, uint32_t d)
{
    double c = floor(frac * (double)block * d + 0.5);
    return c > 65535 ? 65535u : (uint32_t)c;
}

/* Lays out head h of a Q block at byte `at`: two u32 outlier counts, then
 * K codes, K scales, K outliers, V codes, V scales, V outliers. Returns the
 * byte after. */
static size_t head_layout(const kvck_qfmt *kf, const kvck_qfmt *vf, int k_mode, uint32_t B,
                          uint32_t k_cap, uint32_t v_cap, size_t at, kvcp_qs_head *hd)
{
    at += 8; /* u32 k_nout, u32 v_nout */
    hd->k_codes = at;
    at = up8(at + (size_t)B * kf->row_bytes);
    hd->k_sz = at;
    at = up8(at + kvck_q_scale_bytes(kf, k_mode, B));
    hd->k_out = at;
    at = up8(at + (size_t)k_cap * sizeof(kvck_qout));
    hd->v_codes = at;
    at = up8(at + (size_t)B * vf->row_bytes);
    hd->v_sz = at;
    at = up8(at + kvck_q_scale_bytes(vf, KVCK_QS_TOKEN, B));
    hd->v_out = at;
    at = up8(at + (size_t)v_cap * sizeof(kvck_qout));
    return at;
}

void kvcp_qs_free(kvcp_qs *q)
{
    if (!q || !q->host)
        return;
    const kvc_host *h = q->host;
    const kvcp_geom *g = q->g;
    kvcp_free(h, q->fmts, (size_t)q->n_fmts * sizeof(kvck_qfmt));
    kvcp_free(h, q->lf, (size_t)g->n_layers * sizeof(kvcp_qs_lfmt));
    kvcp_free(h, q->heads, (size_t)g->n_layers * g->n_kv * sizeof(kvcp_qs_head));
    kvcp_free(h, q->k_signs, (size_t)g->head_dim * sizeof(float));
    kvcp_free(h, q->v_signs, (size_t)g->head_dim * sizeof(float));
    kvcp_free(h, q->rope_table, q->rope_table_bytes);
    kvcp_free(h, q->perms, q->perms_bytes);
    kvcp_free(h, q->raw_sz, (size_t)g->n_layers * g->n_kv * g->head_dim * 4);
    memset(q, 0, sizeof *q);
}

static kvc_status check_fmt(const kvck_qfmt *f, const kvcp_geom *g, const char *what, char *msg,
                            size_t cap)
{
    if (f->d != g->head_dim)
        return kvcp_fail(msg, cap, KVC_E_INVALID, "%s format covers %u channels, head_dim is %u",
                         what, f->d, g->head_dim);
    if (f->row_bytes == 0 && f->n_seg == 0)
        return kvcp_fail(msg, cap, KVC_E_INVALID, "%s format is empty", what);
    return KVC_OK;
}

kvc_status kvcp_qs_init(kvcp_qs *q, const kvc_host *host, const kvcp_geom *g,
                        const kvcp_qs_opts *o, char *msg, size_t cap)
{
    memset(q, 0, sizeof *q);
    if (o->block == 0 || o->block > 256)
        return kvcp_fail(msg, cap, KVC_E_INVALID,
                         "quantized storage needs 1..256 tokens per block, got %u", o->block);
    if (o->k_pre && o->k_hadamard)
        return kvcp_fail(msg, cap, KVC_E_INVALID,
                         "keys kept before RoPE cannot also be Hadamard-rotated (RoPE is applied "
                         "after dequantization, in the unrotated basis)");
    if ((o->k_perm && (!o->k_pre || o->k_hadamard)) || (o->v_perm && o->v_hadamard))
        return kvcp_fail(msg, cap, KVC_E_INVALID,
                         "a channel permutation needs keys kept before RoPE and no Hadamard "
                         "rotation of the same rows");
    if (o->k_raw_sz && !o->k_pre)
        return kvcp_fail(msg, cap, KVC_E_INVALID,
                         "8-bit raw keys on fixed channel scales need keys kept before RoPE");
    if (o->k_mode != KVCK_QS_CHANNEL && o->k_mode != KVCK_QS_TOKEN)
        return kvcp_fail(msg, cap, KVC_E_INVALID, "unknown key scaling mode %d", o->k_mode);
    if (!(o->k_outliers >= 0 && o->k_outliers <= 0.25 && o->v_outliers >= 0 &&
          o->v_outliers <= 0.25))
        return kvcp_fail(msg, cap, KVC_E_INVALID, "outlier fractions must be in [0, 0.25]");
    const uint32_t L = g->n_layers, H = g->n_kv, d = g->head_dim;
    const int per_head = o->k_fmt != NULL;
    if (per_head != (o->v_fmt != NULL) || (!per_head && (!o->k_fmt_all || !o->v_fmt_all)))
        return kvcp_fail(msg, cap, KVC_E_INTERNAL, "quantized store: formats missing");

    q->host = host;
    q->g = g;
    q->o = *o;
    q->o.k_fmt = q->o.v_fmt = q->o.k_fmt_all = q->o.v_fmt_all = NULL;
    q->o.k_perm = q->o.v_perm = q->o.k_raw_sz = NULL;
    /* Formats per layer and head ([n_layers][n_kv] K then V), or one K and
     * one V per head shared by every layer ([n_kv] K then V). */
    const uint32_t per = per_head ? L * H : H;
    q->n_fmts = 2 * per;
    q->fmts = kvcp_alloc(host, (size_t)q->n_fmts * sizeof(kvck_qfmt), KVC_USAGE_INSTANCE);
    q->lf = kvcp_alloc(host, (size_t)L * sizeof(kvcp_qs_lfmt), KVC_USAGE_INSTANCE);
    q->heads = kvcp_alloc(host, (size_t)L * H * sizeof(kvcp_qs_head), KVC_USAGE_INSTANCE);
    if (!q->fmts || !q->lf || !q->heads)
        goto nomem;
    for (uint32_t i = 0; i < per; i++) {
        q->fmts[i] = per_head ? o->k_fmt[i] : *o->k_fmt_all;
        q->fmts[per + i] = per_head ? o->v_fmt[i] : *o->v_fmt_all;
    }
    for (uint32_t i = 0; i < q->n_fmts; i++) {
        kvc_status st = check_fmt(&q->fmts[i], g, i < per ? "key" : "value", msg, cap);
        if (st) {
            kvcp_qs_free(q);
            return st;
        }
    }
    const uint32_t B = o->block;
    const uint32_t k_cap = out_cap(o->k_outliers, B, d), v_cap = out_cap(o->v_outliers, B, d);
    for (uint32_t l = 0; l < L; l++) {
        kvcp_qs_lfmt *lf = &q->lf[l];
        lf->k = q->fmts + (per_head ? (size_t)l * H : 0);
        lf->v = q->fmts + per + (per_head ? (size_t)l * H : 0);
        lf->k_out_cap = k_cap;
        lf->v_out_cap = v_cap;
        lf->k_perm = lf->v_perm = NULL;
        lf->k_raw_sz = NULL;
        lf->head = q->heads + (size_t)l * H;
        size_t at = 0;
        for (uint32_t h = 0; h < H; h++)
            at = head_layout(&lf->k[h], &lf->v[h], o->k_mode, B, k_cap, v_cap, at, &lf->head[h]);
        lf->q_bytes = at;
    }
    const size_t lhd = (size_t)L * H * d;
    if (o->k_perm || o->v_perm) {
        q->perms_bytes = 2 * lhd * sizeof(uint16_t);
        if (!(q->perms = kvcp_alloc(host, q->perms_bytes, KVC_USAGE_INSTANCE)))
            goto nomem;
        for (int kv = 0; kv < 2; kv++) {
            const uint16_t *src = kv ? o->v_perm : o->k_perm;
            if (!src)
                continue;
            uint16_t *dst = q->perms + (size_t)kv * lhd;
            memcpy(dst, src, lhd * sizeof(uint16_t));
            for (size_t r = 0; r < (size_t)L * H; r++) { /* a permutation of 0..d-1? */
                uint8_t seen[KVCK_MAX_HEAD_DIM] = {0};
                for (uint32_t i = 0; i < d; i++) {
                    uint16_t c = dst[r * d + i];
                    if (c >= d || seen[c]) {
                        kvcp_qs_free(q);
                        return kvcp_fail(msg, cap, KVC_E_INVALID,
                                         "%s channel order of layer %zu head %zu is not a "
                                         "permutation of 0..%u",
                                         kv ? "value" : "key", r / H, r % H, d - 1);
                    }
                    seen[c] = 1;
                }
            }
            for (uint32_t l = 0; l < L; l++)
                *(kv ? &q->lf[l].v_perm : &q->lf[l].k_perm) = dst + (size_t)l * H * d;
        }
    }
    if (o->k_raw_sz) {
        if (!(q->raw_sz = kvcp_alloc(host, lhd * 4, KVC_USAGE_INSTANCE)))
            goto nomem;
        memcpy(q->raw_sz, o->k_raw_sz, lhd * 4);
        for (uint32_t l = 0; l < L; l++)
            q->lf[l].k_raw_sz = q->raw_sz + (size_t)l * H * d * 2;
        const unsigned rb = o->k_raw_bits ? o->k_raw_bits : 8;
        if (rb < 4 || kvck_qfmt_uniform(&q->raw8, d, rb, d)) {
            kvcp_qs_free(q);
            return kvcp_fail(msg, cap, KVC_E_INVALID, "no 8-bit row format for head_dim %u", d);
        }
    }
    if (o->k_hadamard || o->v_hadamard) {
        if (o->k_hadamard) {
            if (!(q->k_signs = kvcp_alloc(host, d * sizeof(float), KVC_USAGE_INSTANCE)))
                goto nomem;
            kvcp_qs_hadamard_signs(o->seed, 0, q->k_signs, d);
        }
        if (o->v_hadamard) {
            if (!(q->v_signs = kvcp_alloc(host, d * sizeof(float), KVC_USAGE_INSTANCE)))
                goto nomem;
            kvcp_qs_hadamard_signs(o->seed, 1, q->v_signs, d);
        }
    }
    if (o->k_pre && g->rope_style != KVC_ROPE_NONE) {
        q->rope_table_bytes = kvck_rope_table_floats(&g->rope, g->max_positions) * sizeof(float);
        if (!(q->rope_table = kvcp_alloc(host, q->rope_table_bytes, KVC_USAGE_INSTANCE)))
            goto nomem;
        kvck_rope_table_fill(&g->rope, g->max_positions, q->rope_table);
    }
    q->row = (size_t)H * d;
    q->rawk_row = q->raw_sz ? q->raw8.row_bytes : d * sizeof(uint16_t);
    q->rawk_bytes = (size_t)H * B * q->rawk_row;
    q->rawv_row = o->v_raw8 ? d : d * sizeof(uint16_t);
    q->rawv_bytes = (size_t)H * B * q->rawv_row + (o->v_raw8 ? (size_t)H * B * 4 : 0);
    if (o->v_raw8 && kvck_qfmt_uniform(&q->vraw8, d, 8, d)) {
        kvcp_qs_free(q);
        return kvcp_fail(msg, cap, KVC_E_INVALID, "no 8-bit row format for head_dim %u", d);
    }
    q->param_bytes = (uint64_t)q->n_fmts * sizeof(kvck_qfmt) + (uint64_t)L * sizeof(kvcp_qs_lfmt) +
                     (uint64_t)L * H * sizeof(kvcp_qs_head) +
                     (q->k_signs ? d * sizeof(float) : 0) + (q->v_signs ? d * sizeof(float) : 0) +
                     q->rope_table_bytes + q->perms_bytes + (q->raw_sz ? lhd * 4 : 0);
    return KVC_OK;

nomem:
    kvcp_qs_free(q);
    return kvcp_fail(msg, cap, KVC_E_NOMEM, "out of memory for the quantized store's parameters");
}

void kvcp_qs_hadamard_signs(uint64_t seed, int kv, float *signs, uint32_t d)
{
    kvck_hadamard_signs(signs, d, seed ^ (kv ? UINT64_C(0x56565656) : UINT64_C(0x4b4b4b4b)));
}

size_t kvcp_qs_block_bytes(const kvck_qfmt *kf, const kvck_qfmt *vf, uint32_t n_kv, int k_mode,
                           uint32_t block, double k_outliers, double v_outliers)
{
    const uint32_t d = kf[0].d;
    const uint32_t k_cap = out_cap(k_outliers, block, d), v_cap = out_cap(v_outliers, block, d);
    size_t at = 0;
    kvcp_qs_head hd;
    for (uint32_t h = 0; h < n_kv; h++)
        at = head_layout(&kf[h], &vf[h], k_mode, block, k_cap, v_cap, at, &hd);
    return at;
}

double kvcp_qs_ratio_of(const kvcp_geom *g, size_t q_bytes, uint32_t block)
{
    double meta = sizeof(int32_t) + 2.0 * sizeof(kvcp_qs_block) / block;
    return ((double)q_bytes / block + meta) / (double)kvcp_fp16_bytes_per_token_layer(g);
}

double kvcp_qs_token_ratio(const kvcp_qs *q)
{
    const kvcp_geom *g = q->g;
    size_t worst = 0;
    for (uint32_t l = 0; l < g->n_layers; l++)
        worst = q->lf[l].q_bytes > worst ? q->lf[l].q_bytes : worst;
    return kvcp_qs_ratio_of(g, worst, q->o.block);
}

uint64_t kvcp_qs_seq_overhead(const kvcp_qs *q)
{
    const kvcp_geom *g = q->g;
    const uint32_t B = q->o.block;
    /* Raw rows at rest: the window, plus for per-channel keys the block
     * being filled, in whole raw blocks; two more for the partly used
     * blocks at either end of a batch whose pending rows are not counted. */
    uint64_t k_tokens = (uint64_t)q->o.k_window + (q->o.k_mode == KVCK_QS_CHANNEL ? B - 1 : 0);
    uint64_t k_blocks = (k_tokens + B - 1) / B + 2, v_blocks = (q->o.v_window + B - 1) / B + 2;
    uint64_t q_max = 0;
    for (uint32_t l = 0; l < g->n_layers; l++)
        q_max = q->lf[l].q_bytes > q_max ? q->lf[l].q_bytes : q_max;
    uint64_t sink = (uint64_t)q->o.sink * (2 * q->row * sizeof(uint16_t) + sizeof(int32_t));
    uint64_t pos_blocks = k_blocks > v_blocks ? k_blocks : v_blocks;
    uint64_t per_layer = k_blocks * q->rawk_bytes + v_blocks * q->rawv_bytes +
                         pos_blocks * (uint64_t)B * sizeof(int32_t) /* their positions */ +
                         q_max /* a partly used Q block */ + (uint64_t)B * sizeof(int32_t) +
                         sink + (KVCP_TABLE_INIT + 2) * sizeof(kvcp_qs_block);
    return per_layer * g->n_layers;
}

static uint32_t main_of(const kvcp_qs *q, uint32_t n)
{
    return n - (n < q->o.sink ? n : q->o.sink);
}

uint32_t kvcp_qs_vq_count(const kvcp_qs *q, uint32_t n)
{
    uint32_t m = main_of(q, n);
    return m > q->o.v_window ? m - q->o.v_window : 0;
}

uint32_t kvcp_qs_kq_count(const kvcp_qs *q, uint32_t n)
{
    uint32_t m = main_of(q, n);
    uint32_t old = m > q->o.k_window ? m - q->o.k_window : 0;
    return q->o.k_mode == KVCK_QS_CHANNEL ? old / q->o.block * q->o.block : old;
}

/* crc32 over a value's bytes, little-endian independent of the host. */
static uLong crc_u32(uLong crc, uint32_t v)
{
    unsigned char b[4] = {(unsigned char)v, (unsigned char)(v >> 8), (unsigned char)(v >> 16),
                          (unsigned char)(v >> 24)};
    return crc32(crc, b, 4);
}

uint32_t kvcp_qs_fingerprint(const kvcp_qs *q)
{
    uLong c = crc32(0L, Z_NULL, 0);
    const kvcp_qs_opts *o = &q->o;
    const uint32_t words[] = {o->block, o->sink, o->k_window, o->v_window, (uint32_t)o->v_raw8,
                              o->k_raw_bits,
                              (uint32_t)o->k_mode, (uint32_t)o->k_pre,
                              (uint32_t)o->k_hadamard, (uint32_t)o->v_hadamard,
                              (uint32_t)llround(o->k_outliers * 1e6),
                              (uint32_t)llround(o->v_outliers * 1e6), (uint32_t)o->seed,
                              q->n_fmts};
    for (size_t i = 0; i < sizeof words / sizeof words[0]; i++)
        c = crc_u32(c, words[i]);
    for (uint32_t i = 0; i < q->n_fmts; i++) {
        const kvck_qfmt *f = &q->fmts[i];
        c = crc_u32(c, f->n_seg);
        c = crc_u32(c, f->group);
        for (uint32_t s = 0; s < f->n_seg; s++) {
            c = crc_u32(c, f->seg[s].first);
            c = crc_u32(c, f->seg[s].len);
            c = crc_u32(c, f->seg[s].bits);
            if (f->seg[s].levels)
                for (uint32_t k = 0; k < (1u << f->seg[s].bits); k++) {
                    uint32_t bits;
                    memcpy(&bits, &f->seg[s].levels[k], 4);
                    c = crc_u32(c, bits);
                }
        }
    }
    if (q->perms)
        c = crc32(c, (const Bytef *)q->perms, (uInt)q->perms_bytes);
    if (q->raw_sz)
        c = crc32(c, (const Bytef *)q->raw_sz,
                  (uInt)((size_t)q->g->n_layers * q->g->n_kv * q->g->head_dim * 4));
    return (uint32_t)c;
}
