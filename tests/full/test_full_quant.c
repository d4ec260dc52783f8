/*
 * test_full_quant.c -- kvc-full.so with quantized storage (k_bits/v_bits,
 * the shared store of plugins/common/qstore.h) through the ABI: attention
 * equals exact attention over what materialize returns; error falls as
 * bits grow; batched appends and attends equal single steps to the byte
 * (outputs and export blobs); export/import round trips to identical
 * bytes; stats equal the allocator and the kv_ratio budget holds after
 * every append (pending excluded) and attend; instance caps follow the
 * options (ABI 1.3); truncate, fork; every allocation failed in turn;
 * bad options named.
 */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "stream.h"

static uint64_t g_seed;

/* The configurations under test: one line of options each. */
static const char *const CONFIGS[] = {
    "k_bits=4 v_bits=4",                                            /* defaults: channel, pre-RoPE */
    "k_bits=4 v_bits=2 k_scale=token k_rope=post",                  /* Hadamard on K and V */
    "k_bits=3 v_bits=3 sink=5 window=20 outliers=0.02 block_tokens=16",
    "k_bits=8 v_bits=8 k_rope=post hadamard=none group=32",
    "k_bits=5 v_bits=6 k_scale=token block_tokens=32 outliers=0.01",
    "k_bits=2 v_bits=1 k_rope=post hadamard=kv group=16 window=7",
};
#define N_CONFIGS (sizeof CONFIGS / sizeof CONFIGS[0])

/* Splits "a=1 b=2" into opts[] (NULL-terminated) backed by buf. */
static void split_opts(const char *line, char *buf, size_t cap, const char **opts, size_t max)
{
    snprintf(buf, cap, "%s", line);
    size_t n = 0;
    for (char *t = strtok(buf, " "); t && n + 1 < max; t = strtok(NULL, " "))
        opts[n++] = t;
    opts[n] = NULL;
}

static kvc_instance *create_cfg(const th_env *e, const kvc_geometry *g, const char *line)
{
    char buf[256], msg[256];
    const char *opts[16];
    split_opts(line, buf, sizeof buf, opts, 16);
    kvc_instance *in = NULL;
    kvc_status st = th_create(e, g, opts, &in, msg, sizeof msg);
    ck_assert_msg(st == KVC_OK, "create \"%s\": %s", line, msg);
    return in;
}

static kvc_geometry small_geometry(void)
{
    kvc_geometry g = th_smollm2();
    g.n_layers = 2;
    g.n_heads = 8;
    g.n_kv_heads = 2;
    g.max_positions = 1 << 16;
    return g;
}

/* ---- accuracy ------------------------------------------------------------------ */

/* One more token's query attends; its output must equal float64 attention
 * over the materialized (dequantized, post-RoPE) keys and values: the
 * store attends over exactly what it holds. Returns that error; *vs_exact
 * gets the error against the true keys and values. */
static double decode_vs_materialized(const th_env *e, kvc_seq *seq, const stream *s, size_t t,
                                     double *vs_exact)
{
    const kvc_geometry *g = &s->g;
    const size_t d = g->head_dim, n_kv = s->dense.n_kv_heads, nq = qrow(s);
    float *out = malloc(nq * sizeof(float));
    ck_assert_int_eq(step(e, seq, s, 0, t, 1, out), KVC_OK);
    const size_t n = t + 1;
    uint32_t counts[8];
    int32_t *mpos = malloc(n_kv * n * sizeof(int32_t));
    float *mk = malloc(n_kv * n * d * sizeof(float)), *mv = malloc(n_kv * n * d * sizeof(float));
    kvc_materialized m = {sizeof m, (uint32_t)n, counts, mpos, mk, mv};
    ck_assert_int_eq(e->p->materialize(seq, 0, &m), KVC_OK);
    /* Token-major copies for the oracle, keys already rotated: RoPE off. */
    float *k = malloc(n * n_kv * d * sizeof(float)), *v = malloc(n * n_kv * d * sizeof(float));
    for (size_t h = 0; h < n_kv; h++) {
        ck_assert_uint_eq(counts[h], n);
        for (size_t i = 0; i < n; i++) {
            ck_assert_int_eq(mpos[h * n + i], s->pos[i]);
            memcpy(k + (i * n_kv + h) * d, mk + (h * n + i) * d, d * sizeof(float));
            memcpy(v + (i * n_kv + h) * d, mv + (h * n + i) * d, d * sizeof(float));
        }
    }
    float *qr = malloc(nq * sizeof(float));
    kvck_rope_apply(&s->rope, 1, s->dense.n_heads, s->pos + t, s->q + t * nq, qr);
    kvck_rope none;
    ck_assert_int_eq(kvck_rope_init(&none, 0, (int)d, 0, 1.0f, NULL, 0.0f), 0);
    kvck_dense dn = s->dense;
    dn.rope = &none;
    double *ref = malloc(nq * sizeof(double)), *ex = malloc(nq * sizeof(double));
    kvck_attention_ref(&dn, 1, s->pos + t, qr, n, s->pos, k, v, ref);
    oracle(s, t, 1, ex);
    double err = th_rel_err(out, ref, nq);
    *vs_exact = th_rel_err(out, ex, nq);
    free(out), free(mpos), free(mk), free(mv), free(k), free(v), free(qr), free(ref), free(ex);
    return err;
}

