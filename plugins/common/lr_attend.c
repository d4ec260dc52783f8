/*
 * Attention on the latent cache. Per group and block of cached tokens:
 *   pre-RoPE keys   K^ = Hk . up_k^T      one GEMM, once for all the
 *                                         group's KV heads and their query
 *                                         heads; then RoPE at the tokens'
 *                                         positions;
 *   post-RoPE keys  q~ = q_rot . up_k     once per query (before the
 *                                         blocks); scores q~ . h directly,
 *                                         no reconstruction at all;
 *   values          the streaming softmax accumulates p . Hv (r_v wide);
 *                   out = acc . up_v^T once per query at the end.
 */
#include <string.h>

#include <cblas.h>

#include "lowrank.h"

/* Queries per pass over the blocks. */
#define LR_Q_CHUNK 64u

typedef struct lr_scratch {
    float *q_rot;  /* [max_q][n_q][head_dim] rotated, scaled */
    float *q_rows; /* [gh][chunk*G][head_dim] one group's query rows per KV head */
    float *qt;     /* [gh][chunk*G][rk] latent queries (post-RoPE keys) */
    float *attn;   /* [gh] x kvck_attn scratch */
    float *blk;    /* [B][row_elems] widened fp16 rows */
    float *khat;   /* [B][m] reconstructed keys */
    float *olat;   /* [chunk*G][rv] latent outputs */
    float *otmp;   /* [chunk*G][head_dim] */
    int32_t *kpos; /* [B] */
    size_t attn_each;
} lr_scratch;

static size_t scratch_floats(const kvc_instance *in, uint32_t layer, uint32_t max_q)
{
    const kvcp_geom *g = &in->g;
    const lr_layer *L = &in->layers[layer];
    size_t rows = (size_t)LR_Q_CHUNK * g->group, d = g->head_dim, B = in->cfg.block_tokens;
    size_t gh = in->cfg.group_heads;
    return (size_t)max_q * g->n_q * d + gh * rows * d + gh * rows * L->rk +
           gh * kvck_attn_scratch_floats(rows, L->rv, B) + B * L->row_elems + B * in->m +
           rows * L->rv + rows * d + B;
}

static void scratch_carve(const kvc_instance *in, uint32_t layer, uint32_t max_q, float *p,
                          lr_scratch *sc)
{
    const kvcp_geom *g = &in->g;
    const lr_layer *L = &in->layers[layer];
    size_t rows = (size_t)LR_Q_CHUNK * g->group, d = g->head_dim, B = in->cfg.block_tokens;
    size_t gh = in->cfg.group_heads;
    sc->attn_each = kvck_attn_scratch_floats(rows, L->rv, B);
    sc->q_rot = p;
    sc->q_rows = sc->q_rot + (size_t)max_q * g->n_q * d;
    sc->qt = sc->q_rows + gh * rows * d;
    sc->attn = sc->qt + gh * rows * L->rk;
    sc->blk = sc->attn + gh * sc->attn_each;
    sc->khat = sc->blk + B * L->row_elems;
    sc->olat = sc->khat + B * in->m;
    sc->otmp = sc->olat + rows * L->rv;
    sc->kpos = (int32_t *)(sc->otmp + rows * d);
}

static kvc_status check_attend(kvc_seq *s, uint32_t layer, uint32_t n_q,
                               const int32_t *positions, const void *q_pre, const void *out)
{
    kvc_status st = kvcp_check_attend(&s->inst->g, layer, n_q, positions, q_pre, out, s->msg,
                                      sizeof s->msg);
    if (!st && !s->inst->layers[layer].finalized)
        st = kvcp_fail(s->msg, sizeof s->msg, KVC_E_STATE,
                       "attend: layer %u has no factors yet (prepare and finalize it first)",
                       layer);
    return st;
}

static const kvc_instance *seq_inst(const kvc_seq *s)
{
    return s->inst;
}

static char *seq_msg(kvc_seq *s)
{
    return s->msg;
}

static const kvcp_batch_ops batch_ops = {seq_inst, seq_msg, check_attend};

/* Rows of block b as fp32 [nb][row_elems] (stored rows, or widened), and
 * their positions. */
static const float *block_rows(const kvc_instance *in, uint32_t layer, const kvcp_block *fb,
                               uint32_t nb, float *buf, int32_t *kpos, const int32_t **kp)
{
    const size_t e = in->layers[layer].row_elems;
    if (fb->pos) {
        *kp = fb->pos;
    } else {
        for (uint32_t i = 0; i < nb; i++)
            kpos[i] = fb->pos0 + (int32_t)i;
        *kp = kpos;
    }
    if (in->cfg.dtype == LR_F32)
        return fb->data;
    kvck_f16_to_f32_n(fb->data, buf, (size_t)nb * e);
    return buf;
}

