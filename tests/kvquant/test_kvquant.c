/*
 * test_kvquant.c -- kvc-kvquant.so through the ABI (loaded by path, argv[1]):
 * the calibrated widths go where the calibration says they matter, fitted
 * levels beat a uniform grid on bell-shaped keys, one artifact serves every
 * width setting and round-trips to the same bytes and the same attention,
 * kv_ratio picks a setting inside the budget or is refused at create with
 * the reason, and nothing runs before preparation.
 *
 * Synthetic model: rope_style NONE (so materialize returns the stored
 * pre-RoPE keys), W_q with a few channels per head far louder than the
 * rest, Gaussian-ish activations.
 */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "stream.h"

static const char *g_path;
static uint64_t g_seed;

enum { L = 2, NH = 8, NKV = 2, D = 64, HID = 256, ROWS = 256, CHUNKS = 4 };
/* Channels of every key head whose queries are 8x louder. */
static const uint32_t LOUD[] = {4, 5, 40, 41};
#define N_LOUD (sizeof LOUD / sizeof LOUD[0])

static kvc_geometry geometry(void)
{
    kvc_geometry g;
    memset(&g, 0, sizeof g);
    g.struct_size = sizeof g;
    g.n_layers = L;
    g.n_heads = NH;
    g.n_kv_heads = NKV;
    g.head_dim = D;
    g.hidden_size = HID;
    g.max_positions = 4096;
    g.rope_style = KVC_ROPE_NONE;
    return g;
}

static int loud(uint32_t c)
{
    for (size_t i = 0; i < N_LOUD; i++)
        if (LOUD[i] == c)
            return 1;
    return 0;
}

static float gauss(uint64_t *s)
{
    return th_uniform(s) + th_uniform(s) + th_uniform(s);
}

/* Feeds synthetic weights and calibration, then finalize. */
static void prepare(const th_env *e, kvc_instance *in, uint64_t seed)
{
    uint64_t r = seed;
    const size_t qd = (size_t)NH * D, kd = (size_t)NKV * D;
    float *wq = malloc(qd * HID * sizeof(float)), *wk = malloc(kd * HID * sizeof(float));
    float *wv = malloc(kd * HID * sizeof(float)), *x = malloc((size_t)ROWS * HID * sizeof(float));
    int32_t pos[ROWS];
    for (int i = 0; i < ROWS; i++)
        pos[i] = i;
    const float s = 1.0f / sqrtf((float)HID);
    for (uint32_t l = 0; l < L; l++) {
        for (size_t i = 0; i < qd * HID; i++)
            wq[i] = s * th_uniform(&r) * (loud((uint32_t)((i / HID) % D)) ? 8.0f : 1.0f);
        for (size_t i = 0; i < kd * HID; i++) {
            wk[i] = s * th_uniform(&r);
            wv[i] = s * th_uniform(&r);
        }
        kvc_layer_weights w = {.struct_size = sizeof w, .w_q = wq, .w_k = wk, .w_v = wv};
        ck_assert_int_eq(e->p->prepare_layer(in, l, &w, NULL), KVC_OK);
        for (int c = 0; c < CHUNKS; c++) {
            for (size_t i = 0; i < (size_t)ROWS * HID; i++)
                x[i] = gauss(&r);
            kvc_calib_chunk ch = {.struct_size = sizeof ch, .n_rows = ROWS, .x = x,
                                  .positions = pos};
            kvc_status st = e->p->prepare_layer(in, l, NULL, &ch);
            ck_assert_msg(st == KVC_OK, "calibration: %s", e->p->instance_message(in));
        }
    }
    ck_assert_msg(e->p->finalize(in) == KVC_OK, "finalize: %s", e->p->instance_message(in));
    free(wq), free(wk), free(wv), free(x);
}

