/*
 * kvck.h -- kvc's compute kernels (CPU), shared by plugins and the host.
 *
 * Internal API (static library, hidden in plugins): not part of the ABI.
 * Kernels never allocate: callers pass scratch sized by the *_floats()
 * helpers, so every byte a plugin holds goes through the host allocator.
 * All functions are thread-safe on distinct data. Shapes are in the comment
 * beside each buffer, outermost first.
 */
#ifndef KVCK_H
#define KVCK_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KVCK_MAX_HEAD_DIM 512

/* ---- half precision (IEEE binary16, round to nearest even) ------------- */

uint16_t kvck_f32_to_f16(float x);
float kvck_f16_to_f32(uint16_t h);
void kvck_f32_to_f16_n(const float *in /* [n] */, uint16_t *out /* [n] */, size_t n);
void kvck_f16_to_f32_n(const uint16_t *in /* [n] */, float *out /* [n] */, size_t n);

/* 1 when every one of the n values is finite, else 0. */
int kvck_all_finite(const float *x /* [n] */, size_t n);

/* ---- rotary position embedding ----------------------------------------- */

/* style values equal KVC_ROPE_NONE/ADJACENT/HALVES of abi/kvc.h. */
typedef struct kvck_rope {
    int style;        /* 0 none, 1 adjacent pairs (2i, 2i+1), 2 halves (i, i + dims/2) */
    int head_dim;     /* elements per head */
    int dims;         /* rotated elements from the start of each head (even, <= head_dim) */
    float mscale;     /* multiplies cos and sin */
    float inv_freq[KVCK_MAX_HEAD_DIM / 2]; /* [dims/2] angle per position of pair i */
} kvck_rope;

/* Fills r. dims == 0 means head_dim. inv_freq == NULL means
 * theta^(-2i/dims). mscale == 0 means 1. Returns 0, or -1 when the shape is
 * invalid (odd dims, dims > head_dim, head_dim > KVCK_MAX_HEAD_DIM, bad
 * style, theta <= 0 without inv_freq). */
int kvck_rope_init(kvck_rope *r, int style, int head_dim, int dims,
                   float theta, const float *inv_freq, float mscale);

/* Rotates every head of n_tok tokens: x [n_tok][n_heads][head_dim] at
 * pos [n_tok] into y (same shape; y == x allowed). Angles are computed in
 * double and rounded once, so results do not depend on batching. */
void kvck_rope_apply(const kvck_rope *r, size_t n_tok, size_t n_heads,
                     const int32_t *pos, const float *x, float *y);

/* ---- attention: streaming (flash-style) online softmax ------------------ */

/* Attention of `rows` query rows over keys fed block by block. Rows are
 * n_q queries times `group` query heads sharing one KV head, row
 * r = query (r / group), head (r % group). A key at position kp is visible
 * to a row whose query is at position qp iff kp <= qp and, when window > 0,
 * qp - kp < window (and within q_hi/q_lo when set). Scores in fp32 with a
 * running max per row. */
typedef struct kvck_attn {
    size_t rows, group, dk, dv, block;
    uint32_t window;
    const int32_t *q_pos; /* [rows / group] positions of the queries */
    /* Optional per-query bounds (kvck_quant.h, kvck_attn_bounds): a key at
     * kp is visible to query t only if kp <= q_hi[t] (instead of q_pos[t])
     * and q_lo[t] < kp. NULL (as kvck_attn_init sets them) = no such bound.
     * The window is still measured from q_pos[t]. */
    const int32_t *q_hi; /* [rows / group] or NULL */
    const int32_t *q_lo; /* [rows / group] or NULL */
    /* kvck_attn_block_src only: nonzero = rows go through the kernels in
     * tiles of the few-row size, so a row's sums do not depend on how many
     * other rows the pass holds (kvck_attn_row_invariant). */
    int row_invariant;
    float *m;   /* [rows] running max of scores */
    float *l;   /* [rows] running sum of exp(score - m) */
    float *acc; /* [rows][dv] running sum of p * v */
    float *s;   /* [rows][block] scores of the current block */
} kvck_attn;

/* Floats of scratch kvck_attn_init needs. */
size_t kvck_attn_scratch_floats(size_t rows, size_t dv, size_t block);

/* Starts a pass. q_pos must stay valid until kvck_attn_finish. */
void kvck_attn_init(kvck_attn *a, size_t rows, size_t group, size_t dk,
                    size_t dv, size_t block, uint32_t window,
                    const int32_t *q_pos, float *scratch);

/* Folds n <= block keys into the pass. q [rows][ldq] are the queries,
 * already rotated and multiplied by the attention scale; k [n][ldk]
 * post-RoPE keys; v [n][ldv] values (dv wide); k_pos [n] their positions.
 * Rows that see none of the block's keys are skipped. */
void kvck_attn_block(kvck_attn *a, const float *q, size_t ldq,
                     const float *k, size_t ldk, const float *v, size_t ldv,
                     const int32_t *k_pos, size_t n);

/* Writes acc / l to out [rows][ldo] (dv wide). A row that saw no key gets
 * zeros. */
