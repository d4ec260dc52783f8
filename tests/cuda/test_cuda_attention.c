/*
 * test_cuda_attention.c -- the CUDA kernels against the CPU oracle.
 *
 * kvck_cuda_rope against kvck_rope_apply (same math, so within an ulp or
 * two), kvck_cuda_attention against kvck_attention_ref (float64) at
 * ||out - ref|| / ||ref|| <= 1e-5, kvck_cuda_attention_f16kv at <= 2e-3,
 * over seeded random shapes: 1-8 query heads per KV head, head_dim 32/64/128
 * (and a few others for the other kernel instances), both RoPE pairings,
 * decode (n_q = 1, n_k up to 4096) and prefill, sliding windows, keys in any
 * order, queries that see no key.
 *
 * Without a CUDA device it prints "SKIP: ..." and exits 77, which meson
 * reports as skipped. KVC_TEST_SEED=n replays a run. The suite runs
 * unforked: the parent has already initialized CUDA when it counts
 * devices, and a forked child cannot use CUDA after that.
 */
#include <check.h>
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvck.h"
#include "kvck_cuda.h"

#define TOL_F32 1e-5
#define TOL_F16 2e-3

/* ---- seeded random numbers (splitmix64) --------------------------------- */

static uint64_t g_seed = 20240917u;
static uint64_t g_rng;

static uint64_t rng_next(void)
{
    uint64_t z = (g_rng += 0x9e3779b97f4a7c15u);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
    return z ^ (z >> 31);
}

/* Uniform integer in [lo, hi]. */
static int rng_int(int lo, int hi)
{
    return lo + (int)(rng_next() % (uint64_t)(hi - lo + 1));
}

/* Uniform float in [-a, a). */
static float rng_sym(float a)
{
    return a * (float)((double)(rng_next() >> 11) * 0x1p-53 * 2.0 - 1.0);
}

/* Each test starts its own stream of numbers from the seed and its name,
 * so a test replayed alone (CK_RUN_CASE=name) sees the same data. */
static void rng_start(const char *name)
{
    g_rng = g_seed;
    for (const char *c = name; *c; c++)
        g_rng = g_rng * 31u + (unsigned char)*c;
}

/* ---- device helpers ----------------------------------------------------- */

#define CUDA_OK(x)                                                                    \
    do {                                                                              \
        cudaError_t e_ = (x);                                                         \
        ck_assert_msg(e_ == cudaSuccess, "%s: %s (seed %llu)", #x,                    \
                      cudaGetErrorString(e_), (unsigned long long)g_seed);            \
    } while (0)

static void *dev_alloc(size_t bytes)
{
    void *p = NULL;
    CUDA_OK(cudaMalloc(&p, bytes ? bytes : 1));
    return p;
}

static void *dev_copy(const void *h, size_t bytes)
{
    void *p = dev_alloc(bytes);
    if (bytes)
        CUDA_OK(cudaMemcpy(p, h, bytes, cudaMemcpyHostToDevice));
    return p;
}

static void *xmalloc(size_t bytes)
{
    void *p = malloc(bytes ? bytes : 1);
    ck_assert_ptr_nonnull(p);
    return p;
}

/* ---- one attention case ------------------------------------------------- */

typedef struct attn_case {
    int style;           /* 0 none, 1 adjacent, 2 halves */
    int head_dim;
    int dims;            /* 0 = head_dim */
    int custom_freq;     /* inv_freq from the caller instead of theta */
    float mscale;        /* 0 = 1 */
    size_t n_heads, n_kv_heads;
    uint32_t window;
    size_t n_q, n_k;
    int gaps;            /* key positions step by 1-3 instead of 1 */
    int shuffle;         /* keys in random order */
    int blind;           /* queries sit before every key: all zeros */
    int f16;             /* kvck_cuda_attention_f16kv */
} attn_case;

static void case_str(const attn_case *c, char *buf, size_t n)
{
    snprintf(buf, n,
             "n_q=%zu n_k=%zu heads=%zu/%zu hd=%d style=%d dims=%d%s mscale=%g "
             "window=%u%s%s%s%s",
             c->n_q, c->n_k, c->n_heads, c->n_kv_heads, c->head_dim, c->style, c->dims,
             c->custom_freq ? " freq" : "", (double)c->mscale, c->window,
             c->gaps ? " gaps" : "", c->shuffle ? " shuffled" : "",
             c->blind ? " blind" : "", c->f16 ? " f16kv" : "");
}

