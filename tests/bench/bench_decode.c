/*
 * kvc-bench-decode: decode time per token through one or more plugins, on
 * ONE layer of SmolLM2-135M's geometry (9 query heads, 3 KV heads, head_dim
 * 64, hidden 576, adjacent RoPE, theta 100000), at several context lengths,
 * beside this machine's measured memcpy bandwidth. One layer is enough: a
 * decode step's attention touches only its own layer's cache and factors,
 * so L layers take about L times this (with caches cold, see --cache). A
 * benchmark, not a test: it prints figures and asserts nothing.
 *
 * usage: kvc-bench-decode [--plugin SPEC]... [--opt name=value]...
 *                         [--contexts 1024,4096,...] [--reps N] [--cache cold|warm]
 *   SPEC  NAME or PATH of a plugin, optionally followed by '|'-separated
 *         options: "lorc|kv_ratio=0.5", "build/plugins/svdllm/kvc-svdllm.so|
 *         kv_ratio=0.5|key_space=post". Repeatable: one configuration each.
 *   --opt adds an option to the preceding --plugin (before any --plugin: to
 *         `full`). Without any --plugin: `full` at its defaults and fp16.
 *
 * Per configuration, once: create (max_positions covering the largest
 * context and the timed steps); a plugin whose caps say NEEDS_WEIGHTS or
 * NEEDS_CALIBRATION gets synthetic weights (uniform random / sqrt(hidden))
 * and/or CALIB_ROWS random calibration rows (positions 0..n-1) through
 * prepare_layer, then finalize(). Attention time depends on the ranks the
 * options give, not on the factor values, so synthetic inputs suffice.
 *
 * Per context N: every configuration gets a fresh sequence filled with N
 * random tokens (appends of 4096), then decode steps are timed, each
 * = append 1 token + attend 1 query at its position. Medians of --reps
 * steps after WARMUP untimed ones, step and attend-only.
 *   --cache cold (default): the configurations take turns step by step, so
 *     load on the machine hits them alike (ratios measured side by side),
 *     and before each step twice the last-level cache is read, so no CPU
 *     cache holds the sequence: what a step sees in a model whose other
 *     layers ran in between.
 *   --cache warm: each configuration's steps run back to back, so a
 *     sequence that fits the CPU caches is read from them.
 *
 * The reference is the first configuration that is `full` without options;
 * when none was asked for, one is added in front.
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench_util.h"
#include "kvch.h"

#define MAX_CONFIGS 64
#define MAX_CTX 16
#define WARMUP 3
#define CHUNK 4096      /* tokens per fill append */
#define CALIB_ROWS 2048 /* >= 2 * hidden: a full-rank Gram for whitening */
#define CALIB_CHUNK 512

/* SmolLM2-135M's layer geometry. */
enum { N_HEADS = 9, N_KV = 3, HEAD_DIM = 64, HIDDEN = 576 };
#define KW ((size_t)N_KV * HEAD_DIM)   /* K or V values per token */
#define QW ((size_t)N_HEADS * HEAD_DIM) /* query values per token */

