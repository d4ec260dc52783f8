/* rope.cu -- rotary position embedding on the device (kvck_rope_apply's
 * twin): one thread per (token, rotated pair or passed-through element),
 * looping over heads so cos and sin are computed once per token and pair. */
#include <cuda_runtime.h>
#include <limits.h>

#include "kvck_cuda.h"

namespace {

constexpr int ROPE_THREADS = 256;
constexpr unsigned ROPE_MAX_BLOCKS = 1u << 20;

/* r travels by value (kernel parameter space); its inv_freq is copied to
 * shared memory once per block, since lanes index it differently. */
__global__ void __launch_bounds__(ROPE_THREADS)
rope_kernel(const kvck_rope r, size_t n_tok, int n_heads,
            const int32_t *__restrict__ pos, const float *x, float *y)
{
    __shared__ float inv[KVCK_MAX_HEAD_DIM / 2];
    const int hd = r.head_dim, half = r.dims / 2;
    for (int i = threadIdx.x; i < half; i += blockDim.x)
        inv[i] = r.inv_freq[i];
    __syncthreads();

    const int per_tok = half + (hd - r.dims); /* pairs, then copied tail */
    const size_t total = n_tok * (size_t)per_tok;
    const double ms = (double)r.mscale;
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
         idx < total; idx += (size_t)gridDim.x * blockDim.x) {
        const size_t tok = idx / per_tok;
        const int j = (int)(idx % per_tok);
        const float *xt = x + tok * n_heads * hd; /* [n_heads][hd] */
        float *yt = y + tok * n_heads * hd;
        if (j < half) {
            /* angle in double, cos/sin rounded once: batch-independent */
            double s, c;
            sincos((double)pos[tok] * (double)inv[j], &s, &c);
            const float cf = (float)(c * ms), sf = (float)(s * ms);
            const int i0 = r.style == 1 ? 2 * j : j;
            const int i1 = r.style == 1 ? 2 * j + 1 : j + half;
            for (int h = 0; h < n_heads; ++h) {
                const float x0 = xt[h * hd + i0], x1 = xt[h * hd + i1];
                /* _rn: no FMA contraction, as the plain C expression */
                yt[h * hd + i0] = __fsub_rn(__fmul_rn(x0, cf), __fmul_rn(x1, sf));
                yt[h * hd + i1] = __fadd_rn(__fmul_rn(x0, sf), __fmul_rn(x1, cf));
            }
        } else {
            const int e = r.dims + (j - half);
            for (int h = 0; h < n_heads; ++h)
                yt[h * hd + e] = xt[h * hd + e];
        }
    }
}

} // namespace

extern "C" int kvck_cuda_rope(const kvck_rope *r, size_t n_tok,
                              size_t n_heads, const int32_t *d_pos,
                              const float *d_x, float *d_y, void *stream)
{
    if (!r || r->style < 0 || r->style > 2 || r->head_dim <= 0 ||
        r->head_dim > KVCK_MAX_HEAD_DIM || r->dims < 0 || (r->dims & 1) ||
        r->dims > r->head_dim || n_heads > (size_t)INT_MAX / r->head_dim)
        return (int)cudaErrorInvalidValue;
    if (n_tok == 0 || n_heads == 0)
        return 0;
    if (!d_x || !d_y || (r->style != 0 && !d_pos))
        return (int)cudaErrorInvalidValue;
    cudaStream_t st = (cudaStream_t)stream;
    const size_t bytes = n_tok * n_heads * (size_t)r->head_dim * sizeof(float);
    if (r->style == 0 || r->dims == 0) { /* nothing rotates */
        if (d_y == d_x)
            return 0;
        return (int)cudaMemcpyAsync(d_y, d_x, bytes, cudaMemcpyDeviceToDevice, st);
    }
    const size_t per_tok = (size_t)(r->dims / 2 + (r->head_dim - r->dims));
    size_t blocks = (n_tok * per_tok + ROPE_THREADS - 1) / ROPE_THREADS;
    if (blocks > ROPE_MAX_BLOCKS)
        blocks = ROPE_MAX_BLOCKS;
    rope_kernel<<<(unsigned)blocks, ROPE_THREADS, 0, st>>>(
        *r, n_tok, (int)n_heads, d_pos, d_x, d_y);
    return (int)cudaGetLastError();
}