static void attend_core(const kvc_seq *s, uint32_t layer, uint32_t n_q, const int32_t *positions,
                        const float *q_pre, float *out, const lr_scratch *sc)
{
    const kvc_instance *in = s->inst;
    const kvcp_geom *g = &in->g;
    const lr_layer *Lf = &in->layers[layer];
    const kvcp_pages *L = &s->layers[layer];
    const size_t d = g->head_dim, G = g->group, B = in->cfg.block_tokens, gh = in->cfg.group_heads;
    const size_t m = in->m, e = Lf->row_elems, rk = Lf->rk, rv = Lf->rv;
    const int post = in->cfg.key_space == LR_POST_ROPE;

    kvck_rope_apply(&g->rope, n_q, g->n_q, positions, q_pre, sc->q_rot);
    const size_t nq_all = (size_t)n_q * g->n_q * d;
    for (size_t i = 0; i < nq_all; i++)
        sc->q_rot[i] *= g->scale;

    for (uint32_t q0 = 0; q0 < n_q; q0 += LR_Q_CHUNK) {
        const uint32_t nc = n_q - q0 < LR_Q_CHUNK ? n_q - q0 : LR_Q_CHUNK;
        int32_t qmin = positions[q0], qmax = positions[q0];
        for (uint32_t i = 1; i < nc; i++) {
            int32_t p = positions[q0 + i];
            qmin = p < qmin ? p : qmin;
            qmax = p > qmax ? p : qmax;
        }
        const size_t rows = (size_t)nc * G;
        for (uint32_t gi = 0; gi < in->n_groups; gi++) {
            const lr_factor *fk = &Lf->k[gi], *fv = &Lf->v[gi];
            kvck_attn a[LR_MAX_GROUP];
            for (size_t kh = 0; kh < gh; kh++) {
                const size_t head = (size_t)gi * gh + kh; /* KV head within the shard */
                float *qr = sc->q_rows + kh * rows * d;
                for (uint32_t i = 0; i < nc; i++)
                    memcpy(qr + (size_t)i * G * d,
                           sc->q_rot + ((size_t)(q0 + i) * g->n_q + head * G) * d,
                           G * d * sizeof(float));
                if (post)
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)rows, (int)rk,
                                (int)d, 1.0f, qr, (int)d, fk->up + kh * d * rk, (int)rk, 0.0f,
                                sc->qt + kh * rows * rk, (int)rk);
                kvck_attn_init(&a[kh], rows, G, post ? rk : d, rv, B, g->window, positions + q0,
                               sc->attn + kh * sc->attn_each);
            }
            for (uint32_t b = 0; b < L->n_blocks; b++) {
                const kvcp_block *fb = &L->blocks[b];
                const uint32_t nb = kvcp_block_count(L, b, (uint32_t)B);
                if (kvcp_block_pos(fb, 0) > qmax)
                    break;
                if (g->window && (int64_t)qmin - kvcp_block_pos(fb, nb - 1) >= (int64_t)g->window)
                    continue;
                const int32_t *kp;
                const float *r = block_rows(in, layer, fb, nb, sc->blk, sc->kpos, &kp);
                const float *hk = r + lr_off_k(Lf, gi), *hv = r + lr_off_v(Lf, gi);
                if (post) {
                    for (size_t kh = 0; kh < gh; kh++)
                        kvck_attn_block(&a[kh], sc->qt + kh * rows * rk, rk, hk, e, hv, e, kp, nb);
                    continue;
                }
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)nb, (int)m, (int)rk,
                            1.0f, hk, (int)e, fk->up, (int)rk, 0.0f, sc->khat, (int)m);
                kvck_rope_apply(&g->rope, nb, gh, kp, sc->khat, sc->khat);
                for (size_t kh = 0; kh < gh; kh++)
                    kvck_attn_block(&a[kh], sc->q_rows + kh * rows * d, d, sc->khat + kh * d, m,
                                    hv, e, kp, nb);
            }
            for (size_t kh = 0; kh < gh; kh++) {
                const size_t head = (size_t)gi * gh + kh;
                kvck_attn_finish(&a[kh], sc->olat, rv);
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)rows, (int)d, (int)rv,
                            1.0f, sc->olat, (int)rv, fv->up + kh * d * rv, (int)rv, 0.0f,
                            sc->otmp, (int)d);
                for (uint32_t i = 0; i < nc; i++)
                    memcpy(out + ((size_t)(q0 + i) * g->n_q + head * G) * d,
                           sc->otmp + (size_t)i * G * d, G * d * sizeof(float));
            }
        }
    }
}

kvc_status lr_attend(kvc_seq *s, uint32_t layer, uint32_t n_q, const int32_t *positions,
                     const void *q_pre, void *out)
{
    if (!s)
        return KVC_E_INVALID;
    kvc_status st = check_attend(s, layer, n_q, positions, q_pre, out);
    if (st)
        return st;
    const kvc_instance *in = s->inst;
    size_t bytes = scratch_floats(in, layer, n_q) * sizeof(float);
    float *base = kvcp_alloc(&in->host, bytes, KVC_USAGE_SCRATCH);
    if (!base)
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_NOMEM,
                         "attend: out of memory for scratch (%zu bytes)", bytes);
    lr_scratch sc;
    scratch_carve(in, layer, n_q, base, &sc);
    attend_core(s, layer, n_q, positions, q_pre, out, &sc);
    kvcp_free(&in->host, base, bytes);
    return KVC_OK;
}

