/*
 * t_memory.c -- group "memory": what a plugin reports against what it
 * promised and what the host's allocator saw.
 *
 *   budget                 resident - pending <= kv_ratio * fp16_full +
 *                          seq_overhead after every append, and with pending
 *                          0 the plain bound after every attend that covers
 *                          the batch, at every kv_ratio the plugin accepts
 *                          (KVC-REQ-9; bytes_pending is ABI 1.2, 0 from an
 *                          older plugin)
 *   reported_vs_allocated  reported bytes == bytes held at the allocator,
 *                          exactly, after every operation (KVC-REQ-7)
 *   bytes_per_token        growth per token as declared, up to 8k tokens
 *                          (quick) or 32k (full) on SmolLM2's head shape
 *   stats_consistency      the parts add up, pending <= resident; token and
 *                          fp16 counts follow the geometry, also for a head
 *                          shard
 *
 * No tolerance anywhere: the ABI states these as equalities and bounds on
 * integers, and the tracking allocator counts requested bytes exactly.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "conform.h"

/* kv_ratio values tried by `budget`, clipped to the option's range. */
static const double LADDER[] = {0.0625, 0.125, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 8.0};
#define N_LADDER (sizeof LADDER / sizeof LADDER[0])

/* ---- helpers ------------------------------------------------------------------ */

/* The sequence's stats at this host's size (1.2: bytes_pending included).
 * Zero-filled first: a 1.0/1.1 plugin fills only the fields it knows, so
 * bytes_pending reads 0 from it (it compresses, or holds, on append). */
static kvc_seq_stats seq_stats(const kc_env *e, const kvc_seq *s)
{
    kvc_seq_stats st;
    memset(&st, 0, sizeof st);
    st.struct_size = sizeof st;
    kvc_status rc = e->p->seq_stats(s, &st);
    ck_assert_msg(rc == KVC_OK, "seq_stats failed: %s (%d)", kvch_status_string(rc), rc);
    return st;
}

static kvc_instance_stats inst_stats(const kc_env *e, const kvc_instance *inst)
{
    kvc_instance_stats st;
    memset(&st, 0, sizeof st);
    st.struct_size = sizeof st;
    kvc_status rc = e->p->instance_stats(inst, &st);
    ck_assert_msg(rc == KVC_OK, "instance_stats failed: %s (%d)", kvch_status_string(rc), rc);
    ck_assert_msg(isfinite(st.kv_ratio) && st.kv_ratio > 0,
                  "instance_stats declares kv_ratio %g: KVC-REQ-9 needs a positive budget",
                  st.kv_ratio);
    return st;
}

static kvc_seq *open_seq(const kc_env *e, kvc_instance *inst)
{
    kvc_seq *s = NULL;
    kvc_status st = e->p->seq_open(inst, &s);
    ck_assert_msg(st == KVC_OK && s, "seq_open failed: %s (%d)", kvch_status_string(st), st);
    return s;
}

/* Bytes live at the tracking allocator, host and device together. */
static uint64_t tracked(const kc_env *e)
{
    kvch_tracker_stats st;
    kvch_tracker_get(e->tr, &st);
    return st.current[KVC_MEM_HOST] + st.current[KVC_MEM_CUDA];
}

static const kvc_option_desc *find_option(const kvc_plugin *p, const char *name)
{
    for (uint32_t i = 0; i < p->n_options; i++)
        if (p->options[i] && p->options[i]->name && strcmp(p->options[i]->name, name) == 0)
            return p->options[i];
    return NULL;
}

static size_t kv_row(const kvc_geometry *g)
{
    uint32_t kv = g->kv_head_count ? g->kv_head_count : g->n_kv_heads;
    return (size_t)kv * g->head_dim;
}

static size_t q_row(const kvc_geometry *g)
{
    uint32_t kv = g->kv_head_count ? g->kv_head_count : g->n_kv_heads;
    return (size_t)kv * (g->n_heads / g->n_kv_heads) * g->head_dim;
}

/* Per-layer synthetic tokens with a gap of 3 positions every 41 tokens
 * (position metadata must be counted too). */
