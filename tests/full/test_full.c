/*
 * test_full.c -- kvc-full.so through the ABI, loaded by name as a server
 * would: exactness against a float64 reference, the step rule, truncate,
 * fork, export/import, materialize, stats against the tracking allocator,
 * bad input, allocation failures, threads.
 */
#include <check.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "kvck.h"

static uint64_t g_seed;

#include "stream.h"

/* ---- exactness -------------------------------------------------------------- */

static double run_random_config(uint64_t *rng, const char *dtype, int verbose)
{
    th_env e;
    OPEN_FULL(e);
    kvc_geometry g = th_smollm2();
    g.n_kv_heads = 1 + (uint32_t)(th_next(rng) % 3);
    g.n_heads = g.n_kv_heads * (1 + (uint32_t)(th_next(rng) % 8));
    static const uint32_t dims[] = {32, 64, 80, 128};
    g.head_dim = dims[th_next(rng) % 4];
    g.rope_style = 1 + (int32_t)(th_next(rng) % 2);
    g.rope_theta = th_next(rng) % 2 ? 10000.0f : 500000.0f;
    g.n_layers = 2;
    /* Log-uniform lengths up to 2048 so both short and long contexts occur. */
    size_t total = (size_t)exp(log(2048.0) * (double)(th_next(rng) % 1000) / 999.0);
    if (total < 1)
        total = 1;
    stream s;
    stream_init(&s, &g, total, rng, (int)(th_next(rng) % 2));
    char bt[32];
    snprintf(bt, sizeof bt, "block_tokens=%u", 1u << (th_next(rng) % 9));
    char dt[32];
    snprintf(dt, sizeof dt, "dtype=%s", dtype);
    const char *opts[] = {dt, bt, NULL};
    kvc_instance *in = NULL;
    char msg[256];
    ck_assert_msg(th_create(&e, &g, opts, &in, msg, sizeof msg) == KVC_OK, "%s", msg);
    kvc_seq *seq;
    ck_assert_int_eq(e.p->seq_open(in, &seq), KVC_OK);

    float *out = malloc(total * qrow(&s) * sizeof(float));
    double *ref = malloc(total * qrow(&s) * sizeof(double));
    double worst = 0;
    size_t t = 0;
    while (t < total) {
        /* Mix prefill chunks and single-token decode steps. */
        size_t n = th_next(rng) % 3 == 0 ? 1 + th_next(rng) % 300 : 1;
        if (n > total - t)
            n = total - t;
        kvc_status st = step(&e, seq, &s, 1, t, n, out);
        ck_assert_msg(st == KVC_OK, "step: %s", e.p->seq_message(seq));
        /* Checking every decode step of a long stream costs O(n^2): check
         * prefills always and decode steps at random. */
        if (n > 1 || th_next(rng) % 8 == 0 || t + n == total) {
            oracle(&s, t, n, ref);
            double err = th_rel_err(out, ref, n * qrow(&s));
            if (err > worst)
                worst = err;
        }
        t += n;
    }
    if (verbose)
        printf("  %s G=%u kv=%u d=%u rope=%d tokens=%zu %s: max rel err %.3g\n", dtype,
               g.n_heads / g.n_kv_heads, g.n_kv_heads, g.head_dim, g.rope_style, total, bt,
               worst);
    e.p->seq_close(seq);
    e.p->destroy(in);
    ck_assert_uint_eq(th_live_bytes(&e), 0);
    free(out), free(ref);
    stream_free(&s);
    th_close(&e);
    return worst;
}

START_TEST(exact_vs_float64_reference)
{
    uint64_t rng = g_seed + 101;
    for (int i = 0; i < 14; i++) {
        double err = run_random_config(&rng, "fp32", 1);
        ck_assert_msg(err <= 1e-5, "config %d: relative error %.3g > 1e-5 (seed %llu)", i, err,
                      (unsigned long long)g_seed);
    }
}
END_TEST

START_TEST(fp16_storage_close_to_reference)
{
    uint64_t rng = g_seed + 202;
    for (int i = 0; i < 4; i++) {
        double err = run_random_config(&rng, "fp16", 1);
        ck_assert_msg(err <= 5e-3, "fp16 config %d: relative error %.3g (seed %llu)", i, err,
                      (unsigned long long)g_seed);
    }
}
END_TEST

/* SmolLM2 geometry at the largest context the issue names, prefill then
 * decode. */
START_TEST(smollm2_2048_prefill_then_decode)
{
    th_env e;
    OPEN_FULL(e);
    uint64_t rng = g_seed + 303;
    kvc_geometry g = th_smollm2();
    const size_t total = 2048, prefill = 2040;
    stream s;
    stream_init(&s, &g, total, &rng, 0);
    kvc_instance *in;
    char msg[256];
    ck_assert_msg(th_create(&e, &g, NULL, &in, msg, sizeof msg) == KVC_OK, "%s", msg);
    kvc_seq *seq;
    ck_assert_int_eq(e.p->seq_open(in, &seq), KVC_OK);
    float *out = malloc(total * qrow(&s) * sizeof(float));
    double *ref = malloc(total * qrow(&s) * sizeof(double));
    ck_assert_int_eq(step(&e, seq, &s, 7, 0, prefill, out), KVC_OK);
    oracle(&s, 0, prefill, ref);
    double err = th_rel_err(out, ref, prefill * qrow(&s));
    ck_assert_msg(err <= 1e-5, "prefill error %.3g", err);
    for (size_t t = prefill; t < total; t++) {
        ck_assert_int_eq(step(&e, seq, &s, 7, t, 1, out), KVC_OK);
        oracle(&s, t, 1, ref);
        err = th_rel_err(out, ref, qrow(&s));
        ck_assert_msg(err <= 1e-5, "decode %zu error %.3g", t, err);
    }
    e.p->destroy(in); /* with the sequence still open: destroy frees it */
    ck_assert_uint_eq(th_live_bytes(&e), 0);
    free(out), free(ref);
    stream_free(&s);
    th_close(&e);
}
END_TEST

/* ---- the step rule, truncate, fork, export ------------------------------------ */

