/*
 * t_semantics.c -- group "semantics": what the ABI promises about results.
 *
 *   determinism    same inputs on fresh sequences / instances -> same bytes
 *   step_rule      n tokens in one call == n single steps (KVC-REQ-1; with
 *                  KVC_CAP_PROMPT_PHASE after the same prompt call)
 *   truncate       truncate + re-append == never appended (KVC-REQ-14)
 *   fork           fork gives independent copies (KVC-REQ-15)
 *   export_import  round trip gives the same bytes and stats (KVC-REQ-13)
 *   threads        distinct sequences on distinct threads (KVC-REQ-12)
 *   materialize    post-RoPE K, V and positions as appended (KVC-REQ-18)
 *
 * Every comparison is between two runs with the same call history except
 * for the operation under test, so even a lossy or evicting plugin must
 * give the same numbers: the tolerances only absorb float rounding from a
 * different batching (see TOL_* below).
 */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "conform.h"
#include "kvck.h"

/* Relative error (norm-wise per layer, see wl_diff) allowed between two
 * runs that the ABI says are equal. A lossless configuration recomputes the same exact numbers, so
 * only a different summation order can differ (~1e-7). A lossy plugin
 * still owes equality up to float rounding, but its reconstruction (latent
 * products, dequantization) amplifies reordering a little: 10x more. */
#define TOL_LOSSLESS 1e-6
#define TOL_LOSSY 1e-5

/* Guard bytes around every attend/materialize output buffer. */
#define GUARD 64
#define GUARD_BYTE 0xA5

/* ---- helpers ------------------------------------------------------------------ */

static double tolerance(kc_env *e)
{
    return kc_config_lossless(e) ? TOL_LOSSLESS : TOL_LOSSY;
}

/* ||a - b|| / ||b|| over n floats (absolute when b is zero; infinite
 * when either holds a non-finite value). */