static kvc_instance *create(const th_env *e, const char *const *opts, const void *art,
                            size_t art_size)
{
    kvc_geometry g = geometry();
    const char *names[16], *values[16];
    char store[16][64];
    uint32_t n = 0;
    for (; opts && opts[n]; n++) {
        snprintf(store[n], sizeof store[n], "%s", opts[n]);
        char *eq = strchr(store[n], '=');
        *eq = 0;
        names[n] = store[n];
        values[n] = eq + 1;
    }
    kvc_create_info ci = {.struct_size = sizeof ci, .host = &e->host, .geometry = &g,
                          .n_options = n, .option_names = names, .option_values = values,
                          .artifact = art, .artifact_size = art_size};
    kvc_instance *in = NULL;
    char msg[512];
    kvc_status st = e->p->create(&ci, &in, msg, sizeof msg);
    ck_assert_msg(st == KVC_OK, "create: %s", msg);
    return in;
}

static void *save(const th_env *e, kvc_instance *in, size_t *size)
{
    ck_assert_int_eq(e->p->save(in, NULL, 0, size), KVC_OK);
    void *buf = malloc(*size);
    ck_assert_int_eq(e->p->save(in, buf, *size, size), KVC_OK);
    return buf;
}

/* Keys of `n` tokens through a sequence of `in`, materialized: per channel
 * c the mean squared error against the keys given, relative to their
 * variance, into rel [D] (head 0 of layer 0). */
static void key_errors(const th_env *e, kvc_instance *in, uint32_t n, double *rel)
{
    uint64_t r = g_seed + 7;
    const size_t kd = (size_t)NKV * D;
    float *k = malloc(n * kd * sizeof(float)), *v = malloc(n * kd * sizeof(float));
    int32_t *pos = malloc(n * sizeof(int32_t));
    for (uint32_t i = 0; i < n; i++)
        pos[i] = (int32_t)i;
    for (size_t i = 0; i < n * kd; i++) {
        k[i] = gauss(&r);
        v[i] = gauss(&r);
    }
    kvc_seq *s;
    ck_assert_int_eq(e->p->seq_open(in, &s), KVC_OK);
    ck_assert_int_eq(e->p->append(s, 0, n, pos, k, v, NULL), KVC_OK);
    uint32_t cnt[NKV];
    float *mk = malloc(NKV * n * D * sizeof(float));
    int32_t *mp = malloc(NKV * n * sizeof(int32_t));
    kvc_materialized m = {sizeof m, n, cnt, mp, mk, NULL};
    ck_assert_int_eq(e->p->materialize(s, 0, &m), KVC_OK);
    for (uint32_t c = 0; c < D; c++) {
        double err = 0, var = 0;
        for (uint32_t t = 0; t < n; t++) {
            double a = mk[(size_t)t * D + c], b = k[(size_t)t * kd + c];
            err += (a - b) * (a - b);
            var += b * b;
        }
        rel[c] = err / var;
    }
    e->p->seq_close(s);
    free(k), free(v), free(pos), free(mk), free(mp);
}

#define OPEN(e)                                                                             \
    th_env e;                                                                               \
    char err_[512];                                                                         \
    ck_assert_msg(th_open(&e, g_path, err_, sizeof err_) == 0, "load: %s", err_)

START_TEST(widths_follow_query_energy)
{
    OPEN(e);
    const char *opts[] = {"k_bits=3", "v_bits=4", NULL};
    kvc_instance *in = create(&e, opts, NULL, 0);
    prepare(&e, in, g_seed);
    double rel[D];
    key_errors(&e, in, 512, rel); /* 8 whole blocks: all quantized */
    double loud_err = 0, quiet_err = 0;
    for (uint32_t c = 0; c < D; c++)
        *(loud(c) ? &loud_err : &quiet_err) += rel[c];
    loud_err /= N_LOUD;
    quiet_err /= D - N_LOUD;
    printf("  k_bits=3: loud channels' key error %.3e, others %.3e\n", loud_err, quiet_err);
    ck_assert_msg(loud_err < quiet_err / 4,
                  "channels with 8x louder queries should get more bits: error %.3e vs %.3e",
                  loud_err, quiet_err);
    e.p->destroy(in);
    ck_assert_uint_eq(th_live_bytes(&e), 0);
    th_close(&e);
}
END_TEST