static kc_tokens *make_layers(const kvc_geometry *g, uint32_t n, uint64_t salt)
{
    kc_tokens *t = calloc(g->n_layers, sizeof *t);
    ck_assert_ptr_nonnull(t);
    for (uint32_t l = 0; l < g->n_layers; l++) {
        kc_rng r;
        kc_rng_init(&r, salt * 100 + l);
        kc_tokens_make(&t[l], g, n, 0, &r);
        for (uint32_t i = 0; i < n; i++)
            t[l].pos[i] = (int32_t)(i + (i / 41) * 3);
    }
    return t;
}

static void free_layers(const kvc_geometry *g, kc_tokens *t)
{
    for (uint32_t l = 0; l < g->n_layers; l++)
        kc_tokens_free(&t[l]);
    free(t);
}

static void append_ok(const kc_env *e, kvc_seq *s, const kvc_geometry *g, uint32_t layer,
                      const kc_tokens *t, uint32_t at, uint32_t n)
{
    kvc_status st = e->p->append(s, layer, n, t->pos + at, t->k + (size_t)at * kv_row(g),
                                 t->v + (size_t)at * kv_row(g), t->flags + at);
    ck_assert_msg(st == KVC_OK, "append(layer %u, %u tokens at position %d) failed: %s (%d): %s",
                  layer, n, t->pos[at], kvch_status_string(st), st, e->p->seq_message(s));
}

static void attend_ok(const kc_env *e, kvc_seq *s, const kvc_geometry *g, uint32_t layer,
                      const kc_tokens *t, uint32_t at, uint32_t n)
{
    float *out = kc_guarded((size_t)n * q_row(g));
    kvc_status st = e->p->attend(s, layer, n, t->pos + at, t->q + (size_t)at * q_row(g), out);
    ck_assert_msg(st == KVC_OK, "attend(layer %u, %u queries at position %d) failed: %s (%d): %s",
                  layer, n, t->pos[at], kvch_status_string(st), st, e->p->seq_message(s));
    kc_guard_check(out, (size_t)n * q_row(g), "attend output");
    kc_guard_free(out);
}

/* Batch sizes: a prefill, then decode steps with a few small batches. */
static uint32_t batch_at(uint32_t i, uint32_t prefill)
{
    static const uint32_t after[] = {1, 1, 1, 3, 1, 1, 17, 1, 1, 1, 64, 1, 2};
    return i == 0 ? prefill : after[(i - 1) % (sizeof after / sizeof after[0])];
}

/* ---- budget ------------------------------------------------------------------------- */

typedef struct budget_run {
    double worst_use;     /* max (resident - pending) / (kv_ratio * fp16_full + overhead) */
    double end_of_fp16;   /* resident / fp16_full at the end of the run */
    uint64_t max_pending; /* largest bytes_pending seen after an append */
} budget_run;

/* When check_budget looks. */
enum {
    AFTER_APPEND, /* tokens may be pending: the bound holds without them */
    AT_REST       /* nothing appended yet, or every appended position attended:
                     pending is 0 and the plain bound holds */
};

/* The promise for one sequence now; `what` names the moment. Returns the
 * fraction of the budget used and raises r->max_pending. */
static double check_budget(const kc_env *e, const kvc_seq *s, const kvc_instance_stats *is,
                           const char *config, const char *what, int moment, budget_run *r)
{
    kvc_seq_stats st = seq_stats(e, s);
    double limit = is->kv_ratio * (double)st.bytes_fp16_full + (double)is->seq_overhead_bytes;
    ck_assert_msg(st.bytes_pending <= st.bytes_resident,
                  "KVC-REQ-9 (%s) %s: bytes_pending %llu B exceeds bytes_resident %llu B (the "
                  "pending bytes are part of the resident ones)",
                  config, what, (unsigned long long)st.bytes_pending,
                  (unsigned long long)st.bytes_resident);
    if (moment == AT_REST)
        ck_assert_msg(st.bytes_pending == 0,
                      "KVC-REQ-9 (%s) %s: bytes_pending %llu B after an attend whose last query "
                      "is at or after every appended position (or before any append): it must "
                      "be 0 there (resident %llu B, %llu tokens appended)",
                      config, what, (unsigned long long)st.bytes_pending,
                      (unsigned long long)st.bytes_resident,
                      (unsigned long long)st.tokens_appended);
    uint64_t counted = st.bytes_resident - st.bytes_pending;
    ck_assert_msg((double)counted <= limit,
                  "KVC-REQ-9 (%s) %s: resident %llu B - pending %llu B = %llu B > kv_ratio %.6g "
                  "x fp16_full %llu B + seq_overhead %llu B = %.0f B (%llu tokens appended)",
                  config, what, (unsigned long long)st.bytes_resident,
                  (unsigned long long)st.bytes_pending, (unsigned long long)counted,
                  is->kv_ratio, (unsigned long long)st.bytes_fp16_full,
                  (unsigned long long)is->seq_overhead_bytes, limit,
                  (unsigned long long)st.tokens_appended);
    if (st.bytes_pending > r->max_pending)
        r->max_pending = st.bytes_pending;
    return limit > 0 ? (double)counted / limit : 0;
}

