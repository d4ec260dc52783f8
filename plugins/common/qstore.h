/*
 * qstore.h -- the quantized token store every caching plugin can hold its
 * keys and values in (full, fastgen's rows, the calibrated quantizer).
 * Internal (prefix kvcp_qs_), linked hidden.
 *
 * One layer of one sequence holds its tokens in token order as
 *   SINKS   the first `sink` tokens, fp16 keys (post-RoPE) and values, for
 *           good (attention sinks);
 *   MAIN    every later token, in blocks of `block` tokens, its key and its
 *           value each either QUANTIZED (codes, fp16 scales and zero
 *           points, exact outliers, in the block's Q part) or RAW (the
 *           block's raw key rows: fp16, or 8-bit codes on fixed per-channel
 *           scales when the configuration has them; raw value rows: fp16,
 *           or 8-bit codes with a scale and zero per row).
 * A value is quantized once it is older than the newest `v_window` tokens;
 * a key once it is older than the newest `k_window` and, when keys are
 * scaled per channel over a block, its block is complete. So keys[0, kq)
 * and values[0, vq) are quantized.
 *
 * Quantization always reads the raw rows (never the caller's floats), so
 * the result does not depend on how appends were batched. A row is
 * quantized by the append that makes it quantizable; its raw copy stays
 * PENDING until an attend covers the last appended position, because the
 * batch's earlier queries must still see it raw (the step rule,
 * KVC-REQ-1): a query at index t sees each key and value in the form it
 * had at time t. The streaming kernel does that in four passes whose
 * per-query bounds (kvck_attn_bounds) split the tokens at the query's two
 * cuts (both quantized / only the key raw / only the value raw / both
 * raw). After
 * the covering attend pending copies are freed; later queries at older
 * positions see the cache as it is then, restricted to their positions.
 *
 * Keys are quantized after RoPE (and after an optional Hadamard rotation,
 * queries rotated alike) or, with `k_pre`, before RoPE: a key block is
 * then dequantized, rotated from a cos/sin table and scored as f32, which
 * also allows a channel permutation (calibrated per-channel widths). Values
 * may be Hadamard-rotated or permuted; the attention output is taken back
 * once per query.
 *
 * Every byte goes through the host allocator and is counted in a
 * kvcp_qs_bytes.
 */
#ifndef KVCP_QSTORE_H
#define KVCP_QSTORE_H

#include "kvck_quant.h"
#include "kvcp.h"
#include "pages.h" /* KVCP_TABLE_INIT */

/* What a store is asked to be (validated by kvcp_qs_init). */
typedef struct kvcp_qs_opts {
    uint32_t block;     /* tokens per block (raw and quantized), <= 256 */
    uint32_t sink;      /* first tokens kept in fp16 */
    uint32_t k_window;  /* newest tokens whose keys stay raw */
    uint32_t v_window;  /* newest tokens whose values stay raw */
    int v_raw8;         /* raw values as 8-bit codes with a scale and zero per row
                         * (instead of fp16): a cheap recent window */
    int k_mode;         /* KVCK_QS_CHANNEL (per channel over a block) or KVCK_QS_TOKEN */
    int k_pre;          /* 1: keys quantized before RoPE */
    int k_hadamard;     /* rotate keys (post-RoPE only) and queries */
    int v_hadamard;     /* rotate values, rotate outputs back */
    double k_outliers;  /* fraction of key values kept exactly */
    double v_outliers;
    uint64_t seed;      /* Hadamard signs */
    /* Formats: either one for every layer and head (fmt_all) or one per
     * layer and KV head of the shard ([n_layers * n_kv], layer-major).
     * Copied. */
    const kvck_qfmt *k_fmt_all, *v_fmt_all;
    const kvck_qfmt *k_fmt, *v_fmt;
    /* Optional, per layer and head ([n_layers][n_kv][d], copied): the
     * channel order codes are stored in (perm[i] = the natural channel at
     * stored position i), so channels of one width sit in one segment.
     * Keys only with k_pre; neither with the Hadamard rotation. */
    const uint16_t *k_perm, *v_perm;
    /* Optional, [n_layers][n_kv][d][2] fp16 (scale, zero) per channel,
     * copied: raw keys (pre-RoPE, natural order) are then k_raw_bits-bit
     * codes on these fixed scales instead of fp16 (values outside clamp).
     * k_pre only. */
    const uint16_t *k_raw_sz;
    unsigned k_raw_bits; /* with k_raw_sz: 4, 5, 6 or 8 (0 = 8) */
} kvcp_qs_opts;

