/* qs_internal.h -- the quantized store's block accessors and row moves,
 * shared by its files (qs_store.c, qs_attend.c, qs_io.c). Not for
 * plugins. */
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
    /* The two counts sit just before the key codes. */
    p->k_nout = (uint32_t *)(qb + hd->k_codes - 8);
    p->v_nout = p->k_nout + 1;
    p->k_codes = qb + hd->k_codes;
    p->k_sz = (uint16_t *)(qb + hd->k_sz);
    p->k_out = (kvck_qout *)(qb + hd->k_out);
    p->v_codes = qb + hd->v_codes;
    p->v_sz = (uint16_t *)(qb + hd->v_sz);
    p->v_out = (kvck_qout *)(qb + hd->v_out);
}

/* Raw rows of head h in a block: keys [block][rawk_row] bytes, values
 * [block][rawv_row] bytes (fp16, or 8-bit codes whose per-row scale and
 * zero qs_rawv_sz gives). */
static inline uint8_t *qs_rawk(const kvcp_qs *q, const kvcp_qs_block *b, uint32_t h)
{
    return b->rawk + (size_t)h * q->o.block * q->rawk_row;
}
static inline uint8_t *qs_rawv(const kvcp_qs *q, const kvcp_qs_block *b, uint32_t h)
{
    return b->rawv + (size_t)h * q->o.block * q->rawv_row;
}
/* 8-bit raw values' (scale, zero) of head h: [block][2] fp16. */
static inline uint16_t *qs_rawv_sz(const kvcp_qs *q, const kvcp_qs_block *b, uint32_t h)
{
    return (uint16_t *)(b->rawv + (size_t)q->g->n_kv * q->o.block * q->rawv_row) +
           (size_t)h * q->o.block * 2;
}
/* The fixed per-channel scales of raw keys of head h, or NULL (fp16). */
static inline const uint16_t *qs_raw_sz(const kvcp_qs *q, uint32_t layer, uint32_t h)
{
    const uint16_t *sz = q->lf[layer].k_raw_sz;
    return sz ? sz + (size_t)h * q->g->head_dim * 2 : NULL;
}

/* Sink token i's K or V row set [n_kv][d]. */
static inline uint16_t *qs_sink_k(const kvcp_qs *q, const kvcp_qs_layer *L, uint32_t i)
{
    return L->sink_kv + (size_t)i * q->row;
}
static inline uint16_t *qs_sink_v(const kvcp_qs *q, const kvcp_qs_layer *L, uint32_t i)
{
    return L->sink_kv + ((size_t)q->o.sink + i) * q->row;
}
static inline size_t qs_sink_bytes(const kvcp_qs *q)
{
    return (size_t)q->o.sink * (2 * q->row * sizeof(uint16_t) + sizeof(int32_t));
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

/* Scratch (floats) quantizing or dequantizing one block needs. */
size_t qs_quant_scratch_floats(const kvcp_qs *q);

/* Raw key rows [j0, j0 + n) of block b, head h, as floats [n][d] in their
 * stored form (pre- or post-RoPE, natural channel order). */
void qs_rawk_rows(const kvcp_qs *q, uint32_t layer, const kvcp_qs_block *b, uint32_t h,
                  uint32_t j0, uint32_t n, float *x);

/* Raw value rows [j0, j0 + n) of block b, head h, as floats [n][d] (in
 * the stored basis: Hadamard-rotated when values are); and the reverse. */
void qs_rawv_rows(const kvcp_qs *q, const kvcp_qs_block *b, uint32_t h, uint32_t j0, uint32_t n,
                  float *x);
void qs_rawv_put(const kvcp_qs *q, kvcp_qs_block *b, uint32_t h, uint32_t j0, uint32_t n,
                 const float *x, size_t ldx);

/* Quantizes the keys of main tokens [from, to) (whole blocks when scaled
 * per channel) / the values of [from, to) from their raw rows; the Q
 * blocks exist. */
void qs_quantize_keys(const kvcp_qs *q, kvcp_qs_layer *L, uint32_t layer, uint32_t from,
                      uint32_t to, float *scratch);
void qs_quantize_values(const kvcp_qs *q, kvcp_qs_layer *L, uint32_t layer, uint32_t from,
                        uint32_t to, float *scratch);

/* Dequantizes the keys (rows of block b that are quantized, all of them
 * when scaled per channel) / values of block b, head h, into [rows][d],
 * outliers patched, natural channel order, stored basis (pre-RoPE or
 * Hadamard-rotated). */
void qs_dequant_keys(const kvcp_qs *q, const kvcp_qs_layer *L, uint32_t layer, uint32_t b,
                     uint32_t h, float *k);
void qs_dequant_values(const kvcp_qs *q, const kvcp_qs_layer *L, uint32_t layer, uint32_t b,
                       uint32_t h, float *v);

#endif
