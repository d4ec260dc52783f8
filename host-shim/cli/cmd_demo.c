/*
 * kvc demo: drives a plugin the way a server does, on SmolLM2-135M's
 * attention geometry with synthetic keys, values and queries (the real
 * model comes with `kvc ppl`): prefill a prompt through every layer, decode
 * tokens one at a time, check each step against a float64 reference of
 * exact attention, then report memory as the plugin and the tracking
 * allocator see it, an export/import round trip and leaks.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cmds.h"
#include "kvch.h"
#include "kvck.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static float rnd(void) /* [-1, 1) */
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (float)(((rng_state * 2685821657736338717ull) >> 40) * (2.0 / 16777216.0) - 1.0);
}

static void usage(FILE *f)
{
    fprintf(f, "usage: kvc demo [--plugin NAME|PATH] [--opt name=value]... [--prompt N] "
               "[--decode M]\n"
               "  Prefill N synthetic tokens (default 512) through all 30 layers of SmolLM2-135M's\n"
               "  attention shape, decode M more (default 32), and compare every output with a\n"
               "  float64 reference of exact attention.\n");
}

typedef struct demo {
    const kvc_plugin *p;
    kvc_geometry g;
    kvck_rope rope;
    kvck_dense dense;
    size_t qw, kw;           /* floats per token: queries, keys */
    int32_t *pos;            /* [total] */
    float *q, *k, *v;        /* [total][heads][head_dim] for one layer, reused per layer */
    float *out;              /* [prompt][n_heads][head_dim] */
    double *ref;             /* same shape, float64 */
} demo;

/* Worst relative error of layer outputs against the reference. */
static double check(const demo *d, size_t t0, size_t n)
{
    kvck_attention_ref(&d->dense, n, d->pos + t0, d->q + t0 * d->qw, t0 + n, d->pos, d->k, d->v,
                       d->ref);
    double num = 0, den = 0;
    for (size_t i = 0; i < n * d->qw; i++) {
        double e = (double)d->out[i] - d->ref[i];
        num += e * e;
        den += d->ref[i] * d->ref[i];
    }
    return sqrt(num / (den > 0 ? den : 1));
}