START_TEST(fitted_levels_beat_uniform_on_bell_shaped_keys)
{
    OPEN(e);
    const char *uni[] = {"k_bits=3", "v_bits=3", "alloc=uniform", "levels=uniform", NULL};
    const char *fit[] = {"k_bits=3", "v_bits=3", "alloc=uniform", "levels=fit", NULL};
    kvc_instance *a = create(&e, uni, NULL, 0), *b = create(&e, fit, NULL, 0);
    prepare(&e, a, g_seed);
    prepare(&e, b, g_seed);
    double ra[D], rb[D], sa = 0, sb = 0;
    key_errors(&e, a, 512, ra);
    key_errors(&e, b, 512, rb);
    for (uint32_t c = 0; c < D; c++)
        sa += ra[c], sb += rb[c];
    printf("  3-bit keys: uniform levels %.3e, fitted %.3e\n", sa / D, sb / D);
    ck_assert_msg(sb < sa * 0.97, "fitted levels should cut the error: %.3e vs %.3e", sb / D,
                  sa / D);
    e.p->destroy(a), e.p->destroy(b);
    th_close(&e);
}
END_TEST

/* Output of one query after 300 tokens (mixed batches). */
static void attend_once(const th_env *e, kvc_instance *in, float *out)
{
    uint64_t r = g_seed + 99;
    enum { N = 300 };
    const size_t kd = (size_t)NKV * D, qd = (size_t)NH * D;
    float *k = malloc(N * kd * sizeof(float)), *v = malloc(N * kd * sizeof(float));
    float *q = malloc(N * qd * sizeof(float)), *o = malloc(N * qd * sizeof(float));
    int32_t pos[N];
    for (int i = 0; i < N; i++)
        pos[i] = i;
    for (size_t i = 0; i < N * kd; i++)
        k[i] = gauss(&r), v[i] = gauss(&r);
    for (size_t i = 0; i < N * qd; i++)
        q[i] = gauss(&r);
    kvc_seq *s;
    ck_assert_int_eq(e->p->seq_open(in, &s), KVC_OK);
    for (int t = 0; t < N; t += 100) {
        ck_assert_int_eq(e->p->append(s, 1, 100, pos + t, k + t * kd, v + t * kd, NULL), KVC_OK);
        ck_assert_int_eq(e->p->attend(s, 1, 100, pos + t, q + t * qd, o), KVC_OK);
    }
    memcpy(out, o + 99 * qd, qd * sizeof(float));
    e->p->seq_close(s);
    free(k), free(v), free(q), free(o);
}

START_TEST(one_artifact_serves_every_setting)
{
    OPEN(e);
    const char *opts[] = {"k_bits=3.5", "v_bits=3", "levels=fit", NULL};
    kvc_instance *a = create(&e, opts, NULL, 0);
    prepare(&e, a, g_seed);
    size_t n1, n2;
    void *art = save(&e, a, &n1);
    /* The same settings from the artifact: the same bytes and outputs. */
    kvc_instance *b = create(&e, opts, art, n1);
    void *again = save(&e, b, &n2);
    ck_assert_msg(n1 == n2 && memcmp(art, again, n1) == 0, "artifact round trip differs");
    float oa[NH * D], ob[NH * D];
    attend_once(&e, a, oa);
    attend_once(&e, b, ob);
    ck_assert_msg(memcmp(oa, ob, sizeof oa) == 0, "attention from the artifact differs");
    /* Other widths from the same statistics. */
    static const char *const other[][4] = {{"k_bits=8", "v_bits=8", NULL, NULL},
                                           {"k_bits=2", "v_bits=2", "alloc=uniform", NULL},
                                           {"kv_ratio=0.3", NULL, NULL, NULL}};
    for (size_t i = 0; i < 3; i++) {
        kvc_instance *c = create(&e, other[i], art, n1);
        kvc_instance_stats is = {.struct_size = sizeof is};
        ck_assert_int_eq(e.p->instance_stats(c, &is), KVC_OK);
        printf("  from the artifact, %s %s: declared kv_ratio %.3f\n", other[i][0],
               other[i][1] ? other[i][1] : "", is.kv_ratio);
        if (i == 2)
            ck_assert_msg(is.kv_ratio <= 0.3, "kv_ratio 0.3 picked a setting declaring %.4f",
                          is.kv_ratio);
        float oc[NH * D];
        attend_once(&e, c, oc);
        e.p->destroy(c);
    }
    /* A damaged artifact is refused with a reason. */
    ((unsigned char *)art)[n1 / 2] ^= 0x40;
    kvc_geometry g = geometry();
    kvc_create_info ci = {.struct_size = sizeof ci, .host = &e.host, .geometry = &g,
                          .artifact = art, .artifact_size = n1};
    kvc_instance *bad = NULL;
    char msg[512] = "";
    ck_assert_int_eq(e.p->create(&ci, &bad, msg, sizeof msg), KVC_E_CORRUPT);
    ck_assert(msg[0] && !bad);
    free(art), free(again);
    e.p->destroy(a), e.p->destroy(b);
    ck_assert_uint_eq(th_live_bytes(&e), 0);
    th_close(&e);
}
END_TEST

