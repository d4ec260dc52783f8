/*
 * kvck_cuda.h -- kvc's compute kernels on CUDA devices.
 *
 * The device twins of kvck.h: same structs, same rules (RoPE styles, the
 * mask kp <= qp and qp - kp < window, GQA grouping, zeros for a query that
 * sees no key), but every buffer named d_* is device memory and the work is
 * enqueued on `stream` (a cudaStream_t passed as void *; NULL = the legacy
 * default stream). Calls return as soon as the work is enqueued.
 *
 * Status: 0, or a cudaError_t value (cudaErrorInvalidValue, 1, for a bad
 * shape or a NULL pointer that must not be NULL; otherwise what the launch
 * reported). Nothing prints, aborts or exits. Structs passed by pointer
 * (kvck_rope, kvck_dense) are read during the call only.
 *
 * Kernels never allocate: callers pass scratch sized by the
 * *_scratch_floats() helpers, which depend on the shape only (never on the
 * device), so a plugin can size it once through the host allocator.
 * Thread-safe on distinct data; one stream per caller thread is the usual
 * way to use them.
 */
#ifndef KVCK_CUDA_H
#define KVCK_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "kvck.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Number of CUDA devices this process can use; 0 when there is none, no
 * driver, or the runtime fails for any reason (never reports loudly). */
int kvck_cuda_device_count(void);

/* Device kvck_rope_apply: rotates every head of n_tok tokens,
 * d_x [n_tok][n_heads][r->head_dim] at d_pos [n_tok], into d_y (same shape;
 * d_y == d_x allowed). Angles pos * inv_freq[i] in double, cos and sin
 * (times mscale) rounded once to float, the rotation in float. */
int kvck_cuda_rope(const kvck_rope *r, size_t n_tok, size_t n_heads,
                   const int32_t *d_pos, const float *d_x, float *d_y,
                   void *stream);

/* Floats of device scratch kvck_cuda_attention needs; 0 for an invalid
 * shape. */
size_t kvck_cuda_attention_scratch_floats(const kvck_dense *d, size_t n_q,
                                          size_t n_k);

/* Device kvck_attention: d_q_pre [n_q][n_heads][head_dim] at d_q_pos [n_q]
 * attend over d_k_pre, d_v [n_k][n_kv_heads][head_dim] at d_k_pos [n_k]
 * (pre-RoPE keys, positions in any order), causally by position, into
 * d_out [n_q][n_heads][head_dim]. Query head i uses KV head
 * i / (n_heads / n_kv_heads). d->rope == NULL means no RoPE. Q and K are
 * rotated into d_scratch, then a flash-style pass (keys in tiles through
 * shared memory, online softmax, fp32 throughout) splits long key ranges
 * across blocks and merges the partial softmaxes. d_scratch holds
 * kvck_cuda_attention_scratch_floats(d, n_q, n_k) floats. */
int kvck_cuda_attention(const kvck_dense *d, size_t n_q,
                        const int32_t *d_q_pos, const float *d_q_pre,
                        size_t n_k, const int32_t *d_k_pos,
                        const float *d_k_pre, const float *d_v, float *d_out,
                        float *d_scratch, void *stream);

/* Floats of device scratch kvck_cuda_attention_f16kv needs; 0 for an
 * invalid shape. */
size_t kvck_cuda_attention_f16kv_scratch_floats(const kvck_dense *d,
                                                size_t n_q, size_t n_k);

/* As kvck_cuda_attention over a cache stored in IEEE fp16, head-major:
 * d_k (already rotated, post-RoPE) and d_v [n_kv_heads][n_k][head_dim],
 * positions d_k_pos [n_k]. Queries are fp32 and pre-RoPE as above; scores,
 * softmax and accumulation in fp32. */
int kvck_cuda_attention_f16kv(const kvck_dense *d, size_t n_q,
                              const int32_t *d_q_pos, const float *d_q_pre,
                              size_t n_k, const int32_t *d_k_pos,
                              const uint16_t *d_k, const uint16_t *d_v,
                              float *d_out, float *d_scratch, void *stream);

#ifdef __cplusplus
}
#endif

#endif /* KVCK_CUDA_H */
