/*
 * kvc-bench-decode: decode-attention time per token through a plugin, on
 * one layer of SmolLM2-135M's geometry (9 query heads, 3 KV heads, head_dim
 * 64), at several context lengths, beside this machine's measured memcpy
 * bandwidth. A benchmark, not a test: it prints figures and asserts nothing.
 *
 * usage: kvc-bench-decode [--plugin NAME] [--opt k=v]... [--contexts 1024,4096,...]
 *                         [--reps N]
 * Without --opt it runs the plugin's defaults and, for `full`, fp16 too.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kvch.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *x, int n)
{
    qsort(x, (size_t)n, sizeof *x, cmp_double);
    return n % 2 ? x[n / 2] : 0.5 * (x[n / 2 - 1] + x[n / 2]);
}

/* Bytes copied per second by memcpy of 256 MiB, median of 7. */
static double memcpy_bandwidth(void)
{
    size_t n = (size_t)256 << 20;
    char *a = malloc(n), *b = malloc(n);
    if (!a || !b)
        return 0;
    memset(a, 1, n);
    memset(b, 2, n);
    double t[7];
    for (int r = 0; r < 7; r++) {
        double t0 = now_s();
        memcpy(r % 2 ? a : b, r % 2 ? b : a, n);
        t[r] = now_s() - t0;
    }
    volatile char sink = a[n / 2] + b[n / 3];
    (void)sink;
    free(a), free(b);
    return (double)n / median(t, 7);
}

/* Bytes read per second summing 256 MiB of floats (8 accumulators so the
 * loop vectorizes), median of 7: the bound for a kernel that only reads. */
static double read_bandwidth(void)
{
    size_t n = ((size_t)256 << 20) / sizeof(float);
    float *a = malloc(n * sizeof(float));
    if (!a)
        return 0;
    for (size_t i = 0; i < n; i++)
        a[i] = (float)(i & 7);
    double t[7];
    volatile float sink = 0;
    for (int r = 0; r < 7; r++) {
        float acc[8] = {0};
        double t0 = now_s();
        for (size_t i = 0; i < n; i += 8)
            for (int j = 0; j < 8; j++)
                acc[j] += a[i + j];
        t[r] = now_s() - t0;
        for (int j = 0; j < 8; j++)
            sink += acc[j];
    }
    free(a);
    return (double)(n * sizeof(float)) / median(t, 7);
}

static uint64_t rng = 88172645463325252ull;
static float rnd(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((rng >> 40) * (2.0 / 16777216.0) - 1.0);
}

/* One configuration: median seconds per decode attend at each context. */
static int run(const kvc_plugin *p, kvc_host *host, const kvch_options *o, const char *label,
               const size_t *ctx, int n_ctx, int reps, double read_bw)
{
    size_t max_ctx = 0;
    for (int i = 0; i < n_ctx; i++)
        max_ctx = ctx[i] > max_ctx ? ctx[i] : max_ctx;
    kvc_geometry g = {.struct_size = sizeof g, .n_layers = 1, .n_heads = 9, .n_kv_heads = 3,
                      .head_dim = 64, .hidden_size = 576,
                      .max_positions = (uint32_t)max_ctx + 1,
                      .rope_style = KVC_ROPE_ADJACENT, .rope_theta = 100000.0f};
    kvc_create_info ci = {.struct_size = sizeof ci, .host = host, .geometry = &g,
                          .device = KVC_MEM_HOST, .dtype = KVC_DTYPE_F32};
    kvch_options_apply(o, &ci);
    kvc_instance *in;
    char err[512];
    if (p->create(&ci, &in, err, sizeof err)) {
        fprintf(stderr, "create: %s\n", err);
        return 1;
    }
    const size_t chunk = 4096, kw = 3 * 64, qw = 9 * 64;
    float *k = malloc(chunk * kw * sizeof(float)), *v = malloc(chunk * kw * sizeof(float));
    float *q = malloc(qw * sizeof(float)), *out = malloc(qw * sizeof(float));
    int32_t *pos = malloc(chunk * sizeof(int32_t));
    for (size_t i = 0; i < chunk * kw; i++)
        k[i] = rnd(), v[i] = rnd();
    for (size_t i = 0; i < qw; i++)
        q[i] = rnd();
    for (int c = 0; c < n_ctx; c++) {
        kvc_seq *s;
        if (p->seq_open(in, &s))
            return 1;
        for (size_t t = 0; t < ctx[c]; t += chunk) {
            size_t n = ctx[c] - t < chunk ? ctx[c] - t : chunk;
            for (size_t i = 0; i < n; i++)
                pos[i] = (int32_t)(t + i);
            if (p->append(s, 0, (uint32_t)n, pos, k, v, NULL)) {
                fprintf(stderr, "append: %s\n", p->seq_message(s));
                return 1;
            }
        }
        int32_t qp = (int32_t)ctx[c];
        double *t = malloc((size_t)reps * sizeof(double));
        for (int r = -3; r < reps; r++) { /* 3 warm-up calls */
            double t0 = now_s();
            if (p->attend(s, 0, 1, &qp, q, out)) {
                fprintf(stderr, "attend: %s\n", p->seq_message(s));
                return 1;
            }
            if (r >= 0)
                t[r] = now_s() - t0;
        }
        kvc_seq_stats st = {.struct_size = sizeof st};
        p->seq_stats(s, &st);
        double med = median(t, reps);
        double bytes = (double)st.bytes_payload; /* every held K and V value is read once */
        printf("%-12s %7zu  %10.1f  %9.1f  %8.2f  %8.0f%%\n", label, ctx[c], 1e6 * med,
               bytes / 1024.0, bytes / med / 1e9, 100.0 * (bytes / med) / read_bw);
        free(t);
        p->seq_close(s);
    }
    p->destroy(in);
    free(k), free(v), free(q), free(out), free(pos);
    return 0;
}

