/*
 * kvc-bench-qattn: one decode step of one layer's attention straight from
 * the kernels (kvck_attn_block_src), over caches of f32, f16 and quantized
 * blocks, beside this machine's one-thread streaming read. A benchmark, not
 * a test: it prints figures and asserts nothing.
 *
 * Geometry: SmolLM2-135M's layer, 9 query heads over 3 KV heads of 64
 * channels, so a step is 3 passes (one per KV head) of 3 query rows over N
 * keys in blocks of 64. Quantized: keys per channel (scales per block),
 * values per token in groups of 64, uniform levels, no outliers.
 *
 * Cold cache: before every step the cache's lines are flushed (clflush),
 * so every byte comes from memory, as in a model whose other layers ran in
 * between. Before each step on block b, the next block is asked for with
 * kvck_src_prefetch, as a store would. The yardstick ("read" rows, and
 * "% read") is the f16 cache itself, flushed the same way and read once as
 * a plain stream with vector loads. The configurations and the stream take
 * turns step by step, so load from other processes hits them alike and
 * the ratios hold on a shared machine. One thread (run with
 * OPENBLAS_NUM_THREADS=1 so no idle BLAS thread spins beside it). Median
 * of REPS steps after WARMUP. A standalone streaming read of a flushed
 * buffer is printed first, for reference.
 *
 * usage: kvc-bench-qattn [--reps N] [--contexts 4096,16384,65536]
 *                        [--isa generic|avx2|avx512|all] [--warm] [--no-prefetch]
 *   --warm: no flush, so caches that fit the CPU's caches are read from
 *           them (the compute side of the kernels alone).
 *   --no-prefetch: do not call kvck_src_prefetch on the next block (a
 *           store is expected to; this shows what it is worth).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench_util.h"
#include "kvck.h"
#include "kvck_quant.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

enum { N_KV = 3, GROUP = 3, D = 64, BLOCK = 64, WARMUP = 3, MAX_CTX = 8 };

/* Evicts [p, p + bytes) from every cache level. */
static void flush(const void *p, size_t bytes)
{
#if defined(__x86_64__)
    const char *c = (const char *)p;
    for (size_t i = 0; i < bytes; i += 64)
        _mm_clflush(c + i);
    _mm_mfence();
#else
    (void)p, (void)bytes;
#endif
}

static void *xalloc(size_t bytes)
{
    void *p = NULL;
    if (posix_memalign(&p, 64, bytes ? bytes : 64) != 0) {
        fprintf(stderr, "out of memory (%zu bytes)\n", bytes);
        exit(1);
    }
    return p;
}