/* Runs c on the device and the oracle; returns ||out - ref|| / ||ref||
 * (0 when both are zero) and checks what must hold exactly: every output
 * finite, and rows that see no key exactly zero. */
static double run_case(const attn_case *c)
{
    char desc[256];
    case_str(c, desc, sizeof desc);

    const size_t hd = (size_t)c->head_dim, nh = c->n_heads, nkv = c->n_kv_heads;
    const size_t n_q = c->n_q, n_k = c->n_k;
    kvck_rope rope;
    float freq[KVCK_MAX_HEAD_DIM / 2];
    const int dims = c->dims ? c->dims : c->head_dim;
    for (int i = 0; i < dims / 2; i++) /* YaRN-like: slower low bands */
        freq[i] = powf(10000.0f, -2.0f * (float)i / (float)dims) / (i < dims / 4 ? 1.0f : 8.0f);
    ck_assert_int_eq(kvck_rope_init(&rope, c->style, c->head_dim, c->dims, 10000.0f,
                                    c->custom_freq ? freq : NULL, c->mscale),
                     0);
    const kvck_dense d = {
        .rope = &rope,
        .scale = 1.0f / sqrtf((float)hd),
        .window = c->window,
        .n_heads = nh,
        .n_kv_heads = nkv,
        .head_dim = hd,
    };

    /* Key positions ascending with gaps, queries at the last n_q of them
     * (prefill of the keys' own tokens; decode when n_q = 1), or before
     * the first key when blind; then the keys shuffled. */
    int32_t *k_pos = xmalloc(n_k * sizeof *k_pos);
    int32_t *q_pos = xmalloc(n_q * sizeof *q_pos);
    int32_t p = rng_int(1, 100);
    for (size_t j = 0; j < n_k; j++) {
        k_pos[j] = p;
        p += c->gaps ? rng_int(1, 3) : 1;
    }
    for (size_t i = 0; i < n_q; i++) {
        if (c->blind || n_k == 0)
            q_pos[i] = (int32_t)i;
        else
            q_pos[i] = k_pos[n_k - n_q + i];
    }
    if (c->blind && n_k > 0)
        for (size_t j = 0; j < n_k; j++)
            k_pos[j] += (int32_t)n_q;
    if (c->shuffle)
        for (size_t j = n_k; j > 1; j--) {
            size_t o = (size_t)(rng_next() % j);
            int32_t t = k_pos[j - 1];
            k_pos[j - 1] = k_pos[o];
            k_pos[o] = t;
        }

    const size_t nq_el = n_q * nh * hd, nk_el = n_k * nkv * hd;
    float *q = xmalloc(nq_el * sizeof *q);
    float *k = xmalloc(nk_el * sizeof *k);
    float *v = xmalloc(nk_el * sizeof *v);
    for (size_t i = 0; i < nq_el; i++)
        q[i] = rng_sym(2.0f); /* scores of a few units: a peaked softmax */
    for (size_t i = 0; i < nk_el; i++) {
        k[i] = rng_sym(1.0f);
        v[i] = rng_sym(1.0f);
    }

    double *ref = xmalloc(nq_el * sizeof *ref);
    kvck_attention_ref(&d, n_q, q_pos, q, n_k, k_pos, k, v, ref);

    int32_t *dq_pos = dev_copy(q_pos, n_q * sizeof *q_pos);
    int32_t *dk_pos = dev_copy(k_pos, n_k * sizeof *k_pos);
    float *dq = dev_copy(q, nq_el * sizeof *q);
    float *dout = dev_alloc(nq_el * sizeof *dout);
    CUDA_OK(cudaMemset(dout, 0xff, nq_el * sizeof *dout)); /* NaN: catches unwritten */
    cudaStream_t st;
    CUDA_OK(cudaStreamCreate(&st));
    int rc;
    void *dk, *dv;
    float *dscratch;
    if (c->f16) {
        /* The cache as a server holds it: rotated keys, fp16, head-major. */
        float *k_rot = xmalloc(nk_el * sizeof *k_rot);
        kvck_rope_apply(&rope, n_k, nkv, k_pos, k, k_rot);
        uint16_t *kh = xmalloc(nk_el * sizeof *kh), *vh = xmalloc(nk_el * sizeof *vh);
        for (size_t h = 0; h < nkv; h++)
            for (size_t j = 0; j < n_k; j++)
                for (size_t e = 0; e < hd; e++) {
                    kh[(h * n_k + j) * hd + e] = kvck_f32_to_f16(k_rot[(j * nkv + h) * hd + e]);
                    vh[(h * n_k + j) * hd + e] = kvck_f32_to_f16(v[(j * nkv + h) * hd + e]);
                }
        dk = dev_copy(kh, nk_el * sizeof *kh);
        dv = dev_copy(vh, nk_el * sizeof *vh);
        free(k_rot);
        free(kh);
        free(vh);
        size_t sf = kvck_cuda_attention_f16kv_scratch_floats(&d, n_q, n_k);
        ck_assert_msg(sf > 0, "scratch size 0 for %s", desc);
        dscratch = dev_alloc(sf * sizeof(float));
        rc = kvck_cuda_attention_f16kv(&d, n_q, dq_pos, dq, n_k, dk_pos, dk, dv, dout, dscratch,
                                       st);
    } else {
        dk = dev_copy(k, nk_el * sizeof *k);
        dv = dev_copy(v, nk_el * sizeof *v);
        size_t sf = kvck_cuda_attention_scratch_floats(&d, n_q, n_k);
        ck_assert_msg(sf > 0, "scratch size 0 for %s", desc);
        dscratch = dev_alloc(sf * sizeof(float));
        rc = kvck_cuda_attention(&d, n_q, dq_pos, dq, n_k, dk_pos, dk, dv, dout, dscratch, st);
    }
    ck_assert_msg(rc == 0, "kvck_cuda_attention%s: %d (%s) for %s, seed %llu",
                  c->f16 ? "_f16kv" : "", rc, cudaGetErrorString((cudaError_t)rc), desc,
                  (unsigned long long)g_seed);
    CUDA_OK(cudaStreamSynchronize(st));
    float *out = xmalloc(nq_el * sizeof *out);
    CUDA_OK(cudaMemcpy(out, dout, nq_el * sizeof *out, cudaMemcpyDeviceToHost));

    double num = 0.0, den = 0.0;
    for (size_t row = 0; row < n_q * nh; row++) {
        int zero_row = 1;
        for (size_t e = 0; e < hd; e++)
            zero_row &= ref[row * hd + e] == 0.0;
        for (size_t e = 0; e < hd; e++) {
            const double o = out[row * hd + e], r = ref[row * hd + e];
            ck_assert_msg(isfinite(o), "out[%zu][%zu] = %g not finite for %s, seed %llu", row, e,
                          o, desc, (unsigned long long)g_seed);
            if (zero_row)
                ck_assert_msg(o == 0.0, "row %zu sees no key but out[%zu] = %g for %s, seed %llu",
                              row, e, o, desc, (unsigned long long)g_seed);
            num += (o - r) * (o - r);
            den += r * r;
        }
    }
    const double rel = den > 0.0 ? sqrt(num / den) : sqrt(num);
    const double tol = c->f16 ? TOL_F16 : TOL_F32;
    printf("  %-100s rel %.3g\n", desc, rel);
    ck_assert_msg(rel <= tol, "rel error %.3g > %.0e for %s, seed %llu", rel, tol, desc,
                  (unsigned long long)g_seed);

    CUDA_OK(cudaStreamDestroy(st));
    CUDA_OK(cudaFree(dq_pos));
    CUDA_OK(cudaFree(dk_pos));
    CUDA_OK(cudaFree(dq));
    CUDA_OK(cudaFree(dk));
    CUDA_OK(cudaFree(dv));
    CUDA_OK(cudaFree(dout));
    CUDA_OK(cudaFree(dscratch));
    free(k_pos);
    free(q_pos);
    free(q);
    free(k);
    free(v);
    free(ref);
    free(out);
    return rel;
}