START_TEST(batched_equals_single_steps)
{
    th_env e;
    OPEN_FULL(e);
    uint64_t rng = g_seed + 404;
    kvc_geometry g = th_smollm2();
    const size_t total = 300;
    stream s;
    stream_init(&s, &g, total, &rng, 1);
    kvc_instance *in;
    char msg[256];
    ck_assert_msg(th_create(&e, &g, NULL, &in, msg, sizeof msg) == KVC_OK, "%s", msg);
    kvc_seq *a, *b;
    ck_assert_int_eq(e.p->seq_open(in, &a), KVC_OK);
    ck_assert_int_eq(e.p->seq_open(in, &b), KVC_OK);
    float *oa = malloc(total * qrow(&s) * sizeof(float));
    float *ob = malloc(total * qrow(&s) * sizeof(float));
    ck_assert_int_eq(step(&e, a, &s, 0, 0, 100, oa), KVC_OK);
    ck_assert_int_eq(step(&e, a, &s, 0, 100, 200, oa + 100 * qrow(&s)), KVC_OK);
    for (size_t t = 0; t < total; t++)
        ck_assert_int_eq(step(&e, b, &s, 0, t, 1, ob + t * qrow(&s)), KVC_OK);
    double err = th_rel_err_f(oa, ob, total * qrow(&s));
    printf("  batched vs single steps: rel err %.3g\n", err);
    ck_assert_msg(err <= 1e-6, "batched vs single: %.3g", err);
    e.p->destroy(in);
    free(oa), free(ob);
    stream_free(&s);
    th_close(&e);
}
END_TEST

START_TEST(truncate_then_reappend_equals_never_appended)
{
    th_env e;
    OPEN_FULL(e);
    uint64_t rng = g_seed + 505;
    kvc_geometry g = th_smollm2();
    g.n_layers = 3;
    stream s, junk;
    stream_init(&s, &g, 400, &rng, 0);
    stream_init(&junk, &g, 400, &rng, 1);
    kvc_instance *in;
    char msg[256];
    const char *opts[] = {"block_tokens=16", NULL};
    ck_assert_msg(th_create(&e, &g, opts, &in, msg, sizeof msg) == KVC_OK, "%s", msg);
    kvc_seq *a, *b;
    ck_assert_int_eq(e.p->seq_open(in, &a), KVC_OK);
    ck_assert_int_eq(e.p->seq_open(in, &b), KVC_OK);
    float *oa = malloc(400 * qrow(&s) * sizeof(float));
    float *ob = malloc(400 * qrow(&s) * sizeof(float));
    uint64_t before = th_live_bytes(&e);
    for (uint32_t l = 0; l < 3; l++) {
        ck_assert_int_eq(step(&e, a, &s, l, 0, 250, oa), KVC_OK);
        ck_assert_int_eq(step(&e, b, &s, l, 0, 250, ob), KVC_OK);
    }
    /* b takes speculative tokens (positions 250.. with gaps), then rolls back. */
    kvc_seq_stats sa = {.struct_size = sizeof sa}, sb = {.struct_size = sizeof sb};
    for (uint32_t l = 0; l < 3; l++) {
        int32_t p[37];
        for (int i = 0; i < 37; i++)
            p[i] = 250 + junk.pos[i];
        ck_assert_int_eq(e.p->append(b, l, 37, p, junk.k, junk.v, NULL), KVC_OK);
    }
    ck_assert_int_eq(e.p->truncate(b, 250), KVC_OK);
    ck_assert_int_eq(e.p->seq_stats(a, &sa), KVC_OK);
    ck_assert_int_eq(e.p->seq_stats(b, &sb), KVC_OK);
    ck_assert_uint_eq(sa.bytes_payload, sb.bytes_payload);
    ck_assert_uint_eq(sa.bytes_reserved, sb.bytes_reserved);
    ck_assert_uint_eq(sa.tokens_appended, sb.tokens_appended);
    for (uint32_t l = 0; l < 3; l++) {
        ck_assert_int_eq(step(&e, a, &s, l, 250, 150, oa), KVC_OK);
        ck_assert_int_eq(step(&e, b, &s, l, 250, 150, ob), KVC_OK);
        ck_assert_msg(memcmp(oa, ob, 150 * qrow(&s) * sizeof(float)) == 0,
                      "layer %u differs after truncate", l);
    }
    /* Truncating to 0 empties every layer and frees its blocks. */
    ck_assert_int_eq(e.p->truncate(b, 0), KVC_OK);
    ck_assert_int_eq(e.p->seq_stats(b, &sb), KVC_OK);
    ck_assert_uint_eq(sb.tokens_appended, 0);
    ck_assert_uint_eq(sb.bytes_payload + sb.bytes_reserved + sb.bytes_metadata, 0);
    ck_assert_uint_ge(th_live_bytes(&e), before);
    e.p->seq_close(a);
    e.p->seq_close(b);
    e.p->destroy(in);
    ck_assert_uint_eq(th_live_bytes(&e), 0);
    free(oa), free(ob);
    stream_free(&s), stream_free(&junk);
    th_close(&e);
}
END_TEST

START_TEST(fork_gives_independent_sequences)
{
    th_env e;
    OPEN_FULL(e);
    uint64_t rng = g_seed + 606;
    kvc_geometry g = th_smollm2();
    g.n_layers = 1;
    stream s, other;
    stream_init(&s, &g, 200, &rng, 0);
    stream_init(&other, &g, 200, &rng, 0);
    kvc_instance *in;
    char msg[256];
    ck_assert_msg(th_create(&e, &g, NULL, &in, msg, sizeof msg) == KVC_OK, "%s", msg);
    kvc_seq *a, *b, *ref;
    ck_assert_int_eq(e.p->seq_open(in, &a), KVC_OK);
    ck_assert_int_eq(e.p->seq_open(in, &b), KVC_OK);
    ck_assert_int_eq(e.p->seq_open(in, &ref), KVC_OK);
    float *o1 = malloc(200 * qrow(&s) * sizeof(float));
    float *o2 = malloc(200 * qrow(&s) * sizeof(float));
    ck_assert_int_eq(step(&e, a, &s, 0, 0, 120, o1), KVC_OK);
    ck_assert_int_eq(step(&e, ref, &s, 0, 0, 120, o1), KVC_OK);
    ck_assert_int_eq(e.p->fork(a, b), KVC_OK);
    /* a continues with s, b with other's tokens at the same positions. */
    ck_assert_int_eq(step(&e, a, &s, 0, 120, 80, o1), KVC_OK);
    ck_assert_int_eq(step(&e, ref, &s, 0, 120, 80, o2), KVC_OK);
    ck_assert_msg(memcmp(o1, o2, 80 * qrow(&s) * sizeof(float)) == 0, "fork source disturbed");
    ck_assert_int_eq(e.p->append(b, 0, 80, s.pos + 120, other.k, other.v, NULL), KVC_OK);
    ck_assert_int_eq(e.p->attend(b, 0, 80, s.pos + 120, s.q + 120 * qrow(&s), o2), KVC_OK);
    ck_assert_msg(memcmp(o1, o2, 80 * qrow(&s) * sizeof(float)) != 0, "fork shares storage");
    /* a is still what ref is after b's appends. */
    ck_assert_int_eq(e.p->attend(a, 0, 1, s.pos + 199, s.q + 199 * qrow(&s), o1), KVC_OK);
    ck_assert_int_eq(e.p->attend(ref, 0, 1, s.pos + 199, s.q + 199 * qrow(&s), o2), KVC_OK);
    ck_assert_msg(memcmp(o1, o2, qrow(&s) * sizeof(float)) == 0, "fork target wrote into source");
    e.p->destroy(in);
    ck_assert_uint_eq(th_live_bytes(&e), 0);
    free(o1), free(o2);
    stream_free(&s), stream_free(&other);
    th_close(&e);
}
END_TEST

