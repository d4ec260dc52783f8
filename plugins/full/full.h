/*
 * full.h -- internals of kvc-full.so, the exact (uncompressed) control.
 *
 * Storage is paged: each layer of a sequence is a table of fixed-size
 * blocks of `block_tokens` tokens, so memory grows in steps of one block
 * (no reallocation, no 2x capacity slack), truncate frees whole blocks, and
 * attention walks blocks with the streaming kernel. Keys are stored after
 * RoPE so attention never rotates the cache again.
 *
 * Positions cost nothing while they are contiguous: a block stores its
 * first position and allocates a per-token array only when a gap appears.
 */
#ifndef KVC_FULL_H
#define KVC_FULL_H

#include <pthread.h>

#include "kvcp.h"
#include "pages.h"
#include "qstore.h"

#define FULL_ID "full"
#define FULL_EXPORT_VERSION 1u

enum { FULL_F32 = 0, FULL_F16 = 1, FULL_QUANT = 2 /* export records only */ };

struct kvc_seq {
    kvcp_link link;              /* in the instance's open sequences */
    kvc_instance *inst;
    kvcp_pages *layers;          /* [n_layers], dtype storage (inst->quant == 0) */
    kvcp_page_bytes bytes;       /* allocated blocks, position arrays, tables */
    kvcp_qs_seq q;               /* quantized storage (inst->quant) */
    char msg[KVCP_MSG_SIZE];
};

struct kvc_instance {
    kvc_host host;
    kvcp_geom g;
    int dtype;             /* FULL_F32 / FULL_F16 storage */
    uint32_t block_tokens; /* tokens per block */
    size_t elem;           /* bytes per stored value */
    size_t block_bytes;    /* bytes of one block's K+V */
    double kv_ratio;       /* declared budget (KVC-REQ-9) */
    uint64_t seq_overhead; /* declared per-sequence constant */
    kvcp_seqlist seqs;     /* open sequences */
    int quant;             /* keys and values in the quantized store (k_bits/v_bits) */
    kvcp_qs qs;            /* its configuration */
    char msg[KVCP_MSG_SIZE];
};

/* Bytes of the sequence struct plus its layer array. */
size_t full_seq_fixed_bytes(const kvc_instance *inst);


/* Pointers into a block: head h's keys or values, [block_tokens][head_dim]. */
static inline void *full_block_k(const kvc_instance *in, const kvcp_block *b, uint32_t h)
{
    return (char *)b->data + (size_t)h * in->block_tokens * in->g.head_dim * in->elem;
}
static inline void *full_block_v(const kvc_instance *in, const kvcp_block *b, uint32_t h)
{
    return (char *)b->data + ((size_t)in->g.n_kv + h) * in->block_tokens * in->g.head_dim * in->elem;
}
/* The page format: blocks of K then V, head-major, block_tokens each. */
static inline kvcp_page_fmt full_page_fmt(const kvc_instance *in)
{
    kvcp_page_fmt f = {&in->host, in->block_tokens, in->block_bytes};
    return f;
}

/* full_store.c */
kvc_status full_append(kvc_seq *s, uint32_t layer, uint32_t n, const int32_t *positions,
                       const void *k_pre, const void *v, const uint8_t *flags);
kvc_status full_truncate(kvc_seq *s, int32_t position);
kvc_status full_fork(const kvc_seq *src, kvc_seq *dst);
/* Frees every block and table of `layers` [n_layers] and zeroes them. */
void full_layers_release(const kvc_instance *in, kvcp_pages *layers, kvcp_page_bytes *cnt);
/* Appends already-rotated keys k [n][n_kv][head_dim] (float) to a layer;
 * shared by append and import. All-or-nothing on NOMEM. */
kvc_status full_store_rotated(const kvc_instance *in, kvcp_pages *L, kvcp_page_bytes *cnt, uint32_t n,
                              const int32_t *positions, const float *k_rot, const float *v);
/* Element i of head h's keys or values [block_tokens][head_dim] as float. */
void full_read_row(const kvc_instance *in, const void *base, uint32_t i, float *dst);

/* full_attend.c */
kvc_status full_attend(kvc_seq *s, uint32_t layer, uint32_t n_q, const int32_t *positions,
                       const void *q_pre, void *out);
kvc_status full_attend_batch(kvc_instance *inst, uint32_t layer, uint32_t n_items,
                             const kvc_attend_item *const *items);
kvc_status full_materialize(kvc_seq *s, uint32_t layer, kvc_materialized *out);

/* full_io.c */
kvc_status full_export(kvc_seq *s, void *buf, size_t buf_size, size_t *size);
kvc_status full_import(kvc_seq *s, const void *blob, size_t size);

#endif /* KVC_FULL_H */