/* Two sequences, interleaved, prefill then decode, checking after every
 * append (pending allowed) and after every attend (of exactly the batch
 * just appended: its last query is at the last appended position, so
 * nothing is pending any more). */
static budget_run run_budget(kc_env *e, kvc_instance *inst, const kvc_geometry *g, uint32_t n,
                             const char *config)
{
    kvc_instance_stats is = inst_stats(e, inst);
    kc_tokens *ta = make_layers(g, n, 1), *tb = make_layers(g, n, 2);
    kvc_seq *s[2] = {open_seq(e, inst), open_seq(e, inst)};
    kc_tokens *t[2] = {ta, tb};
    budget_run r = {0, 0, 0};
    for (int k = 0; k < 2; k++)
        r.worst_use =
            fmax(r.worst_use, check_budget(e, s[k], &is, config, "empty sequence", AT_REST, &r));
    uint32_t at[2] = {0, 0}, step[2] = {0, 0};
    const uint32_t prefill[2] = {n / 2, 100};
    while (at[0] < n || at[1] < n) {
        for (int k = 0; k < 2; k++) {
            if (at[k] >= n)
                continue;
            uint32_t b = batch_at(step[k]++, prefill[k]);
            if (b > n - at[k])
                b = n - at[k];
            for (uint32_t l = 0; l < g->n_layers; l++) {
                char what[96];
                append_ok(e, s[k], g, l, &t[k][l], at[k], b);
                snprintf(what, sizeof what, "after appending %u tokens at %d to layer %u", b,
                         t[k][l].pos[at[k]], l);
                r.worst_use = fmax(r.worst_use,
                                   check_budget(e, s[k], &is, config, what, AFTER_APPEND, &r));
                attend_ok(e, s[k], g, l, &t[k][l], at[k], b);
                snprintf(what, sizeof what, "after attending the %u queries on layer %u", b, l);
                r.worst_use =
                    fmax(r.worst_use, check_budget(e, s[k], &is, config, what, AT_REST, &r));
            }
            at[k] += b;
        }
    }
    kvc_seq_stats st = seq_stats(e, s[0]);
    r.end_of_fp16 = (double)st.bytes_resident / (double)st.bytes_fp16_full;
    e->p->seq_close(s[0]);
    e->p->seq_close(s[1]);
    free_layers(g, ta);
    free_layers(g, tb);
    return r;
}

