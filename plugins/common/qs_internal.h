/* qs_internal.h -- the quantized store's block accessors, shared by its
 * files (qs_store.c, qs_attend.c, qs_io.c). Not for plugins. */
#ifndef KVCP_QS_INTERNAL_H
#define KVCP_QS_INTERNAL_H

#include "qstore.h"

/* Head h's parts of a Q block. */
typedef struct qs_qhead {
    uint32_t *k_nout, *v_nout;
    uint8_t *k_codes;  /* [block][k row_bytes] */
    uint16_t *k_sz;    /* channel: [d][2]; token: [block][groups][2] */
    kvck_qout *k_out;  /* [k_out_cap], by row */
    uint8_t *v_codes;  /* [block][v row_bytes] */
    uint16_t *v_sz;    /* [block][groups][2] */
    kvck_qout *v_out;  /* [v_out_cap], by row */
} qs_qhead;

static inline void qs_qhead_at(const kvcp_qs *q, uint32_t layer, uint8_t *qb, uint32_t h,
                               qs_qhead *p)
{
    const kvcp_qs_head *hd = &q->lf[layer].head[h];
    uint8_t *base = qb;
    /* The two counts sit just before the key codes. */
    p->k_nout = (uint32_t *)(base + hd->k_codes - 8);
    p->v_nout = p->k_nout + 1;
    p->k_codes = base + hd->k_codes;
    p->k_sz = (uint16_t *)(base + hd->k_sz);
    p->k_out = (kvck_qout *)(base + hd->k_out);
    p->v_codes = base + hd->v_codes;
    p->v_sz = (uint16_t *)(base + hd->v_sz);
    p->v_out = (kvck_qout *)(base + hd->v_out);
}

/* Raw rows of head h in a raw block: keys then values, [block][d] each. */
static inline uint16_t *qs_raw_k(const kvcp_qs *q, const uint16_t *raw, uint32_t h)
{
    return (uint16_t *)raw + (size_t)h * q->o.block * q->g->head_dim;
}
static inline uint16_t *qs_raw_v(const kvcp_qs *q, const uint16_t *raw, uint32_t h)
{
    return (uint16_t *)raw + ((size_t)q->g->n_kv + h) * q->o.block * q->g->head_dim;
}

/* Sink token i's K or V row set [n_kv][d]. */
static inline uint16_t *qs_sink_k(const kvcp_qs *q, const kvcp_qs_layer *L, uint32_t i)
{
    return L->sink_kv + (size_t)i * q->raw_row;
}
static inline uint16_t *qs_sink_v(const kvcp_qs *q, const kvcp_qs_layer *L, uint32_t i)
{
    return L->sink_kv + ((size_t)q->o.sink + i) * q->raw_row;
}
static inline size_t qs_sink_bytes(const kvcp_qs *q)
{
    return (size_t)q->o.sink * (2 * q->raw_row * sizeof(uint16_t) + sizeof(int32_t));
}

/* Position of main token m. */
static inline int32_t qs_main_pos(const kvcp_qs *q, const kvcp_qs_layer *L, uint32_t m)
{
    const kvcp_qs_block *b = &L->blocks[m / q->o.block];
    uint32_t i = m % q->o.block;
    return b->pos ? b->pos[i] : b->pos0 + (int32_t)i;
}

/* Main tokens held. */
static inline uint32_t qs_main(const kvcp_qs_layer *L)
{
    return L->n - L->n_sink;
}

/* Tokens of main block b held by L. */
static inline uint32_t qs_block_count(const kvcp_qs *q, const kvcp_qs_layer *L, uint32_t b)
{
    uint32_t m = qs_main(L), B = q->o.block;
    uint32_t end = (b + 1) * B < m ? (b + 1) * B : m;
    return end > b * B ? end - b * B : 0;
}

/* Scratch (floats) the quantization of one block needs. */
size_t qs_quant_scratch_floats(const kvcp_qs *q);
/* Quantizes main tokens [from, to) of layer `layer` from their raw rows
 * (Q and raw blocks exist). scratch: qs_quant_scratch_floats. */
void qs_quantize_range(const kvcp_qs *q, kvcp_qs_layer *L, uint32_t layer, uint32_t from,
                       uint32_t to, float *scratch);
/* Writes the dequantized rows of main tokens [from, to) into their raw
 * blocks (which exist): the inverse move, for truncate and for a channel
 * block quantized again. scratch: qs_quant_scratch_floats. */
void qs_dequantize_to_raw(const kvcp_qs *q, kvcp_qs_layer *L, uint32_t layer, uint32_t from,
                          uint32_t to, float *scratch);
/* Dequantizes main block b's head h into k [cnt][d], v [cnt][d] (either
 * may be NULL), outliers patched: keys in their stored form (pre-RoPE or
 * rotated post-RoPE), values in theirs (rotated when v_hadamard). */
void qs_dequant_block(const kvcp_qs *q, const kvcp_qs_layer *L, uint32_t layer, uint32_t b,
                      uint32_t h, float *k, float *v);

#endif