/* Where one head's data sits inside a layer's Q block. */
typedef struct kvcp_qs_head {
    size_t k_codes, k_sz, k_out, v_codes, v_sz, v_out; /* byte offsets */
} kvcp_qs_head;

/* Per layer: formats and the Q block layout. */
typedef struct kvcp_qs_lfmt {
    const kvck_qfmt *k, *v;   /* [n_kv] */
    const uint16_t *k_perm, *v_perm; /* [n_kv][d] or NULL */
    const uint16_t *k_raw_sz; /* [n_kv][d][2] or NULL */
    uint32_t k_out_cap, v_out_cap; /* outliers a block can hold, per head */
    size_t q_bytes;           /* one Q block */
    kvcp_qs_head *head;       /* [n_kv] */
} kvcp_qs_lfmt;

/* An instance's store configuration (read-only once made). */
typedef struct kvcp_qs {
    const kvc_host *host;
    const kvcp_geom *g;
    kvcp_qs_opts o;
    kvck_qfmt *fmts;          /* [n_fmts] owned copies */
    uint32_t n_fmts;
    kvcp_qs_lfmt *lf;         /* [n_layers] */
    kvcp_qs_head *heads;      /* [n_layers * n_kv] */
    uint16_t *perms;          /* owned k_perm then v_perm copies, or NULL */
    size_t perms_bytes;
    uint16_t *raw_sz;         /* owned k_raw_sz copy, or NULL */
    kvck_qfmt raw8;           /* k_raw_bits per channel, one group: raw keys on raw_sz */
    float *k_signs, *v_signs; /* [head_dim] or NULL */
    float *rope_table;        /* k_pre: kvck_rope_table [max_positions] */
    size_t rope_table_bytes;
    size_t rawk_row;          /* bytes of one raw key row: d * 2 (fp16), or packed codes */
    size_t rawk_bytes;        /* one block's raw keys [n_kv][block][rawk_row] */
    size_t rawv_row;          /* bytes of one raw value row: d * 2 (fp16) or d (8-bit) */
    size_t rawv_bytes;        /* one block's raw values [n_kv][block][rawv_row], then
                               * with v_raw8 their (scale, zero) fp16 [n_kv][block][2] */
    kvck_qfmt vraw8;          /* 8 bits, one group per row: raw values with v_raw8 */
    size_t row;               /* values of one token's K (or V): n_kv * d */
    uint64_t param_bytes;     /* everything above, at the allocator */
} kvcp_qs;

/* One main block. */
typedef struct kvcp_qs_block {
    int32_t pos0;    /* position of its first token */
    int32_t *pos;    /* [block] positions, or NULL while contiguous */
    uint8_t *rawk;   /* raw keys [n_kv][block][rawk_row], or NULL */
    uint8_t *rawv;   /* raw values (see kvcp_qs.rawv_bytes), or NULL */
    uint8_t *q;      /* the layer's Q block layout, or NULL */
} kvcp_qs_block;

/* One layer of one sequence. Main tokens [0, main) with main = n - n_sink. */
typedef struct kvcp_qs_layer {
    uint32_t n;           /* tokens appended (sinks included) */
    uint32_t n_sink;      /* sink tokens held: min(n, sink) */
    uint32_t kq, vq;      /* main tokens whose key / value is quantized */
    uint32_t kraw_from;   /* main tokens [kraw_from, main) have raw keys (kraw_from <= kq) */
    uint32_t vraw_from;   /* likewise values (vraw_from <= vq) */
    int32_t last_pos;     /* -1 when empty */
    uint16_t *sink_kv;    /* K then V fp16 [2][sink][n_kv][d], then positions, or NULL */
    int32_t *sink_pos;    /* [sink] */
    kvcp_qs_block *blocks; /* [cap_blocks] */
    uint32_t n_blocks, cap_blocks;
} kvcp_qs_layer;