START_TEST(attend_equals_attention_over_materialized)
{
    th_env e;
    OPEN_FULL(e);
    uint64_t rng = g_seed + 11 * (uint64_t)_i;
    kvc_geometry g = small_geometry();
    if (_i == 2) { /* a non-power-of-two head and NeoX pairs */
        g.head_dim = 80;
        g.rope_style = KVC_ROPE_HALVES;
    }
    stream s;
    stream_init(&s, &g, 301, &rng, _i % 2);
    kvc_instance *in = create_cfg(&e, &g, CONFIGS[_i]);
    kvc_seq *seq;
    ck_assert_int_eq(e.p->seq_open(in, &seq), KVC_OK);
    float *out = malloc(300 * qrow(&s) * sizeof(float));
    run_batches(&e, seq, &s, 0, 300, 100, 40, &rng, out);
    double vs_exact = 0, err = decode_vs_materialized(&e, seq, &s, 300, &vs_exact);
    printf("  %-66s attend vs materialized %.2e, vs exact %.2e\n", CONFIGS[_i], err, vs_exact);
    ck_assert_msg(err <= 1e-5, "\"%s\": attention differs from attention over its own "
                  "materialized cache by %.3e", CONFIGS[_i], err);
    e.p->seq_close(seq);
    e.p->destroy(in);
    ck_assert_uint_eq(th_live_bytes(&e), 0);
    free(out);
    stream_free(&s);
    th_close(&e);
}
END_TEST

START_TEST(error_falls_as_bits_grow)
{
    th_env e;
    OPEN_FULL(e);
    static const char *const ladder[] = {"k_bits=2 v_bits=2", "k_bits=3 v_bits=3",
                                         "k_bits=4 v_bits=4", "k_bits=6 v_bits=6",
                                         "k_bits=8 v_bits=8"};
    kvc_geometry g = small_geometry();
    uint64_t rng0 = g_seed + 77;
    stream s;
    stream_init(&s, &g, 257, &rng0, 0);
    double prev = INFINITY;
    for (size_t i = 0; i < sizeof ladder / sizeof ladder[0]; i++) {
        uint64_t rng = g_seed + 78;
        kvc_instance *in = create_cfg(&e, &g, ladder[i]);
        kvc_seq *seq;
        ck_assert_int_eq(e.p->seq_open(in, &seq), KVC_OK);
        float *out = malloc(256 * qrow(&s) * sizeof(float));
        run_batches(&e, seq, &s, 0, 256, 128, 16, &rng, out);
        double vs_exact = 0;
        decode_vs_materialized(&e, seq, &s, 256, &vs_exact);
        printf("  %-20s decode error vs exact %.3e\n", ladder[i], vs_exact);
        ck_assert_msg(vs_exact < prev, "%s: error %.3e did not fall below %.3e", ladder[i],
                      vs_exact, prev);
        prev = vs_exact;
        free(out);
        e.p->seq_close(seq);
        e.p->destroy(in);
    }
    ck_assert_msg(prev < 1e-2, "8-bit error %.3e", prev);
    stream_free(&s);
    th_close(&e);
}
END_TEST

/* ---- sinks and outliers come back exactly --------------------------------------- */

/* 2-bit per-token rows with one planted spike (|x| >= 20, exact in fp16)
 * per row and head among values in [-1, 1]: the spikes are the outliers
 * (2% of entries) and come back exactly, as the 5 sink tokens do (fp16 of
 * what was appended); the other entries keep 2-bit accuracy on the range
 * the spike no longer widens (half a step of [-1, 1] is 1/3; with the
 * spike in the range it would be ~3.5). RoPE off: materialize gives the
 * stored keys. */