void kvck_attn_finish(const kvck_attn *a, float *out, size_t ldo);

/* ---- explicit-softmax pieces --------------------------------------------- */
/* For plugins that need the attention probabilities themselves (token
 * eviction keeps cumulative attention per key): the same score, max, exp
 * and P.V code the streaming kernel runs, AVX2 for few rows where the CPU
 * has it, CBLAS otherwise. */

/* s [rows][lds] (first n columns) = q [rows][ldq] . k [n][ldk]^T, d wide. */
void kvck_scores(size_t rows, size_t d, const float *q, size_t ldq, const float *k, size_t ldk,
                 size_t n, float *s, size_t lds);

/* acc [rows][dv] += p [rows][ldp] (n wide) . v [n][ldv]. */
void kvck_pv(size_t rows, size_t dv, const float *p, size_t ldp, const float *v, size_t ldv,
             size_t n, float *acc);

/* Largest of s [n] (-inf when n == 0 or all are -inf). */
float kvck_row_max(const float *s, size_t n);

/* s [n] <- exp(s - m), -inf giving 0; returns the sum. */
float kvck_row_exp(float *s, size_t n, float m);

/* ---- whole attention over dense token-major arrays ---------------------- */

/* Shape and rules of one dense attention call. */
typedef struct kvck_dense {
    const kvck_rope *rope;
    float scale;      /* score scale, e.g. 1/sqrt(head_dim) */
    uint32_t window;  /* 0 = none */
    size_t n_heads;   /* query heads, multiple of n_kv_heads */
    size_t n_kv_heads;
    size_t head_dim;
} kvck_dense;

/* Floats of scratch kvck_attention needs for n_q queries and n_k keys. */
size_t kvck_attention_scratch_floats(const kvck_dense *d, size_t n_q, size_t n_k);

/* Fast path: q_pre [n_q][n_heads][head_dim] at q_pos [n_q] attend over
 * k_pre, v [n_k][n_kv_heads][head_dim] at k_pos [n_k] (pre-RoPE, any order
 * of positions), causally by position, into out [n_q][n_heads][head_dim].
 * Blocked, CBLAS GEMMs. */
void kvck_attention(const kvck_dense *d, size_t n_q, const int32_t *q_pos,
                    const float *q_pre, size_t n_k, const int32_t *k_pos,
                    const float *k_pre, const float *v, float *out,
                    float *scratch);

/* Plain reference of kvck_attention, everything (RoPE included) in double,
 * no blocking, no BLAS: for tests only. out [n_q][n_heads][head_dim]. */
void kvck_attention_ref(const kvck_dense *d, size_t n_q, const int32_t *q_pos,
                        const float *q_pre, size_t n_k, const int32_t *k_pos,
                        const float *k_pre, const float *v, double *out);


/* ---- GGML tensor types: dequantization --------------------------------- */

/* ggml type ids, as stored in GGUF files (frozen by ggml). */
enum {
    KVCK_GGML_F32 = 0, KVCK_GGML_F16 = 1, KVCK_GGML_Q4_0 = 2, KVCK_GGML_Q4_1 = 3,
    KVCK_GGML_Q5_0 = 6, KVCK_GGML_Q5_1 = 7, KVCK_GGML_Q8_0 = 8, KVCK_GGML_Q8_1 = 9,
    KVCK_GGML_Q2_K = 10, KVCK_GGML_Q3_K = 11, KVCK_GGML_Q4_K = 12, KVCK_GGML_Q5_K = 13,
    KVCK_GGML_Q6_K = 14, KVCK_GGML_Q8_K = 15, KVCK_GGML_BF16 = 30
};

/* Name of a ggml type id in ggml's spelling ("q4_1", "q6_K", "bf16");
 * "unknown" for ids not in the enum above (ggml defines more, e.g. the IQ
 * types, but kvc does not know them). Static string. */
const char *kvck_ggml_type_name(uint32_t type);

/* Elements per block and bytes per block of a type (1 and 4 for f32,
 * 32 and 20 for q4_1, 256 and 210 for q6_K); 0 for ids not in the enum
 * above. Every id in the enum is in the size table, even those without a
 * dequantizer, so a GGUF reader can size tensors it cannot read. */
size_t kvck_ggml_block_elems(uint32_t type);
size_t kvck_ggml_block_bytes(uint32_t type);

/* 1 when kvck_dequantize handles the type: F32, F16, BF16, Q4_0, Q4_1,
 * Q8_0, Q6_K. */
int kvck_ggml_can_dequantize(uint32_t type);

/* Dequantizes n elements (a multiple of the block size) of `type` from src
 * (n / block_elems blocks of little-endian file data, any byte alignment)
 * to dst [n]. Results equal ggml's reference dequantize_row_* bit for bit
 * (f16 NaNs come back quieted). Returns 0 (n == 0 does nothing), or -1,
 * dst untouched, for a type without a dequantizer, n not a multiple of the
 * block, or a NULL pointer with n > 0. */
int kvck_dequantize(uint32_t type, const void *src, float *dst, size_t n);

#ifdef __cplusplus
}
#endif

#endif /* KVCK_H */