static void export_import_roundtrip(const char *dtype)
{
    th_env e;
    OPEN_FULL(e);
    uint64_t rng = g_seed + 707;
    kvc_geometry g = th_smollm2();
    g.n_layers = 2;
    stream s;
    stream_init(&s, &g, 300, &rng, 1);
    kvc_instance *in;
    char msg[256], dt[32];
    snprintf(dt, sizeof dt, "dtype=%s", dtype);
    const char *opts[] = {dt, NULL};
    ck_assert_msg(th_create(&e, &g, opts, &in, msg, sizeof msg) == KVC_OK, "%s", msg);
    kvc_seq *a, *b;
    ck_assert_int_eq(e.p->seq_open(in, &a), KVC_OK);
    ck_assert_int_eq(e.p->seq_open(in, &b), KVC_OK);
    float *o1 = malloc(300 * qrow(&s) * sizeof(float));
    float *o2 = malloc(300 * qrow(&s) * sizeof(float));
    for (uint32_t l = 0; l < 2; l++)
        ck_assert_int_eq(step(&e, a, &s, l, 0, 250, o1), KVC_OK);
    size_t need = 0;
    ck_assert_int_eq(e.p->seq_export(a, NULL, 0, &need), KVC_OK);
    ck_assert_uint_gt(need, 250 * 2 * krow(&s));
    char *blob = malloc(need);
    size_t got = 0;
    ck_assert_int_eq(e.p->seq_export(a, blob, need - 1, &got), KVC_E_BUFFER);
    ck_assert_uint_eq(got, need);
    ck_assert_int_eq(e.p->seq_export(a, blob, need, &got), KVC_OK);
    ck_assert_int_eq(e.p->seq_import(b, blob, got), KVC_OK);
    for (uint32_t l = 0; l < 2; l++) {
        ck_assert_int_eq(step(&e, a, &s, l, 250, 50, o1), KVC_OK);
        ck_assert_int_eq(step(&e, b, &s, l, 250, 50, o2), KVC_OK);
        ck_assert_msg(memcmp(o1, o2, 50 * qrow(&s) * sizeof(float)) == 0,
                      "layer %u: attention differs after import", l);
    }
    /* Damage: every truncation point and bit flips are refused, b unchanged. */
    ck_assert_int_eq(e.p->seq_export(a, NULL, 0, &need), KVC_OK);
    blob = realloc(blob, need);
    ck_assert_int_eq(e.p->seq_export(a, blob, need, &got), KVC_OK);
    kvc_seq_stats before = {.struct_size = sizeof before}, after = {.struct_size = sizeof after};
    ck_assert_int_eq(e.p->seq_stats(b, &before), KVC_OK);
    for (size_t cut = 0; cut < got; cut += 1 + cut / 3) {
        kvc_status st = e.p->seq_import(b, blob, cut);
        ck_assert_msg(st == KVC_E_CORRUPT, "truncated to %zu: status %d", cut, st);
    }
    for (int i = 0; i < 200; i++) {
        size_t at = th_next(&rng) % got;
        blob[at] ^= (char)(1u << (th_next(&rng) % 8));
        kvc_status st = e.p->seq_import(b, blob, got);
        ck_assert_msg(st != KVC_OK, "bit flip at %zu accepted", at);
        ck_assert_str_ne(e.p->seq_message(b), "");
        ck_assert_int_eq(e.p->seq_export(a, blob, need, &got), KVC_OK); /* restore */
    }
    ck_assert_int_eq(e.p->seq_stats(b, &after), KVC_OK);
    ck_assert_mem_eq(&before, &after, sizeof before);
    e.p->destroy(in);
    ck_assert_uint_eq(th_live_bytes(&e), 0);
    free(blob), free(o1), free(o2);
    stream_free(&s);
    th_close(&e);
}

START_TEST(export_import_identical_fp32) { export_import_roundtrip("fp32"); }
END_TEST
START_TEST(export_import_identical_fp16) { export_import_roundtrip("fp16"); }
END_TEST

START_TEST(import_refuses_other_geometry_and_dtype)
{
    th_env e;
    OPEN_FULL(e);
    uint64_t rng = g_seed + 808;
    kvc_geometry g = th_smollm2(), g2 = th_smollm2();
    g2.n_layers = 29;
    stream s;
    stream_init(&s, &g, 10, &rng, 0);
    kvc_instance *a, *b, *c;
    char msg[256];
    const char *f16[] = {"dtype=fp16", NULL};
    ck_assert_int_eq(th_create(&e, &g, NULL, &a, msg, sizeof msg), KVC_OK);
    ck_assert_int_eq(th_create(&e, &g2, NULL, &b, msg, sizeof msg), KVC_OK);
    ck_assert_int_eq(th_create(&e, &g, f16, &c, msg, sizeof msg), KVC_OK);
    kvc_seq *sa, *sb, *sc;
    ck_assert_int_eq(e.p->seq_open(a, &sa), KVC_OK);
    ck_assert_int_eq(e.p->seq_open(b, &sb), KVC_OK);
    ck_assert_int_eq(e.p->seq_open(c, &sc), KVC_OK);
    ck_assert_int_eq(e.p->append(sa, 0, 10, s.pos, s.k, s.v, NULL), KVC_OK);
    size_t n = 0;
    ck_assert_int_eq(e.p->seq_export(sa, NULL, 0, &n), KVC_OK);
    char *blob = malloc(n);
    ck_assert_int_eq(e.p->seq_export(sa, blob, n, &n), KVC_OK);
    ck_assert_int_eq(e.p->seq_import(sb, blob, n), KVC_E_INVALID);
    ck_assert_ptr_nonnull(strstr(e.p->seq_message(sb), "layers 30"));
    ck_assert_int_eq(e.p->seq_import(sc, blob, n), KVC_E_INVALID);
    ck_assert_ptr_nonnull(strstr(e.p->seq_message(sc), "fp32"));
    /* A blob that is not an export at all. */
    char junk[100] = "KVC1 this is not a blob";
    ck_assert_int_eq(e.p->seq_import(sa, junk, sizeof junk), KVC_E_CORRUPT);
    ck_assert_int_eq(e.p->seq_import(sa, NULL, 10), KVC_E_INVALID);
    e.p->destroy(a), e.p->destroy(b), e.p->destroy(c);
    ck_assert_uint_eq(th_live_bytes(&e), 0);
    free(blob);
    stream_free(&s);
    th_close(&e);
}
END_TEST

