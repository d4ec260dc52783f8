/*
 * attn_internal.h -- the streaming pass's pieces that other sources of keys
 * and values (attn_src.c: fp16, quantized) share with kvck_attn_block, so
 * every source runs the same masking and online softmax. Internal to kvck.
 */
#ifndef KVCK_ATTN_INTERNAL_H
#define KVCK_ATTN_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "kvck.h"

/* Rows up to which a block goes through the few-row kernels (or GEMV)
 * instead of SGEMM: the measured crossover on a Zen 3 core is ~20 rows at
 * head_dim 64 (SGEMM's packing pays off only over many rows). */
#define KVCK_FEW_ROWS 16

/* The rows of a pass that may see a key of one block. */
typedef struct kvcki_span {
    size_t r0, nr;      /* rows [r0, r0 + nr) */
    int32_t kmin, kmax; /* the block's key positions */
} kvcki_span;

/* Fills sp for the block's keys k_pos [n] (n >= 1); returns 0 when no row
 * may see any of them (then nothing else is needed for the block). */
int kvcki_attn_span(const kvck_attn *a, const int32_t *k_pos, size_t n, kvcki_span *sp);

/* With the span's scores in a->s (rows r0.., n columns): masks what each
 * row may not see, updates the running max and sum (rescaling acc when the
 * max grows) and turns the scores into p = exp(s - max). A row that sees
 * none of the keys gets p = 0 and seen[r - r0] = 0 (seen [nr], or NULL). */
void kvcki_attn_softmax(kvck_attn *a, const int32_t *k_pos, size_t n, const kvcki_span *sp,
                        unsigned char *seen);

#endif