START_TEST(sinks_and_outliers_come_back_exactly)
{
    th_env e;
    OPEN_FULL(e);
    kvc_geometry g = small_geometry();
    g.rope_style = KVC_ROPE_NONE;
    kvc_instance *in = create_cfg(&e, &g, "k_bits=2 v_bits=2 k_scale=token k_rope=post "
                                          "hadamard=none sink=5 outliers=0.02");
    const size_t n = 96, d = g.head_dim, n_kv = g.n_kv_heads, row = n_kv * d;
    uint64_t rng = g_seed + 404;
    float *k = malloc(n * row * sizeof(float)), *v = malloc(n * row * sizeof(float));
    uint8_t *spike = calloc(n * row, 1);
    int32_t *pos = malloc(n * sizeof(int32_t));
    th_fill(&rng, k, n * row);
    th_fill(&rng, v, n * row);
    for (size_t t = 0; t < n; t++) {
        pos[t] = (int32_t)t;
        for (size_t h = 0; h < n_kv; h++) {
            size_t c = (size_t)(th_next(&rng) % d);
            float x = (float)(20 + (int)(th_next(&rng) % 7)) * (t % 2 ? -1.0f : 1.0f);
            k[t * row + h * d + c] = x;
            v[t * row + h * d + (c + 17) % d] = x;
            spike[t * row + h * d + c] |= 1;
            spike[t * row + h * d + (c + 17) % d] |= 2;
        }
    }
    kvc_seq *seq;
    ck_assert_int_eq(e.p->seq_open(in, &seq), KVC_OK);
    float *q = calloc(n * g.n_heads * d, sizeof(float)), *o = malloc(n * g.n_heads * d * 4);
    ck_assert_int_eq(e.p->append(seq, 0, (uint32_t)n, pos, k, v, NULL), KVC_OK);
    ck_assert_int_eq(e.p->attend(seq, 0, (uint32_t)n, pos, q, o), KVC_OK);
    uint32_t counts[8];
    int32_t *mpos = malloc(n_kv * n * sizeof(int32_t));
    float *mk = malloc(n_kv * n * d * 4), *mv = malloc(n_kv * n * d * 4);
    kvc_materialized m = {sizeof m, (uint32_t)n, counts, mpos, mk, mv};
    ck_assert_int_eq(e.p->materialize(seq, 0, &m), KVC_OK);
    double worst = 0;
    size_t spikes = 0;
    for (size_t h = 0; h < n_kv; h++)
        for (size_t t = 0; t < n; t++)
            for (size_t c = 0; c < d; c++) {
                const size_t src = t * row + h * d + c, dst = (h * n + t) * d + c;
                const float ks = kvck_f16_to_f32(kvck_f32_to_f16(k[src]));
                const float vs = kvck_f16_to_f32(kvck_f32_to_f16(v[src]));
                if (t < 5) {
                    ck_assert_msg(mk[dst] == ks && mv[dst] == vs,
                                  "sink token %zu head %zu channel %zu: %a %a, appended %a %a",
                                  t, h, c, mk[dst], mv[dst], ks, vs);
                    continue;
                }
                if (spike[src] & 1) {
                    ck_assert_msg(mk[dst] == ks, "key spike %zu/%zu/%zu: %a, appended %a", t, h,
                                  c, mk[dst], ks);
                    spikes++;
                } else {
                    worst = fmax(worst, fabs(mk[dst] - k[src]));
                }
                if (spike[src] & 2) {
                    ck_assert_msg(mv[dst] == vs, "value spike %zu/%zu/%zu: %a, appended %a", t,
                                  h, c, mv[dst], vs);
                    spikes++;
                } else {
                    worst = fmax(worst, fabs(mv[dst] - v[src]));
                }
            }
    printf("  %zu spikes back exactly, 5 sink tokens exact; other entries within %.3f\n", spikes,
           worst);
    ck_assert_uint_eq(spikes, 2 * n_kv * (n - 5));
    ck_assert_msg(worst <= 0.34, "2-bit error %.3f: the spikes still widen the range", worst);
    e.p->seq_close(seq);
    e.p->destroy(in);
    ck_assert_uint_eq(th_live_bytes(&e), 0);
    free(k), free(v), free(spike), free(pos), free(q), free(o), free(mpos), free(mk), free(mv);
    th_close(&e);
}
END_TEST

/* ---- the step rule, to the byte ------------------------------------------------- */