/* ---- materialize, stats, budgets ------------------------------------------------ */

START_TEST(materialize_returns_rotated_keys_and_values)
{
    th_env e;
    OPEN_FULL(e);
    uint64_t rng = g_seed + 909;
    kvc_geometry g = th_smollm2();
    g.n_layers = 1;
    stream s;
    stream_init(&s, &g, 150, &rng, 1);
    kvc_instance *in;
    char msg[256];
    const char *opts[] = {"block_tokens=32", NULL};
    ck_assert_int_eq(th_create(&e, &g, opts, &in, msg, sizeof msg), KVC_OK);
    kvc_seq *seq;
    ck_assert_int_eq(e.p->seq_open(in, &seq), KVC_OK);
    ck_assert_int_eq(e.p->append(seq, 0, 150, s.pos, s.k, s.v, NULL), KVC_OK);
    uint32_t counts[3] = {0};
    kvc_materialized m = {.struct_size = sizeof m, .n_tokens = counts};
    ck_assert_int_eq(e.p->materialize(seq, 0, &m), KVC_OK);
    ck_assert_uint_eq(counts[0], 150);
    m.capacity = 149;
    int32_t *pos = malloc(3 * 150 * sizeof(int32_t));
    float *k = malloc(3 * 150 * 64 * sizeof(float)), *v = malloc(3 * 150 * 64 * sizeof(float));
    m.positions = pos, m.k = k, m.v = v;
    ck_assert_int_eq(e.p->materialize(seq, 0, &m), KVC_E_BUFFER);
    m.capacity = 150;
    ck_assert_int_eq(e.p->materialize(seq, 0, &m), KVC_OK);
    float *rot = malloc(150 * krow(&s) * sizeof(float));
    kvck_rope_apply(&s.rope, 150, 3, s.pos, s.k, rot);
    for (uint32_t h = 0; h < 3; h++)
        for (uint32_t t = 0; t < 150; t++) {
            ck_assert_int_eq(pos[h * 150 + t], s.pos[t]);
            ck_assert_mem_eq(k + (h * 150 + t) * 64, rot + (t * 3 + h) * 64, 64 * sizeof(float));
            ck_assert_mem_eq(v + (h * 150 + t) * 64, s.v + (t * 3 + h) * 64, 64 * sizeof(float));
        }
    e.p->destroy(in);
    free(pos), free(k), free(v), free(rot);
    stream_free(&s);
    th_close(&e);
}
END_TEST

/* Resident bytes reported = bytes the tracking allocator holds for the
 * sequence, and stay within the declared budget, for both dtypes, with and
 * without position gaps. */
static void stats_match_allocator(const char *dtype, int gaps)
{
    th_env e;
    OPEN_FULL(e);
    uint64_t rng = g_seed + 1001;
    kvc_geometry g = th_smollm2();
    stream s;
    stream_init(&s, &g, 1000, &rng, gaps);
    kvc_instance *in;
    char msg[256], dt[32];
    snprintf(dt, sizeof dt, "dtype=%s", dtype);
    const char *opts[] = {dt, NULL};
    ck_assert_int_eq(th_create(&e, &g, opts, &in, msg, sizeof msg), KVC_OK);
    kvc_instance_stats is = {.struct_size = sizeof is};
    ck_assert_int_eq(e.p->instance_stats(in, &is), KVC_OK);
    uint64_t base = th_live_bytes(&e);
    kvc_seq *seq;
    ck_assert_int_eq(e.p->seq_open(in, &seq), KVC_OK);
    size_t t = 0;
    while (t < 1000) {
        size_t n = 1 + th_next(&rng) % 97;
        if (n > 1000 - t)
            n = 1000 - t;
        for (uint32_t l = 0; l < g.n_layers; l++)
            ck_assert_int_eq(e.p->append(seq, l, (uint32_t)n, s.pos + t, s.k + t * krow(&s),
                                         s.v + t * krow(&s), NULL),
                             KVC_OK);
        t += n;
        kvc_seq_stats st = {.struct_size = sizeof st};
        ck_assert_int_eq(e.p->seq_stats(seq, &st), KVC_OK);
        uint64_t held = th_live_bytes(&e) - base;
        ck_assert_uint_eq(st.bytes_resident, held);
        ck_assert_uint_eq(st.tokens_appended, t * g.n_layers);
        ck_assert_uint_eq(st.bytes_fp16_full, t * g.n_layers * 768);
        double budget = is.kv_ratio * (double)st.bytes_fp16_full + (double)is.seq_overhead_bytes;
        ck_assert_msg((double)st.bytes_resident <= budget, "%zu tokens: %llu > budget %.0f", t,
                      (unsigned long long)st.bytes_resident, budget);
    }
    kvc_seq_stats st = {.struct_size = sizeof st};
    ck_assert_int_eq(e.p->seq_stats(seq, &st), KVC_OK);
    printf("  %s%s: kv_ratio %.4f, %.1f resident bytes/token/layer (fp16 full: 768)\n", dtype,
           gaps ? " with gaps" : "", is.kv_ratio,
           (double)(st.bytes_payload + st.bytes_metadata) / (double)st.tokens_appended);
    e.p->seq_close(seq);
    ck_assert_uint_eq(th_live_bytes(&e), base);
    e.p->destroy(in);
    ck_assert_uint_eq(th_live_bytes(&e), 0);
    stream_free(&s);
    th_close(&e);
}

START_TEST(stats_fp32_contiguous) { stats_match_allocator("fp32", 0); }
END_TEST
START_TEST(stats_fp16_gaps) { stats_match_allocator("fp16", 1); }
END_TEST

