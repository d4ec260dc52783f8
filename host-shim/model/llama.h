/*
 * llama.h -- the reference model host: Llama-family weights from a GGUF and
 * the fp32 CPU forward pass, with every layer's attention going through a
 * KV store (kvch_kv): a loaded plugin, or the built-in exact path.
 *
 * Part of libkvc-host, not of the plugin ABI. Prefix kvch_. A kvch_llama is
 * read-only after load: any thread may run forward passes over it at once,
 * each with its own kvch_llama_ctx and kvch_kv.
 */
#ifndef KVCH_LLAMA_H
#define KVCH_LLAMA_H

#include <stddef.h>
#include <stdint.h>

#include "gguf.h"
#include "kvc.h"

/* Every hyperparameter the forward pass uses, read from the GGUF. */
typedef struct kvch_llama_hparams {
    char arch[32];          /* general.architecture: "llama", "mistral", "qwen2" */
    char name[96];          /* general.name, or "" */
    uint32_t n_layer;       /* {arch}.block_count */
    uint32_t n_embd;        /* {arch}.embedding_length */
    uint32_t n_ff;          /* {arch}.feed_forward_length */
    uint32_t n_head;        /* {arch}.attention.head_count */
    uint32_t n_head_kv;     /* {arch}.attention.head_count_kv (default n_head) */
    uint32_t head_dim;      /* {arch}.attention.key_length, default n_embd / n_head */
    uint32_t n_vocab;       /* rows of token_embd */
    uint32_t n_ctx_train;   /* {arch}.context_length */
    float rms_eps;          /* {arch}.attention.layer_norm_rms_epsilon */
    int32_t rope_style;     /* KVC_ROPE_ADJACENT for llama/mistral, HALVES for qwen2 */
    uint32_t rope_dims;     /* {arch}.rope.dimension_count, default head_dim */
    float rope_theta;       /* {arch}.rope.freq_base, default 10000 */
    float rope_scale;       /* linear scaling factor ({arch}.rope.scaling.factor), 1 = none */
    int has_rope_freqs;     /* rope_freqs.weight present (Llama-3 style factors) */
    int tied_output;        /* no output.weight: logits use token_embd */
    int has_qkv_bias;       /* attn_{q,k,v}.bias present */
} kvch_llama_hparams;

/* One layer's weights, dequantized to fp32, row-major [out][in] as the GGUF
 * holds them (y = W x). Q/K rows in the order the rope_style expects. */
typedef struct kvch_llama_layer {
    float *attn_norm;           /* [n_embd] */
    float *wq;                  /* [n_head*head_dim][n_embd] */
    float *wk;                  /* [n_head_kv*head_dim][n_embd] */
    float *wv;                  /* [n_head_kv*head_dim][n_embd] */
    float *wo;                  /* [n_embd][n_head*head_dim] */
    float *bq, *bk, *bv;        /* [rows of wq/wk/wv] or NULL */
    float *ffn_norm;            /* [n_embd] */
    float *w_gate;              /* [n_ff][n_embd] */
    float *w_up;                /* [n_ff][n_embd] */
    float *w_down;              /* [n_embd][n_ff] */
} kvch_llama_layer;

typedef struct kvch_llama {
    kvch_llama_hparams hp;
    float *tok_embd;            /* [n_vocab][n_embd] */
    float *out_norm;            /* [n_embd] */
    float *output;              /* [n_vocab][n_embd]; == tok_embd when tied */
    float *rope_inv_freq;       /* [rope_dims/2] or NULL (from theta) */
    kvch_llama_layer *layers;   /* [n_layer] */
    size_t bytes_weights;       /* fp32 bytes held */
} kvch_llama;

/* Reads hyperparameters and every weight of g (dequantized to fp32; g may
 * be closed afterwards). Errors, with err naming the key or tensor:
 * UNSUPPORTED (architecture, rope scaling type, tensor type), CORRUPT
 * (missing key/tensor, shape disagreeing with the hyperparameters), NOMEM.
 * The caller frees with kvch_llama_free. */