START_TEST(batched_equals_single_steps_to_the_byte)
{
    th_env e;
    OPEN_FULL(e);
    uint64_t rng = g_seed + 101 * (uint64_t)_i;
    kvc_geometry g = small_geometry();
    const size_t total = 260;
    stream s;
    stream_init(&s, &g, total, &rng, _i % 2);
    kvc_instance *in = create_cfg(&e, &g, CONFIGS[_i]);
    kvc_seq *a, *b;
    ck_assert_int_eq(e.p->seq_open(in, &a), KVC_OK);
    ck_assert_int_eq(e.p->seq_open(in, &b), KVC_OK);
    float *oa = malloc(total * qrow(&s) * sizeof(float));
    float *ob = malloc(total * qrow(&s) * sizeof(float));
    for (uint32_t l = 0; l < g.n_layers; l++) {
        run_batches(&e, a, &s, l, total, 90, 50, &rng, oa);
        run_batches(&e, b, &s, l, total, 1, 1, &rng, ob);
        for (size_t t = 0; t < total; t++)
            ck_assert_msg(memcmp(oa + t * qrow(&s), ob + t * qrow(&s), qrow(&s) * 4) == 0,
                          "\"%s\" layer %u: query %zu differs between batched and single "
                          "steps (rel err %.3e)",
                          CONFIGS[_i], l, t,
                          th_rel_err_f(oa + t * qrow(&s), ob + t * qrow(&s), qrow(&s)));
    }
    void *ba, *bb;
    size_t na = export_blob(&e, a, &ba), nb = export_blob(&e, b, &bb);
    ck_assert_msg(na == nb && memcmp(ba, bb, na) == 0,
                  "\"%s\": the two caches export different bytes (%zu vs %zu)", CONFIGS[_i], na,
                  nb);
    free(ba), free(bb), free(oa), free(ob);
    e.p->destroy(in);
    stream_free(&s);
    th_close(&e);
}
END_TEST

/* ---- export / import, fork ------------------------------------------------------- */

START_TEST(export_import_identical_bytes)
{
    th_env e;
    OPEN_FULL(e);
    uint64_t rng = g_seed + 303 * (uint64_t)_i;
    kvc_geometry g = small_geometry();
    stream s;
    stream_init(&s, &g, 240, &rng, 1);
    kvc_instance *in = create_cfg(&e, &g, CONFIGS[_i]);
    kvc_seq *a, *b;
    ck_assert_int_eq(e.p->seq_open(in, &a), KVC_OK);
    ck_assert_int_eq(e.p->seq_open(in, &b), KVC_OK);
    float *oa = malloc(240 * qrow(&s) * sizeof(float)), *ob = malloc(240 * qrow(&s) * sizeof(float));
    for (uint32_t l = 0; l < g.n_layers; l++)
        run_batches(&e, a, &s, l, 200, 64, 30, &rng, oa);
    /* Pending raw rows too: append without attending on layer 1. */
    ck_assert_int_eq(e.p->append(a, 1, 10, s.pos + 200, s.k + 200 * krow(&s),
                                 s.v + 200 * krow(&s), NULL), KVC_OK);
    void *blob, *again;
    size_t n = export_blob(&e, a, &blob);
    ck_assert_int_eq(e.p->seq_import(b, blob, n), KVC_OK);
    size_t n2 = export_blob(&e, b, &again);
    ck_assert_msg(n == n2 && memcmp(blob, again, n) == 0, "\"%s\": re-export differs",
                  CONFIGS[_i]);
    kvc_seq_stats sa = {.struct_size = sizeof sa}, sb = {.struct_size = sizeof sb};
    ck_assert_int_eq(e.p->seq_stats(a, &sa), KVC_OK);
    ck_assert_int_eq(e.p->seq_stats(b, &sb), KVC_OK);
    ck_assert_uint_eq(sa.bytes_resident, sb.bytes_resident);
    ck_assert_uint_eq(sa.bytes_pending, sb.bytes_pending);
    /* Both continue alike. */
    ck_assert_int_eq(e.p->attend(a, 1, 10, s.pos + 200, s.q + 200 * qrow(&s), oa), KVC_OK);
    ck_assert_int_eq(e.p->attend(b, 1, 10, s.pos + 200, s.q + 200 * qrow(&s), ob), KVC_OK);
    ck_assert(memcmp(oa, ob, 10 * qrow(&s) * 4) == 0);
    for (size_t t = 210; t < 240; t += 15) {
        ck_assert_int_eq(step(&e, a, &s, 0, t, 15, oa), KVC_OK);
        ck_assert_int_eq(step(&e, b, &s, 0, t, 15, ob), KVC_OK);
        ck_assert(memcmp(oa, ob, 15 * qrow(&s) * 4) == 0);
    }
    /* Damage is refused, and b is unchanged by a refused import. */
    ((unsigned char *)blob)[n / 2] ^= 0x10;
    ck_assert_int_eq(e.p->seq_import(b, blob, n), KVC_E_CORRUPT);
    ck_assert(e.p->seq_message(b)[0] != 0);
    free(blob), free(again), free(oa), free(ob);
    e.p->destroy(in);
    ck_assert_uint_eq(th_live_bytes(&e), 0);
    stream_free(&s);
    th_close(&e);
}
END_TEST