int kvc_cmd_demo(int argc, char **argv)
{
    const char *plugin = "full";
    size_t prompt = 512, decode = 32;
    kvch_options opts = {0};
    char err[512];
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--plugin") && i + 1 < argc) {
            plugin = argv[++i];
        } else if (!strcmp(argv[i], "--opt") && i + 1 < argc) {
            if (kvch_options_add(&opts, argv[++i], err, sizeof err)) {
                fprintf(stderr, "kvc demo: %s\n", err);
                return 2;
            }
        } else if (!strcmp(argv[i], "--prompt") && i + 1 < argc) {
            prompt = strtoul(argv[++i], NULL, 10);
        } else if (!strcmp(argv[i], "--decode") && i + 1 < argc) {
            decode = strtoul(argv[++i], NULL, 10);
        } else if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            usage(stdout);
            return 0;
        } else {
            usage(stderr);
            return 2;
        }
    }
    if (prompt < 1 || prompt > 100000 || decode > 100000) {
        fprintf(stderr, "kvc demo: --prompt must be in [1, 100000], --decode at most 100000\n");
        return 2;
    }

    kvch_plugin *lib;
    if (kvch_load(plugin, &lib, err, sizeof err) != KVC_OK) {
        fprintf(stderr, "kvc demo: %s\n", err);
        return 1;
    }
    demo d;
    memset(&d, 0, sizeof d);
    d.p = kvch_plugin_desc(lib);
    kvch_tracker *tr = kvch_tracker_new();
    kvch_logger log = {KVC_LOG_WARN, stderr, d.p->id};
    kvc_host host;
    kvch_tracker_host(tr, &log, &host);

    /* SmolLM2-135M-Instruct: 30 layers, 9 query heads over 3 KV heads of 64,
     * RoPE theta 100000 on adjacent pairs (llama.cpp's permuted layout). */
    d.g = (kvc_geometry){.struct_size = sizeof(kvc_geometry), .n_layers = 30, .n_heads = 9,
                         .n_kv_heads = 3, .head_dim = 64, .hidden_size = 576,
                         .max_positions = 8192, .rope_style = KVC_ROPE_ADJACENT,
                         .rope_theta = 100000.0f};
    kvck_rope_init(&d.rope, d.g.rope_style, 64, 64, d.g.rope_theta, NULL, 0);
    d.dense = (kvck_dense){&d.rope, 0.125f, 0, 9, 3, 64};
    d.qw = 9 * 64;
    d.kw = 3 * 64;
    size_t total = prompt + decode;
    d.pos = malloc(total * sizeof(int32_t));
    d.q = malloc(total * d.qw * sizeof(float));
    d.k = malloc(total * d.kw * sizeof(float));
    d.v = malloc(total * d.kw * sizeof(float));
    d.out = malloc(prompt * d.qw * sizeof(float));
    d.ref = malloc(prompt * d.qw * sizeof(double));
    if (!d.pos || !d.q || !d.k || !d.v || !d.out || !d.ref) {
        fprintf(stderr, "kvc demo: out of memory\n");
        return 1;
    }
    for (size_t t = 0; t < total; t++)
        d.pos[t] = (int32_t)t;
    for (size_t i = 0; i < total * d.qw; i++)
        d.q[i] = rnd();
    for (size_t i = 0; i < total * d.kw; i++) {
        d.k[i] = 3.0f * rnd();
        d.v[i] = rnd();
    }

    kvc_create_info ci = {.struct_size = sizeof ci, .host = &host, .geometry = &d.g,
                          .device = KVC_MEM_HOST, .dtype = KVC_DTYPE_F32};
    kvch_options_apply(&opts, &ci);
    kvc_instance *in = NULL;
    int rc = 1;
    if (d.p->create(&ci, &in, err, sizeof err) != KVC_OK) {
        fprintf(stderr, "kvc demo: create %s: %s\n", d.p->id, err);
        goto done;
    }
    kvc_seq *seq = NULL, *copy = NULL;
    if (d.p->seq_open(in, &seq) != KVC_OK || d.p->seq_open(in, &copy) != KVC_OK) {
        fprintf(stderr, "kvc demo: seq_open failed\n");
        goto done;
    }
    printf("kvc demo: plugin %s %s (%s), SmolLM2-135M attention shape: 30 layers, 9 query / 3 KV "
           "heads of 64\n",
           d.p->id, d.p->version, kvch_plugin_path(lib));
    printf("synthetic data: %zu-token prompt, %zu decode steps; every output checked against "
           "float64 exact attention\n\n",
           prompt, decode);

    /* Prefill: append + attend the whole prompt, layer by layer. Every
     * layer sees the same synthetic tensors; that is enough to exercise the
     * plugin and keeps the reference cheap. */
    double worst = 0, t0 = now_s();
    for (uint32_t l = 0; l < d.g.n_layers; l++) {
        if (d.p->append(seq, l, (uint32_t)prompt, d.pos, d.k, d.v, NULL) ||
            d.p->attend(seq, l, (uint32_t)prompt, d.pos, d.q, d.out)) {
            fprintf(stderr, "kvc demo: prefill layer %u: %s\n", l, d.p->seq_message(seq));
            goto done;
        }
        if (l == 0 || l + 1 == d.g.n_layers) {
            double e = check(&d, 0, prompt);
            worst = e > worst ? e : worst;
        }
    }
    double t_prefill = now_s() - t0;
    printf("prefill  %6zu tokens x 30 layers  %8.1f ms   max rel err vs float64 %.2e\n", prompt,
           1e3 * t_prefill, worst);

    worst = 0;
    t0 = now_s();
    for (size_t t = prompt; t < total; t++) {
        for (uint32_t l = 0; l < d.g.n_layers; l++) {
            if (d.p->append(seq, l, 1, d.pos + t, d.k + t * d.kw, d.v + t * d.kw, NULL) ||
                d.p->attend(seq, l, 1, d.pos + t, d.q + t * d.qw, d.out)) {
                fprintf(stderr, "kvc demo: decode %zu layer %u: %s\n", t, l,
                        d.p->seq_message(seq));
                goto done;
            }
        }
        double e = check(&d, t, 1);
        worst = e > worst ? e : worst;
    }
    double t_decode = now_s() - t0;
    if (decode)
        printf("decode   %6zu steps  x 30 layers  %8.2f ms/token  max rel err vs float64 %.2e\n",
               decode, 1e3 * t_decode / (double)decode, worst);

    kvc_seq_stats st = {.struct_size = sizeof st};
    kvc_instance_stats is = {.struct_size = sizeof is};
    d.p->seq_stats(seq, &st);
    d.p->instance_stats(in, &is);
    kvch_tracker_stats ts;
    kvch_tracker_get(tr, &ts);
    printf("\nmemory (plugin's stats; tracking allocator beside it)\n");
    printf("  tokens held          %llu (= %zu tokens x 30 layers)\n",
           (unsigned long long)st.tokens_appended, total);
    printf("  payload              %10llu B   %7.1f B/token/layer\n",
           (unsigned long long)st.bytes_payload,
           (double)st.bytes_payload / (double)st.tokens_appended);
    printf("  metadata             %10llu B\n", (unsigned long long)st.bytes_metadata);
    printf("  reserved (block tails) %8llu B\n", (unsigned long long)st.bytes_reserved);
    printf("  fixed                %10llu B\n", (unsigned long long)st.bytes_fixed);
    printf("  resident             %10llu B   = %.3f x an fp16 full cache (%llu B)\n",
           (unsigned long long)st.bytes_resident,
           (double)st.bytes_resident / (double)st.bytes_fp16_full,
           (unsigned long long)st.bytes_fp16_full);
    printf("  budget promise       resident <= %.4f x fp16 + %llu B: %s\n", is.kv_ratio,
           (unsigned long long)is.seq_overhead_bytes,
           (double)st.bytes_resident <=
                   is.kv_ratio * (double)st.bytes_fp16_full + (double)is.seq_overhead_bytes
               ? "kept"
               : "BROKEN");
    printf("  allocator sees       %10llu B live (instance + 2 sequences), peak %llu B\n",
           (unsigned long long)ts.current[KVC_MEM_HOST], (unsigned long long)ts.peak[KVC_MEM_HOST]);

    /* Offload and restore: export the sequence, import it into another one,
     * and compare one more decode step bit for bit. */
    size_t need = 0;
    kvc_status xs = d.p->seq_export(seq, NULL, 0, &need);
    if (xs == KVC_OK) {
        char *blob = malloc(need);
        float *o2 = malloc(d.qw * sizeof(float));
        int same = blob && o2 && d.p->seq_export(seq, blob, need, &need) == KVC_OK &&
                   d.p->seq_import(copy, blob, need) == KVC_OK &&
                   d.p->attend(seq, 29, 1, d.pos + total - 1, d.q, d.out) == KVC_OK &&
                   d.p->attend(copy, 29, 1, d.pos + total - 1, d.q, o2) == KVC_OK &&
                   !memcmp(d.out, o2, d.qw * sizeof(float));
        printf("\nexport   %zu B blob; import into a new sequence gives %s attention\n", need,
               same ? "bit-identical" : "DIFFERENT");
        free(blob);
        free(o2);
        if (!same)
            goto done;
    } else {
        printf("\nexport   not offered by this plugin (%s)\n", kvch_status_string(xs));
    }
    d.p->seq_close(seq);
    d.p->seq_close(copy);
    d.p->destroy(in);
    in = NULL;
    kvch_tracker_get(tr, &ts);
    printf("leaks    %llu allocations live after destroy; %llu bad frees, %llu overruns\n",
           (unsigned long long)ts.live, (unsigned long long)ts.n_bad_free,
           (unsigned long long)ts.n_overrun);
    rc = (ts.live || ts.n_bad_free || ts.n_overrun) ? 1 : 0;

done:
    if (in)
        d.p->destroy(in);
    free(d.pos), free(d.q), free(d.k), free(d.v), free(d.out), free(d.ref);
    kvch_options_clear(&opts);
    kvch_tracker_free(tr);
    kvch_unload(lib);
    return rc;
}