int main(int argc, char **argv)
{
    const char *plugin = "full";
    size_t ctx[16] = {1024, 4096, 16384, 65536};
    int n_ctx = 4, reps = 20;
    kvch_options opts = {0};
    char err[512];
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--plugin") && i + 1 < argc)
            plugin = argv[++i];
        else if (!strcmp(argv[i], "--opt") && i + 1 < argc) {
            if (kvch_options_add(&opts, argv[++i], err, sizeof err)) {
                fprintf(stderr, "%s\n", err);
                return 2;
            }
        } else if (!strcmp(argv[i], "--reps") && i + 1 < argc)
            reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--contexts") && i + 1 < argc) {
            n_ctx = 0;
            for (char *tok = strtok(argv[++i], ","); tok && n_ctx < 16; tok = strtok(NULL, ","))
                ctx[n_ctx++] = strtoul(tok, NULL, 10);
        } else {
            fprintf(stderr, "usage: kvc-bench-decode [--plugin NAME] [--opt k=v]... "
                            "[--contexts 1024,4096,...] [--reps N]\n");
            return 2;
        }
    }
    if (reps < 1 || n_ctx < 1)
        return 2;
    kvch_plugin *lib;
    if (kvch_load(plugin, &lib, err, sizeof err)) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    const kvc_plugin *p = kvch_plugin_desc(lib);
    kvch_tracker *tr = kvch_tracker_new();
    kvc_host host;
    kvch_tracker_host(tr, NULL, &host);

    double bw = memcpy_bandwidth(), rbw = read_bandwidth();
    printf("kvc-bench-decode: plugin %s %s; one layer of SmolLM2-135M (9 q heads, 3 kv heads, "
           "head_dim 64)\n",
           p->id, p->version);
    printf("decode = attend of 1 query over the whole context; median of %d calls after 3 "
           "warm-ups\n",
           reps);
    printf("this machine, one thread, 256 MiB, median of 7: memcpy %.2f GB/s copied (%.2f GB/s "
           "of read+write traffic); streaming read %.2f GB/s\n",
           bw / 1e9, 2 * bw / 1e9, rbw / 1e9);
    printf("GB/s = cache bytes read per second by attend (every held K and V value once)\n\n");
    printf("%-12s %7s  %10s  %9s  %8s  %9s\n", "config", "context", "us/token", "KV KiB",
           "GB/s", "of read bw");
    int rc = 0;
    if (opts.n) {
        rc = run(p, &host, &opts, "options", ctx, n_ctx, reps, rbw);
    } else {
        rc = run(p, &host, &opts, "default", ctx, n_ctx, reps, rbw);
        if (!rc && !strcmp(p->id, "full")) {
            kvch_options f16 = {0};
            kvch_options_add(&f16, "dtype=fp16", err, sizeof err);
            rc = run(p, &host, &f16, "dtype=fp16", ctx, n_ctx, reps, rbw);
            kvch_options_clear(&f16);
        }
    }
    kvch_options_clear(&opts);
    kvch_tracker_free(tr);
    kvch_unload(lib);
    return rc;
}
