/*
 * run.h -- what the model host does with a model and a KV store:
 * perplexity (llama.cpp's protocol), generation, and the preparation feed
 * that gives a compressor its weights and calibration activations (from
 * exact passes, or sequentially through the layers already compressed).
 *
 * Prefix kvch_. Single-threaded per call (BLAS may use its own threads).
 */
#ifndef KVCH_RUN_H
#define KVCH_RUN_H

#include <stddef.h>
#include <stdint.h>

#include "kvc.h"
#include "kld.h"
#include "llama.h"
#include "tokenizer.h"

/* Reads a whole file into *buf (malloc'd, NUL-terminated, caller frees).
 * Errors: INVALID with err naming the path and strerror. */
kvc_status kvch_read_file(const char *path, char **buf, size_t *len, char *err, size_t err_size);

/* The default model path: $KVC_MODEL, else $KVC_MODEL_DIR/NAME, else
 * ~/.cache/kvc/NAME, NAME = SmolLM2-135M-Instruct.Q4_1.gguf. Writes into
 * buf[cap] and returns buf. */
const char *kvch_default_model(char *buf, size_t cap);

/* A model and its tokenizer, loaded together. */
typedef struct kvch_model {
    kvch_gguf *gguf;
    kvch_llama *llama;
    kvch_tokenizer *tok;
    double load_s; /* seconds to map, dequantize and build the tokenizer */
} kvch_model;

/* Opens path (NULL: kvch_default_model) and loads weights and tokenizer.
 * The error names the path and, when it is the default model and absent,
 * says to run scripts/fetch-model.sh. */
kvc_status kvch_model_open(const char *path, kvch_model *m, char *err, size_t err_size);
void kvch_model_close(kvch_model *m);

/* ---- perplexity ------------------------------------------------------------ */

typedef struct kvch_ppl_params {
    uint32_t n_ctx;       /* tokens per chunk (even, >= 4) */
    uint32_t n_chunks;    /* 0 = every whole chunk of the text */
    int token_by_token;   /* second half: one eval per token instead of one batch */
    /* called after each chunk (may be NULL) */
    void (*progress)(void *user, uint32_t chunk, uint32_t n_chunks, double ppl);
    void *user;
    /* Called, when set, once per chunk (chunk 0 .. n_chunks-1) after its
     * tokens were scored and before the store is reset for the next chunk
     * or the function returns: kv then holds the chunk's whole sequence
     * (n_ctx - 1 tokens appended to every layer, every one attended). For
     * inspection only (kvch_kv_stats, kvch_kv_describe): the callback must
     * not append, attend or reset. A non-OK return stops kvch_perplexity
     * with that status and the callback's words in err. Runs before
     * `progress` of the same chunk. */
    kvc_status (*chunk_done)(void *chunk_user, uint32_t chunk, const kvch_kv *kv, char *err,
                             size_t err_size);
    void *chunk_user;
} kvch_ppl_params;

typedef struct kvch_ppl_result {
    double ppl;              /* exp(mean NLL) over the scored tokens */
    double ppl_err;          /* ppl * sqrt(var(NLL) / (N - 1)), as llama-perplexity */
    uint64_t n_scored;       /* tokens scored: chunks * (n_ctx - 1 - n_ctx/2) */
    uint32_t n_chunks;
    double prefill_s;        /* seconds in first halves (prompt) */
    uint64_t prefill_tokens;
    double gen_s;            /* seconds in second halves (generation) */
    uint64_t gen_tokens;
    /* The store's stats at the end of the last chunk (all n_ctx - 1 tokens
     * held): resident and fp16-full bytes per token of the sequence. */
    double kv_bytes_per_token;
    double fp16_bytes_per_token;
} kvch_ppl_result;

/* Scores tokens [n_tokens] the way llama.cpp's llama-perplexity does:
 * non-overlapping chunks of n_ctx tokens, a fresh sequence per chunk
 * (kvch_kv_reset), the logits of positions n_ctx/2 .. n_ctx-2 scoring the
 * tokens after them. The first half is the prompt (one eval: append +
 * attend as prefill); the second half follows as generation. flags [n_tokens]
 * (KVC_TOKEN_*) go with the appends, may be NULL. Errors: INVALID (fewer
 * tokens than one chunk), the store's errors. */
kvc_status kvch_perplexity(kvch_llama_ctx *c, kvch_kv *kv, const kvch_llama *m,
                           const int32_t *tokens, const uint8_t *flags, size_t n_tokens,
                           const kvch_ppl_params *p, kvch_ppl_result *r, char *err,
                           size_t err_size);

/* kvch_perplexity on kv (result r) and, chunk by chunk beside it, on a
 * reference store ref (result r_ref; the exact path, kvch_kv_exact, for
 * "how far is the plugin from exact"): for each chunk, ref's chunk is
 * scored, then kv's, with the same tokens, flags and mode. kv sees the same
 * calls in the same order as under kvch_perplexity, so r is bit-identical
 * to its result; r_ref is what kvch_perplexity on ref alone gives. When
 * kld is not NULL (it needs ref), every scored token's two logit rows go to
 * kvch_kld_add(kld, ref's, kv's, ...) before the next chunk: memory stays
 * at two chunks of logits (2 x (n_ctx/2 - 1) x n_vocab floats) plus one
 * double per scored token in kld. chunk_done and progress are kv's (ref is
 * not inspected). ref NULL: kvch_perplexity (r_ref and kld unused).
 * Errors: those of kvch_perplexity; a reference store's prefixed
 * "reference store: "; INVALID for ref without r_ref, kld without ref. */
