/*
 * lowrank.h -- the latent KV cache shared by the low-rank plugins (kvc-lorc,
 * kvc-svdllm; Palu extends it with quantization later).
 *
 * The math, per layer l, group g of KV heads (m = heads in group * head_dim
 * rows of the K or V projection) and K or V:
 *   factors  down [r][m] and up [m][r] (down = U_r^T of an SVD; up = U_r,
 *            or a least-squares refit of it);
 *   append   h = down . k            (r numbers per token per group; keys
 *                                     pre-RoPE, or post-RoPE in the
 *                                     key_space=post option);
 *   attend   k^ = up . h, RoPE(k^), scores; values stay latent:
 *            sum_t p_t v^_t = up_v . (sum_t p_t h_t), one up-projection
 *            per query instead of one per cached token.
 * At full rank (r = m) up . down = I and the cache is exact up to fp32
 * rounding; the plugins are then lossless (their default).
 *
 * Storage: per layer, paged blocks of `block_tokens` rows; a row is the
 * layer's latents of one token, groups in order, K then V:
 *   row = [g0: hk (r_k) | hv (r_v)] [g1: ...]   (fp32 or fp16)
 * Ranks may differ by layer (LoRC's progressive allocation), so rows do.
 * Positions cost nothing while contiguous (as in kvc-full).
 *
 * Internal to the plugins (prefix lr_); linked statically and hidden.
 */
#ifndef KVC_LOWRANK_H
#define KVC_LOWRANK_H

#include <pthread.h>

#include "kvcp.h"
#include "pages.h"

#define LR_ARTIFACT_VERSION 1u
#define LR_EXPORT_VERSION 1u
#define LR_NOTE_MAX 512u
#define LR_MAX_GROUP 64u /* KV heads per group at most */

enum { LR_F32 = 0, LR_F16 = 1 };               /* latent storage */
enum { LR_PLAIN = 0, LR_WHITEN = 1 };          /* factor method */
enum { LR_UNIFORM = 0, LR_PROGRESSIVE = 1 };   /* rank allocation */
enum { LR_PRE_ROPE = 0, LR_POST_ROPE = 1 };    /* which keys the latent holds */

/* What a plugin is: its id and the method its factors come from. */
typedef struct lr_method {
    const char *id;     /* "lorc", "svdllm": blob and artifact owner */
    int factor;         /* LR_PLAIN or LR_WHITEN */
    int needs_calib;    /* LR_WHITEN and post-RoPE keys need activations */
} lr_method;

/* Everything the options decide. Factor-determining fields are recorded in
 * the artifact and must match when an artifact is loaded. */
typedef struct lr_config {
    int dtype;            /* LR_F32 / LR_F16 */
    int alloc;            /* LR_UNIFORM / LR_PROGRESSIVE */
    int key_space;        /* LR_PRE_ROPE / LR_POST_ROPE */
    int refit;            /* least-squares refit of `up` (needs x_ref) */
    double kv_ratio;      /* requested budget; 0 = full rank */
    uint32_t rank_k;      /* explicit ranks; 0 = from kv_ratio */
    uint32_t rank_v;
    double spread;        /* progressive: extra rank fraction of the shallowest layer */
    uint32_t group_heads; /* KV heads per group (divides the shard's count) */
    uint32_t block_tokens;
    char note[LR_NOTE_MAX]; /* calibration note, recorded in the artifact */
} lr_config;

/* One (layer, group, K or V) factor pair. */
typedef struct lr_factor {
    uint32_t r;   /* rank, 1..m */
    float *down;  /* [r][m]: h = down . k */
    float *up;    /* [m][r]: k^ = up . h */
    float *sigma; /* [m] singular values (whitened for svdllm; sqrt of
                     eigenvalues for post-RoPE keys), descending */
} lr_factor;

/* Preparation state of one layer, freed at finalize_layer. */
typedef struct lr_prep {
    float *wk, *wv;   /* [n_kv*head_dim][hidden] the shard's W_k, W_v rows */
    float *gram;      /* [hidden][hidden] upper: sum x x^T (exact rows) */
    float *gram_c;    /* [hidden][hidden] upper: sum x' x'^T (compressed rows; refit) */
    float *cross;     /* [hidden][hidden]: sum x_ref x'^T (refit) */
    float *kcov;      /* [n_groups][m][m] upper: sum of post-RoPE key outer products */
    uint64_t rows;    /* calibration rows fed */
    uint64_t ref_rows; /* rows that came with x_ref */
} lr_prep;

typedef struct lr_layer {
    int finalized;
    uint32_t rk, rv;     /* ranks of every group's K and V (0 until allocated) */
    uint32_t row_elems;  /* latents per token: sum over groups of r_k + r_v */
    lr_factor *k, *v;    /* [n_groups] */
    lr_prep prep;
    double shift_k;      /* Cholesky shift used (whitening), 0 = none */
} lr_layer;

