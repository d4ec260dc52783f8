/*
 * kvc-full.so attention: queries are rotated once, then for each KV head and
 * chunk of queries the streaming kernel walks the layer's blocks. Blocks
 * past the last query position are never touched; fp16 blocks are read by
 * the kernels as fp16 (kvck_attn_block_src).
 */
#include <string.h>

#include "full.h"
#include "kvck_quant.h"

/* Queries per pass over the blocks: bounds scratch for long prefills. */
#define FULL_Q_CHUNK 64u

/* Scratch layout of one attend call, in floats (int32 positions share the
 * float size). */
typedef struct attend_scratch {
    float *q_rot; /* [n_q][n_q_heads][head_dim] rotated, scaled */
    float *q_buf; /* [chunk * group][head_dim] one KV head's query rows */
    float *o_buf; /* [chunk * group][head_dim] their outputs */
    int32_t *k_pos; /* [block_tokens] positions of a contiguous block */
    float *attn;  /* kvck_attn scratch */
} attend_scratch;

static size_t scratch_floats(const kvc_instance *in, uint32_t max_q)
{
    const kvcp_geom *g = &in->g;
    size_t rows = (size_t)FULL_Q_CHUNK * g->group;
    size_t d = g->head_dim, B = in->block_tokens;
    return (size_t)max_q * g->n_q * d + 2 * rows * d + B +
           kvck_attn_scratch_floats(rows, d, B);
}

static void scratch_carve(const kvc_instance *in, uint32_t max_q, float *base, attend_scratch *sc)
{
    const kvcp_geom *g = &in->g;
    size_t rows = (size_t)FULL_Q_CHUNK * g->group;
    size_t d = g->head_dim, B = in->block_tokens;
    sc->q_rot = base;
    sc->q_buf = sc->q_rot + (size_t)max_q * g->n_q * d;
    sc->o_buf = sc->q_buf + rows * d;
    sc->k_pos = (int32_t *)(sc->o_buf + rows * d);
    sc->attn = (float *)(sc->k_pos + B);
}

/* Checks one attend request; the message goes to the sequence. */
static kvc_status check_attend(kvc_seq *s, uint32_t layer, uint32_t n_q,
                               const int32_t *positions, const void *q_pre, const void *out)
{
    return kvcp_check_attend(&s->inst->g, layer, n_q, positions, q_pre, out, s->msg,
                             sizeof s->msg);
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

/* The attention itself; cannot fail once scratch exists. */
static void attend_core(const kvc_seq *s, uint32_t layer, uint32_t n_q, const int32_t *positions,
                        const float *q_pre, float *out, const attend_scratch *sc)
{
    const kvc_instance *in = s->inst;
    const kvcp_geom *g = &in->g;
    const kvcp_pages *L = &s->layers[layer];
    const size_t d = g->head_dim, G = g->group, B = in->block_tokens;

    kvck_rope_apply(&g->rope, n_q, g->n_q, positions, q_pre, sc->q_rot);
    size_t nq_all = (size_t)n_q * g->n_q * d;
    for (size_t i = 0; i < nq_all; i++)
        sc->q_rot[i] *= g->scale;

    for (uint32_t q0 = 0; q0 < n_q; q0 += FULL_Q_CHUNK) {
        uint32_t nc = n_q - q0 < FULL_Q_CHUNK ? n_q - q0 : FULL_Q_CHUNK;
        int32_t qmin = positions[q0], qmax = positions[q0];
        for (uint32_t i = 1; i < nc; i++) {
            int32_t p = positions[q0 + i];
            qmin = p < qmin ? p : qmin;
            qmax = p > qmax ? p : qmax;
        }
        size_t rows = (size_t)nc * G;
        for (uint32_t h = 0; h < g->n_kv; h++) {
            /* Gather this KV head's query rows: row (i, j) = query i, head h*G+j. */
            for (uint32_t i = 0; i < nc; i++)
                memcpy(sc->q_buf + (size_t)i * G * d,
                       sc->q_rot + ((size_t)(q0 + i) * g->n_q + (size_t)h * G) * d,
                       G * d * sizeof(float));
            kvck_attn a;
            kvck_attn_init(&a, rows, G, d, d, B, g->window, positions + q0, sc->attn);
            for (uint32_t b = 0; b < L->n_blocks; b++) {
                const kvcp_block *fb = &L->blocks[b];
                uint32_t nb = kvcp_block_count(L, b, (uint32_t)B);
                int32_t first = kvcp_block_pos(fb, 0), last = kvcp_block_pos(fb, nb - 1);
                if (first > qmax)
                    break; /* positions only grow from here */
                if (g->window && (int64_t)qmin - last >= (int64_t)g->window)
                    continue; /* the whole block is out of every query's window */
                const int32_t *kp = fb->pos;
                if (!kp) {
                    for (uint32_t i = 0; i < nb; i++)
                        sc->k_pos[i] = fb->pos0 + (int32_t)i;
                    kp = sc->k_pos;
                }
                if (in->dtype == FULL_F32) {
                    kvck_attn_block(&a, sc->q_buf, d, full_block_k(in, fb, h), d,
                                    full_block_v(in, fb, h), d, kp, nb);
                } else {
                    /* fp16 read as it is stored: no widening pass. */
                    kvck_src ks = {.kind = KVCK_SRC_F16, .data = full_block_k(in, fb, h), .ld = d};
                    kvck_src vs = {.kind = KVCK_SRC_F16, .data = full_block_v(in, fb, h), .ld = d};
                    kvck_attn_block_src(&a, sc->q_buf, d, &ks, &vs, kp, nb, NULL);
                }
            }
            kvck_attn_finish(&a, sc->o_buf, d);
            for (uint32_t i = 0; i < nc; i++)
                memcpy(out + ((size_t)(q0 + i) * g->n_q + (size_t)h * G) * d,
                       sc->o_buf + (size_t)i * G * d, G * d * sizeof(float));
        }
    }
}

kvc_status full_attend(kvc_seq *s, uint32_t layer, uint32_t n_q, const int32_t *positions,
                       const void *q_pre, void *out)
{
    if (!s)
        return KVC_E_INVALID;
    kvc_status st = check_attend(s, layer, n_q, positions, q_pre, out);
    if (st)
        return st;
    const kvc_instance *in = s->inst;
    if (in->quant)
        return kvcp_qss_attend(&in->qs, &s->q, layer, n_q, positions, q_pre, out, s->msg);
    size_t bytes = scratch_floats(in, n_q) * sizeof(float);
    float *base = kvcp_alloc(&in->host, bytes, KVC_USAGE_SCRATCH);
    if (!base)
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_NOMEM,
                         "attend: out of memory for scratch (%zu bytes)", bytes);
    attend_scratch sc;
    scratch_carve(in, n_q, base, &sc);
    attend_core(s, layer, n_q, positions, q_pre, out, &sc);
    kvcp_free(&in->host, base, bytes);
    return KVC_OK;
}