START_TEST(budget)
{
    kc_need_host_data();
    kc_env e;
    kc_load(&e);
    kvc_geometry g = kc_geometry_small();
    const uint32_t n = KC.profile == KC_FULL ? 2000 : 600;
    const kvc_option_desc *opt = find_option(e.p, "kv_ratio");
    ck_assert_msg(opt != NULL, "KVC-REQ-9: the option table has no kv_ratio");
    double lo = opt->type == KVC_OPT_FLOAT || opt->type == KVC_OPT_INT ? opt->min : 0;
    double hi = opt->type == KVC_OPT_FLOAT || opt->type == KVC_OPT_INT ? opt->max : INFINITY;

    /* As configured (no kv_ratio override) first. */
    kvc_instance *inst = kc_create_ready(&e, &g, NULL);
    budget_run r0 = run_budget(&e, inst, &g, n, "as configured");
    e.p->destroy(inst);
    double worst = r0.worst_use;
    uint64_t max_pending = r0.max_pending;
    char ladder[1024];
    int len = snprintf(ladder, sizeof ladder, "as configured %.3f", r0.end_of_fp16);

    /* Then every ladder value in the option's range: refused at create (a
     * ratio the plugin cannot meet, KVC-REQ-9) or honoured. A larger budget
     * is never harder to meet, so once one is honoured all larger must be. */
    double first_ok = -1, refused_hi = -1;
    int honoured = 0, refused = 0;
    for (size_t i = 0; i < N_LADDER; i++) {
        double want = LADDER[i];
        if (want < lo || want > hi)
            continue;
        char opt_kv[64], config[64], msg[512] = "";
        snprintf(opt_kv, sizeof opt_kv, "kv_ratio=%.17g", want);
        snprintf(config, sizeof config, "kv_ratio=%g", want);
        const char *extra[] = {opt_kv, NULL};
        kvc_instance *probe = NULL;
        kvc_status st = kc_create(&e, &g, extra, &probe, msg, sizeof msg);
        if (st != KVC_OK) {
            ck_assert_msg(st == KVC_E_INVALID || st == KVC_E_UNSUPPORTED,
                          "create with %s (in the option's range [%g, %g]) failed with %s (%d): "
                          "a ratio the plugin cannot meet is refused with KVC_E_INVALID",
                          config, lo, hi, kvch_status_string(st), st);
            ck_assert_msg(msg[0] != '\0', "create refused %s without a message", config);
            ck_assert_msg(first_ok < 0,
                          "create refused %s (%s) but honoured the smaller kv_ratio %g", config,
                          msg, first_ok);
            refused++;
            refused_hi = want;
            continue;
        }
        e.p->destroy(probe);
        if (first_ok < 0)
            first_ok = want;
        inst = kc_create_ready(&e, &g, extra);
        kvc_instance_stats is = inst_stats(&e, inst);
        ck_assert_msg(is.kv_ratio <= want * (1 + 1e-12),
                      "created with %s, the instance declares kv_ratio %.6g: it must promise "
                      "at most what was asked",
                      config, is.kv_ratio);
        budget_run r = run_budget(&e, inst, &g, n, config);
        e.p->destroy(inst);
        worst = fmax(worst, r.worst_use);
        if (r.max_pending > max_pending)
            max_pending = r.max_pending;
        honoured++;
        if (len < (int)sizeof ladder)
            len += snprintf(ladder + len, sizeof ladder - (size_t)len, ", r=%g %.3f", want,
                            r.end_of_fp16);
    }
    ck_assert_msg(honoured > 0 || lo > LADDER[N_LADDER - 1] || hi < LADDER[0],
                  "create refused every kv_ratio tried in the option's own range [%g, %g]", lo,
                  hi);
    char pend[64] = "";
    if (max_pending)
        snprintf(pend, sizeof pend, "; pending up to %llu B after appends",
                 (unsigned long long)max_pending);
    if (refused)
        kc_figure("max %.3f of budget; resident/fp16 at %u tok: %s; refused r<=%g%s", worst, n,
                  ladder, refused_hi, pend);
    else
        kc_figure("max %.3f of budget; resident/fp16 at %u tok: %s%s", worst, n, ladder, pend);
    kc_unload(&e);
}
END_TEST

/* ---- reported vs allocated ------------------------------------------------------------- */

typedef struct ledger {
    const kc_env *e;
    kvc_instance *inst;
    uint64_t base; /* allocator bytes before create */
    kvc_seq *seqs[4];
    int checks;
} ledger;

/* Allocator bytes since create == instance params + fixed + every open
 * sequence's resident bytes. Scratch must be gone when a call returns. */