kvc_status lr_attend_batch(kvc_instance *in, uint32_t layer, uint32_t n_items,
                           const kvc_attend_item *const *items)
{
    uint32_t max_q = 0;
    kvc_status st = kvcp_batch_check(in, layer, n_items, items, &batch_ops, &max_q);
    if (st)
        return st;
    if (!n_items)
        return KVC_OK;
    size_t bytes = scratch_floats(in, layer, max_q) * sizeof(float);
    float *base = kvcp_alloc(&in->host, bytes, KVC_USAGE_SCRATCH);
    if (!base) {
        kvc_seq *s = items[0]->seq;
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_NOMEM,
                         "attend_batch: out of memory for scratch (%zu bytes)", bytes);
    }
    lr_scratch sc;
    scratch_carve(in, layer, max_q, base, &sc);
    for (uint32_t i = 0; i < n_items; i++) {
        const kvc_attend_item *it = items[i];
        attend_core(it->seq, layer, it->n_q, it->positions, it->q_pre, it->out, &sc);
    }
    kvcp_free(&in->host, base, bytes);
    return KVC_OK;
}

kvc_status lr_materialize(kvc_seq *s, uint32_t layer, kvc_materialized *out)
{
    if (!s)
        return KVC_E_INVALID;
    const kvc_instance *in = s->inst;
    const kvcp_geom *g = &in->g;
    kvc_status st = kvcp_check_materialize(g, layer, out, s->msg, sizeof s->msg);
    if (st)
        return st;
    const kvcp_pages *L = &s->layers[layer];
    if (out->positions && out->capacity < L->n)
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_BUFFER,
                         "materialize: capacity %u is below the %u tokens held", out->capacity,
                         L->n);
    if (out->positions && L->n && !in->layers[layer].finalized)
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_STATE, "materialize: layer %u not ready",
                         layer);
    for (uint32_t h = 0; h < g->n_kv; h++)
        out->n_tokens[h] = L->n;
    if (!out->positions || !L->n)
        return KVC_OK;
    const lr_layer *Lf = &in->layers[layer];
    const size_t d = g->head_dim, cap = out->capacity, m = in->m, B = in->cfg.block_tokens;
    const size_t e = Lf->row_elems, gh = in->cfg.group_heads;
    /* [B][row_elems] widened rows, [B][m] keys, [B][m] values, [B] positions */
    size_t bytes = (B * e + 2 * B * m + B) * sizeof(float);
    float *buf = kvcp_alloc(&in->host, bytes, KVC_USAGE_SCRATCH);
    if (!buf)
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_NOMEM,
                         "materialize: out of memory for scratch (%zu bytes)", bytes);
    float *kh_buf = buf + B * e, *vh_buf = kh_buf + B * m;
    int32_t *kpos = (int32_t *)(vh_buf + B * m);
    for (uint32_t b = 0; b < L->n_blocks; b++) {
        const kvcp_block *fb = &L->blocks[b];
        const uint32_t nb = kvcp_block_count(L, b, (uint32_t)B);
        const int32_t *kp;
        const float *r = block_rows(in, layer, fb, nb, buf, kpos, &kp);
        for (uint32_t gi = 0; gi < in->n_groups; gi++) {
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)nb, (int)m, (int)Lf->rk,
                        1.0f, r + lr_off_k(Lf, gi), (int)e, Lf->k[gi].up, (int)Lf->rk, 0.0f,
                        kh_buf, (int)m);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)nb, (int)m, (int)Lf->rv,
                        1.0f, r + lr_off_v(Lf, gi), (int)e, Lf->v[gi].up, (int)Lf->rv, 0.0f,
                        vh_buf, (int)m);
            if (in->cfg.key_space == LR_PRE_ROPE)
                kvck_rope_apply(&g->rope, nb, gh, kp, kh_buf, kh_buf);
            for (uint32_t i = 0; i < nb; i++) {
                size_t t = (size_t)b * B + i;
                for (size_t kh = 0; kh < gh; kh++) {
                    size_t h = (size_t)gi * gh + kh;
                    out->positions[h * cap + t] = kp[i];
                    if (out->k)
                        memcpy(out->k + (h * cap + t) * d, kh_buf + (size_t)i * m + kh * d,
                               d * sizeof(float));
                    if (out->v)
                        memcpy(out->v + (h * cap + t) * d, vh_buf + (size_t)i * m + kh * d,
                               d * sizeof(float));
                }
            }
        }
    }
    kvcp_free(&in->host, buf, bytes);
    return KVC_OK;
}