/* A random case: 1-8 query heads per KV head, 1-4 KV heads (1-2 for
 * prefill, to keep the oracle quick), head_dim one of hds, RoPE style 1 or
 * 2, partial rotary, custom frequencies and mscale now and then. */
static attn_case random_case(size_t n_q, size_t n_k, const int *hds, int n_hds)
{
    attn_case c;
    memset(&c, 0, sizeof c);
    c.style = rng_int(1, 2);
    c.head_dim = hds[rng_int(0, n_hds - 1)];
    c.dims = rng_int(0, 3) == 0 ? c.head_dim / 2 : 0;
    if (c.dims & 1)
        c.dims += 1;
    c.custom_freq = rng_int(0, 3) == 0;
    c.mscale = rng_int(0, 3) == 0 ? 1.25f : 0.0f;
    c.n_kv_heads = (size_t)rng_int(1, n_q > 1 ? 2 : 4);
    c.n_heads = c.n_kv_heads * (size_t)rng_int(1, 8);
    c.n_q = n_q;
    c.n_k = n_k;
    c.gaps = rng_int(0, 1);
    c.shuffle = rng_int(0, 2) == 0;
    return c;
}

static const int HD3[] = {32, 64, 128};

/* ---- tests -------------------------------------------------------------- */

START_TEST(test_rope_matches_cpu)
{
    rng_start("rope");
    for (int style = 1; style <= 2; style++)
        for (int variant = 0; variant < 4; variant++) {
            const int hd = variant & 1 ? 128 : 64;
            const int dims = variant & 2 ? hd / 2 : 0;
            const float ms = variant == 3 ? 1.3f : 0.0f;
            kvck_rope r;
            ck_assert_int_eq(kvck_rope_init(&r, style, hd, dims, 500000.0f, NULL, ms), 0);
            const size_t n_tok = 37, nh = 5, n = n_tok * nh * (size_t)hd;
            int32_t pos[37];
            for (size_t t = 0; t < n_tok; t++)
                pos[t] = t == 0 ? 0 : t == 1 ? 2000000 : rng_int(0, 200000);
            float *x = xmalloc(n * sizeof *x), *y = xmalloc(n * sizeof *y);
            float *yd = xmalloc(n * sizeof *yd);
            for (size_t i = 0; i < n; i++)
                x[i] = rng_sym(4.0f);
            kvck_rope_apply(&r, n_tok, nh, pos, x, y);

            int32_t *dpos = dev_copy(pos, sizeof pos);
            float *dx = dev_copy(x, n * sizeof *x), *dy = dev_alloc(n * sizeof *dy);
            for (int inplace = 0; inplace <= 1; inplace++) {
                float *dst = inplace ? dx : dy;
                ck_assert_int_eq(kvck_cuda_rope(&r, n_tok, nh, dpos, dx, dst, NULL), 0);
                CUDA_OK(cudaMemcpy(yd, dst, n * sizeof *yd, cudaMemcpyDeviceToHost));
                double worst = 0.0;
                for (size_t i = 0; i < n; i++) {
                    double e = fabs((double)yd[i] - (double)y[i]);
                    worst = e > worst ? e : worst;
                }
                /* same rounding steps; only libm vs CUDA double sincos differ */
                ck_assert_msg(worst <= 2e-6, "rope style %d hd %d dims %d: %g (seed %llu)",
                              style, hd, dims, worst, (unsigned long long)g_seed);
            }
            CUDA_OK(cudaFree(dpos));
            CUDA_OK(cudaFree(dx));
            CUDA_OK(cudaFree(dy));
            free(x);
            free(y);
            free(yd);
        }
}
END_TEST

