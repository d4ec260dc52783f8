/*
 * kvquant.h -- internals of kvc-kvquant.so: a KV cache quantized the way
 * KVQuant (Hooper et al., arXiv 2401.18079) and KIVI do it, with what the
 * model's calibration says:
 *   keys     before RoPE, per channel over a block of tokens; each
 *            channel's width chosen from calibration (more bits where the
 *            queries look and the keys spread: a sensitivity-weighted
 *            allocation that averages k_bits); channels of one width stored
 *            side by side (a permutation); the block being filled held as
 *            8-bit codes on fixed per-channel scales from calibration;
 *   values   per token in groups, after a Hadamard rotation;
 *   levels   uniform, or fitted per layer, K/V and width by weighted
 *            k-means on calibration values (non-uniform levels);
 *   all of it in the shared quantized store (plugins/common/qstore.h).
 * Preparation gathers statistics only (per channel: query energy, block
 * range, extremes; per layer: histograms of where values fall inside their
 * groups); the artifact holds them, and every k_bits / v_bits / alloc /
 * levels setting is built from them at create, so one preparation serves
 * all of them.
 */
#ifndef KVC_KVQUANT_H
#define KVC_KVQUANT_H

#include "kvcp.h"
#include "qstore.h"

#define KQ_ID "kvquant"
#define KQ_ARTIFACT_VERSION 1u
#define KQ_EXPORT_VERSION 1u
#define KQ_HIST 512u    /* bins of a level histogram over [0, 1] */
#define KQ_NOTE_MAX 256u

enum { KQ_ALLOC_UNIFORM = 0, KQ_ALLOC_SENSITIVITY = 1 };
enum { KQ_LEVELS_UNIFORM = 0, KQ_LEVELS_FIT = 1 };

/* Calibration statistics of one layer (the artifact's content). Channels
 * in natural order, [n_kv][d] each. */
typedef struct kq_stats {
    float *q_energy;  /* mean of q_c^2 over the rows and the KV head's query heads */
    float *k_range2;  /* mean over blocks of (block range of pre-RoPE k_c)^2 */
    float *k_min, *k_max; /* extremes of pre-RoPE k_c */
    float *k_hist;    /* [KQ_HIST] where keys fall in their channel's block range, weighted
                         by the channel's query energy */
    float *v_hist;    /* [KQ_HIST] where rotated values fall in their group's range */
    uint64_t rows;    /* calibration rows seen */
    uint64_t blocks;  /* key blocks seen (per channel) */
} kq_stats;

/* A layer's weights while it is prepared: copies of the shard's rows
 * [rows][hidden] of W_q, W_k, W_v and their biases (or NULL). */
typedef struct kq_weights {
    float *wq, *wk, *wv;
    float *bq, *bk, *bv;
} kq_weights;

/* What the options ask for. */
typedef struct kq_config {
    double k_bits;     /* average key width */
    uint32_t v_bits;
    int alloc, levels;
    unsigned raw8;     /* raw keys as codes of this width on calibrated scales (0: fp16) */
    int raw8v;         /* raw values as 8-bit codes (per-row scale) */
    uint32_t block, group, sink, window;
    double outliers;
    double kv_ratio;   /* 0 = not set */
    char note[KQ_NOTE_MAX];
} kq_config;

struct kvc_seq {
    kvcp_link link;
    kvc_instance *inst;
    kvcp_qs_seq q;
    char msg[KVCP_MSG_SIZE];
};

struct kvc_instance {
    kvc_host host;
    kvcp_geom g;
    kq_config cfg;
    kq_stats *stats;          /* [n_layers] */
    uint8_t *finalized;       /* [n_layers] statistics of the layer are final */
    kq_weights *prep;         /* [n_layers] during preparation, else NULL */
    uint64_t bytes_prep;      /* held for preparation (weights) */
    int prep_counted;         /* the prep array is in bytes_prep */
    int ready;                /* the store is built: sequences may run */
    int from_artifact;
    /* Chosen from the statistics at build: widths, order, levels. */
    kvck_qfmt *kfmt, *vfmt;   /* [n_layers][n_kv] */
    uint16_t *kperm;          /* [n_layers][n_kv][d] */
    uint16_t *kraw_sz;        /* [n_layers][n_kv][d][2] fp16 */
    float *levels;            /* [n_layers][2 (K, V)][9 widths][256] fitted levels */
    double k_bits_built;      /* the average width the allocation reached */
    uint32_t v_bits_built;
    kvcp_qs qs;
    double kv_ratio;          /* declared */
    uint64_t seq_overhead;
    uint64_t bytes_params;    /* statistics, formats, levels, permutations (the store's own too) */
    kvcp_seqlist seqs;
    char msg[KVCP_MSG_SIZE];
};

/* kq_calib.c: statistics from weights and calibration rows. */
kvc_status kq_stats_alloc(kvc_instance *in);
void kq_stats_free(kvc_instance *in);
/* Frees what preparation holds (the weights); statistics stay. */
void kq_prep_free(kvc_instance *in);
size_t kq_stats_bytes(const kvcp_geom *g);
kvc_status kq_prepare_layer(kvc_instance *in, uint32_t layer, const kvc_layer_weights *w,
                            const kvc_calib_chunk *c);
kvc_status kq_finalize_layer(kvc_instance *in, uint32_t layer);

/* kq_build.c: widths, order, levels and the store from the statistics and
 * the options (also kv_ratio's choice of k_bits and v_bits). */
kvc_status kq_build(kvc_instance *in, char *msg, size_t cap);
/* The smallest kv_ratio create accepts for options c on geometry g,
 * before any statistics: exact for uniform widths and for kv_ratio's own
 * choice, an upper bound on what a calibrated width allocation averaging
 * k_bits can need (so a ratio create accepts is one the build meets,
 * KVC-REQ-9). INVALID when the widths make no format, NOMEM. */
kvc_status kq_ratio_floor(const kvc_host *host, const kvcp_geom *g, const kq_config *c,
                          double *ratio);
void kq_build_free(kvc_instance *in);

/* kq_io.c: the artifact (statistics) and sequence blobs. */
kvc_status kq_save(kvc_instance *in, void *buf, size_t buf_size, size_t *size);
kvc_status kq_load(kvc_instance *in, const void *blob, size_t size, char *msg, size_t cap);
kvc_status kq_export(kvc_seq *s, void *buf, size_t buf_size, size_t *size);
kvc_status kq_import(kvc_seq *s, const void *blob, size_t size);

#endif /* KVC_KVQUANT_H */