kvc_status full_attend_batch(kvc_instance *in, uint32_t layer, uint32_t n_items,
                             const kvc_attend_item *const *items)
{
    uint32_t max_q = 0;
    kvc_status st = kvcp_batch_check(in, layer, n_items, items, &batch_ops, &max_q);
    if (st)
        return st;
    if (!n_items)
        return KVC_OK;
    if (in->quant) {
        /* Each item in order, as the contract says attend_batch equals. */
        for (uint32_t i = 0; i < n_items; i++) {
            const kvc_attend_item *it = items[i];
            kvc_seq *s = it->seq;
            if ((st = kvcp_qss_attend(&in->qs, &s->q, layer, it->n_q, it->positions, it->q_pre,
                                      it->out, s->msg)))
                return st;
        }
        return KVC_OK;
    }
    size_t bytes = scratch_floats(in, max_q) * sizeof(float);
    float *base = kvcp_alloc(&in->host, bytes, KVC_USAGE_SCRATCH);
    if (!base) {
        kvc_seq *s = items[0]->seq;
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_NOMEM,
                         "attend_batch: out of memory for scratch (%zu bytes)", bytes);
    }
    attend_scratch sc;
    scratch_carve(in, max_q, base, &sc);
    for (uint32_t i = 0; i < n_items; i++) {
        const kvc_attend_item *it = items[i];
        attend_core(it->seq, layer, it->n_q, it->positions, it->q_pre, it->out, &sc);
    }
    kvcp_free(&in->host, base, bytes);
    return KVC_OK;
}

kvc_status full_materialize(kvc_seq *s, uint32_t layer, kvc_materialized *out)
{
    if (!s)
        return KVC_E_INVALID;
    const kvc_instance *in = s->inst;
    const kvcp_geom *g = &in->g;
    kvc_status st = kvcp_check_materialize(g, layer, out, s->msg, sizeof s->msg);
    if (st)
        return st;
    if (in->quant)
        return kvcp_qss_materialize(&in->qs, &s->q, layer, out, s->msg);
    const kvcp_pages *L = &s->layers[layer];
    if (out->positions && out->capacity < L->n)
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_BUFFER,
                         "materialize: capacity %u is below the %u tokens held", out->capacity,
                         L->n);
    for (uint32_t h = 0; h < g->n_kv; h++)
        out->n_tokens[h] = L->n;
    if (!out->positions)
        return KVC_OK;
    const size_t d = g->head_dim, cap = out->capacity;
    for (uint32_t t = 0; t < L->n; t++) {
        const kvcp_block *fb = &L->blocks[t / in->block_tokens];
        uint32_t i = t % in->block_tokens;
        for (uint32_t h = 0; h < g->n_kv; h++) {
            out->positions[h * cap + t] = kvcp_block_pos(fb, i);
            if (out->k)
                full_read_row(in, full_block_k(in, fb, h), i, out->k + (h * cap + t) * d);
            if (out->v)
                full_read_row(in, full_block_v(in, fb, h), i, out->v + (h * cap + t) * d);
        }
    }
    return KVC_OK;
}