static void reconcile(ledger *L, const char *what)
{
    const kc_env *e = L->e;
    kvc_instance_stats is = inst_stats(e, L->inst);
    uint64_t held = tracked(e) - L->base, inst = is.bytes_params + is.bytes_fixed, seqs = 0;
    char parts[256] = "";
    int len = 0;
    for (int i = 0; i < 4; i++) {
        if (!L->seqs[i])
            continue;
        kvc_seq_stats st = seq_stats(e, L->seqs[i]);
        ck_assert_msg(st.bytes_resident == st.bytes_payload + st.bytes_metadata +
                                               st.bytes_reserved + st.bytes_fixed,
                      "%s: sequence %d's resident %llu != payload+metadata+reserved+fixed", what,
                      i, (unsigned long long)st.bytes_resident);
        seqs += st.bytes_resident;
        len += snprintf(parts + len, sizeof parts - (size_t)len, " seq%d %llu", i,
                        (unsigned long long)st.bytes_resident);
    }
    ck_assert_msg(held == inst + seqs,
                  "KVC-REQ-7 %s: the allocator holds %llu B for this instance, but it reports "
                  "%llu B (instance params+fixed %llu;%s): %s by %lld B",
                  what, (unsigned long long)held, (unsigned long long)(inst + seqs),
                  (unsigned long long)inst, parts, held > inst + seqs ? "under-reported" : "over-reported",
                  (long long)(held - (inst + seqs)));
    L->checks++;
}

START_TEST(reported_vs_allocated)
{
    kc_need_host_data();
    kc_env e;
    kc_load(&e);
    kvc_geometry g = kc_geometry_small();
    ledger L = {.e = &e, .base = tracked(&e)};
    L.inst = kc_create_ready(&e, &g, NULL);
    reconcile(&L, "after create");
    const uint32_t n = 400;
    kc_tokens *t1 = make_layers(&g, n + 8, 11), *t2 = make_layers(&g, n, 12);
    char what[128];

    L.seqs[0] = open_seq(&e, L.inst);
    reconcile(&L, "after seq_open");
    for (uint32_t at = 0, i = 0; at < n;) {
        uint32_t b = batch_at(i++, 150);
        b = b > n - at ? n - at : b;
        for (uint32_t l = 0; l < g.n_layers; l++) {
            append_ok(&e, L.seqs[0], &g, l, &t1[l], at, b);
            snprintf(what, sizeof what, "after appending %u tokens to layer %u (%u held)", b, l,
                     at + b);
            reconcile(&L, what);
            attend_ok(&e, L.seqs[0], &g, l, &t1[l], at, b);
            reconcile(&L, "after attend");
        }
        at += b;
        if (at >= 200 && !L.seqs[1]) {
            /* A second sequence grows alongside from here. */
            L.seqs[1] = open_seq(&e, L.inst);
            for (uint32_t l = 0; l < g.n_layers; l++)
                append_ok(&e, L.seqs[1], &g, l, &t2[l], 0, 90);
            reconcile(&L, "after a second sequence's prefill of 90");
        }
    }
    if (e.p->caps & KVC_CAP_FORK) {
        L.seqs[2] = open_seq(&e, L.inst);
        kvc_status st = e.p->fork(L.seqs[0], L.seqs[2]);
        ck_assert_msg(st == KVC_OK, "fork: %s: %s", kvch_status_string(st),
                      e.p->seq_message(L.seqs[2]));
        reconcile(&L, "after fork");
        for (uint32_t l = 0; l < g.n_layers; l++)
            append_ok(&e, L.seqs[2], &g, l, &t1[l], n, 5); /* after the source's last */
        reconcile(&L, "after appending to the fork");
    }
    if (e.p->caps & KVC_CAP_TRUNCATE) {
        kvc_status st = e.p->truncate(L.seqs[0], 130);
        ck_assert_msg(st == KVC_OK, "truncate: %s", kvch_status_string(st));
        reconcile(&L, "after truncate(130)");
        st = e.p->truncate(L.seqs[0], 0);
        ck_assert_msg(st == KVC_OK, "truncate: %s", kvch_status_string(st));
        reconcile(&L, "after truncate(0)");
    }
    if (e.p->caps & KVC_CAP_EXPORT) {
        size_t size = 0;
        kvc_status st = e.p->seq_export(L.seqs[1], NULL, 0, &size);
        ck_assert_msg(st == KVC_OK, "seq_export size: %s", kvch_status_string(st));
        void *blob = malloc(size);
        ck_assert_ptr_nonnull(blob);
        st = e.p->seq_export(L.seqs[1], blob, size, &size);
        ck_assert_msg(st == KVC_OK, "seq_export: %s", kvch_status_string(st));
        reconcile(&L, "after seq_export");
        L.seqs[3] = open_seq(&e, L.inst);
        st = e.p->seq_import(L.seqs[3], blob, size);
        ck_assert_msg(st == KVC_OK, "seq_import: %s: %s", kvch_status_string(st),
                      e.p->seq_message(L.seqs[3]));
        free(blob);
        reconcile(&L, "after seq_import");
    }
    /* Closing a sequence gives back exactly what it reported. */
    for (int i = 3; i >= 0; i--) {
        if (!L.seqs[i])
            continue;
        e.p->seq_close(L.seqs[i]);
        L.seqs[i] = NULL;
        snprintf(what, sizeof what, "after closing sequence %d", i);
        reconcile(&L, what);
    }
    kc_figure("allocator == reported at all %d checkpoints (instance %llu B)", L.checks,
              (unsigned long long)(tracked(&e) - L.base));
    e.p->destroy(L.inst);
    free_layers(&g, t1);
    free_layers(&g, t2);
    kc_unload(&e);
}
END_TEST