START_TEST(test_decode_random)
{
    rng_start("decode");
    for (int i = 0; i < 24; i++) {
        size_t n_k = i == 0 ? 1 : i == 1 ? 4096 : (size_t)rng_int(1, 4096);
        attn_case c = random_case(1, n_k, HD3, 3);
        run_case(&c);
    }
}
END_TEST

START_TEST(test_prefill_random)
{
    rng_start("prefill");
    for (int i = 0; i < 12; i++) {
        size_t n_q = i == 0 ? 2 : (size_t)rng_int(2, 160);
        size_t n_k = n_q + (size_t)rng_int(0, 900);
        attn_case c = random_case(n_q, n_k, HD3, 3);
        if (i == 1)
            c.n_k = c.n_q; /* the whole prompt at once */
        run_case(&c);
    }
}
END_TEST

START_TEST(test_sliding_window)
{
    rng_start("window");
    const uint32_t windows[] = {1, 7, 100, 1000, 5000};
    for (int i = 0; i < 10; i++) {
        size_t n_q = i % 2 ? 1 : (size_t)rng_int(2, 96);
        attn_case c = random_case(n_q, n_q + (size_t)rng_int(0, 2000), HD3, 3);
        c.window = windows[i % 5];
        run_case(&c);
    }
}
END_TEST

START_TEST(test_no_visible_key)
{
    rng_start("blind");
    attn_case c = random_case(1, 300, HD3, 3);
    c.blind = 1;
    ck_assert(run_case(&c) == 0.0);
    c = random_case(40, 300, HD3, 3);
    c.blind = 1;
    ck_assert(run_case(&c) == 0.0);
    c = random_case(3, 0, HD3, 3); /* no keys at all */
    ck_assert(run_case(&c) == 0.0);
    c = random_case(1, 0, HD3, 3);
    c.f16 = 1;
    ck_assert(run_case(&c) == 0.0);
}
END_TEST