struct kvc_seq {
    kvcp_link link;       /* in the instance's open sequences */
    kvc_instance *inst;
    kvcp_pages *layers; /* [n_layers] */
    kvcp_page_bytes bytes;
    char msg[KVCP_MSG_SIZE];
};

struct kvc_instance {
    kvc_host host;
    kvcp_geom g;
    const lr_method *meth;
    lr_config cfg;
    uint32_t n_groups, m; /* groups per layer, rows per group */
    size_t elem;          /* bytes per stored latent */
    lr_layer *layers;     /* [n_layers] */
    int ranks_set;        /* ranks allocated for every layer */
    int ready;            /* every layer finalized */
    int from_artifact;
    uint64_t calib_rows;  /* calibration rows per layer (recorded) */
    uint64_t ref_rows;    /* of which came with x_ref (sequential calibration) */
    uint32_t fingerprint; /* hash of every factor: exports name it */
    uint64_t bytes_params; /* factors held */
    uint64_t bytes_prep;   /* preparation buffers held */
    double kv_ratio;       /* declared (KVC-REQ-9) */
    uint64_t seq_overhead;
    kvcp_seqlist seqs;     /* open sequences */
    char msg[KVCP_MSG_SIZE];
};

/* ---- lr_plugin.c: instance and sequence lifecycle -------------------------- */

#define LR_MAX_OPTIONS 16u

/* A plugin's create(): parses info's options against its table (options
 * named kv_ratio, rank_k, rank_v, dtype, alloc, key_space, refit, spread,
 * block_tokens, calib_note are understood by name) and creates. */
kvc_status lr_create_with_options(const lr_method *meth, const kvc_option_desc *const *table,
                                  uint32_t n, const kvc_create_info *info, kvc_instance **out,
                                  char *msg, size_t cap);

/* create() for a method: options already parsed into cfg (cfg->note may be
 * empty); artifact loaded when given. */
kvc_status lr_create(const lr_method *meth, const kvc_create_info *info, const lr_config *cfg,
                     const uint8_t *cfg_set, kvc_instance **out, char *msg, size_t cap);
void lr_destroy(kvc_instance *in);
const char *lr_instance_message(const kvc_instance *in);
kvc_status lr_instance_stats(const kvc_instance *in, kvc_instance_stats *out);
kvc_status lr_seq_open(kvc_instance *in, kvc_seq **out);
void lr_seq_close(kvc_seq *s);
const char *lr_seq_message(const kvc_seq *s);
kvc_status lr_seq_stats(const kvc_seq *s, kvc_seq_stats *out);
/* seq_describe (ABI 1.2): per KV head "tokens=<n> rank_k=<r> rank_v=<r>",
 * the ranks of the head's group in that layer. */
kvc_status lr_seq_describe(const kvc_seq *s, uint32_t layer, char *buf, size_t buf_size,
                           size_t *size);
/* Bytes of the sequence struct and its layer array. */
size_t lr_seq_fixed_bytes(const kvc_instance *in);
/* Fills declared kv_ratio and seq_overhead from the ranks in force. */
void lr_declare_budget(kvc_instance *in);
/* Worst-case metadata bytes per token per layer (a position, table share). */
double lr_meta_per_token(const kvc_instance *in);

/* ---- lr_prepare.c: factors ------------------------------------------------- */

kvc_status lr_prepare_layer(kvc_instance *in, uint32_t layer, const kvc_layer_weights *w,
                            const kvc_calib_chunk *c);
kvc_status lr_finalize_layer(kvc_instance *in, uint32_t layer);
kvc_status lr_finalize(kvc_instance *in);
/* Instance memory through the host allocator, counted in *counter
 * (bytes_params or bytes_prep) so instance_stats is exact. */
void *lr_ialloc(kvc_instance *in, size_t size, uint64_t *counter);
void lr_ifree(kvc_instance *in, void *p, size_t size, uint64_t *counter);
/* Frees a layer's preparation buffers. */
void lr_prep_free(kvc_instance *in, lr_layer *L);
/* Frees a layer's factors. */
void lr_factors_free(kvc_instance *in, lr_layer *L);
/* Allocates the factor arrays of layer L with ranks rk, rv (all groups). */
kvc_status lr_factors_alloc(kvc_instance *in, lr_layer *L, uint32_t rk, uint32_t rv);
/* Uniform ranks from the config (explicit ranks, kv_ratio, or full);
 * INVALID with a message when the budget cannot hold rank 1. */
kvc_status lr_uniform_ranks(const kvc_instance *in, uint32_t *rk, uint32_t *rv, char *msg,
                            size_t cap);

/* ---- lr_store.c: the paged latent store ------------------------------------ */