static double row_err(const float *a, const float *b, size_t n)
{
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double x = a[i], y = b[i];
        if (!isfinite(x) || !isfinite(y))
            return INFINITY;
        num += (x - y) * (x - y);
        den += y * y;
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* Skips the test (after unloading) when the plugin lacks `cap`. */
static void need_cap(kc_env *e, uint64_t cap, const char *name)
{
    if (e->p->caps & cap)
        return;
    kc_unload(e);
    kc_skip("plugin has no %s", name);
}

static size_t q_row(const kvc_geometry *g)
{
    return (size_t)g->n_heads * g->head_dim;
}

static size_t kv_row(const kvc_geometry *g)
{
    return (size_t)g->n_kv_heads * g->head_dim;
}

/* Spreads positions out: every `every` tokens, `gap` positions are skipped,
 * so plugins that store positions implicitly while contiguous are tested
 * on the other path too. */
static void add_gaps(kc_tokens *t, uint32_t every, int32_t gap)
{
    int32_t p0 = t->pos[0];
    for (uint32_t i = 0; i < t->n; i++)
        t->pos[i] = p0 + (int32_t)i + (int32_t)(i / every) * gap;
}

/* One workload: per layer its own tokens (distinct data per layer catches a
 * plugin mixing layers up), the same positions in every layer. */
typedef struct wl {
    kvc_geometry g;
    uint32_t n;
    kc_tokens *t; /* [n_layers] */
    float **out;  /* [n_layers][n][n_heads][head_dim] attend outputs */
} wl;

static void wl_make(wl *w, const kvc_geometry *g, uint32_t n, int32_t start, uint64_t salt,
                    uint32_t gap_every)
{
    w->g = *g;
    w->n = n;
    w->t = calloc(g->n_layers, sizeof *w->t);
    w->out = calloc(g->n_layers, sizeof *w->out);
    ck_assert_msg(w->t && w->out, "out of memory");
    for (uint32_t l = 0; l < g->n_layers; l++) {
        kc_rng r;
        kc_rng_init(&r, salt * 1000 + l);
        kc_tokens_make(&w->t[l], g, n, start, &r);
        if (gap_every)
            add_gaps(&w->t[l], gap_every, 3);
        w->out[l] = calloc((size_t)n * q_row(g), sizeof(float));
        ck_assert_msg(w->out[l], "out of memory");
    }
}

static void wl_free(wl *w)
{
    for (uint32_t l = 0; l < w->g.n_layers; l++) {
        kc_tokens_free(&w->t[l]);
        free(w->out[l]);
    }
    free(w->t);
    free(w->out);
}

/* attend() through a buffer with guard bytes on both sides. Returns 0, or
 * -1 with the problem in err (status and message, a write outside the
 * output, a non-finite output). Thread-safe: no Check calls. */
static int attend_guarded(const kc_env *e, kvc_seq *s, const kvc_geometry *g, uint32_t layer,
                          uint32_t n, const int32_t *pos, const float *q, float *out, char *err,
                          size_t err_size)
{
    size_t bytes = (size_t)n * q_row(g) * sizeof(float);
    unsigned char *buf = malloc(bytes + 2 * GUARD);
    if (!buf) {
        snprintf(err, err_size, "out of memory");
        return -1;
    }
    memset(buf, GUARD_BYTE, bytes + 2 * GUARD);
    kvc_status st = e->p->attend(s, layer, n, pos, q, buf + GUARD);
    int bad = 0;
    for (size_t i = 0; i < GUARD && !bad; i++)
        bad = buf[i] != GUARD_BYTE || buf[GUARD + bytes + i] != GUARD_BYTE;
    if (st != KVC_OK) {
        snprintf(err, err_size, "attend(layer %u, %u queries at %d..%d) failed: %s (%d): %s",
                 layer, n, pos[0], pos[n - 1], kvch_status_string(st), st,
                 e->p->seq_message(s));
    } else if (bad) {
        snprintf(err, err_size, "attend(layer %u, %u queries) wrote outside its output buffer",
                 layer, n);
    } else {
        memcpy(out, buf + GUARD, bytes);
        for (size_t i = 0; i < bytes / sizeof(float); i++)
            if (!isfinite(out[i])) {
                snprintf(err, err_size,
                         "attend(layer %u, %u queries at %d..) output %zu is %g (not finite)",
                         layer, n, pos[0], i, (double)out[i]);
                bad = 1;
                break;
            }
    }
    free(buf);
    return st != KVC_OK || bad ? -1 : 0;
}

/* Runs tokens [from, to) of w through s in batches: sizes[0], sizes[1], ...
 * (the last size repeats). Each batch: for every layer, append then attend
 * its own queries (a model's forward pass). Outputs into w->out. Returns 0
 * or -1 with err set. Thread-safe. */
static int wl_run(const kc_env *e, kvc_seq *s, wl *w, uint32_t from, uint32_t to,
                  const uint32_t *sizes, size_t n_sizes, char *err, size_t err_size)
{
    const kvc_geometry *g = &w->g;
    size_t bi = 0;
    for (uint32_t at = from; at < to;) {
        uint32_t b = sizes[bi < n_sizes ? bi : n_sizes - 1];
        bi++;
        if (b > to - at)
            b = to - at;
        for (uint32_t l = 0; l < g->n_layers; l++) {
            const kc_tokens *t = &w->t[l];
            kvc_status st = e->p->append(s, l, b, t->pos + at, t->k + (size_t)at * kv_row(g),
                                         t->v + (size_t)at * kv_row(g), t->flags + at);
            if (st != KVC_OK) {
                snprintf(err, err_size, "append(layer %u, %u tokens at %d) failed: %s (%d): %s", l,
                         b, t->pos[at], kvch_status_string(st), st, e->p->seq_message(s));
                return -1;
            }
            if (attend_guarded(e, s, g, l, b, t->pos + at, t->q + (size_t)at * q_row(g),
                               w->out[l] + (size_t)at * q_row(g), err, err_size))
                return -1;
        }
        at += b;
    }
    return 0;
}

/* wl_run that fails the test. */
static void run_ok(const kc_env *e, kvc_seq *s, wl *w, uint32_t from, uint32_t to,
                   const uint32_t *sizes, size_t n_sizes, const char *what)
{
    char err[768];
    if (wl_run(e, s, w, from, to, sizes, n_sizes, err, sizeof err))
        ck_abort_msg("%s: %s", what, err);
}

static kvc_seq *open_seq(const kc_env *e, kvc_instance *inst)
{
    kvc_seq *s = NULL;
    kvc_status st = e->p->seq_open(inst, &s);
    ck_assert_msg(st == KVC_OK && s, "seq_open failed: %s (%d)", kvch_status_string(st), st);
    return s;
}

/* Attends probe queries (tokens [0, n) of p) on every layer into p->out. */
static void probe(const kc_env *e, kvc_seq *s, wl *p, const char *what)
{
    char err[768];
    for (uint32_t l = 0; l < p->g.n_layers; l++)
        if (attend_guarded(e, s, &p->g, l, p->n, p->t[l].pos, p->t[l].q, p->out[l], err,
                           sizeof err))
            ck_abort_msg("%s: %s", what, err);
}

/* Compares two workloads' outputs over tokens [from, to): the worst over
 * layers of ||a - b|| / ||b|| (Frobenius over the tokens). Norm-wise, not
 * per token: on random data attention averages many values, so a single
 * output can be small and its rounding large relative to itself, while
 * any real defect (a token seen or missed, a wrong value) moves the norm
 * far beyond 1e-6. */
static double wl_diff(const wl *a, const wl *b, uint32_t from, uint32_t to)
{
    double worst = 0;
    size_t row = q_row(&a->g);
    for (uint32_t l = 0; l < a->g.n_layers; l++)
        worst = fmax(worst, row_err(a->out[l] + from * row, b->out[l] + from * row,
                                    (to - from) * row));
    return worst;
}

/* Nonzero when the outputs of tokens [0, n) are the same bytes. */
static int wl_same_bytes(const wl *a, const wl *b)
{
    for (uint32_t l = 0; l < a->g.n_layers; l++)
        if (memcmp(a->out[l], b->out[l], (size_t)a->n * q_row(&a->g) * sizeof(float)))
            return 0;
    return 1;
}

/* A batch schedule: a prefill, then decode steps mixed with small and
 * block-crossing batches. */
static const uint32_t MIXED[] = {100, 1, 2, 5, 1, 17, 64, 1, 3, 31, 1, 1, 70, 7, 1, 129, 2, 9};
#define N_MIXED (sizeof MIXED / sizeof MIXED[0])

static uint32_t profile_tokens(uint32_t quick, uint32_t full)
{
    return KC.profile == KC_FULL ? full : quick;
}

/* ---- determinism ------------------------------------------------------------------ */

START_TEST(determinism)
{
    kc_need_host_data();
    kc_env e;
    kc_load(&e);
    kvc_geometry g = kc_geometry_small();
    const uint32_t n = profile_tokens(320, 1000);
    kvc_instance *a = kc_create_ready(&e, &g, NULL);
    wl w1, w2, w3;
    wl_make(&w1, &g, n, 0, 11, 45);
    wl_make(&w2, &g, n, 0, 11, 45);
    wl_make(&w3, &g, n, 0, 11, 45);

    /* Two fresh sequences of one instance; the first stays open, so the
     * second runs next to live state it must not read. */
    kvc_seq *s1 = open_seq(&e, a), *s2 = open_seq(&e, a);
    run_ok(&e, s1, &w1, 0, n, MIXED, N_MIXED, "sequence 1");
    run_ok(&e, s2, &w2, 0, n, MIXED, N_MIXED, "sequence 2");
    ck_assert_msg(wl_same_bytes(&w1, &w2),
                  "two fresh sequences of one instance given the same inputs differ: "
                  "relative difference %.3e",
                  wl_diff(&w2, &w1, 0, n));

    /* A second instance with the same geometry and options. */
    kvc_instance *b = kc_create_ready(&e, &g, NULL);
    kvc_seq *s3 = open_seq(&e, b);
    run_ok(&e, s3, &w3, 0, n, MIXED, N_MIXED, "sequence on a second instance");
    ck_assert_msg(wl_same_bytes(&w1, &w3),
                  "two instances with the same geometry and options differ on the same inputs: "
                  "relative difference %.3e",
                  wl_diff(&w3, &w1, 0, n));
    kc_figure("3 runs x %u tokens x %u layers: identical bytes", n, g.n_layers);

    e.p->seq_close(s1);
    e.p->seq_close(s2);
    e.p->seq_close(s3);
    e.p->destroy(a);
    e.p->destroy(b);
    wl_free(&w1);
    wl_free(&w2);
    wl_free(&w3);
    kc_unload(&e);
}
END_TEST

/* ---- step rule ------------------------------------------------------------------------ */

/* Batched (MIXED) vs one token per call on geometry g; returns the worst
 * relative difference (wl_diff). With KVC_CAP_PROMPT_PHASE the first
 * attend of each layer is the prompt, which the rule does not cover
 * (KVC-REQ-1): the token-by-token run then starts with the batched run's
 * prefill (MIXED[0] tokens in one call) and goes one token per call. */
static double step_rule_on(kc_env *e, const kvc_geometry *g, uint32_t n, uint64_t salt)
{
    kvc_instance *inst = kc_create_ready(e, g, NULL);
    wl batched, single;
    wl_make(&batched, g, n, 0, salt, 53);
    wl_make(&single, g, n, 0, salt, 53);
    kvc_seq *a = open_seq(e, inst), *b = open_seq(e, inst);
    static const uint32_t one[] = {1};
    const uint32_t prompt_then_one[] = {MIXED[0], 1}; /* the last size repeats */
    const int prompt = (e->p->caps & KVC_CAP_PROMPT_PHASE) != 0;
    run_ok(e, a, &batched, 0, n, MIXED, N_MIXED, "batched run");
    if (prompt)
        run_ok(e, b, &single, 0, n, prompt_then_one, 2,
               "prompt-then-token-by-token run (KVC_CAP_PROMPT_PHASE)");
    else
        run_ok(e, b, &single, 0, n, one, 1, "token-by-token run");
    double err = wl_diff(&batched, &single, 0, n);
    e->p->seq_close(a);
    e->p->seq_close(b);
    e->p->destroy(inst);
    wl_free(&batched);
    wl_free(&single);
    return err;
}

START_TEST(step_rule)
{
    kc_need_host_data();
    kc_env e;
    kc_load(&e);
    const double tol = tolerance(&e);
    const uint32_t n = profile_tokens(400, 1200);
    kvc_geometry g = kc_geometry_small();
    const int prompt = (e.p->caps & KVC_CAP_PROMPT_PHASE) != 0;
    /* With a prompt phase both runs share the prompt call; what follows it
     * is compared (KVC-REQ-1 holds after the first attend of each layer). */
    char vs[96], pfig[80] = "";
    if (prompt) {
        snprintf(vs, sizeof vs, "one token per call after the same %u-token prompt", MIXED[0]);
        snprintf(pfig, sizeof pfig, "; prompt phase: both runs share a %u-token prompt",
                 MIXED[0]);
    } else {
        snprintf(vs, sizeof vs, "one token per call");
    }
    double err = step_rule_on(&e, &g, n, 21);
    ck_assert_msg(err <= tol,
                  "KVC-REQ-1: appending+attending in batches (prefill %u, then mixed sizes) "
                  "differs from %s: relative error %.3e > %.0e",
                  MIXED[0], vs, err, tol);

    /* The same with a sliding window, when the plugin takes one: the rule
     * then also says which keys a batch's early queries still see. */
    kvc_geometry gw = g;
    gw.sliding_window = 48;
    kvc_instance *probe_inst = NULL;
    char msg[512] = "";
    double err_w = -1;
    kvc_status st = kc_create(&e, &gw, NULL, &probe_inst, msg, sizeof msg);
    if (st == KVC_OK) {
        e.p->destroy(probe_inst);
        err_w = step_rule_on(&e, &gw, n, 22);
        ck_assert_msg(err_w <= tol,
                      "KVC-REQ-1 with sliding_window %u: batched differs from %s: "
                      "relative error %.3e > %.0e",
                      gw.sliding_window, vs, err_w, tol);
        kc_figure("max rel err %.2e (window %u: %.2e), %u tokens x %u layers%s", err,
                  gw.sliding_window, err_w, n, g.n_layers, pfig);
    } else {
        kc_figure("max rel err %.2e, %u tokens x %u layers%s (sliding window refused: %s)", err,
                  n, g.n_layers, pfig, msg);
    }
    kc_unload(&e);
}
END_TEST

/* ---- truncate --------------------------------------------------------------------------- */

/* first: 200 tokens at 0..199; second: 80 other tokens at 120..199;
 * tail: 16 more at 200..215 appended to both afterwards. */
enum { N = 200, CUT = 120, TAIL = 16 };
static const uint32_t halves[] = {100};

/* The exact case (KVC_CAP_TRUNCATE): a was given first[0..N) then
 * truncate(CUT). Re-append, then compare with a fresh sequence that never
 * saw first[CUT..N). */
static void truncate_exact(kc_env *e, kvc_instance *inst, kvc_seq *a, wl *second_a, wl *second_b,
                           wl *tail_a, wl *tail_b, wl *head_b)
{
    const kvc_geometry g = second_a->g;
    const double tol = tolerance(e);
    kvc_seq_stats sa = {.struct_size = sizeof sa};
    ck_assert_int_eq(e->p->seq_stats(a, &sa), KVC_OK);
    ck_assert_msg(sa.tokens_appended == (uint64_t)CUT * g.n_layers,
                  "after truncate(%d) of %u tokens on %u layers, tokens_appended is %llu, "
                  "expected %llu",
                  CUT, (unsigned)N, g.n_layers, (unsigned long long)sa.tokens_appended,
                  (unsigned long long)CUT * g.n_layers);
    static const uint32_t all[] = {N};
    char err[768];
    if (wl_run(e, a, second_a, 0, N - CUT, all, 1, err, sizeof err))
        ck_abort_msg("re-appending positions %d..%d after truncate(%d): %s "
                     "(truncate does not seem to roll back)",
                     CUT, N - 1, CUT, err);
    run_ok(e, a, tail_a, 0, TAIL, all, 1, "appending after the re-append");

    /* Reference: a fresh sequence that never saw first[CUT..N). */
    kvc_seq *b = open_seq(e, inst);
    run_ok(e, b, head_b, 0, CUT, halves, 1, "reference: first 120 tokens");
    run_ok(e, b, second_b, 0, N - CUT, all, 1, "reference: 80 other tokens");
    run_ok(e, b, tail_b, 0, TAIL, all, 1, "reference: tail");
    double e1 = wl_diff(second_a, second_b, 0, N - CUT);
    double e2 = wl_diff(tail_a, tail_b, 0, TAIL);
    ck_assert_msg(e1 <= tol && e2 <= tol,
                  "KVC-REQ-14: append %u, truncate(%d), re-append %u differs from a sequence "
                  "that never had the removed tokens: relative error %.3e on the "
                  "re-appended queries, %.3e on later ones (tolerance %.0e)",
                  (unsigned)N, CUT, (unsigned)(N - CUT), e1, e2, tol);
    kc_figure("max rel err %.2e (re-appended), %.2e (after)", e1, e2);
    e->p->seq_close(b);
}

START_TEST(truncate_reappend)
{
    kc_need_host_data();
    kc_env e;
    kc_load(&e);
    kvc_geometry g = kc_geometry_small();
    kvc_instance *inst = kc_create_ready(&e, &g, NULL);
    wl first, second_a, second_b, tail_a, tail_b, head_b;
    wl_make(&first, &g, N, 0, 31, 0);
    wl_make(&head_b, &g, N, 0, 31, 0);
    wl_make(&second_a, &g, N - CUT, CUT, 32, 0);
    wl_make(&second_b, &g, N - CUT, CUT, 32, 0);
    wl_make(&tail_a, &g, TAIL, N, 33, 0);
    wl_make(&tail_b, &g, TAIL, N, 33, 0);

    kvc_seq *a = open_seq(&e, inst);
    run_ok(&e, a, &first, 0, N, halves, 1, "appending 200 tokens");
    kvc_status st = e.p->truncate(a, CUT);
    ck_assert_msg(st == KVC_OK, "truncate(%d) on a valid sequence failed: %s (%d): %s", CUT,
                  kvch_status_string(st), st, e.p->seq_message(a));

    if (!(kc_instance_caps(&e, inst) & KVC_CAP_TRUNCATE)) {
        /* Not exact by declaration: the plugin's documentation says what is
         * recovered. The sequence must still work: attend after it. */
        probe(&e, a, &tail_a, "attend after truncate (no KVC_CAP_TRUNCATE)");
        kc_figure("no KVC_CAP_TRUNCATE: truncate returned OK and attend works");
    } else {
        truncate_exact(&e, inst, a, &second_a, &second_b, &tail_a, &tail_b, &head_b);
    }
    e.p->seq_close(a);
    e.p->destroy(inst);
    wl_free(&first);
    wl_free(&head_b);
    wl_free(&second_a);
    wl_free(&second_b);
    wl_free(&tail_a);
    wl_free(&tail_b);
    kc_unload(&e);
}
END_TEST

/* ---- fork -------------------------------------------------------------------------------- */

START_TEST(fork_independent)
{
    kc_need_host_data();
    kc_env e;
    kc_load(&e);
    need_cap(&e, KVC_CAP_FORK, "KVC_CAP_FORK");
    kvc_geometry g = kc_geometry_small();
    kvc_instance *inst = kc_create_ready(&e, &g, NULL);
    const double tol = tolerance(&e);
    enum { N0 = 150, NB = 50, NP = 10 };
    static const uint32_t sched[] = {100, 1, 7, 1};
    /* Call histories (every comparison is against a fresh sequence with the
     * same history minus the fork):
     *   src:  t0, [fork to dst], probe1 @150, tA @150..199, probe2 @200
     *   refA: t0,                probe1 @150, tA @150..199, probe2 @200
     *   dst:  junk, [fork], tB @150..199, probe2 @200 (after src's tA)
     *   refB: t0,           tB @150..199, probe2 @200 */
    enum { T0, T0R, T0B, JUNK, TA, TAR, TB, TBR, P1, P1R, P2, P2R, P3, P3R, NW };
    static const struct {
        uint32_t n;
        int32_t start;
        uint64_t salt;
    } spec[NW] = {{N0, 0, 41},      {N0, 0, 41},      {N0, 0, 41},      {30, 0, 42},
                  {NB, N0, 43},     {NB, N0, 43},     {NB, N0, 44},     {NB, N0, 44},
                  {NP, N0, 45},     {NP, N0, 45},     {NP, N0 + NB, 46}, {NP, N0 + NB, 46},
                  {NP, N0 + NB, 46}, {NP, N0 + NB, 46}};
    wl w[NW];
    for (int i = 0; i < NW; i++)
        wl_make(&w[i], &g, spec[i].n, spec[i].start, spec[i].salt, 0);

    kvc_seq *src = open_seq(&e, inst), *dst = open_seq(&e, inst);
    run_ok(&e, src, &w[T0], 0, N0, sched, 4, "source: history");
    run_ok(&e, dst, &w[JUNK], 0, 30, sched, 4, "destination: contents to be replaced");
    kvc_status st = e.p->fork(src, dst);
    ck_assert_msg(st == KVC_OK, "fork failed: %s (%d): %s", kvch_status_string(st), st,
                  e.p->seq_message(dst));
    run_ok(&e, dst, &w[TB], 0, NB, sched, 4, "copy: appending tB");
    probe(&e, src, &w[P1], "source after appends to the copy");
    run_ok(&e, src, &w[TA], 0, NB, sched, 4, "source: appending tA");
    probe(&e, src, &w[P2], "source after its own appends");
    probe(&e, dst, &w[P3], "copy after appends to the source");

    kvc_seq *ra = open_seq(&e, inst), *rb = open_seq(&e, inst);
    run_ok(&e, ra, &w[T0R], 0, N0, sched, 4, "reference A: history");
    probe(&e, ra, &w[P1R], "reference A: probe 1");
    run_ok(&e, ra, &w[TAR], 0, NB, sched, 4, "reference A: tA");
    probe(&e, ra, &w[P2R], "reference A: probe 2");
    run_ok(&e, rb, &w[T0B], 0, N0, sched, 4, "reference B: history");
    run_ok(&e, rb, &w[TBR], 0, NB, sched, 4, "reference B: tB");
    probe(&e, rb, &w[P3R], "reference B: probe");

    double e_src1 = wl_diff(&w[P1], &w[P1R], 0, NP);
    ck_assert_msg(e_src1 <= tol,
                  "KVC-REQ-15: appending to the fork's copy changed the source: its attention "
                  "differs from a never-forked sequence by %.3e (relative, tolerance %.0e)",
                  e_src1, tol);
    double e_src = fmax(wl_diff(&w[TA], &w[TAR], 0, NB), wl_diff(&w[P2], &w[P2R], 0, NP));
    ck_assert_msg(e_src <= tol,
                  "KVC-REQ-15: the source after fork and its own appends differs from a fresh "
                  "sequence with its history by %.3e (tolerance %.0e)",
                  e_src, tol);
    double e_dst = fmax(wl_diff(&w[TB], &w[TBR], 0, NB), wl_diff(&w[P3], &w[P3R], 0, NP));
    ck_assert_msg(e_dst <= tol,
                  "KVC-REQ-15: the copy (fork into a sequence holding 30 other tokens, then its "
                  "own appends) differs from a fresh sequence with its history by %.3e "
                  "(tolerance %.0e)",
                  e_dst, tol);
    kc_figure("max rel err source %.2e, copy %.2e", fmax(e_src1, e_src), e_dst);

    e.p->seq_close(src);
    e.p->seq_close(dst);
    e.p->seq_close(ra);
    e.p->seq_close(rb);
    e.p->destroy(inst);
    for (int i = 0; i < NW; i++)
        wl_free(&w[i]);
    kc_unload(&e);
}
END_TEST

/* ---- export / import ---------------------------------------------------------------------- */

static void stats_equal(const kvc_seq_stats *a, const kvc_seq_stats *b, const char *what)
{
#define SAME(f)                                                                               \
    ck_assert_msg(a->f == b->f, "%s: seq_stats." #f " is %llu after import, %llu before",   \
                  what, (unsigned long long)b->f, (unsigned long long)a->f)
    SAME(tokens_appended);
    SAME(head_tokens_resident);
    SAME(bytes_payload);
    SAME(bytes_metadata);
    SAME(bytes_reserved);
    SAME(bytes_fixed);
    SAME(bytes_resident);
    SAME(bytes_fp16_full);
#undef SAME
}

START_TEST(export_import)
{
    kc_need_host_data();
    kc_env e;
    kc_load(&e);
    need_cap(&e, KVC_CAP_EXPORT, "KVC_CAP_EXPORT");
    kvc_geometry g = kc_geometry_small();
    kvc_instance *i1 = kc_create_ready(&e, &g, NULL), *i2 = kc_create_ready(&e, &g, NULL);
    enum { N0 = 230, NT = 40 };
    static const uint32_t sched[] = {150, 1, 3, 1, 64};
    wl hist, junk, t_src, t_same, t_other;
    wl_make(&hist, &g, N0, 0, 51, 37);
    wl_make(&junk, &g, 20, 0, 52, 0);
    int32_t after = hist.t[0].pos[N0 - 1] + 1;
    wl_make(&t_src, &g, NT, after, 53, 0);
    wl_make(&t_same, &g, NT, after, 53, 0);
    wl_make(&t_other, &g, NT, after, 53, 0);

    kvc_seq *src = open_seq(&e, i1);
    run_ok(&e, src, &hist, 0, N0, sched, 5, "source history");
    size_t size = 0;
    kvc_status st = e.p->seq_export(src, NULL, 0, &size);
    ck_assert_msg(st == KVC_OK && size > 0, "seq_export size query: %s (%d), size %zu: %s",
                  kvch_status_string(st), st, size, e.p->seq_message(src));
    void *blob = malloc(size);
    ck_assert_ptr_nonnull(blob);
    size_t got = 0;
    st = e.p->seq_export(src, blob, size, &got);
    ck_assert_msg(st == KVC_OK && got == size,
                  "seq_export into the size it asked for (%zu): %s (%d), wrote %zu: %s", size,
                  kvch_status_string(st), st, got, e.p->seq_message(src));

    /* Into a sequence of the same instance that held other tokens (import
     * replaces), and into a fresh instance with the same configuration. */
    kvc_seq *same = open_seq(&e, i1), *other = open_seq(&e, i2);
    run_ok(&e, same, &junk, 0, 20, sched, 5, "contents to be replaced");
    st = e.p->seq_import(same, blob, size);
    ck_assert_msg(st == KVC_OK, "seq_import (same instance) failed: %s (%d): %s",
                  kvch_status_string(st), st, e.p->seq_message(same));
    st = e.p->seq_import(other, blob, size);
    ck_assert_msg(st == KVC_OK, "seq_import (second instance) failed: %s (%d): %s",
                  kvch_status_string(st), st, e.p->seq_message(other));

    kvc_seq_stats s0 = {.struct_size = sizeof s0}, s1 = s0, s2 = s0;
    ck_assert_int_eq(e.p->seq_stats(src, &s0), KVC_OK);
    ck_assert_int_eq(e.p->seq_stats(same, &s1), KVC_OK);
    ck_assert_int_eq(e.p->seq_stats(other, &s2), KVC_OK);
    stats_equal(&s0, &s1, "import into the same instance");
    stats_equal(&s0, &s2, "import into a second instance");

    /* The three go on alike: same new tokens, same bytes out. */
    run_ok(&e, src, &t_src, 0, NT, sched + 1, 4, "source after export");
    run_ok(&e, same, &t_same, 0, NT, sched + 1, 4, "imported (same instance)");
    run_ok(&e, other, &t_other, 0, NT, sched + 1, 4, "imported (second instance)");
    ck_assert_msg(wl_same_bytes(&t_src, &t_same) && wl_same_bytes(&t_src, &t_other),
                  "attention after export/import differs from the source: "
                  "relative difference %.3e (same instance), %.3e (second instance); the "
                  "round trip must give the same bytes",
                  wl_diff(&t_same, &t_src, 0, NT), wl_diff(&t_other, &t_src, 0, NT));
    kc_figure("blob %zu B for %u tokens x %u layers (%.3f of resident); identical bytes", size,
              (unsigned)N0, g.n_layers, (double)size / (double)s0.bytes_resident);

    free(blob);
    e.p->seq_close(src);
    e.p->seq_close(same);
    e.p->seq_close(other);
    e.p->destroy(i1);
    e.p->destroy(i2);
    wl_free(&hist);
    wl_free(&junk);
    wl_free(&t_src);
    wl_free(&t_same);
    wl_free(&t_other);
    kc_unload(&e);
}
END_TEST

/* ---- threads ------------------------------------------------------------------------------ */

enum { N_THREADS = 4, THREAD_ROUNDS = 2 };

typedef struct job {
    const kc_env *e;
    kvc_instance *inst;
    wl w;
    int failed;
    char err[768];
} job;

static const uint32_t THREAD_SCHED[] = {96, 1, 2, 1, 5, 1, 1, 16};

/* A thread's work: open its own sequence, run its workload, close; twice,
 * so sequences come and go while the others run. No Check calls here:
 * failures are recorded and asserted after join. */
static void *thread_main(void *arg)
{
    job *j = arg;
    for (int r = 0; r < THREAD_ROUNDS && !j->failed; r++) {
        kvc_seq *s = NULL;
        kvc_status st = j->e->p->seq_open(j->inst, &s);
        if (st != KVC_OK || !s) {
            snprintf(j->err, sizeof j->err, "seq_open on a thread failed: %s (%d)",
                     kvch_status_string(st), st);
            j->failed = 1;
            break;
        }
        if (wl_run(j->e, s, &j->w, 0, j->w.n, THREAD_SCHED, 8, j->err, sizeof j->err))
            j->failed = 1;
        j->e->p->seq_close(s);
    }
    return NULL;
}

START_TEST(threads)
{
    kc_need_host_data();
    kc_env e;
    kc_load(&e);
    kvc_geometry g = kc_geometry_small();
    kvc_instance *inst = kc_create_ready(&e, &g, NULL);
    const uint32_t n = profile_tokens(192, 600);
    static job jobs[N_THREADS];
    wl ref[N_THREADS];
    /* Each thread has its own data (crosstalk between sequences shows as a
     * difference); the reference is the same work on one thread first. */
    for (int i = 0; i < N_THREADS; i++) {
        wl_make(&ref[i], &g, n, 0, 60 + (uint64_t)i, 41);
        kvc_seq *s = open_seq(&e, inst);
        run_ok(&e, s, &ref[i], 0, n, THREAD_SCHED, 8, "single-thread reference");
        e.p->seq_close(s);
        jobs[i] = (job){.e = &e, .inst = inst};
        wl_make(&jobs[i].w, &g, n, 0, 60 + (uint64_t)i, 41);
    }
    pthread_t th[N_THREADS];
    for (int i = 0; i < N_THREADS; i++)
        ck_assert_msg(pthread_create(&th[i], NULL, thread_main, &jobs[i]) == 0,
                      "pthread_create failed");
    for (int i = 0; i < N_THREADS; i++)
        pthread_join(th[i], NULL);
    for (int i = 0; i < N_THREADS; i++) {
        ck_assert_msg(!jobs[i].failed, "thread %d of %d: %s", i, N_THREADS, jobs[i].err);
        ck_assert_msg(wl_same_bytes(&jobs[i].w, &ref[i]),
                      "KVC-REQ-12: thread %d of %d (own sequence, one instance) gives other "
                      "results than the same work on one thread: relative "
                      "difference %.3e",
                      i, N_THREADS, wl_diff(&jobs[i].w, &ref[i], 0, n));
    }
    kc_figure("%d threads x %d sequences x %u tokens: identical bytes", N_THREADS, THREAD_ROUNDS,
              n);
    for (int i = 0; i < N_THREADS; i++) {
        wl_free(&ref[i]);
        wl_free(&jobs[i].w);
    }
    e.p->destroy(inst);
    kc_unload(&e);
}
END_TEST

/* ---- materialize --------------------------------------------------------------------------- */

/* Index of position p in pos [n] (strictly increasing), or -1. */
static long find_pos(const int32_t *pos, uint32_t n, int32_t p)
{
    long lo = 0, hi = (long)n - 1;
    while (lo <= hi) {
        long mid = (lo + hi) / 2;
        if (pos[mid] == p)
            return mid;
        if (pos[mid] < p)
            lo = mid + 1;
        else
            hi = mid - 1;
    }
    return -1;
}

START_TEST(materialize)
{
    kc_need_host_data();
    kc_env e;
    kc_load(&e);
    need_cap(&e, KVC_CAP_MATERIALIZE, "KVC_CAP_MATERIALIZE");
    kvc_geometry g = kc_geometry_small();
    kvc_instance *inst = kc_create_ready(&e, &g, NULL);
    const int lossless = kc_config_lossless(&e);
    const uint32_t n = 300, H = g.n_kv_heads, d = g.head_dim;
    wl w;
    wl_make(&w, &g, n, 5, 71, 29);
    kvc_seq *s = open_seq(&e, inst);
    run_ok(&e, s, &w, 0, n, MIXED, N_MIXED, "appending");
    kvck_rope rope;
    ck_assert_msg(kvck_rope_init(&rope, g.rope_style, (int)d, (int)g.rope_dims, g.rope_theta,
                                 g.rope_inv_freq, g.rope_mscale) == 0,
                  "kvck_rope_init refused the geometry");
    float *k_rot = malloc((size_t)n * H * d * sizeof *k_rot);
    uint32_t *counts = malloc(H * sizeof *counts);
    ck_assert_msg(k_rot && counts, "out of memory");
    double worst_k = 0, worst_v = 0;
    uint64_t held = 0;
    for (uint32_t l = 0; l < g.n_layers; l++) {
        const kc_tokens *t = &w.t[l];
        kvck_rope_apply(&rope, n, H, t->pos, t->k, k_rot);
        /* Count-only call: positions == NULL. */
        for (uint32_t h = 0; h < H; h++)
            counts[h] = UINT32_MAX;
        kvc_materialized m = {.struct_size = sizeof m, .n_tokens = counts};
        kvc_status st = e.p->materialize(s, l, &m);
        ck_assert_msg(st == KVC_OK, "materialize count-only (layer %u): %s (%d): %s", l,
                      kvch_status_string(st), st, e.p->seq_message(s));
        uint32_t cap = 0;
        for (uint32_t h = 0; h < H; h++) {
            ck_assert_msg(counts[h] <= n,
                          "materialize count-only: layer %u head %u holds %u tokens, only %u "
                          "were appended",
                          l, h, counts[h], n);
            ck_assert_msg(!lossless || counts[h] == n,
                          "materialize count-only: lossless configuration but layer %u head %u "
                          "holds %u of %u tokens",
                          l, h, counts[h], n);
            cap = counts[h] > cap ? counts[h] : cap;
        }
        if (cap == 0)
            continue;
        /* Too small a capacity: KVC_E_BUFFER and nothing written. */
        size_t nk = (size_t)H * cap * d;
        int32_t *pos = malloc((size_t)H * cap * sizeof *pos);
        float *k = malloc(nk * sizeof *k), *v = malloc(nk * sizeof *v);
        ck_assert_msg(pos && k && v, "out of memory");
        memset(pos, GUARD_BYTE, (size_t)H * cap * sizeof *pos);
        m = (kvc_materialized){sizeof m, cap - 1, counts, pos, k, v};
        st = e.p->materialize(s, l, &m);
        ck_assert_msg(st == KVC_E_BUFFER,
                      "materialize with capacity %u below the %u tokens held returned %s (%d), "
                      "not KVC_E_BUFFER",
                      cap - 1, cap, kvch_status_string(st), st);
        for (size_t i = 0; i < (size_t)H * cap; i++)
            ck_assert_msg(pos[i] == (int32_t)0xA5A5A5A5,
                          "materialize returned KVC_E_BUFFER but wrote positions");
        m.capacity = cap;
        st = e.p->materialize(s, l, &m);
        ck_assert_msg(st == KVC_OK, "materialize (layer %u, capacity %u): %s (%d): %s", l, cap,
                      kvch_status_string(st), st, e.p->seq_message(s));
        for (uint32_t h = 0; h < H; h++) {
            held += counts[h];
            for (uint32_t i = 0; i < counts[h]; i++) {
                int32_t p = pos[(size_t)h * cap + i];
                ck_assert_msg(i == 0 || p > pos[(size_t)h * cap + i - 1],
                              "materialize: layer %u head %u positions not increasing at %u",
                              l, h, i);
                long at = find_pos(t->pos, n, p);
                ck_assert_msg(at >= 0,
                              "materialize: layer %u head %u returns position %d, never "
                              "appended",
                              l, h, p);
                ck_assert_msg(!lossless || at == (long)i,
                              "materialize (lossless): layer %u head %u token %u has position "
                              "%d, appended as %d",
                              l, h, i, p, t->pos[i]);
                const float *gk = k + ((size_t)h * cap + i) * d, *gv = v + ((size_t)h * cap + i) * d;
                const float *wk = k_rot + ((size_t)at * H + h) * d,
                            *wv = t->v + ((size_t)at * H + h) * d;
                double ek = row_err(gk, wk, d), ev = row_err(gv, wv, d);
                ck_assert_msg(isfinite(ek) && isfinite(ev),
                              "materialize: layer %u head %u token %u holds a non-finite value",
                              l, h, i);
                worst_k = fmax(worst_k, ek);
                worst_v = fmax(worst_v, ev);
            }
        }
        free(pos);
        free(k);
        free(v);
    }
    if (lossless)
        ck_assert_msg(worst_k <= TOL_LOSSLESS && worst_v <= TOL_LOSSLESS,
                      "KVC-REQ-18: lossless configuration, but materialized keys differ from "
                      "the appended keys after RoPE by %.3e and values by %.3e (relative, per "
                      "token; tolerance %.0e)",
                      worst_k, worst_v, TOL_LOSSLESS);
    kc_figure("%s: K (post-RoPE) rel err %.2e, V %.2e, %llu of %llu head-tokens held",
              lossless ? "lossless" : "lossy (no threshold)", worst_k, worst_v,
              (unsigned long long)held, (unsigned long long)n * H * g.n_layers);
    free(k_rot);
    free(counts);
    e.p->seq_close(s);
    e.p->destroy(inst);
    wl_free(&w);
    kc_unload(&e);
}
END_TEST

void kc_group_semantics(Suite *s)
{
    kc_add(s, "semantics", "determinism", determinism, 30);
    kc_add(s, "semantics", "step_rule", step_rule, 30);
    kc_add(s, "semantics", "truncate", truncate_reappend, 30);
    kc_add(s, "semantics", "fork", fork_independent, 30);
    kc_add(s, "semantics", "export_import", export_import, 30);
    kc_add(s, "semantics", "threads", threads, 60);
    kc_add(s, "semantics", "materialize", materialize, 30);
}