/* ---- bytes per token ---------------------------------------------------------------------- */

START_TEST(bytes_per_token)
{
    kc_need_host_data();
    kc_env e;
    kc_load(&e);
    /* SmolLM2's head shape; 2 of its 30 layers: per-token cost is per
     * layer, and 30 layers at 32k tokens would cost gigabytes for nothing. */
    kvc_geometry g = kc_geometry_smollm2();
    g.n_layers = 2;
    const uint32_t top = KC.profile == KC_FULL ? 32768 : 8192, chunk = 512;
    if (g.max_positions < top)
        g.max_positions = top;
    kvc_instance *inst = kc_create_ready(&e, &g, NULL);
    kvc_instance_stats is = inst_stats(&e, inst);
    const double fp16_tok = 2.0 * 2 * g.n_kv_heads * g.head_dim * g.n_layers;
    kvc_seq *s = open_seq(&e, inst);
    uint64_t prev_res = seq_stats(&e, s).bytes_resident;
    uint32_t prev_n = 0, next_mark = 1024;
    char fig[512];
    int len = 0;
    for (uint32_t at = 0; at < top; at += chunk) {
        for (uint32_t l = 0; l < g.n_layers; l++) {
            kc_rng r;
            kc_rng_init(&r, 900 + (uint64_t)at * 4 + l);
            kc_tokens t;
            kc_tokens_make(&t, &g, chunk, (int32_t)at, &r);
            append_ok(&e, s, &g, l, &t, 0, chunk);
            /* One decode-like query per chunk: some plugins compress when
             * they attend; cheap next to the appends. */
            attend_ok(&e, s, &g, l, &t, chunk - 1, 1);
            kc_tokens_free(&t);
        }
        uint32_t held = at + chunk;
        if (held != next_mark)
            continue;
        next_mark *= 2;
        kvc_seq_stats st = seq_stats(&e, s);
        ck_assert_msg(st.tokens_appended == (uint64_t)held * g.n_layers,
                      "tokens_appended %llu after %u tokens on %u layers",
                      (unsigned long long)st.tokens_appended, held, g.n_layers);
        /* Every layer's last query was at its last appended position:
         * nothing is pending (ABI 1.2), so the plain bound holds. */
        ck_assert_msg(st.bytes_pending == 0,
                      "KVC-REQ-9 at %u tokens: bytes_pending %llu B after each layer attended "
                      "a query at its last appended position: it must be 0 there",
                      held, (unsigned long long)st.bytes_pending);
        double limit = is.kv_ratio * (double)st.bytes_fp16_full + (double)is.seq_overhead_bytes;
        ck_assert_msg((double)st.bytes_resident <= limit,
                      "KVC-REQ-9 at %u tokens: resident %llu B > %.0f B (kv_ratio %.6g x "
                      "fp16 %llu + overhead %llu)",
                      held, (unsigned long long)st.bytes_resident, limit, is.kv_ratio,
                      (unsigned long long)st.bytes_fp16_full,
                      (unsigned long long)is.seq_overhead_bytes);
        /* Growth between marks: at most the declared rate, plus the
         * per-sequence constant (a block or table started but not full). */
        double grew = (double)st.bytes_resident - (double)prev_res;
        double grew_limit =
            is.kv_ratio * fp16_tok * (held - prev_n) + (double)is.seq_overhead_bytes;
        ck_assert_msg(grew <= grew_limit,
                      "from %u to %u tokens resident grew %.0f B (%.1f B/token), more than the "
                      "declared kv_ratio %.6g x %.0f B/token fp16 + overhead %llu allows "
                      "(%.0f B)",
                      prev_n, held, grew, grew / (held - prev_n), is.kv_ratio, fp16_tok,
                      (unsigned long long)is.seq_overhead_bytes, grew_limit);
        double per_tok = (double)st.bytes_resident / held;
        len += snprintf(fig + len, sizeof fig - (size_t)len, "%s%uk %.0f B/tok %.4f",
                        len ? ", " : "", held / 1024, per_tok, per_tok / fp16_tok);
        prev_res = st.bytes_resident;
        prev_n = held;
    }
    kc_figure("%s of fp16 (%u of 30 layers; declared %.4f)", fig, g.n_layers, is.kv_ratio);
    e.p->seq_close(s);
    e.p->destroy(inst);
    kc_unload(&e);
}
END_TEST