START_TEST(test_other_head_dims)
{
    /* The other kernel instances: padded dims (80, 96), a head_dim not a
     * multiple of 4 (scalar loads), 256 and 512, no RoPE. */
    rng_start("dims");
    const int hds[] = {34, 80, 96, 256, 512};
    for (int i = 0; i < 10; i++) {
        size_t n_q = i % 2 ? 1 : (size_t)rng_int(2, 48);
        attn_case c = random_case(n_q, n_q + (size_t)rng_int(0, 600), &hds[i / 2], 1);
        run_case(&c);
    }
    attn_case c = random_case(17, 400, HD3, 3);
    c.style = 0;
    run_case(&c);
}
END_TEST

START_TEST(test_f16kv_random)
{
    rng_start("f16kv");
    for (int i = 0; i < 12; i++) {
        size_t n_q = i % 3 ? 1 : (size_t)rng_int(2, 128);
        attn_case c = random_case(n_q, n_q + (size_t)rng_int(0, 4096 - 128), HD3, 3);
        c.f16 = 1;
        if (i == 5)
            c.window = 64;
        run_case(&c);
    }
}
END_TEST

START_TEST(test_bad_arguments)
{
    kvck_rope r;
    ck_assert_int_eq(kvck_rope_init(&r, 2, 64, 0, 10000.0f, NULL, 0.0f), 0);
    kvck_dense d = {.rope = &r, .scale = 0.125f, .n_heads = 9, .n_kv_heads = 4, .head_dim = 64};
    ck_assert_uint_eq(kvck_cuda_attention_scratch_floats(&d, 1, 10), 0);
    float *buf = dev_alloc(1 << 20);
    int32_t *pos = dev_alloc(64);
    CUDA_OK(cudaMemset(pos, 0, 64));
    ck_assert_int_eq(kvck_cuda_attention(&d, 1, pos, buf, 1, pos, buf, buf, buf, buf, NULL),
                     cudaErrorInvalidValue);
    d.n_kv_heads = 3;
    d.head_dim = 32; /* disagrees with the rope */
    ck_assert_int_eq(kvck_cuda_attention(&d, 1, pos, buf, 1, pos, buf, buf, buf, buf, NULL),
                     cudaErrorInvalidValue);
    d.head_dim = 64;
    ck_assert_int_eq(kvck_cuda_attention(&d, 1, NULL, buf, 1, pos, buf, buf, buf, buf, NULL),
                     cudaErrorInvalidValue);
    ck_assert_int_eq(kvck_cuda_attention(&d, 0, NULL, NULL, 0, NULL, NULL, NULL, NULL, NULL, NULL),
                     0);
    CUDA_OK(cudaFree(buf));
    CUDA_OK(cudaFree(pos));
}
END_TEST

/* One TCase per test, so CK_RUN_CASE=decode (say) replays one alone. */
static void add(Suite *s, const char *name, const TTest *t)
{
    TCase *tc = tcase_create(name);
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, t);
    suite_add_tcase(s, tc);
}

static Suite *cuda_suite(void)
{
    Suite *s = suite_create("cuda-attention");
    add(s, "rope", test_rope_matches_cpu);
    add(s, "decode", test_decode_random);
    add(s, "prefill", test_prefill_random);
    add(s, "window", test_sliding_window);
    add(s, "blind", test_no_visible_key);
    add(s, "dims", test_other_head_dims);
    add(s, "f16kv", test_f16kv_random);
    add(s, "bad_arguments", test_bad_arguments);
    return s;
}

int main(void)
{
    if (kvck_cuda_device_count() == 0) {
        int n = 0;
        cudaError_t e = cudaGetDeviceCount(&n);
        printf("SKIP: no CUDA device (%s)\n",
               e != cudaSuccess ? cudaGetErrorString(e) : "cudaGetDeviceCount reports 0");
        return 77;
    }
    const char *env = getenv("KVC_TEST_SEED");
    if (env && *env)
        g_seed = strtoull(env, NULL, 0);
    printf("seed %llu (replay with KVC_TEST_SEED=%llu)\n", (unsigned long long)g_seed,
           (unsigned long long)g_seed);
    fflush(stdout);

    SRunner *sr = srunner_create(cuda_suite());
    srunner_set_fork_status(sr, CK_NOFORK); /* CUDA is not fork-safe once initialized */
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