START_TEST(import_refuses_other_quantization)
{
    th_env e;
    OPEN_FULL(e);
    uint64_t rng = g_seed + 404;
    kvc_geometry g = small_geometry();
    stream s;
    stream_init(&s, &g, 80, &rng, 0);
    kvc_instance *a = create_cfg(&e, &g, "k_bits=4 v_bits=4");
    kvc_instance *b = create_cfg(&e, &g, "k_bits=4 v_bits=3");
    kvc_instance *c = create_cfg(&e, &g, "dtype=fp16");
    kvc_seq *sa, *sb, *sc;
    ck_assert_int_eq(e.p->seq_open(a, &sa), KVC_OK);
    ck_assert_int_eq(e.p->seq_open(b, &sb), KVC_OK);
    ck_assert_int_eq(e.p->seq_open(c, &sc), KVC_OK);
    float *out = malloc(80 * qrow(&s) * sizeof(float));
    ck_assert_int_eq(step(&e, sa, &s, 0, 0, 80, out), KVC_OK);
    void *blob;
    size_t n = export_blob(&e, sa, &blob);
    ck_assert_int_eq(e.p->seq_import(sb, blob, n), KVC_E_INVALID);
    ck_assert_msg(strstr(e.p->seq_message(sb), "quantization") != NULL, "%s",
                  e.p->seq_message(sb));
    ck_assert_int_eq(e.p->seq_import(sc, blob, n), KVC_E_INVALID);
    free(blob), free(out);
    e.p->destroy(a), e.p->destroy(b), e.p->destroy(c);
    stream_free(&s);
    th_close(&e);
}
END_TEST

START_TEST(fork_gives_independent_sequences)
{
    th_env e;
    OPEN_FULL(e);
    uint64_t rng = g_seed + 505;
    kvc_geometry g = small_geometry();
    stream s, t2;
    stream_init(&s, &g, 200, &rng, 0);
    stream_init(&t2, &g, 200, &rng, 0);
    kvc_instance *in = create_cfg(&e, &g, CONFIGS[2]);
    kvc_seq *a, *b;
    ck_assert_int_eq(e.p->seq_open(in, &a), KVC_OK);
    ck_assert_int_eq(e.p->seq_open(in, &b), KVC_OK);
    float *out = malloc(200 * qrow(&s) * sizeof(float));
    ck_assert_int_eq(step(&e, a, &s, 0, 0, 120, out), KVC_OK);
    ck_assert_int_eq(e.p->fork(a, b), KVC_OK);
    void *ba, *bb;
    size_t na = export_blob(&e, a, &ba), nb = export_blob(&e, b, &bb);
    ck_assert(na == nb && memcmp(ba, bb, na) == 0);
    /* Different futures: b's continuation must not change a. */
    ck_assert_int_eq(step(&e, b, &t2, 0, 120, 80, out), KVC_OK);
    void *ba2;
    size_t na2 = export_blob(&e, a, &ba2);
    ck_assert(na2 == na && memcmp(ba, ba2, na) == 0);
    free(ba), free(bb), free(ba2), free(out);
    e.p->destroy(in);
    ck_assert_uint_eq(th_live_bytes(&e), 0);
    stream_free(&s), stream_free(&t2);
    th_close(&e);
}
END_TEST

/* ---- memory -------------------------------------------------------------------------- */