kvc_status kvch_perplexity_vs(kvch_llama_ctx *c, kvch_kv *kv, kvch_kv *ref, const kvch_llama *m,
                              const int32_t *tokens, const uint8_t *flags, size_t n_tokens,
                              const kvch_ppl_params *p, kvch_ppl_result *r,
                              kvch_ppl_result *r_ref, kvch_kld *kld, char *err, size_t err_size);

/* ---- generation -------------------------------------------------------------- */

typedef struct kvch_gen_params {
    uint32_t n_predict;   /* tokens to generate at most */
    float temperature;    /* 0 = greedy (argmax) */
    uint32_t top_k;       /* 0 = off */
    float top_p;          /* 1 = off */
    float repeat_penalty; /* 1 = off; divides positive logits of recent tokens */
    uint32_t repeat_last; /* tokens the penalty looks back over */
    uint64_t seed;
    const int32_t *stop;  /* [n_stop] ids that end generation (not emitted) */
    uint32_t n_stop;
    /* called for each generated token (may be NULL); nonzero stops */
    int (*on_token)(void *user, int32_t id);
    void *user;
} kvch_gen_params;

typedef struct kvch_gen_result {
    uint32_t n_prompt, n_generated;
    double prefill_s, decode_s;
    int stopped;          /* 1 when a stop token ended it */
    kvc_seq_stats kv;     /* the store at the end */
} kvch_gen_result;

/* Prefills prompt [n_prompt] at positions 0.. into kv, then samples
 * n_predict tokens one decode step at a time. The generated ids go to
 * out_ids [n_predict] (may be NULL). */
kvc_status kvch_generate(kvch_llama_ctx *c, kvch_kv *kv, const kvch_model *m,
                         const int32_t *prompt, uint32_t n_prompt, const kvch_gen_params *p,
                         int32_t *out_ids, kvch_gen_result *r, char *err, size_t err_size);

/* ---- preparation feed ---------------------------------------------------------- */

typedef struct kvch_prepare_params {
    uint32_t n_ctx;        /* calibration window: tokens per forward pass (0 = 512) */
    uint64_t max_tokens;   /* calibration tokens at most (0 = all given) */
    void (*progress)(void *user, const char *stage, uint64_t done, uint64_t total);
    void *user;
    /* Nonzero: calibrate layer by layer through the layers already
     * finalized (ABI 1.1 sequential order, kvc_calib_chunk.x_ref set).
     * Ignored for plugins without KVC_CAP_NEEDS_CALIBRATION. */
    int sequential;
} kvch_prepare_params;

typedef struct kvch_prepare_result {
    uint64_t calib_tokens;     /* activation rows fed per layer */
    uint32_t calib_windows;    /* windows of n_ctx tokens (one sequence each) */
    double feed_s, finalize_s; /* feed_s includes finalize_layers_s */
    int sequential;            /* 1 when the sequential order ran */
    double finalize_layers_s;  /* seconds in finalize_layer (sequential only) */
} kvch_prepare_result;

/* Prepares `inst` (of plugin p) for model m, then calls finalize().
 *
 * Weights: when the plugin has KVC_CAP_NEEDS_WEIGHTS, first every layer's
 * W_q, W_k, W_v, W_o (kvc_layer_weights: fp32, [out][in] as the GGUF holds
 * them), layers 0 .. L-1.
 *
 * Calibration, when it has KVC_CAP_NEEDS_CALIBRATION: the calib [n_calib]
 * tokens (at most max_tokens) in windows of n_ctx, each window its own
 * sequence at positions 0 .. n-1; each window gives one kvc_calib_chunk
 * per layer (struct_size = sizeof, ABI 1.1).
 * - sequential == 0: exact forward passes, window after window; each
 *   window's chunks arrive layer 0 .. L-1 as the pass reaches them; x_ref
 *   is NULL. No finalize_layer.
 * - sequential != 0: layer-major. For l = 0 .. L-1: every window's chunk
 *   of layer l, with x = the attention input of a pass whose layers 0..l-1
 *   ran through the plugin (appended to and attended over by a fresh plugin
 *   sequence per window and layer, opened after finalize_layer(l) and
 *   closed before layer l+1 is fed) and x_ref = the same tokens' rows in
 *   the exact model; then finalize_layer(l); then every window advances
 *   through layer l on both streams (not after the last layer). At layer
 *   0, x and x_ref are equal. Holds 2 x n x n_embd floats (two residual
 *   streams); costs about two exact passes.
 *
 * Errors: INVALID (a calibration plugin and no tokens; a token outside the
 * vocabulary), NOMEM, the plugin's, with its message in err. */
kvc_status kvch_prepare(const kvc_plugin *p, kvc_instance *inst, const kvch_llama *m,
                        const int32_t *calib, size_t n_calib, const kvch_prepare_params *pp,
                        kvch_prepare_result *r, char *err, size_t err_size);

#endif /* KVCH_RUN_H */