/* Bytes copied per second by memcpy of 256 MiB, median of 7. */
static double memcpy_bandwidth(void)
{
    size_t n = (size_t)256 << 20;
    char *a = malloc(n), *b = malloc(n);
    if (!a || !b) {
        free(a), free(b);
        return 0;
    }
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

static float *rnd_array(size_t n, float scale)
{
    float *a = malloc(n * sizeof(float));
    if (a)
        for (size_t i = 0; i < n; i++)
            a[i] = scale * rnd();
    return a;
}

/* One plugin configuration and its results. */
typedef struct config {
    char *path;          /* name or path given to kvch_load */
    kvch_options opts;
    char label[256];     /* options as "a=1,b=2", or "(defaults)" */
    kvch_plugin *lib;
    const kvc_plugin *p;
    kvc_instance *in;
    kvc_seq *seq;        /* the current context's sequence */
    int failed;
    double *t_step, *t_att; /* [reps] */
} config;

static void config_label(config *c)
{
    size_t n = 0;
    c->label[0] = '\0';
    for (uint32_t i = 0; i < c->opts.n; i++)
        n += (size_t)snprintf(c->label + n, n < sizeof c->label ? sizeof c->label - n : 0,
                              "%s%s=%s", i ? "," : "", c->opts.names[i], c->opts.values[i]);
    if (!c->opts.n)
        snprintf(c->label, sizeof c->label, "(defaults)");
}

/* "path|a=1|b=2" -> a new configuration. */
static config *config_add(config *cs, int *n, const char *spec, char *err, size_t err_size)
{
    if (*n >= MAX_CONFIGS) {
        snprintf(err, err_size, "at most %d configurations", MAX_CONFIGS);
        return NULL;
    }
    config *c = &cs[(*n)++];
    memset(c, 0, sizeof *c);
    char *copy = strdup(spec);
    if (!copy) {
        snprintf(err, err_size, "out of memory");
        return NULL;
    }
    char *bar = strchr(copy, '|'), *rest = NULL;
    if (bar)
        *bar = '\0', rest = bar + 1;
    if (!copy[0] || !(c->path = strdup(copy))) {
        snprintf(err, err_size, "plugin spec \"%s\" names no plugin (NAME|PATH[|name=value...])",
                 spec);
        free(copy);
        return NULL;
    }
    for (char *tok = rest; tok;) {
        char *next = strchr(tok, '|');
        if (next)
            *next++ = '\0';
        if (kvch_options_add(&c->opts, tok, err, err_size)) {
            free(copy);
            return NULL;
        }
        tok = next;
    }
    free(copy);
    return c;
}

static void config_free(config *c)
{
    if (c->p) {
        c->p->seq_close(c->seq);
        c->p->destroy(c->in);
    }
    kvch_unload(c->lib);
    kvch_options_clear(&c->opts);
    free(c->path), free(c->t_step), free(c->t_att);
}

/* Creates c's instance and prepares it from synthetic inputs if its caps
 * ask for preparation. Returns 0 or 1 (message printed). */
static int config_create(config *c, const kvc_host *host, uint32_t max_positions)
{
    kvc_geometry g = {.struct_size = sizeof g, .n_layers = 1, .n_heads = N_HEADS,
                      .n_kv_heads = N_KV, .head_dim = HEAD_DIM, .hidden_size = HIDDEN,
                      .max_positions = max_positions, .rope_style = KVC_ROPE_ADJACENT,
                      .rope_theta = 100000.0f};
    kvc_create_info ci = {.struct_size = sizeof ci, .host = host, .geometry = &g,
                          .device = KVC_MEM_HOST, .dtype = KVC_DTYPE_F32};
    kvch_options_apply(&c->opts, &ci);
    char err[512];
    if (c->p->create(&ci, &c->in, err, sizeof err)) {
        fprintf(stderr, "%s %s: create: %s\n", c->p->id, c->label, err);
        return 1;
    }
    const int w_need = (c->p->caps & KVC_CAP_NEEDS_WEIGHTS) != 0;
    const int c_need = (c->p->caps & KVC_CAP_NEEDS_CALIBRATION) != 0;
    int rc = 0;
    if (w_need || c_need) {
        const float ws = 1.0f / 24.0f; /* 1/sqrt(hidden) */
        float *wq = rnd_array(QW * HIDDEN, ws), *wk = rnd_array(KW * HIDDEN, ws);
        float *wv = rnd_array(KW * HIDDEN, ws), *wo = rnd_array(HIDDEN * QW, ws);
        float *x = rnd_array((size_t)CALIB_CHUNK * HIDDEN, 1.0f);
        int32_t pos[CALIB_CHUNK];
        kvc_layer_weights w = {.struct_size = sizeof w, .w_q = wq, .w_k = wk, .w_v = wv,
                               .w_o = wo};
        const char *what = "out of memory";
        if (!wq || !wk || !wv || !wo || !x)
            rc = 1;
        if (!rc && w_need && c->p->prepare_layer(c->in, 0, &w, NULL))
            rc = 1, what = "prepare_layer (weights)";
        for (int r0 = 0; !rc && c_need && r0 < CALIB_ROWS; r0 += CALIB_CHUNK) {
            for (int i = 0; i < CALIB_CHUNK; i++)
                pos[i] = r0 + i;
            for (size_t i = 0; i < (size_t)CALIB_CHUNK * HIDDEN; i++)
                x[i] = rnd();
            kvc_calib_chunk ch = {.struct_size = sizeof ch, .n_rows = CALIB_CHUNK, .x = x,
                                  .positions = pos};
            if (c->p->prepare_layer(c->in, 0, NULL, &ch))
                rc = 1, what = "prepare_layer (calibration)";
        }
        if (rc)
            fprintf(stderr, "%s %s: %s: %s\n", c->p->id, c->label, what,
                    c->p->instance_message(c->in));
        free(wq), free(wk), free(wv), free(wo), free(x);
    }
    if (!rc && c->p->finalize(c->in)) {
        fprintf(stderr, "%s %s: finalize: %s\n", c->p->id, c->label,
                c->p->instance_message(c->in));
        rc = 1;
    }
    return rc;
}

/* OpenBLAS (linked by the plugins, loaded with this program) runs one
 * thread unless OPENBLAS_NUM_THREADS says otherwise; returns the count in
 * force, or 0 when OpenBLAS is not loaded. */
static int blas_threads(void)
{
    void (*set)(int) = (void (*)(int))dlsym(RTLD_DEFAULT, "openblas_set_num_threads");
    int (*get)(void) = (int (*)(void))dlsym(RTLD_DEFAULT, "openblas_get_num_threads");
    if (set && !getenv("OPENBLAS_NUM_THREADS"))
        set(1);
    return get ? get() : 0;
}

/* One decode step of c at context N, repetition r (< 0: warm-up): append
 * the token at position N + WARMUP + r, attend its query. Returns 0 or 1
 * (message printed, c marked failed). */
static int step(config *c, size_t N, int r, const float *k, const float *v, const float *q,
                float *out)
{
    int32_t p = (int32_t)(N + WARMUP + r);
    const float *kr = k + (size_t)(WARMUP + r) % CHUNK * KW;
    const float *vr = v + (size_t)(WARMUP + r) % CHUNK * KW;
    double t0 = now_s();
    kvc_status s = c->p->append(c->seq, 0, 1, &p, kr, vr, NULL);
    double t1 = now_s();
    if (!s)
        s = c->p->attend(c->seq, 0, 1, &p, q, out);
    double t2 = now_s();
    if (s) {
        fprintf(stderr, "%s %s: decode step at %zu: %s\n", c->p->id, c->label, N,
                c->p->seq_message(c->seq));
        c->failed = 1;
        return 1;
    }
    if (r >= 0) {
        c->t_step[r] = t2 - t0;
        c->t_att[r] = t2 - t1;
    }
    return 0;
}

/* Bytes to read so that the CPU caches hold none of what a step used:
 * twice the last-level cache, at least 64 MiB. */
static size_t flush_bytes(void)
{
    size_t n = (size_t)64 << 20, llc = 0;
    char unit = 0;
    FILE *f = fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r");
    if (f) {
        if (fscanf(f, "%zu%c", &llc, &unit) >= 1)
            llc *= unit == 'K' ? 1024 : unit == 'M' ? (size_t)1 << 20 : 1;
        fclose(f);
    }
    return 2 * llc > n ? 2 * llc : n;
}

static void flush_caches(const float *buf, size_t n)
{
    float acc[8] = {0};
    for (size_t i = 0; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++)
            acc[j] += buf[i + j];
    volatile float sink = acc[0] + acc[7];
    (void)sink;
}

static void usage(void)
{
    fprintf(stderr,
            "usage: kvc-bench-decode [--plugin NAME|PATH[|name=value...]]... [--opt name=value]...\n"
            "                        [--contexts 1024,4096,...] [--reps N] [--cache cold|warm]\n");
}

int main(int argc, char **argv)
{
    static config cs[MAX_CONFIGS];
    int n_cfg = 0;
    size_t ctx[MAX_CTX] = {1024, 4096, 16384, 65536};
    int n_ctx = 4, reps = 20, cold = 1;
    char err[512];
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--plugin") && i + 1 < argc) {
            if (!config_add(cs, &n_cfg, argv[++i], err, sizeof err)) {
                fprintf(stderr, "%s\n", err);
                return 2;
            }
        } else if (!strcmp(argv[i], "--opt") && i + 1 < argc) {
            if ((!n_cfg && !config_add(cs, &n_cfg, "full", err, sizeof err)) ||
                kvch_options_add(&cs[n_cfg - 1].opts, argv[++i], err, sizeof err)) {
                fprintf(stderr, "%s\n", err);
                return 2;
            }
        } else if (!strcmp(argv[i], "--reps") && i + 1 < argc)
            reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--cache") && i + 1 < argc) {
            ++i;
            if (strcmp(argv[i], "cold") && strcmp(argv[i], "warm")) {
                usage();
                return 2;
            }
            cold = !strcmp(argv[i], "cold");
        } else if (!strcmp(argv[i], "--contexts") && i + 1 < argc) {
            n_ctx = 0;
            for (char *tok = strtok(argv[++i], ","); tok && n_ctx < MAX_CTX;
                 tok = strtok(NULL, ","))
                ctx[n_ctx++] = strtoul(tok, NULL, 10);
        } else {
            usage();
            return 2;
        }
    }
    if (reps < 1 || n_ctx < 1) {
        usage();
        return 2;
    }
    for (int c = 0; c < n_ctx; c++)
        if (ctx[c] < 1 || ctx[c] > ((size_t)1 << 30)) {
            fprintf(stderr, "context %zu out of range\n", ctx[c]);
            return 2;
        }
    if (!n_cfg) {
        config_add(cs, &n_cfg, "full", err, sizeof err);
        config_add(cs, &n_cfg, "full|dtype=fp16", err, sizeof err);
    }
    int rc = 0, ref = -1;
    for (int i = 0; i < n_cfg; i++) {
        config_label(&cs[i]);
        if (kvch_load(cs[i].path, &cs[i].lib, err, sizeof err)) {
            fprintf(stderr, "%s\n", err);
            cs[i].failed = 1, rc = 1;
            continue;
        }
        cs[i].p = kvch_plugin_desc(cs[i].lib);
        if (ref < 0 && !strcmp(cs[i].p->id, "full") && !cs[i].opts.n)
            ref = i;
    }
    if (ref < 0 && n_cfg < MAX_CONFIGS) { /* the reference, in front */
        memmove(cs + 1, cs, (size_t)n_cfg * sizeof *cs);
        int one = 0;
        config_add(cs, &one, "full", err, sizeof err);
        n_cfg++;
        config_label(&cs[0]);
        if (kvch_load("full", &cs[0].lib, err, sizeof err)) {
            fprintf(stderr, "reference: %s\n", err);
            cs[0].failed = 1, rc = 1;
        } else {
            cs[0].p = kvch_plugin_desc(cs[0].lib);
            ref = 0;
        }
    }

    int threads = blas_threads();
    kvch_tracker *tr = kvch_tracker_new();
    kvc_host host;
    kvch_tracker_host(tr, NULL, &host);
    size_t max_ctx = 0;
    for (int i = 0; i < n_ctx; i++)
        max_ctx = ctx[i] > max_ctx ? ctx[i] : max_ctx;
    const uint32_t max_pos = (uint32_t)(max_ctx + WARMUP + reps + 1);
    for (int i = 0; i < n_cfg; i++) {
        config *c = &cs[i];
        if (c->failed)
            continue;
        c->t_step = malloc((size_t)reps * sizeof(double));
        c->t_att = malloc((size_t)reps * sizeof(double));
        if (!c->t_step || !c->t_att || config_create(c, &host, max_pos))
            c->failed = 1, rc = 1;
    }

    double bw = memcpy_bandwidth(), rbw = read_bandwidth();
    printf("kvc-bench-decode: one layer of SmolLM2-135M (9 q heads, 3 kv heads, head_dim 64, "
           "hidden 576, adjacent RoPE theta 1e5); one layer suffices: a step's attention "
           "touches only its layer's cache\n");
    printf("step = append 1 token + attend 1 query at its position; median of %d steps after "
           "%d warm-ups\n",
           reps, WARMUP);
    if (cold)
        printf("cache cold: configurations take turns step by step (measured side by side), "
               "and before each step %zu MiB are read so that no CPU cache holds the "
               "sequence, as in a model whose other layers ran in between\n",
               flush_bytes() >> 20);
    else
        printf("cache warm: each configuration's steps run back to back, so a sequence "
               "that fits the CPU caches is read from them (a one-layer model)\n");
    printf("plugins needing weights/calibration prepared from synthetic ones (random weights / "
           "sqrt(hidden), %d random calibration rows): timing depends on the ranks, not the "
           "factor values\n",
           CALIB_ROWS);
    printf("OpenBLAS threads: %d (OPENBLAS_NUM_THREADS=%s)\n", threads,
           getenv("OPENBLAS_NUM_THREADS") ? getenv("OPENBLAS_NUM_THREADS") : "unset, set to 1");
    printf("this machine, one thread, 256 MiB, median of 7: memcpy %.2f GB/s copied (%.2f GB/s "
           "of read+write traffic); streaming read %.2f GB/s\n",
           bw / 1e9, 2 * bw / 1e9, rbw / 1e9);
    printf("x full = median / median of `full` (defaults, fp32) at the same context; B/token = "
           "bytes_resident / tokens / layers, of fp16 = bytes_resident / bytes_fp16_full;\n"
           "GB/s = payload bytes (every held K/V value or latent once) / attend median, "
           "of read = that / streaming read; kept = head-tokens held / (tokens x KV heads)\n");
    for (int i = 0; i < n_cfg; i++)
        if (cs[i].p)
            printf("  %-8s %s  (%s %s)%s%s\n", cs[i].p->id, cs[i].label,
                   kvch_plugin_path(cs[i].lib), cs[i].p->version,
                   i == ref ? "  [reference]" : "", cs[i].failed ? "  FAILED to prepare" : "");
    printf("\n");
    int lw = 10;
    for (int i = 0; i < n_cfg; i++)
        lw = (int)strlen(cs[i].label) > lw ? (int)strlen(cs[i].label) : lw;
    printf("%-8s %-*s %7s %10s %7s %10s %7s %6s %8s %7s %7s %7s\n", "plugin", lw, "options",
           "context", "step us", "x full", "attend us", "x full", "kept", "B/token", "of fp16",
           "GB/s", "of read");
    fflush(stdout);

    const size_t chunk = CHUNK;
    float *k = rnd_array(chunk * KW, 1.0f), *v = rnd_array(chunk * KW, 1.0f);
    float *q = rnd_array(QW, 1.0f), *out = malloc(QW * sizeof(float));
    int32_t *pos = malloc(chunk * sizeof(int32_t));
    const size_t flush_n = cold ? flush_bytes() / sizeof(float) : 0;
    float *flush = cold ? malloc(flush_n * sizeof(float)) : NULL;
    if (flush)
        for (size_t i = 0; i < flush_n; i++)
            flush[i] = (float)(i & 7);
    if (!k || !v || !q || !out || !pos || (cold && !flush)) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    for (int ci = 0; ci < n_ctx; ci++) {
        const size_t N = ctx[ci];
        for (int i = 0; i < n_cfg; i++) { /* fill */
            config *c = &cs[i];
            if (c->failed)
                continue;
            if (c->p->seq_open(c->in, &c->seq)) {
                fprintf(stderr, "%s %s: seq_open failed\n", c->p->id, c->label);
                c->failed = 1, rc = 1;
                continue;
            }
            for (size_t t = 0; t < N && !c->failed; t += chunk) {
                size_t n = N - t < chunk ? N - t : chunk;
                for (size_t j = 0; j < n; j++)
                    pos[j] = (int32_t)(t + j);
                if (c->p->append(c->seq, 0, (uint32_t)n, pos, k, v, NULL)) {
                    fprintf(stderr, "%s %s: append at %zu: %s\n", c->p->id, c->label, N,
                            c->p->seq_message(c->seq));
                    c->failed = 1, rc = 1;
                }
            }
        }
        if (cold) /* interleaved, caches flushed before each step */
            for (int r = -WARMUP; r < reps; r++)
                for (int i = 0; i < n_cfg; i++) {
                    if (cs[i].failed)
                        continue;
                    flush_caches(flush, flush_n);
                    if (step(&cs[i], N, r, k, v, q, out))
                        rc = 1;
                }
        else /* each configuration's steps back to back */
            for (int i = 0; i < n_cfg; i++)
                for (int r = -WARMUP; r < reps && !cs[i].failed; r++)
                    if (step(&cs[i], N, r, k, v, q, out))
                        rc = 1;
        double ref_step = 0, ref_att = 0;
        if (ref >= 0 && !cs[ref].failed) {
            ref_step = median(cs[ref].t_step, reps);
            ref_att = median(cs[ref].t_att, reps);
        }
        for (int i = 0; i < n_cfg; i++) {
            config *c = &cs[i];
            if (!c->p)
                continue;
            if (c->failed) {
                printf("%-8s %-*s %7zu  failed\n", c->p->id, lw, c->label, N);
            } else {
                kvc_seq_stats st = {.struct_size = sizeof st};
                c->p->seq_stats(c->seq, &st);
                double ms = median(c->t_step, reps), ma = median(c->t_att, reps);
                double bpt = st.tokens_appended ? (double)st.bytes_resident / st.tokens_appended
                                                : 0;
                double f16 = st.bytes_fp16_full ? (double)st.bytes_resident / st.bytes_fp16_full
                                                : 0;
                double gbs = (double)st.bytes_payload / ma;
                char xs[16] = "-", xa[16] = "-";
                if (ref_step > 0) {
                    snprintf(xs, sizeof xs, "%.2f", ms / ref_step);
                    snprintf(xa, sizeof xa, "%.2f", ma / ref_att);
                }
                double kept = st.tokens_appended ? (double)st.head_tokens_resident /
                                                       ((double)st.tokens_appended * N_KV)
                                                 : 0;
                printf("%-8s %-*s %7zu %10.1f %7s %10.1f %7s %5.1f%% %8.1f %6.1f%% %7.2f %6.0f%%\n",
                       c->p->id, lw, c->label, N, 1e6 * ms, xs, 1e6 * ma, xa, 100 * kept, bpt,
                       100 * f16, gbs / 1e9, 100.0 * gbs / rbw);
            }
            c->p->seq_close(c->seq);
            c->seq = NULL;
        }
        fflush(stdout);
    }
    free(k), free(v), free(q), free(out), free(pos), free(flush);
    for (int i = 0; i < n_cfg; i++)
        config_free(&cs[i]);
    kvch_tracker_free(tr);
    return rc;
}