kvc_status kvch_llama_load(const kvch_gguf *g, kvch_llama **out, char *err, size_t err_size);
void kvch_llama_free(kvch_llama *m);

/* The ABI geometry of the model (whole model, no shard, no window),
 * with max_positions = max_pos (0: the training context). rope_inv_freq
 * points into m. */
void kvch_llama_geometry(const kvch_llama *m, uint32_t max_pos, kvc_geometry *geo);

/* The layer's attention weights in the ABI's preparation layout (pointers
 * into m). */
void kvch_llama_layer_weights(const kvch_llama *m, uint32_t layer, kvc_layer_weights *w);

/* ---- KV stores: where attention happens ---------------------------------- */

/* One sequence's KV cache over every layer, behind append + attend:
 * a plugin sequence, or the built-in exact store. */
typedef struct kvch_kv kvch_kv;

/* A plugin sequence on `inst` (of plugin `p`): append and attend go to the
 * plugin. The kv owns the sequence (closed by kvch_kv_free); p and inst
 * must outlive it. */
kvc_status kvch_kv_plugin(const kvc_plugin *p, kvc_instance *inst, kvch_kv **out, char *err,
                          size_t err_size);

/* The built-in exact path: fp32 post-RoPE keys and values in host memory,
 * attention by the same streaming kernel `full` uses. For checking plugins
 * against; needs no plugin. */
kvc_status kvch_kv_exact(const kvc_geometry *geo, kvch_kv **out, char *err, size_t err_size);

void kvch_kv_free(kvch_kv *kv);

/* Drops everything (a fresh sequence for the next chunk). */
kvc_status kvch_kv_reset(kvch_kv *kv, char *err, size_t err_size);

/* The ABI operations, with the ABI's shapes (fp32, host memory). On error
 * err holds the plugin's (or the store's) message. */
kvc_status kvch_kv_append(kvch_kv *kv, uint32_t layer, uint32_t n, const int32_t *pos,
                          const float *k_pre, const float *v, const uint8_t *flags, char *err,
                          size_t err_size);
kvc_status kvch_kv_attend(kvch_kv *kv, uint32_t layer, uint32_t n, const int32_t *pos,
                          const float *q_pre, float *out, char *err, size_t err_size);

/* Resident bytes and tokens as the store reports them (the plugin's
 * seq_stats at this host's struct size, zero-filled first so a pre-1.2
 * plugin's bytes_pending reads 0; for the exact store its own fp32
 * arrays). */
kvc_status kvch_kv_stats(const kvch_kv *kv, kvc_seq_stats *st);

/* The plugin's seq_describe text for `layer` of the store's sequence (ABI
 * 1.2, KVC-REQ-21: one line per KV head, "head <h> key=value ...", always
 * with tokens=), in *text_out, malloc'd and NUL-terminated; the caller
 * frees it. KVC_E_UNSUPPORTED (*text_out untouched, err says why) for the
 * exact store and for a plugin built before 1.2; otherwise the plugin's
 * status with its message in err (INVALID for a layer out of range).
 * Reads only: the sequence is not changed. */
kvc_status kvch_kv_describe(const kvch_kv *kv, uint32_t layer, char **text_out, char *err,
                            size_t err_size);

/* ---- forward pass ----------------------------------------------------------- */

/* Called, when set, with each layer's attention input (the rows after
 * attn_norm that feed W_q/W_k/W_v): x [n][n_embd] at pos [n]. A non-OK
 * return stops the forward pass with that status. */
typedef kvc_status (*kvch_layer_hook)(void *user, uint32_t layer, uint32_t n, const int32_t *pos,
                                      const float *x);

/* Activations of one forward pass, sized for up to max_batch tokens per
 * call. One per thread. */
typedef struct kvch_llama_ctx kvch_llama_ctx;

kvc_status kvch_llama_ctx_new(const kvch_llama *m, uint32_t max_batch, kvch_llama_ctx **out,
                              char *err, size_t err_size);