static void check_budget(const th_env *e, kvc_seq *seq, const kvc_instance_stats *is,
                         uint64_t base_live, const char *cfg, const char *when)
{
    kvc_seq_stats st = {.struct_size = sizeof st};
    ck_assert_int_eq(e->p->seq_stats(seq, &st), KVC_OK);
    ck_assert_msg(st.bytes_resident ==
                      st.bytes_payload + st.bytes_metadata + st.bytes_reserved + st.bytes_fixed,
                  "%s %s: resident is not the sum of its parts", cfg, when);
    ck_assert_msg(th_live_bytes(e) - base_live == st.bytes_resident,
                  "%s %s: allocator holds %llu B for the sequence, stats say %llu", cfg, when,
                  (unsigned long long)(th_live_bytes(e) - base_live),
                  (unsigned long long)st.bytes_resident);
    ck_assert(st.bytes_pending <= st.bytes_resident);
    double limit = is->kv_ratio * (double)st.bytes_fp16_full + (double)is->seq_overhead_bytes;
    ck_assert_msg((double)(st.bytes_resident - st.bytes_pending) <= limit,
                  "%s %s: resident %llu - pending %llu > kv_ratio %.4f x %llu + %llu", cfg, when,
                  (unsigned long long)st.bytes_resident, (unsigned long long)st.bytes_pending,
                  is->kv_ratio, (unsigned long long)st.bytes_fp16_full,
                  (unsigned long long)is->seq_overhead_bytes);
}

START_TEST(stats_match_allocator_and_budget_holds)
{
    th_env e;
    OPEN_FULL(e);
    uint64_t rng = g_seed + 606 * (uint64_t)(_i + 1);
    kvc_geometry g = small_geometry();
    const size_t total = 700;
    stream s;
    stream_init(&s, &g, total, &rng, _i % 2);
    kvc_instance *in = create_cfg(&e, &g, CONFIGS[_i]);
    kvc_instance_stats is = {.struct_size = sizeof is};
    ck_assert_int_eq(e.p->instance_stats(in, &is), KVC_OK);
    ck_assert(is.kv_ratio > 0 && is.kv_ratio < 1);
    uint64_t base = th_live_bytes(&e);
    kvc_seq *seq;
    ck_assert_int_eq(e.p->seq_open(in, &seq), KVC_OK);
    float *out = malloc(total * qrow(&s) * sizeof(float));
    size_t t = 0;
    while (t < total) {
        size_t n = t == 0 ? 150 : 1 + th_next(&rng) % 60;
        n = n > total - t ? total - t : n;
        for (uint32_t l = 0; l < g.n_layers; l++)
            ck_assert_int_eq(e.p->append(seq, l, (uint32_t)n, s.pos + t, s.k + t * krow(&s),
                                         s.v + t * krow(&s), NULL),
                             KVC_OK);
        check_budget(&e, seq, &is, base, CONFIGS[_i], "after appends");
        for (uint32_t l = 0; l < g.n_layers; l++)
            ck_assert_int_eq(e.p->attend(seq, l, (uint32_t)n, s.pos + t, s.q + t * qrow(&s),
                                         out),
                             KVC_OK);
        kvc_seq_stats st = {.struct_size = sizeof st};
        ck_assert_int_eq(e.p->seq_stats(seq, &st), KVC_OK);
        ck_assert_msg(st.bytes_pending == 0, "%s: %llu B pending after the covering attends",
                      CONFIGS[_i], (unsigned long long)st.bytes_pending);
        check_budget(&e, seq, &is, base, CONFIGS[_i], "after attends");
        t += n;
    }
    kvc_seq_stats st = {.struct_size = sizeof st};
    ck_assert_int_eq(e.p->seq_stats(seq, &st), KVC_OK);
    printf("  %-66s %.3f of fp16 at %zu tokens (declared %.3f + %llu B)\n", CONFIGS[_i],
           (double)st.bytes_resident / (double)st.bytes_fp16_full, total, is.kv_ratio,
           (unsigned long long)is.seq_overhead_bytes);
    e.p->truncate(seq, 333);
    check_budget(&e, seq, &is, base, CONFIGS[_i], "after truncate");
    e.p->seq_close(seq);
    ck_assert_uint_eq(th_live_bytes(&e), base);
    e.p->destroy(in);
    free(out);
    stream_free(&s);
    th_close(&e);
}
END_TEST

/* One session under failure injection: create, open, three rounds of
 * steps on both layers, truncate, fork. The first non-OK status wins;
 * after a failure the sequence must still take a step. */
static kvc_status session(const th_env *e, const kvc_geometry *g, const stream *s, const char *cfg,
                          float *out)
{
    char buf[256], msg[256];
    const char *opts[16];
    split_opts(cfg, buf, sizeof buf, opts, 16);
    kvc_instance *in = NULL;
    kvc_status st = th_create(e, g, opts, &in, msg, sizeof msg);
    if (st)
        return st;
    kvc_seq *seq = NULL, *f2 = NULL;
    if ((st = e->p->seq_open(in, &seq)))
        goto out;
    for (size_t t = 0; !st && t < 120; t += 40)
        for (uint32_t l = 0; l < g->n_layers && !st; l++)
            st = step(e, seq, s, l, t, 40, out);
    if (!st) {
        e->p->truncate(seq, s->pos[50]);
        if (!(st = e->p->seq_open(in, &f2)))
            st = e->p->fork(seq, f2);
    }
out:
    e->p->seq_close(f2);
    e->p->seq_close(seq);
    e->p->destroy(in);
    return st;
}