static uint64_t g_rng = 0x62656e6368ull;
static float frand(void)
{
    uint64_t z = (g_rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return (float)((double)(z >> 11) * 0x1p-53 * 2.0 - 1.0);
}

/* Sum of buf [n] (n a multiple of 32): four independent vector sums so
 * the adds never hold the loads back. */
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2"))) static float sum_avx2(const float *buf, size_t n)
{
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (size_t i = 0; i < n; i += 32) {
        a0 = _mm256_add_ps(a0, _mm256_load_ps(buf + i));
        a1 = _mm256_add_ps(a1, _mm256_load_ps(buf + i + 8));
        a2 = _mm256_add_ps(a2, _mm256_load_ps(buf + i + 16));
        a3 = _mm256_add_ps(a3, _mm256_load_ps(buf + i + 24));
    }
    float tmp[8], s = 0.0f;
    _mm256_storeu_ps(tmp, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (int i = 0; i < 8; i++)
        s += tmp[i];
    return s;
}
#endif

static float sum_plain(const float *buf, size_t n)
{
    float s4[4] = {0, 0, 0, 0};
    for (size_t i = 0; i < n; i += 4)
        for (int k = 0; k < 4; k++)
            s4[k] += buf[i + (size_t)k];
    return s4[0] + s4[1] + s4[2] + s4[3];
}

static float sum_floats(const float *buf, size_t n)
{
#if defined(__x86_64__) && defined(__GNUC__)
    return __builtin_cpu_supports("avx2") ? sum_avx2(buf, n) : sum_plain(buf, n);
#else
    return sum_plain(buf, n);
#endif
}

/* One-thread streaming read of a flushed buffer: bytes per second. */
static volatile float g_sink;
static double stream_read(const float *buf, size_t bytes, int reps)
{
    double t[64];
    const size_t n = bytes / 4 / 32 * 32;
    reps = reps > 64 ? 64 : reps;
    for (int r = 0; r < reps; r++) {
        flush(buf, bytes);
        double t0 = now_s();
        g_sink = sum_floats(buf, n);
        t[r] = now_s() - t0;
    }
    return (double)(n * 4) / median(t, reps);
}

/* One configuration's cache for one context: per KV head, per block, the
 * keys then the values (a store's page), in one allocation. */
typedef struct cache {
    const char *name;
    int kind;       /* KVCK_SRC_* */
    unsigned bits;  /* Q */
    kvck_qfmt fk, fv;
    size_t page;    /* bytes of one (head, block) page */
    size_t k_bytes, kz_bytes, v_bytes; /* offsets inside a page: K, K scales, V, V scales */
    char *data;     /* [N_KV][n_blocks][page] */
    size_t bytes;
} cache;

static void cache_build(cache *c, size_t n)
{
    const size_t nb = n / BLOCK;
    if (c->kind == KVCK_SRC_Q) {
        kvck_qfmt_uniform(&c->fk, D, c->bits, 0);
        kvck_qfmt_uniform(&c->fv, D, c->bits, 64);
        c->k_bytes = (size_t)BLOCK * c->fk.row_bytes;
        c->kz_bytes = kvck_q_scale_bytes(&c->fk, KVCK_QS_CHANNEL, BLOCK);
        c->v_bytes = (size_t)BLOCK * c->fv.row_bytes;
        c->page = c->k_bytes + c->kz_bytes + c->v_bytes
                  + kvck_q_scale_bytes(&c->fv, KVCK_QS_TOKEN, BLOCK);
    } else {
        const size_t el = c->kind == KVCK_SRC_F32 ? 4 : 2;
        c->k_bytes = (size_t)BLOCK * D * el;
        c->kz_bytes = 0;
        c->v_bytes = c->k_bytes;
        c->page = 2 * c->k_bytes;
    }
    c->page = (c->page + 63) & ~(size_t)63; /* pages on cache lines */
    c->bytes = (size_t)N_KV * nb * c->page;
    c->data = xalloc(c->bytes);
    memset(c->data, 0, c->bytes);
    float k[BLOCK * D], v[BLOCK * D]; /* [BLOCK][D] one block of one head */
    for (size_t h = 0; h < N_KV; h++)
        for (size_t b = 0; b < nb; b++) {
            char *p = c->data + (h * nb + b) * c->page;
            for (size_t i = 0; i < (size_t)BLOCK * D; i++) {
                k[i] = (float)((int)(i % 7) - 3) * 0.3f + frand();
                v[i] = frand();
            }
            if (c->kind == KVCK_SRC_F32) {
                memcpy(p, k, sizeof k);
                memcpy(p + c->k_bytes, v, sizeof v);
            } else if (c->kind == KVCK_SRC_F16) {
                kvck_f32_to_f16_n(k, (uint16_t *)(void *)p, (size_t)BLOCK * D);
                kvck_f32_to_f16_n(v, (uint16_t *)(void *)(p + c->k_bytes), (size_t)BLOCK * D);
            } else {
                uint8_t *kc = (uint8_t *)p;
                uint16_t *kz = (uint16_t *)(void *)(p + c->k_bytes);
                uint8_t *vc = (uint8_t *)(p + c->k_bytes + c->kz_bytes);
                uint16_t *vz = (uint16_t *)(void *)(p + c->k_bytes + c->kz_bytes + c->v_bytes);
                kvck_q_quantize(&c->fk, KVCK_QS_CHANNEL, BLOCK, k, D, NULL, kc, kz);
                kvck_q_quantize(&c->fv, KVCK_QS_TOKEN, BLOCK, v, D, NULL, vc, vz);
            }
        }
}

/* Sources of block b of head h. */
static void cache_src(const cache *c, size_t nb, size_t h, size_t b, kvck_src *k, kvck_src *v)
{
    const char *p = c->data + (h * nb + b) * c->page;
    memset(k, 0, sizeof *k);
    memset(v, 0, sizeof *v);
    k->kind = v->kind = c->kind;
    if (c->kind != KVCK_SRC_Q) {
        k->data = p;
        v->data = p + c->k_bytes;
        k->ld = v->ld = D;
        return;
    }
    k->data = p;
    k->fmt = &c->fk;
    k->mode = KVCK_QS_CHANNEL;
    k->sz = (const uint16_t *)(const void *)(p + c->k_bytes);
    v->data = p + c->k_bytes + c->kz_bytes;
    v->fmt = &c->fv;
    v->mode = KVCK_QS_TOKEN;
    v->sz = (const uint16_t *)(const void *)(p + c->k_bytes + c->kz_bytes + c->v_bytes);
}

static int g_prefetch = 1; /* kvck_src_prefetch on the next block (--no-prefetch: off) */

/* One decode step: every KV head's 3 rows over all n keys. */
static void step(const cache *c, size_t n, const float *q /* [N_KV][GROUP][D] */,
                 const int32_t *k_pos, float *attn_scr, float *q_scr, float *out)
{
    const size_t nb = n / BLOCK;
    const int32_t qp = (int32_t)n;
    for (size_t h = 0; h < N_KV; h++) {
        kvck_attn a;
        kvck_attn_init(&a, GROUP, GROUP, D, D, BLOCK, 0, &qp, attn_scr);
        for (size_t b = 0; b < nb; b++) {
            kvck_src ks, vs;
            if (g_prefetch && b + 1 < nb) {
                /* what a store does: ask for the next block first */
                cache_src(c, nb, h, b + 1, &ks, &vs);
                kvck_src_prefetch(&ks, BLOCK, D);
                kvck_src_prefetch(&vs, BLOCK, D);
            }
            cache_src(c, nb, h, b, &ks, &vs);
            kvck_attn_block_src(&a, q + h * GROUP * D, D, &ks, &vs, k_pos + b * BLOCK, BLOCK,
                                q_scr);
        }
        kvck_attn_finish(&a, out + h * GROUP * D, D);
    }
}

static int parse_isa(const char *s)
{
    if (strcmp(s, "generic") == 0)
        return KVCK_ISA_GENERIC;
    if (strcmp(s, "avx2") == 0)
        return KVCK_ISA_AVX2;
    if (strcmp(s, "avx512") == 0)
        return KVCK_ISA_AVX512;
    return -1; /* all */
}

int main(int argc, char **argv)
{
    int reps = 20, isa_only = -1, warm = 0;
    size_t ctx[MAX_CTX] = {4096, 16384, 65536};
    int n_ctx = 3;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--reps") == 0 && i + 1 < argc) {
            reps = atoi(argv[++i]);
        } else if (strcmp(argv[i], "--warm") == 0) {
            warm = 1;
        } else if (strcmp(argv[i], "--no-prefetch") == 0) {
            g_prefetch = 0;
        } else if (strcmp(argv[i], "--isa") == 0 && i + 1 < argc) {
            isa_only = parse_isa(argv[++i]);
        } else if (strcmp(argv[i], "--contexts") == 0 && i + 1 < argc) {
            n_ctx = 0;
            for (char *s = argv[++i]; *s && n_ctx < MAX_CTX;) {
                size_t v = strtoul(s, &s, 10);
                ctx[n_ctx++] = (v + BLOCK - 1) / BLOCK * BLOCK;
                if (*s == ',')
                    s++;
                else
                    break;
            }
        } else {
            fprintf(stderr, "usage: %s [--reps N] [--contexts a,b,...] [--isa NAME|all] [--warm] "
                    "[--no-prefetch]\n",
                    argv[0]);
            return 2;
        }
    }
    if (reps < 1)
        reps = 1;
    double *t = xalloc(6 * (size_t)reps * sizeof *t); /* [configs + stream][reps] */
    size_t n_max = 0;
    for (int i = 0; i < n_ctx; i++)
        n_max = ctx[i] > n_max ? ctx[i] : n_max;

    /* Streaming read of a buffer the size of the largest f16 cache. */
    const size_t sbytes = (size_t)N_KV * n_max * D * 2 * 2;
    float *sbuf = xalloc(sbytes);
    for (size_t i = 0; i < sbytes / 4; i++)
        sbuf[i] = 1.0f;
    const double bw = stream_read(sbuf, sbytes, 9);
    free(sbuf);
    printf("kvc-bench-qattn: one decode step, one layer: %d KV heads x %d query rows, head_dim %d,"
           " blocks of %d; %s; median of %d steps\n",
           N_KV, GROUP, D, BLOCK, warm ? "warm cache" : "cold cache (clflush)", reps);
    printf("streaming read, one thread, flushed %.0f MiB: %.2f GB/s\n\n",
           (double)sbytes / (1 << 20), bw / 1e9);

    cache cfg[] = {
        {"f32", KVCK_SRC_F32, 0, {0}, {0}, 0, 0, 0, 0, NULL, 0},
        {"f16", KVCK_SRC_F16, 0, {0}, {0}, 0, 0, 0, 0, NULL, 0},
        {"q8", KVCK_SRC_Q, 8, {0}, {0}, 0, 0, 0, 0, NULL, 0},
        {"q4", KVCK_SRC_Q, 4, {0}, {0}, 0, 0, 0, 0, NULL, 0},
        {"q2", KVCK_SRC_Q, 2, {0}, {0}, 0, 0, 0, 0, NULL, 0},
    };
    const int n_cfg = (int)(sizeof cfg / sizeof cfg[0]);
    float q[N_KV * GROUP * D], out[N_KV * GROUP * D]; /* [N_KV][GROUP][D] */
    for (size_t i = 0; i < sizeof q / sizeof q[0]; i++)
        q[i] = 0.125f * frand();
    int32_t *k_pos = xalloc(n_max * sizeof *k_pos);
    for (size_t j = 0; j < n_max; j++)
        k_pos[j] = (int32_t)j;
    float *attn_scr = xalloc(kvck_attn_scratch_floats(GROUP, D, BLOCK) * sizeof(float));
    kvck_qfmt f8;
    kvck_qfmt_uniform(&f8, D, 8, 64);
    float *q_scr = xalloc(kvck_attn_src_scratch_floats(&f8, &f8, GROUP, BLOCK) * sizeof(float));

    const int top = kvck_isa();
    printf("%% read: against the f16 cache read as a plain stream (row 'read'), timed in\n"
           "turn with the steps of the same context and path.\n\n");
    printf("%-8s %-7s %7s %10s %10s %8s %8s %10s\n", "isa", "cache", "N", "us/step", "MB read",
           "GB/s", "% read", "vs f16");
    for (int ci = 0; ci < n_ctx; ci++) {
        const size_t n = ctx[ci];
        for (int i = 0; i < n_cfg; i++)
            cache_build(&cfg[i], n);
        /* The f16 cache read as a plain stream, under the same flush, in
         * turn with the steps: the yardstick for this context. */
        const cache *c16 = &cfg[1];
        for (int isa = KVCK_ISA_GENERIC; isa <= top; isa++) {
            if ((isa_only >= 0 && isa != isa_only) || kvck_isa_set(isa) != isa)
                continue;
            /* Configurations take turns step by step, so load from other
             * processes hits them alike and the ratios hold. */
            for (int r = 0; r < WARMUP + reps; r++) {
                for (int i = 0; i <= n_cfg; i++) {
                    const cache *c = i < n_cfg ? &cfg[i] : c16;
                    if (!warm)
                        flush(c->data, c->bytes);
                    double t0 = now_s();
                    if (i < n_cfg)
                        step(c, n, q, k_pos, attn_scr, q_scr, out);
                    else
                        g_sink = sum_floats((const float *)(const void *)c->data,
                                            c->bytes / 4 / 32 * 32);
                    if (r >= WARMUP)
                        t[(size_t)i * (size_t)reps + (size_t)(r - WARMUP)] = now_s() - t0;
                }
            }
            const double t_read = median(t + (size_t)n_cfg * (size_t)reps, reps);
            const double bw_here = (double)c16->bytes / t_read;
            double t_f16 = 0;
            for (int i = 0; i < n_cfg; i++) {
                const double med = median(t + (size_t)i * (size_t)reps, reps);
                if (cfg[i].kind == KVCK_SRC_F16)
                    t_f16 = med;
                const double gbs = (double)cfg[i].bytes / med / 1e9;
                printf("%-8s %-7s %7zu %10.1f %10.2f %8.2f %7.0f%% ", kvck_isa_name(isa),
                       cfg[i].name, n, med * 1e6, (double)cfg[i].bytes / 1e6, gbs,
                       100.0 * gbs * 1e9 / bw_here);
                if (t_f16 > 0)
                    printf("%9.2fx\n", med / t_f16);
                else
                    printf("%10s\n", "-");
            }
            printf("%-8s %-7s %7zu %10.1f %10.2f %8.2f %7.0f%% %10s\n", kvck_isa_name(isa),
                   "read", n, t_read * 1e6, (double)c16->bytes / 1e6, bw_here / 1e9, 100.0, "-");
            fflush(stdout);
        }
        for (int i = 0; i < n_cfg; i++)
            free(cfg[i].data);
        printf("\n");
    }
    kvck_isa_set(-1);
    (void)out;
    free(t), free(k_pos), free(attn_scr), free(q_scr);
    return 0;
}