START_TEST(kv_ratio_option_picks_or_refuses)
{
    th_env e;
    OPEN_FULL(e);
    kvc_geometry g = th_smollm2();
    kvc_instance *in;
    char msg[256];
    const char *r2[] = {"kv_ratio=2.5", NULL}, *r1[] = {"kv_ratio=1.1", NULL},
               *r05[] = {"kv_ratio=0.5", NULL}, *r03[] = {"kv_ratio=0.3", NULL},
               *tiny[] = {"kv_ratio=0.05", NULL}, *bad[] = {"kv_ratio=1.1", "dtype=fp32", NULL};
    kvc_instance_stats is = {.struct_size = sizeof is};
    ck_assert_int_eq(th_create(&e, &g, r2, &in, msg, sizeof msg), KVC_OK);
    e.p->instance_stats(in, &is);
    ck_assert(is.kv_ratio > 2.0 && is.kv_ratio <= 2.5);
    e.p->destroy(in);
    ck_assert_int_eq(th_create(&e, &g, r1, &in, msg, sizeof msg), KVC_OK);
    e.p->instance_stats(in, &is);
    ck_assert(is.kv_ratio > 1.0 && is.kv_ratio <= 1.1);
    e.p->destroy(in);
    /* Below fp16: quantized widths that fit, the most accurate first. */
    double got[2];
    const char *const *below[] = {r05, r03};
    for (int i = 0; i < 2; i++) {
        ck_assert_int_eq(th_create(&e, &g, below[i], &in, msg, sizeof msg), KVC_OK);
        e.p->instance_stats(in, &is);
        got[i] = is.kv_ratio;
        ck_assert(!(is.caps & KVC_CAP_EXACT));
        e.p->destroy(in);
    }
    printf("  kv_ratio 0.5 declares %.3f, 0.3 declares %.3f\n", got[0], got[1]);
    ck_assert(got[0] <= 0.5 && got[0] > 0.4 && got[1] <= 0.3 && got[1] > 0.2);
    ck_assert_int_eq(th_create(&e, &g, tiny, &in, msg, sizeof msg), KVC_E_INVALID);
    ck_assert_ptr_nonnull(strstr(msg, "kv_ratio"));
    ck_assert_int_eq(th_create(&e, &g, bad, &in, msg, sizeof msg), KVC_E_INVALID);
    ck_assert_uint_eq(th_live_bytes(&e), 0);
    th_close(&e);
}
END_TEST

/* ---- bad input ----------------------------------------------------------------- */

START_TEST(bad_options_and_geometry_are_named)
{
    th_env e;
    OPEN_FULL(e);
    kvc_instance *in = (kvc_instance *)0x1;
    char msg[256];
    struct {
        const char *opt;
        const char *word;
    } cases[] = {{"nosuch=1", "nosuch"},       {"dtype=fp8", "fp8"},
                 {"block_tokens=0", "block_tokens"}, {"block_tokens=1.5", "integer"},
                 {"kv_ratio=abc", "kv_ratio"}, {"kv_ratio=nan", "kv_ratio"}};
    kvc_geometry g = th_smollm2();
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *opts[] = {cases[i].opt, NULL};
        msg[0] = 0;
        ck_assert_int_eq(th_create(&e, &g, opts, &in, msg, sizeof msg), KVC_E_INVALID);
        ck_assert_msg(strstr(msg, cases[i].word), "'%s' -> '%s'", cases[i].opt, msg);
        ck_assert_ptr_eq(in, (kvc_instance *)0x1); /* untouched on error */
    }
    kvc_geometry bad = g;
    bad.n_heads = 10;
    ck_assert_int_eq(th_create(&e, &bad, NULL, &in, msg, sizeof msg), KVC_E_INVALID);
    ck_assert_ptr_nonnull(strstr(msg, "multiple"));
    bad = g;
    bad.struct_size = 8;
    ck_assert_int_eq(th_create(&e, &bad, NULL, &in, msg, sizeof msg), KVC_E_VERSION);
    bad = g;
    bad.kv_head_first = 2, bad.kv_head_count = 2;
    ck_assert_int_eq(th_create(&e, &bad, NULL, &in, msg, sizeof msg), KVC_E_INVALID);
    ck_assert_ptr_nonnull(strstr(msg, "shard"));
    bad = g;
    bad.rope_dims = 63;
    ck_assert_int_eq(th_create(&e, &bad, NULL, &in, msg, sizeof msg), KVC_E_INVALID);
    ck_assert_int_eq(e.p->create(NULL, &in, msg, sizeof msg), KVC_E_INVALID);
    ck_assert_uint_eq(th_live_bytes(&e), 0);
    th_close(&e);
}
END_TEST

/* seq_describe (ABI 1.2): one line per KV head of the shard with the
 * tokens the layer holds and the storage type; size-then-copy; INVALID
 * for a layer out of range and a NULL size, with a message. */
START_TEST(seq_describe_lines_per_head)
{
    th_env e;
    OPEN_FULL(e);
    ck_assert_msg(KVC_HAS_FIELD(e.p, kvc_plugin, seq_describe) && e.p->seq_describe,
                  "kvc-full's descriptor has no seq_describe");
    uint64_t rng = g_seed + 2222;
    static const char *const dtypes[] = {"fp32", "fp16"};
    for (int d = 0; d < 2; d++) {
        kvc_geometry g = th_smollm2();
        g.n_layers = 3;
        if (d == 1) { /* a head shard: lines count the shard's heads from 0 */
            g.kv_head_first = 1;
            g.kv_head_count = 2;
        }
        const uint32_t n_kv = d == 1 ? 2 : g.n_kv_heads;
        stream s;
        stream_init(&s, &g, 50, &rng, 1);
        char opt[32], word[32], why[1024];
        snprintf(opt, sizeof opt, "dtype=%s", dtypes[d]);
        snprintf(word, sizeof word, "dtype=%s", dtypes[d]);
        const char *opts[] = {opt, "block_tokens=16", NULL};
        kvc_instance *in;
        char msg[256];
        ck_assert_msg(th_create(&e, &g, opts, &in, msg, sizeof msg) == KVC_OK, "%s", msg);
        kvc_seq *seq;
        ck_assert_int_eq(e.p->seq_open(in, &seq), KVC_OK);
        /* Empty layers first, then layer 0 with 50 tokens (in two appends,
         * across blocks and position gaps) and layer 2 with 17. */
        ck_assert_msg(th_check_describe(&e, seq, 3, 1, n_kv, 0, word, NULL, why, sizeof why) == 0,
                      "%s empty: %s", dtypes[d], why);
        float *out = malloc(50 * qrow(&s) * sizeof(float));
        ck_assert_int_eq(step(&e, seq, &s, 0, 0, 30, out), KVC_OK);
        ck_assert_int_eq(step(&e, seq, &s, 0, 30, 20, out), KVC_OK);
        ck_assert_int_eq(step(&e, seq, &s, 2, 0, 17, out), KVC_OK);
        const uint32_t held[3] = {50, 0, 17};
        for (uint32_t l = 0; l < 3; l++) {
            char *text = NULL;
            ck_assert_msg(th_check_describe(&e, seq, 3, l, n_kv, held[l], word, &text, why,
                                            sizeof why) == 0,
                          "%s layer %u: %s", dtypes[d], l, why);
            if (l == 0 && d == 0)
                printf("  seq_describe layer 0: %s", text);
            free(text);
        }
        /* Errors carry a message on the sequence. */
        size_t sz = 0;
        ck_assert_int_eq(e.p->seq_describe(seq, 3, NULL, 0, &sz), KVC_E_INVALID);
        ck_assert_ptr_nonnull(strstr(e.p->seq_message(seq), "layer 3"));
        ck_assert_int_eq(e.p->seq_describe(NULL, 0, NULL, 0, &sz), KVC_E_INVALID);
        /* After truncate the counts follow. */
        ck_assert_int_eq(e.p->truncate(seq, s.pos[10]), KVC_OK);
        ck_assert_msg(th_check_describe(&e, seq, 3, 0, n_kv, 10, word, NULL, why, sizeof why) ==
                          0,
                      "%s after truncate: %s", dtypes[d], why);
        free(out);
        e.p->seq_close(seq);
        e.p->destroy(in);
        stream_free(&s);
    }
    ck_assert_uint_eq(th_live_bytes(&e), 0);
    th_close(&e);
}
END_TEST