START_TEST(every_allocation_failure_is_clean)
{
    th_env e;
    OPEN_FULL(e);
    uint64_t rng = g_seed + 707;
    kvc_geometry g = small_geometry();
    stream s;
    stream_init(&s, &g, 120, &rng, 1);
    float *out = malloc(120 * qrow(&s) * sizeof(float));
    unsigned failures = 0;
    for (uint64_t nth = 1;; nth++) {
        kvch_tracker_fail_nth(e.tr, nth);
        kvc_status st = session(&e, &g, &s, CONFIGS[2], out);
        kvch_tracker_fail_nth(e.tr, 0);
        ck_assert_msg(th_live_bytes(&e) == 0, "failing allocation %llu leaked %llu bytes",
                      (unsigned long long)nth, (unsigned long long)th_live_bytes(&e));
        if (st == KVC_OK)
            break;
        ck_assert_msg(st == KVC_E_NOMEM, "failing allocation %llu gave status %d",
                      (unsigned long long)nth, st);
        failures++;
        ck_assert_uint_lt(nth, 20000);
    }
    printf("  allocation failure injected at each of %u allocations: all clean\n", failures);
    ck_assert_uint_gt(failures, 20);
    kvch_tracker_stats ts;
    kvch_tracker_get(e.tr, &ts);
    ck_assert_uint_eq(ts.n_bad_free, 0);
    ck_assert_uint_eq(ts.n_overrun, 0);
    free(out);
    stream_free(&s);
    th_close(&e);
}
END_TEST

/* ---- options, caps ------------------------------------------------------------------ */

START_TEST(instance_caps_follow_options)
{
    th_env e;
    OPEN_FULL(e);
    kvc_geometry g = small_geometry();
    static const struct {
        const char *opts;
        int exact, truncate;
    } cases[] = {
        {"", 1, 1},
        {"dtype=fp16", 0, 1},
        {"k_bits=8 v_bits=8", 0, 0},                           /* per-channel key blocks */
        {"k_bits=4 v_bits=4 k_scale=token", 0, 1},             /* each token on its own */
        {"k_bits=4 v_bits=4 k_scale=token window=16", 0, 0},   /* the window re-rounds */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        kvc_instance *in = create_cfg(&e, &g, cases[i].opts);
        kvc_instance_stats is = {.struct_size = sizeof is};
        ck_assert_int_eq(e.p->instance_stats(in, &is), KVC_OK);
        ck_assert_msg((is.caps & ~e.p->caps) == 0, "instance caps beyond the descriptor's");
        ck_assert_msg(!!(is.caps & KVC_CAP_EXACT) == cases[i].exact, "\"%s\": EXACT %s",
                      cases[i].opts, cases[i].exact ? "missing" : "claimed");
        ck_assert_msg(!!(is.caps & KVC_CAP_TRUNCATE) == cases[i].truncate,
                      "\"%s\": TRUNCATE %s", cases[i].opts,
                      cases[i].truncate ? "missing" : "claimed");
        e.p->destroy(in);
    }
    th_close(&e);
}
END_TEST