/* ---- stats consistency ---------------------------------------------------------------------- */

/* Every field of one sequence's stats against what was appended: counts
 * [n_layers] tokens per layer held. */
static void check_stats(const kc_env *e, const kvc_seq *s, const kvc_geometry *g,
                        const uint32_t *counts, const char *what)
{
    kvc_seq_stats st = seq_stats(e, s);
    uint32_t kv = g->kv_head_count ? g->kv_head_count : g->n_kv_heads;
    uint64_t tokens = 0;
    for (uint32_t l = 0; l < g->n_layers; l++)
        tokens += counts[l];
    ck_assert_msg(st.bytes_resident ==
                      st.bytes_payload + st.bytes_metadata + st.bytes_reserved + st.bytes_fixed,
                  "%s: resident %llu != payload %llu + metadata %llu + reserved %llu + fixed "
                  "%llu",
                  what, (unsigned long long)st.bytes_resident,
                  (unsigned long long)st.bytes_payload, (unsigned long long)st.bytes_metadata,
                  (unsigned long long)st.bytes_reserved, (unsigned long long)st.bytes_fixed);
    ck_assert_msg(st.bytes_pending <= st.bytes_resident,
                  "%s: bytes_pending %llu exceeds bytes_resident %llu (pending bytes are part of "
                  "the resident ones)",
                  what, (unsigned long long)st.bytes_pending,
                  (unsigned long long)st.bytes_resident);
    ck_assert_msg(st.tokens_appended == tokens,
                  "%s: tokens_appended %llu, but %llu tokens (summed over layers) were appended "
                  "and not truncated",
                  what, (unsigned long long)st.tokens_appended, (unsigned long long)tokens);
    uint64_t fp16 = tokens * 2 * kv * g->head_dim * 2;
    ck_assert_msg(st.bytes_fp16_full == fp16,
                  "%s: bytes_fp16_full %llu, expected %llu tokens x 2 (K,V) x %u KV heads x %u "
                  "x 2 B = %llu",
                  what, (unsigned long long)st.bytes_fp16_full, (unsigned long long)tokens, kv,
                  g->head_dim, (unsigned long long)fp16);
    ck_assert_msg(st.head_tokens_resident <= tokens * kv,
                  "%s: head_tokens_resident %llu exceeds tokens x KV heads = %llu", what,
                  (unsigned long long)st.head_tokens_resident, (unsigned long long)tokens * kv);
    if (!(e->p->caps & KVC_CAP_COMPRESS_TOKENS))
        ck_assert_msg(st.head_tokens_resident == tokens * kv,
                      "%s: head_tokens_resident %llu, but a plugin that drops no tokens (no "
                      "KVC_CAP_COMPRESS_TOKENS) holds tokens x KV heads = %llu",
                      what, (unsigned long long)st.head_tokens_resident,
                      (unsigned long long)tokens * kv);
    if (tokens == 0)
        ck_assert_msg(st.bytes_payload == 0 && st.bytes_pending == 0,
                      "%s: no tokens but %llu payload bytes, %llu pending", what,
                      (unsigned long long)st.bytes_payload, (unsigned long long)st.bytes_pending);
}