START_TEST(bad_calls_get_status_and_message)
{
    th_env e;
    OPEN_FULL(e);
    uint64_t rng = g_seed + 1111;
    kvc_geometry g = th_smollm2();
    stream s;
    stream_init(&s, &g, 20, &rng, 0);
    kvc_instance *in;
    char msg[256];
    ck_assert_int_eq(th_create(&e, &g, NULL, &in, msg, sizeof msg), KVC_OK);
    kvc_seq *seq;
    ck_assert_int_eq(e.p->seq_open(in, &seq), KVC_OK);
    float out[9 * 64];
    ck_assert_int_eq(e.p->append(seq, 30, 1, s.pos, s.k, s.v, NULL), KVC_E_INVALID);
    ck_assert_ptr_nonnull(strstr(e.p->seq_message(seq), "layer"));
    ck_assert_int_eq(e.p->append(seq, 0, 0, s.pos, s.k, s.v, NULL), KVC_E_INVALID);
    ck_assert_int_eq(e.p->append(seq, 0, 1, NULL, s.k, s.v, NULL), KVC_E_INVALID);
    ck_assert_int_eq(e.p->append(seq, 0, 1, s.pos, NULL, s.v, NULL), KVC_E_INVALID);
    int32_t neg = -1, huge = 1 << 17;
    ck_assert_int_eq(e.p->append(seq, 0, 1, &neg, s.k, s.v, NULL), KVC_E_INVALID);
    ck_assert_int_eq(e.p->append(seq, 0, 1, &huge, s.k, s.v, NULL), KVC_E_INVALID);
    ck_assert_ptr_nonnull(strstr(e.p->seq_message(seq), "outside"));
    int32_t dup[2] = {5, 5};
    ck_assert_int_eq(e.p->append(seq, 0, 2, dup, s.k, s.v, NULL), KVC_E_INVALID);
    ck_assert_ptr_nonnull(strstr(e.p->seq_message(seq), "increase"));
    float nan_k[3 * 64];
    memcpy(nan_k, s.k, sizeof nan_k);
    nan_k[77] = NAN;
    ck_assert_int_eq(e.p->append(seq, 0, 1, s.pos, nan_k, s.v, NULL), KVC_E_INVALID);
    ck_assert_ptr_nonnull(strstr(e.p->seq_message(seq), "NaN"));
    nan_k[77] = INFINITY;
    ck_assert_int_eq(e.p->append(seq, 0, 1, s.pos, s.v, nan_k, NULL), KVC_E_INVALID);
    /* Nothing was appended by the failures. */
    kvc_seq_stats st = {.struct_size = sizeof st};
    ck_assert_int_eq(e.p->seq_stats(seq, &st), KVC_OK);
    ck_assert_uint_eq(st.tokens_appended, 0);
    ck_assert_int_eq(e.p->append(seq, 0, 10, s.pos, s.k, s.v, NULL), KVC_OK);
    ck_assert_int_eq(e.p->append(seq, 0, 1, s.pos + 5, s.k, s.v, NULL), KVC_E_INVALID);
    /* attend */
    memset(out, 0x5a, sizeof out);
    float keep[9 * 64];
    memcpy(keep, out, sizeof out);
    ck_assert_int_eq(e.p->attend(seq, 31, 1, s.pos, s.q, out), KVC_E_INVALID);
    ck_assert_int_eq(e.p->attend(seq, 0, 1, &neg, s.q, out), KVC_E_INVALID);
    float nan_q[9 * 64];
    memcpy(nan_q, s.q, sizeof nan_q);
    nan_q[3] = NAN;
    ck_assert_int_eq(e.p->attend(seq, 0, 1, s.pos, nan_q, out), KVC_E_INVALID);
    ck_assert_int_eq(e.p->attend(seq, 0, 1, s.pos, s.q, NULL), KVC_E_INVALID);
    ck_assert_mem_eq(out, keep, sizeof out); /* untouched on error */
    /* A query before every key sees nothing: zeros. */
    ck_assert_int_eq(e.p->truncate(seq, 0), KVC_OK);
    int32_t later[1] = {100};
    ck_assert_int_eq(e.p->append(seq, 0, 1, later, s.k, s.v, NULL), KVC_OK);
    int32_t early = 3;
    ck_assert_int_eq(e.p->attend(seq, 0, 1, &early, s.q, out), KVC_OK);
    for (int i = 0; i < 9 * 64; i++)
        ck_assert_float_eq(out[i], 0.0f);
    /* other calls */
    ck_assert_int_eq(e.p->prepare_layer(in, 0, NULL, NULL), KVC_E_UNSUPPORTED);
    ck_assert_str_ne(e.p->instance_message(in), "");
    size_t sz;
    ck_assert_int_eq(e.p->save(in, NULL, 0, &sz), KVC_E_UNSUPPORTED);
    ck_assert_int_eq(e.p->finalize(in), KVC_OK);
    ck_assert_int_eq(e.p->seq_export(seq, NULL, 0, NULL), KVC_E_INVALID);
    kvc_seq_stats small = {.struct_size = 4};
    ck_assert_int_eq(e.p->seq_stats(seq, &small), KVC_E_VERSION);
    kvc_materialized m = {.struct_size = sizeof m};
    ck_assert_int_eq(e.p->materialize(seq, 0, &m), KVC_E_INVALID);
    /* NULL handles */
    ck_assert_int_eq(e.p->append(NULL, 0, 1, s.pos, s.k, s.v, NULL), KVC_E_INVALID);
    ck_assert_int_eq(e.p->attend(NULL, 0, 1, s.pos, s.q, out), KVC_E_INVALID);
    ck_assert_int_eq(e.p->seq_open(NULL, &seq), KVC_E_INVALID);
    e.p->seq_close(NULL);
    e.p->destroy(NULL);
    e.p->destroy(in);
    ck_assert_uint_eq(th_live_bytes(&e), 0);
    stream_free(&s);
    th_close(&e);
}
END_TEST