void kvch_llama_ctx_free(kvch_llama_ctx *c);

/* Sets (or clears, with hook NULL) the per-layer attention-input hook. */
void kvch_llama_ctx_hook(kvch_llama_ctx *c, kvch_layer_hook hook, void *user);

/* Runs n tokens [n] at positions pos0 .. pos0+n-1 through every layer,
 * appending their K/V to kv and attending over it (one append + one attend
 * per layer: a prefill when n > 1, a decode step when n == 1). flags [n]
 * (KVC_TOKEN_*) go with the append (may be NULL). n larger than max_batch
 * is split into micro-batches. logits: NULL, or [n_logits][n_vocab] for
 * the last n_logits tokens (n_logits <= n). Errors: INVALID (token id out
 * of the vocabulary, n == 0), the store's errors with its message. */
kvc_status kvch_llama_eval(kvch_llama_ctx *c, kvch_kv *kv, const int32_t *tokens,
                           const uint8_t *flags, uint32_t n, int32_t pos0, float *logits,
                           uint32_t n_logits, char *err, size_t err_size);

/* ---- the pass one layer at a time --------------------------------------------- */
/* What kvch_llama_eval does, in pieces, for hosts that run layer-major (the
 * sequential calibration of kvch_prepare): embed, then kvch_llama_eval_layer for
 * layer 0 .. n_layer-1, then (for logits) kvch_rmsnorm with out_norm and
 * kvch_linear with `output`. Same arithmetic as eval, bit for bit. */

/* x [n][n_embd] = the embedding rows of tokens [n] (each < n_vocab; not
 * checked here). */
void kvch_llama_embed(const kvch_llama *m, const int32_t *tokens, uint32_t n, float *x);

/* Runs layer `layer` for n tokens (n <= the context's max_batch) at
 * positions pos0 .. pos0+n-1: x [n][n_embd] is the residual stream, read
 * and updated in place; the layer's attention input (the rows after
 * attn_norm that feed W_q/W_k/W_v) is written to xn_out [n][n_embd] when
 * not NULL (it must not overlap x). Attention is this layer's only: one
 * append + one attend of `layer` in kv, flags [n] with the append (may be
 * NULL). The context's hook, if set, sees the attention input too. x and
 * xn_out are the caller's; the context's buffers are scratch. Errors
 * (x unchanged): INVALID (layer out of range, n == 0 or above max_batch,
 * pos0 < 0), the store's errors with its message, the hook's status. */
kvc_status kvch_llama_eval_layer(kvch_llama_ctx *c, kvch_kv *kv, uint32_t layer, uint32_t n,
                                 int32_t pos0, const uint8_t *flags, float *x, float *xn_out,
                                 char *err, size_t err_size);

/* ---- pieces, exposed for tests ---------------------------------------------- */

/* y[i] = x[i] / sqrt(mean(x^2) + eps) * w[i], for rows [n][d]. y == x ok. */
void kvch_rmsnorm(const float *x, const float *w, float eps, size_t n, size_t d, float *y);

/* g[i] = silu(g[i]) * u[i] over [n] values; silu(z) = z / (1 + e^-z). */
void kvch_swiglu(float *g, const float *u, size_t n);

/* y [n][out] = x [n][in] W^T (+ b) for W [out][in]: CBLAS SGEMM. */
void kvch_linear(const float *x, const float *w, const float *b, size_t n, size_t in,
                 size_t out, float *y);

/* log softmax of row [n] at index `target` (double accumulation). */
double kvch_log_softmax_at(const float *row, size_t n, size_t target);

/* The log softmax of row [n] in two pieces: returns the row's maximum m and
 * sets *log_z = log(sum_i exp(row[i] - m)) (double accumulation), so that
 * log p_i = (row[i] - m) - *log_z. kvch_log_softmax_at is built on it. */
double kvch_log_softmax_norm(const float *row, size_t n, double *log_z);

#endif /* KVCH_LLAMA_H */
