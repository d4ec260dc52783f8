/*
 * bench_cuda_attention.c -- decode attention time per token on the device.
 *
 * SmolLM2's layer geometry (9 query heads, 3 KV heads, head_dim 64, RoPE
 * adjacent pairs as a llama GGUF holds them, theta 100000), one query over
 * n_k = 1024 .. 65536 keys. For each n_k: the median of 20 timed calls
 * (cudaEvent, after 3 warm-up calls) of
 *   f32   kvck_cuda_attention: pre-RoPE fp32 K rotated into scratch every
 *         call (the kvck_attention contract), then attention;
 *   f16kv kvck_cuda_attention_f16kv: post-RoPE fp16 cache, attention only;
 * and the K+V bytes each reads divided by that time (for f32 the RoPE pass
 * moves K twice more, which the figure does not count).
 *
 * Usage: bench_cuda_attention [max_n_k]. Exits 77 without a device.
 */
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "kvck.h"
#include "kvck_cuda.h"

#define RUNS 20
#define WARMUP 3

#define CHECK(x)                                                                         \
    do {                                                                                 \
        int e_ = (int)(x);                                                               \
        if (e_ != 0) {                                                                   \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x,                   \
                    cudaGetErrorString((cudaError_t)e_));                                \
            exit(1);                                                                     \
        }                                                                                \
    } while (0)

static int cmp_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    if (kvck_cuda_device_count() == 0) {
        printf("SKIP: no CUDA device\n");
        return 77;
    }
    const size_t max_nk = argc > 1 ? strtoul(argv[1], NULL, 0) : 65536;
    const size_t nh = 9, nkv = 3, hd = 64;
    kvck_rope rope;
    CHECK(kvck_rope_init(&rope, 1, (int)hd, 0, 100000.0f, NULL, 0.0f) != 0
              ? cudaErrorInvalidValue : cudaSuccess);
    const kvck_dense d = {&rope, 1.0f / sqrtf((float)hd), 0, nh, nkv, hd};

    struct cudaDeviceProp prop;
    int dev = 0;
    CHECK(cudaGetDevice(&dev));
    CHECK(cudaGetDeviceProperties(&prop, dev));
    printf("device: %s (%d SMs)\n", prop.name, prop.multiProcessorCount);
    printf("geometry: %zu query heads, %zu KV heads, head_dim %zu, decode (n_q = 1)\n", nh, nkv,
           hd);
    printf("%8s  %12s %10s  %12s %10s\n", "n_k", "f32 us/tok", "K+V GB/s", "f16kv us/tok",
           "K+V GB/s");

    cudaStream_t st;
    CHECK(cudaStreamCreate(&st));
    cudaEvent_t e0, e1;
    CHECK(cudaEventCreate(&e0));
    CHECK(cudaEventCreate(&e1));

    for (size_t n_k = 1024; n_k <= max_nk; n_k *= 4) {
        const size_t nk_el = n_k * nkv * hd, nq_el = nh * hd;
        float *k = malloc(nk_el * sizeof *k);
        uint16_t *kh = malloc(nk_el * sizeof *kh);
        int32_t *pos = malloc(n_k * sizeof *pos);
        float q[9 * 64];
        if (!k || !kh || !pos) {
            fprintf(stderr, "out of memory\n");
            return 1;
        }
        srand(1);
        for (size_t i = 0; i < nk_el; i++)
            k[i] = (float)rand() / (float)RAND_MAX - 0.5f;
        kvck_f32_to_f16_n(k, kh, nk_el);
        for (size_t i = 0; i < n_k; i++)
            pos[i] = (int32_t)i;
        for (size_t i = 0; i < nq_el; i++)
            q[i] = (float)rand() / (float)RAND_MAX - 0.5f;
        int32_t qp = (int32_t)(n_k - 1);

        float *dk, *dv, *dq, *dout, *dscr;
        uint16_t *dkh, *dvh;
        int32_t *dpos, *dqp;
        const size_t scr = kvck_cuda_attention_scratch_floats(&d, 1, n_k);
        CHECK(cudaMalloc((void **)&dk, nk_el * sizeof *dk));
        CHECK(cudaMalloc((void **)&dv, nk_el * sizeof *dv));
        CHECK(cudaMalloc((void **)&dkh, nk_el * sizeof *dkh));
        CHECK(cudaMalloc((void **)&dvh, nk_el * sizeof *dvh));
        CHECK(cudaMalloc((void **)&dq, nq_el * sizeof *dq));
        CHECK(cudaMalloc((void **)&dout, nq_el * sizeof *dout));
        CHECK(cudaMalloc((void **)&dscr, scr * sizeof *dscr));
        CHECK(cudaMalloc((void **)&dpos, n_k * sizeof *dpos));
        CHECK(cudaMalloc((void **)&dqp, sizeof *dqp));
        CHECK(cudaMemcpy(dk, k, nk_el * sizeof *k, cudaMemcpyHostToDevice));
        CHECK(cudaMemcpy(dv, k, nk_el * sizeof *k, cudaMemcpyHostToDevice));
        CHECK(cudaMemcpy(dkh, kh, nk_el * sizeof *kh, cudaMemcpyHostToDevice));
        CHECK(cudaMemcpy(dvh, kh, nk_el * sizeof *kh, cudaMemcpyHostToDevice));
        CHECK(cudaMemcpy(dq, q, sizeof q, cudaMemcpyHostToDevice));
        CHECK(cudaMemcpy(dpos, pos, n_k * sizeof *pos, cudaMemcpyHostToDevice));
        CHECK(cudaMemcpy(dqp, &qp, sizeof qp, cudaMemcpyHostToDevice));

        float med[2];
        for (int variant = 0; variant < 2; variant++) {
            float ms[RUNS];
            for (int r = 0; r < WARMUP + RUNS; r++) {
                CHECK(cudaEventRecord(e0, st));
                if (variant == 0)
                    CHECK(kvck_cuda_attention(&d, 1, dqp, dq, n_k, dpos, dk, dv, dout, dscr, st));
                else
                    CHECK(kvck_cuda_attention_f16kv(&d, 1, dqp, dq, n_k, dpos, dkh, dvh, dout,
                                                    dscr, st));
                CHECK(cudaEventRecord(e1, st));
                CHECK(cudaEventSynchronize(e1));
                if (r >= WARMUP)
                    CHECK(cudaEventElapsedTime(&ms[r - WARMUP], e0, e1));
            }
            qsort(ms, RUNS, sizeof ms[0], cmp_float);
            med[variant] = 0.5f * (ms[RUNS / 2 - 1] + ms[RUNS / 2]);
        }
        const double b32 = 2.0 * (double)nk_el * 4.0, b16 = 2.0 * (double)nk_el * 2.0;
        printf("%8zu  %12.2f %10.1f  %12.2f %10.1f\n", n_k, med[0] * 1e3,
               b32 / (med[0] * 1e-3) / 1e9, med[1] * 1e3, b16 / (med[1] * 1e-3) / 1e9);

        CHECK(cudaFree(dk));
        CHECK(cudaFree(dv));
        CHECK(cudaFree(dkh));
        CHECK(cudaFree(dvh));
        CHECK(cudaFree(dq));
        CHECK(cudaFree(dout));
        CHECK(cudaFree(dscr));
        CHECK(cudaFree(dpos));
        CHECK(cudaFree(dqp));
        free(k);
        free(kh);
        free(pos);
    }
    CHECK(cudaEventDestroy(e0));
    CHECK(cudaEventDestroy(e1));
    CHECK(cudaStreamDestroy(st));
    return 0;
}