START_TEST(attend_batch_equals_attend)
{
    th_env e;
    OPEN_FULL(e);
    uint64_t rng = g_seed + 1212;
    kvc_geometry g = th_smollm2();
    g.n_layers = 1;
    enum { NS = 5 };
    stream s[NS];
    kvc_instance *in;
    char msg[256];
    ck_assert_int_eq(th_create(&e, &g, NULL, &in, msg, sizeof msg), KVC_OK);
    kvc_seq *seq[NS];
    kvc_attend_item items[NS];
    const kvc_attend_item *ptrs[NS];
    float *single[NS], *batched[NS];
    for (int i = 0; i < NS; i++) {
        stream_init(&s[i], &g, 100 + 50 * i, &rng, i % 2);
        ck_assert_int_eq(e.p->seq_open(in, &seq[i]), KVC_OK);
        size_t n = 100 + 50 * i;
        ck_assert_int_eq(e.p->append(seq[i], 0, (uint32_t)n, s[i].pos, s[i].k, s[i].v, NULL),
                         KVC_OK);
        size_t nq = 1 + (size_t)i * 3;
        single[i] = malloc(nq * qrow(&s[i]) * sizeof(float));
        batched[i] = malloc(nq * qrow(&s[i]) * sizeof(float));
        const int32_t *qp = s[i].pos + n - nq;
        ck_assert_int_eq(e.p->attend(seq[i], 0, (uint32_t)nq, qp, s[i].q, single[i]), KVC_OK);
        items[i] = (kvc_attend_item){sizeof(kvc_attend_item), (uint32_t)nq, seq[i], qp, s[i].q,
                                     batched[i]};
        ptrs[i] = &items[i];
    }
    ck_assert_int_eq(e.p->attend_batch(in, 0, NS, ptrs), KVC_OK);
    for (int i = 0; i < NS; i++)
        ck_assert_mem_eq(single[i], batched[i], items[i].n_q * qrow(&s[i]) * sizeof(float));
    /* Same sequence twice is refused before anything is written. */
    items[1].seq = seq[0];
    memset(batched[0], 0, sizeof(float));
    ck_assert_int_eq(e.p->attend_batch(in, 0, NS, ptrs), KVC_E_INVALID);
    ck_assert_ptr_nonnull(strstr(e.p->seq_message(seq[0]), "same sequence"));
    ck_assert_float_eq(batched[0][0], 0.0f);
    e.p->destroy(in);
    for (int i = 0; i < NS; i++) {
        free(single[i]), free(batched[i]);
        stream_free(&s[i]);
    }
    th_close(&e);
}
END_TEST

/* ---- allocation failures --------------------------------------------------------- */

/* One scripted session; returns the first non-OK status. */
static kvc_status session(const th_env *e, const stream *s, float *out)
{
    kvc_instance *in = NULL;
    char msg[256];
    kvc_geometry g = s->g;
    const char *opts[] = {"block_tokens=8", NULL};
    kvc_status st = th_create(e, &g, opts, &in, msg, sizeof msg);
    if (st)
        return st;
    kvc_seq *a = NULL, *b = NULL;
    if ((st = e->p->seq_open(in, &a)) || (st = e->p->seq_open(in, &b)))
        goto out;
    for (uint32_t l = 0; l < g.n_layers && !st; l++)
        st = step(e, a, s, l, 0, 20, out);
    if (!st)
        st = step(e, a, s, 0, 20, 1, out);
    if (!st)
        st = e->p->fork(a, b);
    size_t n = 0;
    if (!st)
        st = e->p->seq_export(a, NULL, 0, &n);
    if (!st) {
        char *blob = malloc(n);
        st = e->p->seq_export(a, blob, n, &n);
        if (!st)
            st = e->p->seq_import(b, blob, n);
        free(blob);
    }
    if (!st)
        st = e->p->truncate(b, 10);
out:
    e->p->seq_close(a);
    e->p->seq_close(b);
    e->p->destroy(in);
    return st;
}

START_TEST(every_allocation_failure_is_clean)
{
    th_env e;
    OPEN_FULL(e);
    uint64_t rng = g_seed + 1313;
    kvc_geometry g = th_smollm2();
    g.n_layers = 2;
    stream s;
    stream_init(&s, &g, 21, &rng, 1);
    float *out = malloc(21 * qrow(&s) * sizeof(float));
    unsigned failures = 0;
    for (uint64_t nth = 1;; nth++) {
        kvch_tracker_fail_nth(e.tr, nth);
        kvc_status st = session(&e, &s, out);
        kvch_tracker_fail_nth(e.tr, 0);
        ck_assert_msg(th_live_bytes(&e) == 0, "failing allocation %llu leaked %llu bytes",
                      (unsigned long long)nth, (unsigned long long)th_live_bytes(&e));
        if (st == KVC_OK)
            break;
        ck_assert_msg(st == KVC_E_NOMEM, "failing allocation %llu gave status %d",
                      (unsigned long long)nth, st);
        failures++;
        ck_assert_uint_lt(nth, 10000);
    }
    printf("  allocation failure injected at each of %u allocations: all clean\n", failures);
    ck_assert_uint_gt(failures, 10);
    kvch_tracker_stats ts;
    kvch_tracker_get(e.tr, &ts);
    ck_assert_uint_eq(ts.n_bad_free, 0);
    ck_assert_uint_eq(ts.n_overrun, 0);
    free(out);
    stream_free(&s);
    th_close(&e);
}
END_TEST

/* ---- threads -------------------------------------------------------------------------- */

typedef struct worker {
    const th_env *e;
    kvc_instance *in;
    const stream *s;
    float *out;
    kvc_status st;
} worker;

static void *work(void *arg)
{
    worker *w = arg;
    kvc_seq *seq;
    w->st = w->e->p->seq_open(w->in, &seq);
    if (w->st)
        return NULL;
    for (size_t t = 0; t < 200 && !w->st; t += 20)
        for (uint32_t l = 0; l < w->s->g.n_layers && !w->st; l++)
            w->st = step(w->e, seq, w->s, l, t, 20, w->out + t * qrow(w->s));
    w->e->p->seq_close(seq);
    return NULL;
}