kvc_status lr_append(kvc_seq *s, uint32_t layer, uint32_t n, const int32_t *positions,
                     const void *k_pre, const void *v, const uint8_t *flags);
kvc_status lr_truncate(kvc_seq *s, int32_t position);
kvc_status lr_fork(const kvc_seq *src, kvc_seq *dst);
/* Stores n latent rows [n][row_elems] (fp32) at positions into L;
 * all-or-nothing on NOMEM. Shared by append and import. */
kvc_status lr_store_rows(const kvc_instance *in, uint32_t layer, kvcp_pages *L, kvcp_page_bytes *b,
                         uint32_t n, const int32_t *positions, const float *rows);
void lr_layers_release(const kvc_instance *in, kvcp_pages *layers, kvcp_page_bytes *b);
static inline size_t lr_block_bytes(const kvc_instance *in, uint32_t layer)
{
    return (size_t)in->cfg.block_tokens * in->layers[layer].row_elems * in->elem;
}
/* The page format of a layer: blocks of block_tokens latent rows. */
static inline kvcp_page_fmt lr_page_fmt(const kvc_instance *in, uint32_t layer)
{
    kvcp_page_fmt f = {&in->host, in->cfg.block_tokens, lr_block_bytes(in, layer)};
    return f;
}
/* Offsets of group g's K and V latents inside a row of layer L. */
uint32_t lr_off_k(const lr_layer *L, uint32_t g);
uint32_t lr_off_v(const lr_layer *L, uint32_t g);

/* ---- lr_attend.c -------------------------------------------------------------- */

kvc_status lr_attend(kvc_seq *s, uint32_t layer, uint32_t n_q, const int32_t *positions,
                     const void *q_pre, void *out);
kvc_status lr_attend_batch(kvc_instance *in, uint32_t layer, uint32_t n_items,
                           const kvc_attend_item *const *items);
kvc_status lr_materialize(kvc_seq *s, uint32_t layer, kvc_materialized *out);

/* ---- lr_io.c: export/import, artifact ---------------------------------------- */

/* Sets in->fingerprint from the factors (after the last finalize_layer or
 * an artifact load). */
void lr_fingerprint(kvc_instance *in);

kvc_status lr_export(kvc_seq *s, void *buf, size_t buf_size, size_t *size);
kvc_status lr_import(kvc_seq *s, const void *blob, size_t size);
kvc_status lr_save(kvc_instance *in, void *buf, size_t buf_size, size_t *size);
/* Loads factors and config from an artifact into a fresh instance whose
 * geometry is set; options the host set (cfg_set[i] for field i of
 * LR_CFG_*) must equal the artifact's. */
kvc_status lr_load_artifact(kvc_instance *in, const void *blob, size_t size,
                            const lr_config *asked, const uint8_t *cfg_set, char *msg,
                            size_t cap);

/* Which config fields the host set (cfg_set[] indices). */
enum { LR_SET_DTYPE, LR_SET_ALLOC, LR_SET_KEYS, LR_SET_REFIT, LR_SET_RATIO, LR_SET_RANK_K,
       LR_SET_RANK_V, LR_SET_SPREAD, LR_SET_N };

/* The function table every low-rank plugin shares: all but create. */
#define LR_PLUGIN_OPS                                                                      \
    .destroy = lr_destroy, .instance_message = lr_instance_message,                        \
    .prepare_layer = lr_prepare_layer, .finalize_layer = lr_finalize_layer,                \
    .finalize = lr_finalize, .save = lr_save, .instance_stats = lr_instance_stats,         \
    .seq_open = lr_seq_open, .seq_close = lr_seq_close, .seq_message = lr_seq_message,     \
    .append = lr_append, .attend = lr_attend, .attend_batch = lr_attend_batch,             \
    .materialize = lr_materialize, .truncate = lr_truncate, .fork = lr_fork,               \
    .seq_export = lr_export, .seq_import = lr_import, .seq_stats = lr_seq_stats,           \
    .seq_describe = lr_seq_describe

/* Capabilities every low-rank plugin has. */
#define LR_CAPS                                                                            \
    (KVC_CAP_CPU | KVC_CAP_NEEDS_WEIGHTS | KVC_CAP_COMPRESS_FEATURES | KVC_CAP_MATERIALIZE |  \
     KVC_CAP_EXPORT | KVC_CAP_ARTIFACT | KVC_CAP_TRUNCATE | KVC_CAP_FORK | KVC_CAP_EXACT)

/* Option descriptors every low-rank plugin lists (defined in lr_plugin.c). */
extern const kvc_option_desc lr_opt_kv_ratio, lr_opt_rank_k, lr_opt_rank_v, lr_opt_dtype,
    lr_opt_block_tokens, lr_opt_calib_note, lr_opt_spread;

#endif /* KVC_LOWRANK_H */