/* Bytes a sequence's layers hold at the allocator, by kind. */
typedef struct kvcp_qs_bytes {
    uint64_t raw;    /* raw key and value rows */
    uint64_t q;      /* Q blocks */
    uint64_t sink;   /* sink areas (K, V, positions) */
    uint64_t pos;    /* per-token position arrays of blocks */
    uint64_t table;  /* block tables */
} kvcp_qs_bytes;

/* ---- options (qs_options.c) ---------------------------------------------------- */

/* The options a plugin offering quantized storage lists, in this order
 * (KVCP_QS_OPT_* index them in the parsed values). */
enum {
    KVCP_QS_OPT_K_BITS, KVCP_QS_OPT_V_BITS, KVCP_QS_OPT_K_SCALE, KVCP_QS_OPT_K_ROPE,
    KVCP_QS_OPT_GROUP, KVCP_QS_OPT_HADAMARD, KVCP_QS_OPT_SINK, KVCP_QS_OPT_WINDOW,
    KVCP_QS_OPT_OUTLIERS, KVCP_QS_N_OPTS
};
extern const kvc_option_desc kvcp_qs_opt_k_bits, kvcp_qs_opt_v_bits, kvcp_qs_opt_k_scale,
    kvcp_qs_opt_k_rope, kvcp_qs_opt_group, kvcp_qs_opt_hadamard, kvcp_qs_opt_sink,
    kvcp_qs_opt_window, kvcp_qs_opt_outliers;
#define KVCP_QS_OPTION_LIST                                                                 \
    &kvcp_qs_opt_k_bits, &kvcp_qs_opt_v_bits, &kvcp_qs_opt_k_scale, &kvcp_qs_opt_k_rope,    \
        &kvcp_qs_opt_group, &kvcp_qs_opt_hadamard, &kvcp_qs_opt_sink, &kvcp_qs_opt_window, \
        &kvcp_qs_opt_outliers

/* From the parsed values v [KVCP_QS_N_OPTS] (KVCP_QS_OPTION_LIST order):
 * *on = 0 when k_bits and v_bits ask for no quantization (unset or 16);
 * else fills *o with one uniform format pair kf, vf (which *o points to:
 * keep them alive until kvcp_qs_init copied them) and *on = 1. INVALID
 * with the option named. */
kvc_status kvcp_qs_opts_parse(const kvcp_optval *v, const kvcp_geom *g, uint32_t block,
                              kvcp_qs_opts *o, kvck_qfmt *kf, kvck_qfmt *vf, int *on, char *msg,
                              size_t cap);

/* ---- configuration (qs_config.c) -------------------------------------------- */

/* Validates o against g and builds q (allocating its parameters through
 * host, KVC_USAGE_INSTANCE). INVALID (message names the option) or NOMEM. */
kvc_status kvcp_qs_init(kvcp_qs *q, const kvc_host *host, const kvcp_geom *g,
                        const kvcp_qs_opts *o, char *msg, size_t cap);
void kvcp_qs_free(kvcp_qs *q);

/* Resident bytes per token per layer once quantized (codes, scales,
 * outlier slots, worst-case positions and block-table share), as a
 * fraction of fp16 full: what kv_ratio promises per token (the largest
 * layer's). */
double kvcp_qs_token_ratio(const kvcp_qs *q);
/* The same before a store exists, for choosing formats: bytes of one
 * layer's Q block with key formats kf [n_kv], value formats vf [n_kv], and
 * the ratio a layer of q_bytes per block promises. */
size_t kvcp_qs_block_bytes(const kvck_qfmt *kf, const kvck_qfmt *vf, uint32_t n_kv, int k_mode,
                           uint32_t block, double k_outliers, double v_outliers);