START_TEST(budgets_and_refusals)
{
    OPEN(e);
    kvc_geometry g = geometry();
    static const struct {
        const char *a, *b, *word;
    } bad[] = {
        {"kv_ratio=0.05", NULL, "kv_ratio"},
        {"k_bits=4", "kv_ratio=0.1", "kv_ratio"},
        {"v_bits=7", NULL, "v_bits"},
        {"block_tokens=300", NULL, "block_tokens"},
        {"k_bits=3.5", "alloc=uniform", "alloc"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        const char *names[2], *values[2];
        char s[2][64];
        uint32_t n = 0;
        for (const char *o = bad[i].a; o && n < 2; o = n == 1 ? bad[i].b : NULL) {
            snprintf(s[n], 64, "%s", o);
            char *eq = strchr(s[n], '=');
            *eq = 0;
            names[n] = s[n];
            values[n] = eq + 1;
            n++;
        }
        kvc_create_info ci = {.struct_size = sizeof ci, .host = &e.host, .geometry = &g,
                              .n_options = n, .option_names = names, .option_values = values};
        kvc_instance *in = NULL;
        char msg[512] = "";
        kvc_status st = e.p->create(&ci, &in, msg, sizeof msg);
        ck_assert_msg(st == KVC_E_INVALID && !in, "%s %s was not refused", bad[i].a,
                      bad[i].b ? bad[i].b : "");
        ck_assert_msg(strstr(msg, bad[i].word) != NULL, "message \"%s\" does not name %s", msg,
                      bad[i].word);
    }
    ck_assert_uint_eq(th_live_bytes(&e), 0);
    th_close(&e);
}
END_TEST

/* KVC-REQ-9: a kv_ratio create accepts is one the built store meets, also
 * when the key widths come from calibration (create sees no statistics).
 * For each setting, the smallest ratio create accepts (bisection on
 * create alone) prepares and finalizes, declaring at most that ratio;
 * just below it create refuses, naming kv_ratio. */
static kvc_status try_create(const th_env *e, const char *const *opts, double ratio,
                             kvc_instance **in, char *msg, size_t cap)
{
    kvc_geometry g = geometry();
    const char *names[8], *values[8];
    char store[8][64], kv[64];
    uint32_t n = 0;
    for (; opts[n]; n++) {
        snprintf(store[n], sizeof store[n], "%s", opts[n]);
        char *eq = strchr(store[n], '=');
        *eq = 0;
        names[n] = store[n];
        values[n] = eq + 1;
    }
    snprintf(kv, sizeof kv, "%.17g", ratio);
    names[n] = "kv_ratio";
    values[n++] = kv;
    kvc_create_info ci = {.struct_size = sizeof ci, .host = &e->host, .geometry = &g,
                          .n_options = n, .option_names = names, .option_values = values};
    *in = NULL;
    return e->p->create(&ci, in, msg, cap);
}

START_TEST(accepted_ratios_are_met_with_calibrated_widths)
{
    OPEN(e);
    static const char *const SETTINGS[][4] = {
        {"k_bits=3.5", "v_bits=3", NULL},
        {"k_bits=2.5", "v_bits=3", "block_tokens=32", NULL},
        {"k_bits=4", "v_bits=4", NULL},
        {"k_bits=5.25", "v_bits=2", "block_tokens=16", NULL},
        {"k_bits=3", "v_bits=3", "alloc=uniform", NULL},
    };
    for (size_t i = 0; i < sizeof SETTINGS / sizeof SETTINGS[0]; i++) {
        const char *const *o = SETTINGS[i];
        char msg[512];
        kvc_instance *in = NULL;
        double lo = 0.01, hi = 2.0; /* refused at lo, accepted at hi */
        ck_assert_int_eq(try_create(&e, o, hi, &in, msg, sizeof msg), KVC_OK);
        e.p->destroy(in);
        while (hi - lo > 1e-6) {
            const double mid = 0.5 * (lo + hi);
            kvc_status st = try_create(&e, o, mid, &in, msg, sizeof msg);
            e.p->destroy(in);
            if (st == KVC_OK) {
                hi = mid;
            } else {
                ck_assert_msg(st == KVC_E_INVALID && strstr(msg, "kv_ratio"),
                              "setting %zu: kv_ratio %g refused with %d: %s", i, mid, st, msg);
                lo = mid;
            }
        }
        ck_assert_int_eq(try_create(&e, o, hi, &in, msg, sizeof msg), KVC_OK);
        prepare(&e, in, g_seed + i); /* finalize must succeed */
        kvc_instance_stats is = {.struct_size = sizeof is};
        ck_assert_int_eq(e.p->instance_stats(in, &is), KVC_OK);
        ck_assert_msg(is.kv_ratio <= hi * (1 + 1e-12),
                      "setting %zu: accepted kv_ratio %.6f, declares %.6f", i, hi, is.kv_ratio);
        e.p->destroy(in);
    }
    ck_assert_uint_eq(th_live_bytes(&e), 0);
    th_close(&e);
}
END_TEST

START_TEST(nothing_runs_before_preparation)
{
    OPEN(e);
    const char *opts[] = {"k_bits=4", NULL};
    kvc_instance *in = create(&e, opts, NULL, 0);
    kvc_seq *s;
    ck_assert_int_eq(e.p->seq_open(in, &s), KVC_OK);
    float k[NKV * D] = {0}, q[NH * D] = {0}, o[NH * D];
    int32_t p = 0;
    ck_assert_int_eq(e.p->append(s, 0, 1, &p, k, k, NULL), KVC_E_STATE);
    ck_assert_int_eq(e.p->attend(s, 0, 1, &p, q, o), KVC_E_STATE);
    ck_assert(strstr(e.p->seq_message(s), "prepared") != NULL);
    size_t sz;
    ck_assert_int_eq(e.p->save(in, NULL, 0, &sz), KVC_E_STATE);
    ck_assert_int_eq(e.p->finalize(in), KVC_E_STATE); /* no calibration fed */
    /* Prepared afterwards, the sequence opened before works. */
    kvc_instance *in2 = create(&e, opts, NULL, 0);
    kvc_seq *s2;
    ck_assert_int_eq(e.p->seq_open(in2, &s2), KVC_OK);
    prepare(&e, in2, g_seed);
    ck_assert_int_eq(e.p->append(s2, 0, 1, &p, k, k, NULL), KVC_OK);
    ck_assert_int_eq(e.p->attend(s2, 0, 1, &p, q, o), KVC_OK);
    e.p->destroy(in);
    e.p->destroy(in2);
    ck_assert_uint_eq(th_live_bytes(&e), 0);
    th_close(&e);
}
END_TEST


/* ---- the step rule and export, to the byte ----------------------------------- */

static const char *const STEP_CONFIGS[][6] = {
    {NULL},                                                       /* defaults: K4V4, sink 4, window 64 */
    {"k_bits=2.5", "v_bits=3", "window=32", "block_tokens=32", NULL},
    {"k_bits=3", "v_bits=2", "raw_keys=fp16", "raw_values=fp16", "outliers=0.01", NULL},
    {"k_bits=6", "v_bits=5", "levels=uniform", "alloc=uniform", "sink=0", NULL},
};

START_TEST(batched_equals_single_steps_and_exports_to_the_byte)
{
    OPEN(e);
    kvc_instance *in = create(&e, STEP_CONFIGS[_i], NULL, 0);
    prepare(&e, in, g_seed);
    uint64_t rng = g_seed + 31 * (uint64_t)_i;
    kvc_geometry g = geometry();
    const size_t total = 300;
    stream s;
    stream_init(&s, &g, total, &rng, 1);
    kvc_seq *a, *b, *c;
    ck_assert_int_eq(e.p->seq_open(in, &a), KVC_OK);
    ck_assert_int_eq(e.p->seq_open(in, &b), KVC_OK);
    float *oa = malloc(total * qrow(&s) * sizeof(float));
    float *ob = malloc(total * qrow(&s) * sizeof(float));
    for (uint32_t l = 0; l < g.n_layers; l++) {
        run_batches(&e, a, &s, l, total, 100, 60, &rng, oa);
        run_batches(&e, b, &s, l, total, 1, 1, &rng, ob);
        for (size_t t = 0; t < total; t++)
            ck_assert_msg(memcmp(oa + t * qrow(&s), ob + t * qrow(&s), qrow(&s) * 4) == 0,
                          "config %d layer %u: query %zu differs between batched and single "
                          "steps (rel err %.3e)", _i, l, t,
                          th_rel_err_f(oa + t * qrow(&s), ob + t * qrow(&s), qrow(&s)));
    }
    void *ba, *bb, *bc;
    size_t na = export_blob(&e, a, &ba), nb = export_blob(&e, b, &bb);
    ck_assert_msg(na == nb && memcmp(ba, bb, na) == 0,
                  "config %d: the two caches export different bytes (%zu vs %zu)", _i, na, nb);
    /* Imported, the copy exports the same bytes and attends alike. */
    ck_assert_int_eq(e.p->seq_open(in, &c), KVC_OK);
    ck_assert_msg(e.p->seq_import(c, ba, na) == KVC_OK, "import: %s", e.p->seq_message(c));
    size_t nc = export_blob(&e, c, &bc);
    ck_assert_msg(nc == na && memcmp(ba, bc, na) == 0, "config %d: re-export differs", _i);
    free(bc), free(ba), free(bb), free(oa), free(ob);
    e.p->seq_close(a), e.p->seq_close(b), e.p->seq_close(c);
    e.p->destroy(in);
    ck_assert_uint_eq(th_live_bytes(&e), 0);
    stream_free(&s);
    th_close(&e);
}
END_TEST

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: test_kvquant PATH/kvc-kvquant.so\n");
        return 2;
    }
    g_path = argv[1];
    const char *env = getenv("KVC_TEST_SEED");
    g_seed = env ? strtoull(env, NULL, 10) : 20261205ull;
    printf("test_kvquant: seed %llu (replay with KVC_TEST_SEED)\n", (unsigned long long)g_seed);
    Suite *su = suite_create("kvquant");
    TCase *tc = tcase_create("kvquant");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, widths_follow_query_energy);
    tcase_add_test(tc, fitted_levels_beat_uniform_on_bell_shaped_keys);
    tcase_add_test(tc, one_artifact_serves_every_setting);
    tcase_add_test(tc, budgets_and_refusals);
    tcase_add_test(tc, accepted_ratios_are_met_with_calibrated_widths);
    tcase_add_test(tc, nothing_runs_before_preparation);
    tcase_add_loop_test(tc, batched_equals_single_steps_and_exports_to_the_byte, 0,
                        (int)(sizeof STEP_CONFIGS / sizeof STEP_CONFIGS[0]));
    suite_add_tcase(su, tc);
    SRunner *sr = srunner_create(su);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