START_TEST(truncate_exact_with_token_keys_and_usable_otherwise)
{
    th_env e;
    OPEN_FULL(e);
    uint64_t rng = g_seed + 808;
    kvc_geometry g = small_geometry();
    stream s, junk;
    stream_init(&s, &g, 300, &rng, 0);
    stream_init(&junk, &g, 300, &rng, 1);
    static const char *const cfgs[] = {"k_bits=4 v_bits=4 k_scale=token", "k_bits=4 v_bits=4",
                                       "k_bits=3 v_bits=3 sink=5 window=20 block_tokens=16"};
    for (size_t c = 0; c < 3; c++) {
        kvc_instance *in = create_cfg(&e, &g, cfgs[c]);
        kvc_seq *a, *b;
        ck_assert_int_eq(e.p->seq_open(in, &a), KVC_OK);
        ck_assert_int_eq(e.p->seq_open(in, &b), KVC_OK);
        float *oa = malloc(300 * qrow(&s) * sizeof(float)), *ob = malloc(300 * qrow(&s) * sizeof(float));
        ck_assert_int_eq(step(&e, a, &s, 0, 0, 150, oa), KVC_OK);
        ck_assert_int_eq(step(&e, b, &s, 0, 0, 150, ob), KVC_OK);
        /* b speculates 100 other tokens, then rolls back to position 150. */
        ck_assert_int_eq(step(&e, b, &junk, 0, 150, 100, ob), KVC_OK);
        ck_assert_int_eq(e.p->truncate(b, s.pos[150]), KVC_OK);
        kvc_seq_stats st = {.struct_size = sizeof st};
        ck_assert_int_eq(e.p->seq_stats(b, &st), KVC_OK);
        ck_assert_uint_eq(st.tokens_appended, 150);
        ck_assert_int_eq(step(&e, a, &s, 0, 150, 150, oa), KVC_OK);
        ck_assert_int_eq(step(&e, b, &s, 0, 150, 150, ob), KVC_OK);
        double err = th_rel_err_f(ob, oa, 150 * qrow(&s));
        printf("  %-50s truncate + re-append vs never: %.3e\n", cfgs[c], err);
        if (c == 0)
            ck_assert_msg(err == 0, "token-scaled keys: truncate must be exact, got %.3e", err);
        else
            ck_assert_msg(err < 0.05, "truncate left the sequence far off: %.3e", err);
        free(oa), free(ob);
        e.p->destroy(in);
    }
    stream_free(&s), stream_free(&junk);
    th_close(&e);
}
END_TEST

START_TEST(bad_options_are_named)
{
    th_env e;
    OPEN_FULL(e);
    kvc_geometry g = small_geometry();
    static const struct {
        const char *opts, *word;
    } cases[] = {
        {"k_bits=7 v_bits=4", "k_bits"},
        {"k_bits=4", "v_bits"},
        {"k_bits=4 v_bits=4 hadamard=k", "k_rope=post"},
        {"k_bits=4 v_bits=4 block_tokens=512", "256"},
        {"k_bits=4 v_bits=4 kv_ratio=0.1", "kv_ratio"},
        {"k_bits=4 v_bits=4 outliers=0.5", "outliers"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char buf[256], msg[256] = "";
        const char *opts[16];
        split_opts(cases[i].opts, buf, sizeof buf, opts, 16);
        kvc_instance *in = NULL;
        kvc_status st = th_create(&e, &g, opts, &in, msg, sizeof msg);
        ck_assert_msg(st == KVC_E_INVALID && !in, "\"%s\" was not refused", cases[i].opts);
        ck_assert_msg(strstr(msg, cases[i].word) != NULL, "\"%s\": message \"%s\" does not name %s",
                      cases[i].opts, msg, cases[i].word);
    }
    ck_assert_uint_eq(th_live_bytes(&e), 0);
    th_close(&e);
}
END_TEST

int main(void)
{
    const char *env = getenv("KVC_TEST_SEED");
    g_seed = env ? strtoull(env, NULL, 10) : 20261204ull;
    printf("test_full_quant: seed %llu (replay with KVC_TEST_SEED)\n", (unsigned long long)g_seed);
    Suite *su = suite_create("full-quant");
    TCase *acc = tcase_create("accuracy");
    tcase_add_loop_test(acc, attend_equals_attention_over_materialized, 0, N_CONFIGS);
    tcase_add_test(acc, error_falls_as_bits_grow);
    tcase_add_test(acc, sinks_and_outliers_come_back_exactly);
    suite_add_tcase(su, acc);
    TCase *sem = tcase_create("semantics");
    tcase_add_loop_test(sem, batched_equals_single_steps_to_the_byte, 0, N_CONFIGS);
    tcase_add_loop_test(sem, export_import_identical_bytes, 0, N_CONFIGS);
    tcase_add_test(sem, import_refuses_other_quantization);
    tcase_add_test(sem, fork_gives_independent_sequences);
    tcase_add_test(sem, truncate_exact_with_token_keys_and_usable_otherwise);
    suite_add_tcase(su, sem);
    TCase *mem = tcase_create("memory");
    tcase_add_loop_test(mem, stats_match_allocator_and_budget_holds, 0, N_CONFIGS);
    tcase_add_test(mem, every_allocation_failure_is_clean);
    suite_add_tcase(su, mem);
    TCase *bad = tcase_create("options");
    tcase_add_test(bad, instance_caps_follow_options);
    tcase_add_test(bad, bad_options_are_named);
    suite_add_tcase(su, bad);
    SRunner *sr = srunner_create(su);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