double kvcp_qs_ratio_of(const kvcp_geom *g, size_t q_bytes, uint32_t block);
/* The per-sequence constant: the fp16 tokens a layer may hold beyond that
 * (sinks, window, the block being filled) and their raw blocks' slack,
 * plus the block table's initial size, times n_layers. */
uint64_t kvcp_qs_seq_overhead(const kvcp_qs *q);

/* The seed the option parser gives the Hadamard signs, and the signs a
 * store with seed `seed` uses for keys (kv 0) or values (kv 1): for
 * plugins that must rotate calibration data the way the store will. */
#define KVCP_QS_SEED UINT64_C(0x6b7663717374)
void kvcp_qs_hadamard_signs(uint64_t seed, int kv, float *signs, uint32_t d);

/* A checksum of everything that decides how tokens are stored (options,
 * formats, levels): blobs carry it, so one made with other settings is
 * refused. */
uint32_t kvcp_qs_fingerprint(const kvcp_qs *q);

/* Main tokens whose key / value is quantized once a layer holds n tokens
 * (sinks included). */
uint32_t kvcp_qs_kq_count(const kvcp_qs *q, uint32_t n);
uint32_t kvcp_qs_vq_count(const kvcp_qs *q, uint32_t n);

/* ---- one layer (qs_store.c) ------------------------------------------------- */

void kvcp_qs_layer_init(kvcp_qs_layer *L);
/* Appends n tokens (checked by the caller: positions after L->last_pos,
 * finite values) of k_pre, v [n][n_kv][d]. All-or-nothing: NOMEM leaves L
 * and cnt as they were. scratch: kvcp_qs_append_scratch_floats(q, n). */
kvc_status kvcp_qs_append(const kvcp_qs *q, kvcp_qs_layer *L, kvcp_qs_bytes *cnt, uint32_t layer,
                          uint32_t n, const int32_t *pos, const float *k_pre, const float *v,
                          float *scratch);
size_t kvcp_qs_append_scratch_floats(const kvcp_qs *q, uint32_t n);
/* Frees the raw copies of quantized tokens (after an attend covering the
 * last appended position). */
void kvcp_qs_drop_pending(const kvcp_qs *q, kvcp_qs_layer *L, kvcp_qs_bytes *cnt);
/* Keeps tokens with position < p, each in the form it has: quantized rows
 * stay quantized even where a fresh sequence of that length would still
 * hold them raw (a per-channel key block cut short, the window), so the
 * result equals never having appended only when nothing is held raw for
 * later (per-token keys, no window). Needs no memory. */
void kvcp_qs_truncate(const kvcp_qs *q, kvcp_qs_layer *L, kvcp_qs_bytes *cnt, uint32_t layer,
                      int32_t p);
void kvcp_qs_release(const kvcp_qs *q, kvcp_qs_layer *L, kvcp_qs_bytes *cnt, uint32_t layer);
/* dst (empty) = independent copy of src; NOMEM: dst released again. */
kvc_status kvcp_qs_copy(const kvcp_qs *q, const kvcp_qs_layer *src, kvcp_qs_layer *dst,
                        kvcp_qs_bytes *cnt, uint32_t layer);
/* Position of token i (sinks first). */
int32_t kvcp_qs_pos(const kvcp_qs *q, const kvcp_qs_layer *L, uint32_t i);
/* Tokens with position <= p. */
uint32_t kvcp_qs_count_upto(const kvcp_qs *q, const kvcp_qs_layer *L, int32_t p);
/* Bytes of pending raw rows (raw copies of quantized keys and values). */
uint64_t kvcp_qs_pending_bytes(const kvcp_qs *q, const kvcp_qs_layer *L);
/* Bytes of payload a layer holds for its tokens: codes of quantized rows,
 * raw rows (live and pending), sink rows. */
uint64_t kvcp_qs_payload_bytes(const kvcp_qs *q, const kvcp_qs_layer *L, uint32_t layer);

/* ---- attention and expansion (qs_attend.c) ------------------------------------ */