/* Uneven layers, then truncate, then empty again; returns checks made. */
static int stats_walk(kc_env *e, const kvc_geometry *g, const char *label)
{
    kvc_instance *inst = kc_create_ready(e, g, NULL);
    const uint32_t L = g->n_layers;
    kc_tokens *t = make_layers(g, 300, 21);
    uint32_t *counts = calloc(L, sizeof *counts);
    ck_assert_ptr_nonnull(counts);
    char what[160];
    int checks = 0;
    kvc_seq *s = open_seq(e, inst);
    check_stats(e, s, g, counts, "empty sequence");
    /* Layer l gets 60 * (l + 1) tokens (capped at 300), in two appends. */
    for (uint32_t l = 0; l < L; l++) {
        uint32_t want = 60 * (l + 1) > 300 ? 300 : 60 * (l + 1);
        append_ok(e, s, g, l, &t[l], 0, want - 7);
        counts[l] = want - 7;
        snprintf(what, sizeof what, "%s: after layer %u's first append", label, l);
        check_stats(e, s, g, counts, what);
        append_ok(e, s, g, l, &t[l], want - 7, 7);
        attend_ok(e, s, g, l, &t[l], want - 7, 7);
        counts[l] = want;
        snprintf(what, sizeof what, "%s: after layer %u's second append and attend", label, l);
        check_stats(e, s, g, counts, what);
        checks += 2;
    }
    if (e->p->caps & KVC_CAP_TRUNCATE) {
        const int32_t cut = 100; /* a position: tokens below it stay */
        kvc_status st = e->p->truncate(s, cut);
        ck_assert_msg(st == KVC_OK, "truncate: %s", kvch_status_string(st));
        for (uint32_t l = 0; l < L; l++) {
            uint32_t keep = 0;
            while (keep < counts[l] && t[l].pos[keep] < cut)
                keep++;
            counts[l] = keep;
        }
        snprintf(what, sizeof what, "%s: after truncate(%d)", label, cut);
        check_stats(e, s, g, counts, what);
        st = e->p->truncate(s, 0);
        ck_assert_msg(st == KVC_OK, "truncate(0): %s", kvch_status_string(st));
        memset(counts, 0, L * sizeof *counts);
        snprintf(what, sizeof what, "%s: after truncate(0)", label);
        check_stats(e, s, g, counts, what);
        checks += 2;
    }
    e->p->seq_close(s);
    e->p->destroy(inst);
    free(counts);
    free_layers(g, t);
    return checks;
}

START_TEST(stats_consistency)
{
    kc_need_host_data();
    kc_env e;
    kc_load(&e);
    kvc_geometry g = kc_geometry_small();
    int checks = stats_walk(&e, &g, "whole model");

    /* A head shard (second KV head only): fp16_full and head counts follow
     * the shard. A plugin may refuse shards at create. */
    kvc_geometry gs = g;
    gs.kv_head_first = 1;
    gs.kv_head_count = 1;
    kvc_instance *probe = NULL;
    char msg[512] = "";
    kvc_status st = kc_create(&e, &gs, NULL, &probe, msg, sizeof msg);
    if (st == KVC_OK) {
        e.p->destroy(probe);
        checks += stats_walk(&e, &gs, "head shard 1 of 2");
        kc_figure("consistent at %d checkpoints (whole model and a head shard)", checks);
    } else {
        kc_figure("consistent at %d checkpoints (head shard refused: %s)", checks, msg);
    }
    kc_unload(&e);
}
END_TEST

void kc_group_memory(Suite *s)
{
    kc_add(s, "memory", "budget", budget, 60);
    kc_add(s, "memory", "reported_vs_allocated", reported_vs_allocated, 30);
    kc_add(s, "memory", "bytes_per_token", bytes_per_token, 60);
    kc_add(s, "memory", "stats_consistency", stats_consistency, 30);
}
