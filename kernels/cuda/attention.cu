/* attention.cu -- causal GQA attention on the device (kvck_attention's twin).
 *
 * One pass, flash-style, on CUDA cores in fp32 (tensor cores would round the
 * operands to tf32/fp16 and miss the 1e-5 contract):
 *   - a block owns R rows of one KV head (row = query x query head of the
 *     head's group, as in kvck_attn) and one split of the keys;
 *   - keys come in tiles of TK through shared memory; a tile no row can see
 *     (by position, causal and window) is skipped before it is loaded, which
 *     is what makes causal prefill cost half a square;
 *   - scores, a running max and sum per row (online softmax), p*V in
 *     registers; everything fp32, exp through expf (not __expf);
 *   - long key ranges (decode: one query, many keys) are cut into splits so
 *     the grid fills the device; each split leaves (m, l, acc) in scratch and
 *     a second kernel merges them (flash-decoding).
 * The split count depends on the shape only, so the scratch size does too.
 */
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <limits.h>
#include <math.h>

#include "kvck_cuda.h"

namespace {

constexpr int NT = 128;             /* threads per block */
constexpr int TARGET_BLOCKS = 512;  /* splits aim at this many blocks */
constexpr int MIN_SPLIT_KEYS = 128; /* no split shorter than this */
constexpr size_t ALIGN_FLOATS = 64; /* scratch regions start 256-byte aligned */

/* Everything a launch needs; computed from the shape alone. */
struct Plan {
    int hd;        /* head_dim */
    int D;         /* head_dim padded to 32, 64, 128, 256 or 512 */
    int R;         /* rows per block */
    int TK;        /* keys per tile */
    int group;     /* query heads per KV head */
    int rows;      /* n_q * group: rows per KV head */
    int row_tiles; /* ceil(rows / R) */
    int n_split;   /* key splits (1 = no merge pass) */
    int split_keys;/* keys per split, a multiple of TK */
    size_t q_floats, k_floats, part_floats; /* scratch regions, aligned */
};

size_t align_up(size_t n) { return (n + ALIGN_FLOATS - 1) / ALIGN_FLOATS * ALIGN_FLOATS; }

/* 0 and p filled, or -1 for a shape kvck_attention would not take. */
int plan_make(const kvck_dense *d, size_t n_q, size_t n_k, Plan *p)
{
    if (!d || d->head_dim == 0 || d->head_dim > KVCK_MAX_HEAD_DIM ||
        d->n_kv_heads == 0 || d->n_heads == 0 ||
        d->n_heads % d->n_kv_heads != 0 || d->n_kv_heads > 65535 ||
        !(d->scale == d->scale))
        return -1;
    const kvck_rope *r = d->rope;
    if (r && (r->style < 0 || r->style > 2 || r->head_dim != (int)d->head_dim ||
              r->dims < 0 || (r->dims & 1) || r->dims > r->head_dim))
        return -1;
    const size_t group = d->n_heads / d->n_kv_heads;
    if (n_q > (size_t)INT_MAX / d->n_heads || n_k > (size_t)INT_MAX)
        return -1;
    p->hd = (int)d->head_dim;
    p->D = 32;
    while (p->D < p->hd)
        p->D *= 2;
    p->TK = p->D <= 64 ? 64 : p->D == 128 ? 32 : p->D == 256 ? 16 : 8;
    p->group = (int)group;
    p->rows = (int)(n_q * group);
    p->R = (p->rows <= 8 || p->D == 512) ? 8 : p->D == 256 ? 16 : 32;
    p->row_tiles = (p->rows + p->R - 1) / p->R;

    const size_t base = (size_t)p->row_tiles * d->n_kv_heads;
    size_t n_split = 1;
    if (n_k > 0 && base > 0) {
        size_t want = (TARGET_BLOCKS + base - 1) / base;
        size_t most = (n_k + MIN_SPLIT_KEYS - 1) / MIN_SPLIT_KEYS;
        n_split = want < most ? want : most;
        if (n_split < 1)
            n_split = 1;
    }
    size_t per = n_k == 0 ? (size_t)p->TK : (n_k + n_split - 1) / n_split;
    per = (per + p->TK - 1) / p->TK * p->TK;
    if (n_k > 0)
        n_split = (n_k + per - 1) / per;
    p->n_split = (int)n_split;
    p->split_keys = (int)per;

    const size_t nr = n_q * d->n_heads;
    p->q_floats = align_up(nr * d->head_dim);
    p->k_floats = align_up(n_k * d->n_kv_heads * d->head_dim);
    p->part_floats = n_split > 1 ? align_up(n_split * nr * (d->head_dim + 2)) : 0;
    return 0;
}

struct Args {
    const float *q;          /* [n_q][n_heads][hd], rotated, unscaled */
    const void *k, *v;       /* element (float or __half) at tok*tok + head*head */
    size_t k_tok, k_head, v_tok, v_head; /* strides in elements */
    const int32_t *q_pos;    /* [n_q] */
    const int32_t *k_pos;    /* [n_k] */
    float *out;              /* [n_q][n_heads][hd], when n_split == 1 */
    float *part;             /* m [n_split][nr], l [n_split][nr], acc [n_split][nr][hd] */
    int n_q, n_k, n_heads, group, hd, n_split, split_keys;
    int vec4;                /* K and V rows load in aligned chunks of 4 */
    unsigned window;
    float scale;
};

template <typename T> __device__ __forceinline__ float ld1(const T *p);
template <> __device__ __forceinline__ float ld1<float>(const float *p) { return __ldg(p); }
template <> __device__ __forceinline__ float ld1<__half>(const __half *p) { return __half2float(__ldg(p)); }

template <typename T> __device__ __forceinline__ float4 ld4(const T *p);
template <> __device__ __forceinline__ float4 ld4<float>(const float *p)
{
    return __ldg(reinterpret_cast<const float4 *>(p));
}
template <> __device__ __forceinline__ float4 ld4<__half>(const __half *p)
{
    const uint2 raw = __ldg(reinterpret_cast<const uint2 *>(p));
    const float2 a = __half22float2(*reinterpret_cast<const __half2 *>(&raw.x));
    const float2 b = __half22float2(*reinterpret_cast<const __half2 *>(&raw.y));
    return make_float4(a.x, a.y, b.x, b.y);
}

__device__ __forceinline__ float warp_max(float x)
{
    for (int o = 16; o > 0; o /= 2)
        x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

__device__ __forceinline__ float warp_sum(float x)
{
    for (int o = 16; o > 0; o /= 2)
        x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

__device__ __forceinline__ bool visible(int kp, int qp, unsigned window)
{
    return kp <= qp && (window == 0 || (long long)qp - kp < (long long)window);
}

template <int D, int R, int TK>
constexpr size_t smem_bytes()
{
    return sizeof(float) * (size_t)(R * (D + 1) + TK * (D + 1) + TK * D + R * TK + 3 * R) +
           sizeof(int) * (size_t)(R + TK);
}

/* grid (row_tiles, n_kv_heads, n_split), NT threads. */
template <int D, int R, int TK, typename T>
__global__ void __launch_bounds__(NT) attn_kernel(const Args a)
{
    constexpr int DP = D + 1;          /* padded rows: conflict-free column reads */
    constexpr int NRG = NT / TK;       /* row groups in the score phase */
    constexpr int RPT = (R + NRG - 1) / NRG; /* score rows per thread */
    constexpr int OPT = R * D / NT;    /* outputs per thread */
    static_assert(NT % TK == 0 && TK <= NT, "tile");
    static_assert((R * D) % NT == 0 && OPT >= 1, "rows x dims vs threads");

    extern __shared__ float sm[];
    float *Qs = sm;               /* [R][DP] q * scale */
    float *Ks = Qs + R * DP;      /* [TK][DP] */
    float *Vs = Ks + TK * DP;     /* [TK][D] */
    float *Ss = Vs + TK * D;      /* [R][TK] scores, then p */
    float *row_m = Ss + R * TK;   /* [R] running max */
    float *row_l = row_m + R;     /* [R] running sum */
    float *row_alpha = row_l + R; /* [R] rescale of this tile */
    int *qpos_s = reinterpret_cast<int *>(row_alpha + R); /* [R] */
    int *kpos_s = qpos_s + R;     /* [TK] */

    const int t = threadIdx.x;
    const int h = blockIdx.y, s = blockIdx.z;
    const int row0 = blockIdx.x * R;
    const int nvalid = min(R, a.n_q * a.group - row0); /* rows r < nvalid exist */

    for (int i = t; i < R * D; i += NT) {
        const int r = i / D, dd = i % D;
        float x = 0.f;
        if (r < nvalid && dd < a.hd) {
            const int gr = row0 + r;
            const int head = h * a.group + gr % a.group;
            x = a.q[((size_t)(gr / a.group) * a.n_heads + head) * a.hd + dd] * a.scale;
        }
        Qs[r * DP + dd] = x;
    }
    if (t < R) {
        qpos_s[t] = t < nvalid ? a.q_pos[(row0 + t) / a.group] : 0;
        row_m[t] = -INFINITY;
        row_l[t] = 0.f;
    }
    __syncthreads();
    int qmin = INT_MAX, qmax = INT_MIN;
    for (int r = 0; r < nvalid; ++r) {
        qmin = min(qmin, qpos_s[r]);
        qmax = max(qmax, qpos_s[r]);
    }

    float acc[OPT];
#pragma unroll
    for (int u = 0; u < OPT; ++u)
        acc[u] = 0.f;

    const T *kb = static_cast<const T *>(a.k) + (size_t)h * a.k_head;
    const T *vb = static_cast<const T *>(a.v) + (size_t)h * a.v_head;
    const int k_begin = s * a.split_keys;
    const int k_end = min(a.n_k, k_begin + a.split_keys);

    for (int k0 = k_begin; k0 < k_end; k0 += TK) {
        const int n = min(TK, k_end - k0);
        /* positions first: a tile no row can see is not loaded at all */
        int maybe = 0;
        if (t < TK) {
            int kp = 0;
            if (t < n) {
                kp = a.k_pos[k0 + t];
                /* superset of "some row sees it": kp <= qmax, qmin - kp < window */
                maybe = kp <= qmax &&
                        (a.window == 0 || (long long)qmin - kp < (long long)a.window);
            }
            kpos_s[t] = kp;
        }
        if (!__syncthreads_or(maybe))
            continue;

        if (a.vec4) {
            for (int i = t; i < TK * D / 4; i += NT) {
                const int j = i * 4 / D, dd = i * 4 % D;
                float4 kx = make_float4(0.f, 0.f, 0.f, 0.f), vx = kx;
                if (j < n && dd < a.hd) {
                    const size_t tok = (size_t)(k0 + j);
                    kx = ld4(kb + tok * a.k_tok + dd);
                    vx = ld4(vb + tok * a.v_tok + dd);
                }
                float *kd = Ks + j * DP + dd, *vd = Vs + j * D + dd;
                kd[0] = kx.x; kd[1] = kx.y; kd[2] = kx.z; kd[3] = kx.w;
                vd[0] = vx.x; vd[1] = vx.y; vd[2] = vx.z; vd[3] = vx.w;
            }
        } else {
            for (int i = t; i < TK * D; i += NT) {
                const int j = i / D, dd = i % D;
                float kx = 0.f, vx = 0.f;
                if (j < n && dd < a.hd) {
                    const size_t tok = (size_t)(k0 + j);
                    kx = ld1(kb + tok * a.k_tok + dd);
                    vx = ld1(vb + tok * a.v_tok + dd);
                }
                Ks[j * DP + dd] = kx;
                Vs[j * D + dd] = vx;
            }
        }
        __syncthreads();

        { /* scores: thread = one key x RPT rows */
            const int j = t % TK, rg = t / TK;
            float sc[RPT];
#pragma unroll
            for (int u = 0; u < RPT; ++u)
                sc[u] = 0.f;
#pragma unroll 8
            for (int dd = 0; dd < D; ++dd) {
                const float kx = Ks[j * DP + dd];
#pragma unroll
                for (int u = 0; u < RPT; ++u) {
                    const int r = rg + u * NRG;
                    if (r < R)
                        sc[u] = fmaf(Qs[r * DP + dd], kx, sc[u]);
                }
            }
            const int kp = kpos_s[j];
#pragma unroll
            for (int u = 0; u < RPT; ++u) {
                const int r = rg + u * NRG;
                if (r < R)
                    Ss[r * TK + j] = (r < nvalid && j < n && visible(kp, qpos_s[r], a.window))
                                         ? sc[u] : -INFINITY;
            }
        }
        __syncthreads();

        { /* online softmax: one warp per row */
            const int warp = t / 32, lane = t % 32;
            for (int r = warp; r < R; r += NT / 32) {
                float mx = -INFINITY;
                for (int j = lane; j < TK; j += 32)
                    mx = fmaxf(mx, Ss[r * TK + j]);
                mx = warp_max(mx);
                const float m_old = row_m[r];
                const float m_new = fmaxf(m_old, mx);
                float alpha = 1.f, sum = 0.f;
                if (m_new == -INFINITY) { /* nothing seen yet */
                    for (int j = lane; j < TK; j += 32)
                        Ss[r * TK + j] = 0.f;
                } else {
                    alpha = expf(m_old - m_new); /* 0 when m_old = -inf */
                    for (int j = lane; j < TK; j += 32) {
                        const float pj = expf(Ss[r * TK + j] - m_new);
                        Ss[r * TK + j] = pj;
                        sum += pj;
                    }
                }
                sum = warp_sum(sum); /* also orders the m_old reads before the write */
                if (lane == 0) {
                    row_alpha[r] = alpha;
                    row_m[r] = m_new;
                    row_l[r] = row_l[r] * alpha + sum;
                }
            }
        }
        __syncthreads();

        /* acc = acc * alpha + p V; no barrier after: the next tile's loads
         * wait behind __syncthreads_or, which every thread reaches only
         * after this */
#pragma unroll
        for (int u = 0; u < OPT; ++u) {
            const int o = t + u * NT, r = o / D, dd = o % D;
            float x = acc[u] * row_alpha[r];
#pragma unroll 8
            for (int j = 0; j < TK; ++j)
                x = fmaf(Ss[r * TK + j], Vs[j * D + dd], x);
            acc[u] = x;
        }
    }

    const size_t nr = (size_t)a.n_q * a.n_heads;
#pragma unroll
    for (int u = 0; u < OPT; ++u) {
        const int o = t + u * NT, r = o / D, dd = o % D;
        if (r >= nvalid || dd >= a.hd)
            continue;
        const int gr = row0 + r;
        const size_t row = (size_t)(gr / a.group) * a.n_heads + h * a.group + gr % a.group;
        if (a.n_split == 1) {
            const float l = row_l[r];
            a.out[row * a.hd + dd] = l > 0.f ? acc[u] / l : 0.f;
        } else {
            a.part[2 * a.n_split * nr + ((size_t)s * nr + row) * a.hd + dd] = acc[u];
        }
    }
    if (a.n_split > 1 && t < nvalid) {
        const int gr = row0 + t;
        const size_t row = (size_t)(gr / a.group) * a.n_heads + h * a.group + gr % a.group;
        a.part[(size_t)s * nr + row] = row_m[t];
        a.part[a.n_split * nr + (size_t)s * nr + row] = row_l[t];
    }
}

/* Merges the splits' partial softmaxes: grid (n_q * n_heads), threads over
 * head_dim. A row no split saw gets zeros. */
__global__ void __launch_bounds__(NT)
merge_kernel(const float *__restrict__ part, int n_split, size_t nr, int hd,
             float *__restrict__ out)
{
    const size_t row = blockIdx.x;
    const float *pm = part, *pl = part + n_split * nr;
    const float *pa = part + 2 * n_split * nr;
    float m = -INFINITY;
    for (int s = 0; s < n_split; ++s)
        m = fmaxf(m, pm[s * nr + row]);
    for (int dd = threadIdx.x; dd < hd; dd += blockDim.x) {
        float l = 0.f, x = 0.f;
        if (m != -INFINITY) {
            for (int s = 0; s < n_split; ++s) {
                const float ms = pm[s * nr + row];
                if (ms == -INFINITY)
                    continue;
                const float w = expf(ms - m);
                l = fmaf(w, pl[s * nr + row], l);
                x = fmaf(w, pa[(s * nr + row) * hd + dd], x);
            }
        }
        out[row * hd + dd] = l > 0.f ? x / l : 0.f;
    }
}

template <int D, int R, typename T>
cudaError_t launch(const Plan &p, const Args &a, unsigned n_kv, cudaStream_t st)
{
    constexpr int TK = D <= 64 ? 64 : D == 128 ? 32 : D == 256 ? 16 : 8;
    constexpr size_t smem = smem_bytes<D, R, TK>();
    void (*kern)(const Args) = attn_kernel<D, R, TK, T>;
    if (smem > 48 * 1024) {
        const cudaError_t e = cudaFuncSetAttribute(
            kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (e != cudaSuccess)
            return e;
    }
    const dim3 grid((unsigned)p.row_tiles, n_kv, (unsigned)p.n_split);
    kern<<<grid, NT, smem, st>>>(a);
    return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch(const Plan &p, const Args &a, unsigned n_kv, cudaStream_t st)
{
    const bool few = p.R == 8;
    switch (p.D) {
    case 32: return few ? launch<32, 8, T>(p, a, n_kv, st) : launch<32, 32, T>(p, a, n_kv, st);
    case 64: return few ? launch<64, 8, T>(p, a, n_kv, st) : launch<64, 32, T>(p, a, n_kv, st);
    case 128: return few ? launch<128, 8, T>(p, a, n_kv, st) : launch<128, 32, T>(p, a, n_kv, st);
    case 256: return few ? launch<256, 8, T>(p, a, n_kv, st) : launch<256, 16, T>(p, a, n_kv, st);
    case 512: return launch<512, 8, T>(p, a, n_kv, st);
    default: return cudaErrorInvalidValue;
    }
}

bool aligned(const void *ptr, size_t bytes)
{
    return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

/* Shared tail of both entry points: q (rotated) and k/v laid out per args. */
template <typename T>
int run(const kvck_dense *d, const Plan &p, size_t n_q, const int32_t *q_pos,
        const float *q, size_t n_k, const int32_t *k_pos, const T *k,
        size_t k_tok, size_t k_head, const T *v, size_t v_tok, size_t v_head,
        float *out, float *part, cudaStream_t st)
{
    Args a;
    a.q = q;
    a.k = k;
    a.v = v;
    a.k_tok = k_tok;
    a.k_head = k_head;
    a.v_tok = v_tok;
    a.v_head = v_head;
    a.q_pos = q_pos;
    a.k_pos = k_pos;
    a.out = out;
    a.part = part;
    a.n_q = (int)n_q;
    a.n_k = (int)n_k;
    a.n_heads = (int)d->n_heads;
    a.group = p.group;
    a.hd = p.hd;
    a.n_split = p.n_split;
    a.split_keys = p.split_keys;
    a.vec4 = p.hd % 4 == 0 && k_tok % 4 == 0 && k_head % 4 == 0 &&
             v_tok % 4 == 0 && v_head % 4 == 0 && aligned(k, 4 * sizeof(T)) &&
             aligned(v, 4 * sizeof(T));
    a.window = d->window;
    a.scale = d->scale;
    cudaError_t e = dispatch<T>(p, a, (unsigned)d->n_kv_heads, st);
    if (e != cudaSuccess || p.n_split == 1)
        return (int)e;
    const size_t nr = n_q * d->n_heads;
    merge_kernel<<<(unsigned)nr, p.hd <= 64 ? 64 : NT, 0, st>>>(part, p.n_split, nr, p.hd, out);
    return (int)cudaGetLastError();
}

bool rotates(const kvck_dense *d)
{
    return d->rope && d->rope->style != 0 && d->rope->dims > 0;
}

} // namespace

extern "C" size_t kvck_cuda_attention_scratch_floats(const kvck_dense *d,
                                                     size_t n_q, size_t n_k)
{
    Plan p;
    if (plan_make(d, n_q, n_k, &p) != 0)
        return 0;
    return p.q_floats + p.k_floats + p.part_floats;
}

extern "C" size_t kvck_cuda_attention_f16kv_scratch_floats(const kvck_dense *d,
                                                           size_t n_q, size_t n_k)
{
    Plan p;
    if (plan_make(d, n_q, n_k, &p) != 0)
        return 0;
    return p.q_floats + p.part_floats;
}

extern "C" int kvck_cuda_attention(const kvck_dense *d, size_t n_q,
                                   const int32_t *d_q_pos, const float *d_q_pre,
                                   size_t n_k, const int32_t *d_k_pos,
                                   const float *d_k_pre, const float *d_v,
                                   float *d_out, float *d_scratch, void *stream)
{
    Plan p;
    if (plan_make(d, n_q, n_k, &p) != 0)
        return (int)cudaErrorInvalidValue;
    if (n_q == 0)
        return 0;
    if (!d_q_pos || !d_q_pre || !d_out || !d_scratch ||
        (n_k > 0 && (!d_k_pos || !d_k_pre || !d_v)))
        return (int)cudaErrorInvalidValue;
    cudaStream_t st = (cudaStream_t)stream;
    const size_t hd = d->head_dim;
    if (n_k == 0)
        return (int)cudaMemsetAsync(d_out, 0, n_q * d->n_heads * hd * sizeof(float), st);

    const float *q = d_q_pre, *k = d_k_pre;
    float *q_rot = d_scratch, *k_rot = q_rot + p.q_floats;
    float *part = k_rot + p.k_floats;
    if (rotates(d)) {
        int e = kvck_cuda_rope(d->rope, n_q, d->n_heads, d_q_pos, d_q_pre, q_rot, stream);
        if (e == 0)
            e = kvck_cuda_rope(d->rope, n_k, d->n_kv_heads, d_k_pos, d_k_pre, k_rot, stream);
        if (e != 0)
            return e;
        q = q_rot;
        k = k_rot;
    }
    /* token-major [n_k][n_kv_heads][hd] */
    const size_t tok = d->n_kv_heads * hd;
    return run<float>(d, p, n_q, d_q_pos, q, n_k, d_k_pos, k, tok, hd, d_v,
                      tok, hd, d_out, part, st);
}

extern "C" int kvck_cuda_attention_f16kv(const kvck_dense *d, size_t n_q,
                                         const int32_t *d_q_pos,
                                         const float *d_q_pre, size_t n_k,
                                         const int32_t *d_k_pos,
                                         const uint16_t *d_k,
                                         const uint16_t *d_v, float *d_out,
                                         float *d_scratch, void *stream)
{
    Plan p;
    if (plan_make(d, n_q, n_k, &p) != 0)
        return (int)cudaErrorInvalidValue;
    if (n_q == 0)
        return 0;
    if (!d_q_pos || !d_q_pre || !d_out || !d_scratch ||
        (n_k > 0 && (!d_k_pos || !d_k || !d_v)))
        return (int)cudaErrorInvalidValue;
    cudaStream_t st = (cudaStream_t)stream;
    const size_t hd = d->head_dim;
    if (n_k == 0)
        return (int)cudaMemsetAsync(d_out, 0, n_q * d->n_heads * hd * sizeof(float), st);

    const float *q = d_q_pre;
    float *q_rot = d_scratch, *part = q_rot + p.q_floats;
    if (rotates(d)) {
        const int e = kvck_cuda_rope(d->rope, n_q, d->n_heads, d_q_pos, d_q_pre, q_rot, stream);
        if (e != 0)
            return e;
        q = q_rot;
    }
    /* head-major [n_kv_heads][n_k][hd] */
    const __half *k = reinterpret_cast<const __half *>(d_k);
    const __half *v = reinterpret_cast<const __half *>(d_v);
    return run<__half>(d, p, n_q, d_q_pos, q, n_k, d_k_pos, k, hd, n_k * hd, v,
                       hd, n_k * hd, d_out, part, st);
}