START_TEST(distinct_sequences_on_distinct_threads)
{
    th_env e;
    OPEN_FULL(e);
    uint64_t rng = g_seed + 1414;
    kvc_geometry g = th_smollm2();
    g.n_layers = 4;
    stream s;
    stream_init(&s, &g, 200, &rng, 0);
    kvc_instance *in;
    char msg[256];
    ck_assert_int_eq(th_create(&e, &g, NULL, &in, msg, sizeof msg), KVC_OK);
    enum { NT = 4 };
    worker w[NT + 1];
    pthread_t th[NT];
    for (int i = 0; i <= NT; i++)
        w[i] = (worker){&e, in, &s, malloc(200 * qrow(&s) * sizeof(float)), 0};
    work(&w[NT]); /* the single-thread answer */
    for (int i = 0; i < NT; i++)
        pthread_create(&th[i], NULL, work, &w[i]);
    for (int i = 0; i < NT; i++)
        pthread_join(th[i], NULL);
    for (int i = 0; i < NT; i++) {
        ck_assert_int_eq(w[i].st, KVC_OK);
        ck_assert_mem_eq(w[i].out, w[NT].out, 200 * qrow(&s) * sizeof(float));
    }
    e.p->destroy(in);
    ck_assert_uint_eq(th_live_bytes(&e), 0);
    for (int i = 0; i <= NT; i++)
        free(w[i].out);
    stream_free(&s);
    th_close(&e);
}
END_TEST

/* ---- geometry variants ------------------------------------------------------------------- */

START_TEST(sliding_window_and_head_shard)
{
    th_env e;
    OPEN_FULL(e);
    uint64_t rng = g_seed + 1515;
    kvc_geometry g = th_smollm2();
    g.n_layers = 1;
    g.sliding_window = 37;
    g.rope_style = KVC_ROPE_HALVES;
    g.rope_dims = 32;
    stream s;
    stream_init(&s, &g, 160, &rng, 1);
    kvc_instance *in, *shard;
    char msg[256];
    ck_assert_int_eq(th_create(&e, &g, NULL, &in, msg, sizeof msg), KVC_OK);
    kvc_geometry gs = g;
    gs.kv_head_first = 1, gs.kv_head_count = 2;
    ck_assert_int_eq(th_create(&e, &gs, NULL, &shard, msg, sizeof msg), KVC_OK);
    kvc_seq *a, *b;
    ck_assert_int_eq(e.p->seq_open(in, &a), KVC_OK);
    ck_assert_int_eq(e.p->seq_open(shard, &b), KVC_OK);
    float *out = malloc(160 * qrow(&s) * sizeof(float));
    double *ref = malloc(160 * qrow(&s) * sizeof(double));
    ck_assert_int_eq(step(&e, a, &s, 0, 0, 160, out), KVC_OK);
    oracle(&s, 0, 160, ref);
    double err = th_rel_err(out, ref, 160 * qrow(&s));
    ck_assert_msg(err <= 1e-5, "window/halves/partial rope: %.3g", err);
    /* The shard gets heads 1..2 of every token: its output is heads 3..8 of a's. */
    float *ks = malloc(160 * 2 * 64 * sizeof(float)), *vs = malloc(160 * 2 * 64 * sizeof(float));
    float *qs = malloc(160 * 6 * 64 * sizeof(float)), *os = malloc(160 * 6 * 64 * sizeof(float));
    for (int t = 0; t < 160; t++) {
        memcpy(ks + t * 128, s.k + t * 192 + 64, 128 * sizeof(float));
        memcpy(vs + t * 128, s.v + t * 192 + 64, 128 * sizeof(float));
        memcpy(qs + t * 384, s.q + t * 576 + 192, 384 * sizeof(float));
    }
    ck_assert_int_eq(e.p->append(b, 0, 160, s.pos, ks, vs, NULL), KVC_OK);
    ck_assert_int_eq(e.p->attend(b, 0, 160, s.pos, qs, os), KVC_OK);
    for (int t = 0; t < 160; t++)
        ck_assert_mem_eq(os + t * 384, out + t * 576 + 192, 384 * sizeof(float));
    e.p->destroy(in), e.p->destroy(shard);
    free(out), free(ref), free(ks), free(vs), free(qs), free(os);
    stream_free(&s);
    th_close(&e);
}
END_TEST

int main(void)
{
    const char *env = getenv("KVC_TEST_SEED");
    g_seed = env ? strtoull(env, NULL, 10) : 20261123ull;
    printf("test_full: seed %llu (replay with KVC_TEST_SEED)\n", (unsigned long long)g_seed);
    Suite *su = suite_create("full");
    TCase *exact = tcase_create("exactness");
    tcase_set_timeout(exact, 600);
    tcase_add_test(exact, exact_vs_float64_reference);
    tcase_add_test(exact, fp16_storage_close_to_reference);
    tcase_add_test(exact, smollm2_2048_prefill_then_decode);
    tcase_add_test(exact, sliding_window_and_head_shard);
    suite_add_tcase(su, exact);
    TCase *sem = tcase_create("semantics");
    tcase_set_timeout(sem, 300);
    tcase_add_test(sem, batched_equals_single_steps);
    tcase_add_test(sem, truncate_then_reappend_equals_never_appended);
    tcase_add_test(sem, fork_gives_independent_sequences);
    tcase_add_test(sem, export_import_identical_fp32);
    tcase_add_test(sem, export_import_identical_fp16);
    tcase_add_test(sem, import_refuses_other_geometry_and_dtype);
    tcase_add_test(sem, materialize_returns_rotated_keys_and_values);
    tcase_add_test(sem, attend_batch_equals_attend);
    tcase_add_test(sem, distinct_sequences_on_distinct_threads);
    suite_add_tcase(su, sem);
    TCase *mem = tcase_create("memory");
    tcase_set_timeout(mem, 300);
    tcase_add_test(mem, stats_fp32_contiguous);
    tcase_add_test(mem, stats_fp16_gaps);
    tcase_add_test(mem, kv_ratio_option_picks_or_refuses);
    tcase_add_test(mem, every_allocation_failure_is_clean);
    suite_add_tcase(su, mem);
    TCase *bad = tcase_create("bad-input");
    tcase_add_test(bad, bad_options_and_geometry_are_named);
    tcase_add_test(bad, bad_calls_get_status_and_message);
    tcase_add_test(bad, seq_describe_lines_per_head);
    suite_add_tcase(su, bad);
    SRunner *sr = srunner_create(su);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