/* Causal attention of n_q queries q_pre [n_q][n_q_heads][d] at pos [n_q]
 * over layer L, by the step rule, into out. Drops pending raw rows when
 * the last query covers the last appended position. NOMEM (scratch) with
 * nothing changed. */
kvc_status kvcp_qs_attend(const kvcp_qs *q, kvcp_qs_layer *L, kvcp_qs_bytes *cnt, uint32_t layer,
                          uint32_t n_q, const int32_t *pos, const float *q_pre, float *out);

/* Every token of the layer as post-RoPE keys and values, token-major
 * k, v [n][n_kv][d] (either may be NULL) with positions [n]: quantized
 * tokens dequantized, raw ones widened. NOMEM (scratch) writes nothing. */
kvc_status kvcp_qs_expand(const kvcp_qs *q, const kvcp_qs_layer *L, uint32_t layer, int32_t *pos,
                    float *k, float *v);

/* ---- blobs (qs_io.c) ------------------------------------------------------------ */

/* The layer's tokens as stored (positions, sinks, Q blocks' used parts,
 * raw rows), for sequence export. */
void kvcp_qs_write(const kvcp_qs *q, const kvcp_qs_layer *L, uint32_t layer, kvcp_writer *w);
/* Reads what kvcp_qs_write wrote into an empty layer. CORRUPT (damage,
 * inconsistent counts) or NOMEM; on error dst is released again. */
kvc_status kvcp_qs_read(const kvcp_qs *q, kvcp_qs_layer *L, kvcp_qs_bytes *cnt, uint32_t layer,
                        kvcp_reader *r, char *msg, size_t cap);

/* ---- a whole sequence (qs_seq.c) ------------------------------------------------- */

/* A sequence's layers in the store; the plugin's struct kvc_seq holds one.
 * The functions take the sequence's KVCP_MSG_SIZE message buffer and write
 * the reason there on error; their contracts are the ABI's. */
typedef struct kvcp_qs_seq {
    kvcp_qs_layer *layers; /* [n_layers] */
    kvcp_qs_bytes bytes;
} kvcp_qs_seq;

kvc_status kvcp_qss_init(const kvcp_qs *q, kvcp_qs_seq *s); /* NOMEM only */
void kvcp_qss_free(const kvcp_qs *q, kvcp_qs_seq *s);
/* Bytes of the layer array (part of a sequence's fixed bytes). */
size_t kvcp_qss_fixed_bytes(const kvcp_qs *q);
kvc_status kvcp_qss_append(const kvcp_qs *q, kvcp_qs_seq *s, uint32_t layer, uint32_t n,
                           const int32_t *positions, const void *k_pre, const void *v, char *msg);
kvc_status kvcp_qss_attend(const kvcp_qs *q, kvcp_qs_seq *s, uint32_t layer, uint32_t n_q,
                           const int32_t *positions, const void *q_pre, void *out, char *msg);
kvc_status kvcp_qss_materialize(const kvcp_qs *q, kvcp_qs_seq *s, uint32_t layer,
                                kvc_materialized *out, char *msg);
void kvcp_qss_truncate(const kvcp_qs *q, kvcp_qs_seq *s, int32_t position);
/* dst = independent copy of src; NOMEM leaves dst unchanged (msg: dst's). */
kvc_status kvcp_qss_fork(const kvcp_qs *q, const kvcp_qs_seq *src, kvcp_qs_seq *dst, char *msg);
/* Fills st's fields (fixed = the plugin's own per-sequence bytes). */
void kvcp_qss_stats(const kvcp_qs *q, const kvcp_qs_seq *s, uint64_t fixed, kvc_seq_stats *st);
/* Sequence blob payload after the plugin's own header: the store's
 * fingerprint, then every layer (kvcp_qs_write). Read refuses a blob of
 * other settings (INVALID) or damaged (CORRUPT); s unchanged on error. */
void kvcp_qss_write(const kvcp_qs *q, const kvcp_qs_seq *s, kvcp_writer *w);
kvc_status kvcp_qss_read(const kvcp_qs *q, kvcp_qs_seq *s, kvcp_reader *r, char *msg);

#endif /* KVCP_QSTORE_H */
