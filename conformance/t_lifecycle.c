/*
 * t_lifecycle.c -- group "lifecycle": objects come and go without a trace.
 *
 *   create_destroy       10 instances in turn, nothing live at the allocator after each
 *   many_sequences       64 sequences, closed in a scrambled order, the rest freed by destroy
 *   alloc_failure        every allocation of a whole scenario failed in turn (KVC-REQ-8)
 *   host_allocator_only  heap the plugin holds outside kvc_host.alloc (KVC-REQ-6)
 *   logger_optional      a host without a logger (kvc_host.log == NULL)
 *
 * The leak checks read the tracking allocator behind the env's host; the
 * final one is kc_unload's.
 */
#include <malloc.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "conform.h"

/* ---- helpers ---------------------------------------------------------------------- */

static kvch_tracker_stats tracker(const kc_env *e)
{
    kvch_tracker_stats st;
    kvch_tracker_get(e->tr, &st);
    return st;
}

/* Fails the test when anything is live at the allocator. */
static void expect_nothing_live(const kc_env *e, const char *when)
{
    kvch_tracker_stats st = tracker(e);
    ck_assert_msg(st.live == 0 && st.current[KVC_MEM_HOST] == 0 && st.current[KVC_MEM_CUDA] == 0,
                  "%s: %llu allocation%s (%llu bytes host, %llu bytes cuda) still live",
                  when, (unsigned long long)st.live, st.live == 1 ? "" : "s",
                  (unsigned long long)st.current[KVC_MEM_HOST],
                  (unsigned long long)st.current[KVC_MEM_CUDA]);
    ck_assert_msg(st.n_bad_free == 0 && st.n_overrun == 0,
                  "%s: %llu bad free(s), %llu overrun block(s) at the allocator", when,
                  (unsigned long long)st.n_bad_free, (unsigned long long)st.n_overrun);
}

static kvc_seq *open_seq(const kc_env *e, kvc_instance *inst)
{
    kvc_seq *s = NULL;
    kvc_status st = e->p->seq_open(inst, &s);
    ck_assert_msg(st == KVC_OK && s != NULL, "seq_open: %s", kvch_status_string(st));
    return s;
}

/* Appends t to every layer of s. */
static void append_all(const kc_env *e, kvc_seq *s, const kvc_geometry *g, const kc_tokens *t)
{
    for (uint32_t l = 0; l < g->n_layers; l++) {
        kvc_status st = e->p->append(s, l, t->n, t->pos, t->k, t->v, t->flags);
        ck_assert_msg(st == KVC_OK, "append of %u tokens at %d on layer %u: %s: %s", t->n,
                      t->pos[0], l, kvch_status_string(st), e->p->seq_message(s));
    }
}

/* Floats of an attend output for n_q queries. */
static size_t out_floats(const kvc_geometry *g, uint32_t n_q)
{
    uint32_t kv = g->kv_head_count ? g->kv_head_count : g->n_kv_heads;
    return (size_t)n_q * kv * (g->n_heads / g->n_kv_heads) * g->head_dim;
}

/* Query i of t (pre-RoPE, [n_heads][head_dim]). */
static const float *query(const kvc_geometry *g, const kc_tokens *t, uint32_t i)
{
    return t->q + (size_t)i * g->n_heads * g->head_dim;
}

/* ---- create_destroy ------------------------------------------------------------------ */

START_TEST(create_destroy)
{
    kc_need_host_data();
    kc_env e;
    kc_load(&e);
    kvc_geometry g = kc_geometry_small();
    kc_rng r;
    kc_rng_init(&r, 0xc4ea);
    kc_tokens t;
    kc_tokens_make(&t, &g, 5, 0, &r);
    uint64_t peak = 0;
    for (int i = 0; i < 10; i++) {
        kvc_instance *inst = kc_create_ready(&e, &g, NULL);
        /* Every other cycle holds a sequence too, closed before destroy. */
        if (i % 2) {
            kvc_seq *s = open_seq(&e, inst);
            append_all(&e, s, &g, &t);
            e.p->seq_close(s);
        }
        kvch_tracker_stats st = tracker(&e);
        peak = st.current[KVC_MEM_HOST] > peak ? st.current[KVC_MEM_HOST] : peak;
        e.p->destroy(inst);
        char when[64];
        snprintf(when, sizeof when, "after destroy number %d", i + 1);
        expect_nothing_live(&e, when);
    }
    kc_tokens_free(&t);
    kc_figure("10 cycles, %llu B live at most", (unsigned long long)peak);
    kc_unload(&e);
}
END_TEST

/* ---- many_sequences ------------------------------------------------------------------ */

#define N_SEQ 64
#define N_KEEP 16 /* left open for destroy to free */

START_TEST(many_sequences)
{
    kc_need_host_data();
    kc_env e;
    kc_load(&e);
    kvc_geometry g = kc_geometry_small();
    kvc_instance *inst = kc_create_ready(&e, &g, NULL);
    uint64_t base = tracker(&e).current[KVC_MEM_HOST];
    kc_rng r;
    kc_rng_init(&r, 0x3a4e);

    kvc_seq *s[N_SEQ];
    kc_tokens t[N_SEQ];
    for (int i = 0; i < N_SEQ; i++) {
        s[i] = open_seq(&e, inst);
        for (int j = 0; j < i; j++)
            if (s[j] == s[i])
                ck_abort_msg("seq_open returned the handle of open sequence %d again", j);
        kc_tokens_make(&t[i], &g, 3, 0, &r); /* distinct data per sequence */
    }
    for (uint32_t l = 0; l < g.n_layers; l++)
        for (int i = 0; i < N_SEQ; i++) {
            kvc_status st = e.p->append(s[i], l, 3, t[i].pos, t[i].k, t[i].v, t[i].flags);
            ck_assert_msg(st == KVC_OK, "append to sequence %d layer %u: %s: %s", i, l,
                          kvch_status_string(st), e.p->seq_message(s[i]));
        }
    uint64_t per_seq = (tracker(&e).current[KVC_MEM_HOST] - base) / N_SEQ;

    /* What each sequence answers now, to compare after the others close. */
    size_t no = out_floats(&g, 1);
    float *ref = malloc(N_SEQ * no * sizeof(float));
    float *o = kc_guarded(no);
    ck_assert_msg(ref != NULL, "out of memory in the test");
    uint32_t last = g.n_layers - 1;
    /* A prompt-phase plugin's first attend of a layer is its prompt, which
     * may compress what it holds: the reference comes after it. */
    const int passes = (e.p->caps & KVC_CAP_PROMPT_PHASE) ? 2 : 1;
    for (int pass = 0; pass < passes; pass++)
        for (int i = 0; i < N_SEQ; i++) {
            kvc_status st = e.p->attend(s[i], last, 1, &t[i].pos[2], query(&g, &t[i], 2), o);
            ck_assert_msg(st == KVC_OK, "attend on sequence %d: %s: %s", i,
                          kvch_status_string(st), e.p->seq_message(s[i]));
            kc_guard_check(o, no, "attend output");
            memcpy(ref + (size_t)i * no, o, no * sizeof(float));
        }

    int order[N_SEQ];
    for (int i = 0; i < N_SEQ; i++)
        order[i] = i;
    for (int i = N_SEQ - 1; i > 0; i--) { /* Fisher-Yates on the test's seed */
        int j = (int)((kc_rng_f(&r) + 1.0f) * 0.5f * (float)(i + 1));
        j = j > i ? i : j;
        int tmp = order[i];
        order[i] = order[j];
        order[j] = tmp;
    }
    for (int k = 0; k < N_SEQ - N_KEEP; k++) {
        e.p->seq_close(s[order[k]]);
        s[order[k]] = NULL;
    }
    /* Closing others must not disturb the survivors. */
    for (int k = N_SEQ - N_KEEP; k < N_SEQ; k++) {
        int i = order[k];
        kvc_status st = e.p->attend(s[i], last, 1, &t[i].pos[2], query(&g, &t[i], 2), o);
        ck_assert_msg(st == KVC_OK, "attend on sequence %d after closing %d others: %s: %s", i,
                      N_SEQ - N_KEEP, kvch_status_string(st), e.p->seq_message(s[i]));
        ck_assert_msg(memcmp(o, ref + (size_t)i * no, no * sizeof(float)) == 0,
                      "sequence %d answers differently after %d other sequences were closed", i,
                      N_SEQ - N_KEEP);
    }
    /* A fresh sequence after the churn works from empty. */
    kvc_seq *fresh = open_seq(&e, inst);
    kvc_status st = e.p->append(fresh, 0, 3, t[0].pos, t[0].k, t[0].v, t[0].flags);
    ck_assert_msg(st == KVC_OK, "append to a sequence opened after closing %d: %s: %s",
                  N_SEQ - N_KEEP, kvch_status_string(st), e.p->seq_message(fresh));

    e.p->destroy(inst); /* with N_KEEP + 1 sequences still open (KVC-REQ-16) */
    expect_nothing_live(&e, "after destroy with 17 sequences open");
    for (int i = 0; i < N_SEQ; i++)
        kc_tokens_free(&t[i]);
    free(ref);
    kc_guard_free(o);
    kc_figure("64 seqs, %llu B each, 17 freed by destroy", (unsigned long long)per_seq);
    kc_unload(&e);
}
END_TEST

/* ---- alloc_failure ------------------------------------------------------------------ */

#define PREFILL 100
#define NQ 8

/* One run of the scenario and what it saw. */
typedef struct afrun {
    kc_env *e;
    const kvc_geometry *g;
    const kc_tokens *t;
    uint64_t nth;        /* the injected allocation; 0 = clean run */
    unsigned failed;     /* calls that failed on the injected allocation */
    unsigned recovered;  /* calls that saw it and still returned OK */
    char where[64];      /* the call that met it */
    float *out[4];       /* attend outputs: A layer 0, A last layer, B, C */
    uint64_t tokens;     /* A's tokens_appended */
} afrun;

static uint64_t n_failed(const kc_env *e)
{
    return tracker(e).n_failed;
}

/* After a call: 1 when it failed on the injected allocation (the caller
 * then checks nothing changed and retries); fails the test for a failure
 * with no allocation refused, a status other than NOMEM, a missing
 * message, or a second failure on retry. */
static int after_call(afrun *r, const char *what, kvc_status st, uint64_t failed_before,
                      const char *msg, int attempt)
{
    uint64_t hit = n_failed(r->e) - failed_before;
    if (hit && !r->where[0])
        snprintf(r->where, sizeof r->where, "%s", what);
    if (st == KVC_OK) {
        r->recovered += hit ? 1 : 0;
        return 0;
    }
    ck_assert_msg(attempt == 0, "%s, retried after allocation %llu was refused in it, failed: "
                  "%s: %s: the failed call changed state or left the object unusable "
                  "(KVC-REQ-8)", what, (unsigned long long)r->nth, kvch_status_string(st),
                  msg ? msg : "");
    ck_assert_msg(hit > 0, "%s returned %s (%s) with no allocation refused (%s)", what,
                  kvch_status_string(st), msg ? msg : "", r->nth ? "failure injection run" :
                  "clean run");
    ck_assert_msg(st == KVC_E_NOMEM, "%s: allocation %llu was refused and it returned %s, "
                  "expected KVC_E_NOMEM (KVC-REQ-8): %s", what, (unsigned long long)r->nth,
                  kvch_status_string(st), msg ? msg : "");
    ck_assert_msg(msg == NULL || *msg, "%s failed with KVC_E_NOMEM but left no message", what);
    r->failed++;
    return 1;
}

/* Runs `call` until it does not fail on the injected allocation; `msg` is
 * read after each call, `on_fail` runs after a failure (state checks). */
#define STEP(r, what, call, msg, on_fail)                                            \
    for (int try_ = 0;; try_++) {                                                    \
        uint64_t f0_ = n_failed((r)->e);                                             \
        kvc_status st_ = (call);                                                     \
        if (!after_call((r), (what), st_, f0_, (msg), try_))                         \
            break;                                                                   \
        on_fail;                                                                     \
    }

static uint64_t seq_tokens(afrun *r, const kvc_seq *s, const char *what)
{
    kvc_seq_stats ss;
    memset(&ss, 0, sizeof ss);
    ss.struct_size = sizeof ss;
    kvc_status st = r->e->p->seq_stats(s, &ss);
    ck_assert_msg(st == KVC_OK, "seq_stats after %s: %s", what, kvch_status_string(st));
    return ss.tokens_appended;
}

static void expect_empty(afrun *r, const kvc_seq *s, const char *what)
{
    uint64_t n = seq_tokens(r, s, what);
    ck_assert_msg(n == 0, "%s failed with KVC_E_NOMEM but its target now holds %llu tokens "
                  "(on error nothing may change)", what, (unsigned long long)n);
}

static void attend_step(afrun *r, kvc_seq *s, uint32_t layer, uint32_t first, int slot,
                        const char *what)
{
    const kvc_plugin *p = r->e->p;
    size_t no = out_floats(r->g, NQ);
    float *o = kc_guarded(no);
    STEP(r, what, p->attend(s, layer, NQ, r->t->pos + first, query(r->g, r->t, first), o),
         p->seq_message(s),
         ck_assert_msg(kc_guard_untouched(o, no), "%s failed but wrote its output", what));
    kc_guard_check(o, no, what);
    memcpy(r->out[slot], o, no * sizeof(float));
    kc_guard_free(o);
}

/* create, seq_open, prefill, attend, export, import, fork, truncate,
 * stats, close, destroy: every step under the injection armed for r->nth. */
static void scenario(afrun *r)
{
    kc_env *e = r->e;
    const kvc_plugin *p = e->p;
    const kvc_geometry *g = r->g;
    const kc_tokens *t = r->t;
    int prep = (p->caps & (KVC_CAP_NEEDS_WEIGHTS | KVC_CAP_NEEDS_CALIBRATION)) != 0;
    kvc_instance *inst = NULL;
    /* A plugin needing preparation is prepared before the injection: the
     * synthetic feed must succeed. Everything after is injected. */
    if (prep)
        inst = kc_create_ready(e, g, NULL);
    kvch_tracker_fail_nth(e->tr, r->nth);
    if (!prep) {
        kvc_instance *const sentinel = (kvc_instance *)(uintptr_t)0x5a5a50;
        char msg[512];
        inst = sentinel;
        STEP(r, "create", kc_create(e, g, NULL, &inst, msg, sizeof msg), msg,
             ck_assert_msg(inst == sentinel, "create failed but wrote *out"));
        STEP(r, "finalize", p->finalize(inst), p->instance_message(inst), (void)0);
    }

    kvc_seq *const none = (kvc_seq *)(uintptr_t)0x5a5a58;
    kvc_seq *a = none, *b = none, *c = none;
    STEP(r, "seq_open", p->seq_open(inst, &a), NULL,
         ck_assert_msg(a == none, "seq_open failed but wrote *out"));
    for (uint32_t l = 0; l < g->n_layers; l++)
        STEP(r, "append", p->append(a, l, PREFILL, t->pos, t->k, t->v, t->flags),
             p->seq_message(a), (void)0); /* the retry itself proves nothing was appended */
    attend_step(r, a, 0, PREFILL - NQ, 0, "attend");
    attend_step(r, a, g->n_layers - 1, PREFILL - NQ, 1, "attend");

    void *blob = NULL;
    if (p->caps & KVC_CAP_EXPORT) {
        size_t size = 0, got = 0;
        STEP(r, "seq_export (size)", p->seq_export(a, NULL, 0, &size), p->seq_message(a),
             (void)0);
        blob = malloc(size ? size : 1);
        ck_assert_msg(blob != NULL, "out of memory in the test (%zu bytes)", size);
        STEP(r, "seq_export", p->seq_export(a, blob, size, &got), p->seq_message(a),
             ck_assert_msg(got == 0, "seq_export failed but set *size"));
        STEP(r, "seq_open", p->seq_open(inst, &b), NULL,
             ck_assert_msg(b == none, "seq_open failed but wrote *out"));
        STEP(r, "seq_import", p->seq_import(b, blob, got), p->seq_message(b),
             expect_empty(r, b, "seq_import"));
        attend_step(r, b, g->n_layers - 1, PREFILL - NQ, 2, "attend after import");
    }
    kvc_seq *cut = a; /* the sequence truncated: the fork when there is one */
    if (p->caps & KVC_CAP_FORK) {
        STEP(r, "seq_open", p->seq_open(inst, &c), NULL,
             ck_assert_msg(c == none, "seq_open failed but wrote *out"));
        STEP(r, "fork", p->fork(a, c), p->seq_message(c), expect_empty(r, c, "fork"));
        cut = c;
    }
    /* truncate never fails on a valid sequence (kvc.h), injection or not. */
    uint64_t f0 = n_failed(e);
    kvc_status st = p->truncate(cut, PREFILL / 2);
    if (n_failed(e) != f0 && !r->where[0])
        snprintf(r->where, sizeof r->where, "truncate");
    ck_assert_msg(st == KVC_OK, "truncate returned %s (%s): it never fails on a valid sequence",
                  kvch_status_string(st), p->seq_message(cut));
    attend_step(r, cut, 0, PREFILL / 2 - NQ, 3, "attend after truncate");

    kvc_seq_stats ss;
    memset(&ss, 0, sizeof ss);
    ss.struct_size = sizeof ss;
    STEP(r, "seq_stats", p->seq_stats(a, &ss), NULL, (void)0);
    r->tokens = ss.tokens_appended;
    kvc_instance_stats is;
    memset(&is, 0, sizeof is);
    is.struct_size = sizeof is;
    STEP(r, "instance_stats", p->instance_stats(inst, &is), NULL, (void)0);

    p->seq_close(b == none ? NULL : b);
    p->seq_close(a);
    p->destroy(inst); /* c, when forked, is freed by destroy */
    kvch_tracker_fail_nth(e->tr, 0);
    free(blob);
}

static void compare_runs(const afrun *clean, const afrun *r)
{
    static const char *const names[4] = {"attend on layer 0", "attend on the last layer",
                                         "attend after import", "attend after truncate"};
    size_t no = out_floats(r->g, NQ);
    for (int i = 0; i < 4; i++) {
        if (i == 2 && !(r->e->p->caps & KVC_CAP_EXPORT))
            continue;
        double num = 0, den = 0;
        for (size_t j = 0; j < no; j++) {
            double d = (double)r->out[i][j] - clean->out[i][j];
            num += d * d;
            den += (double)clean->out[i][j] * clean->out[i][j];
        }
        double rel = den > 0 ? sqrt(num / den) : sqrt(num);
        ck_assert_msg(!(rel > 1e-6), "with allocation %llu refused (first met in %s), %s "
                      "differs from the clean run by %.3g (relative): a failed call changed "
                      "state", (unsigned long long)r->nth, r->where[0] ? r->where : "?",
                      names[i], rel);
    }
    ck_assert_msg(r->tokens == clean->tokens, "with allocation %llu refused, the sequence "
                  "holds %llu tokens, the clean run %llu", (unsigned long long)r->nth,
                  (unsigned long long)r->tokens, (unsigned long long)clean->tokens);
}

START_TEST(alloc_failure)
{
    kc_need_host_data();
    kc_env e;
    kc_load(&e);
    kvc_geometry g = kc_geometry_small();
    kc_rng rng;
    kc_rng_init(&rng, 0xa110c);
    kc_tokens t;
    kc_tokens_make(&t, &g, PREFILL, 0, &rng);
    size_t no = out_floats(&g, NQ);
    afrun clean = {.e = &e, .g = &g, .t = &t}, r;
    for (int i = 0; i < 4; i++) {
        clean.out[i] = calloc(no, sizeof(float));
        ck_assert_msg(clean.out[i] != NULL, "out of memory in the test");
    }
    scenario(&clean);
    expect_nothing_live(&e, "after the clean run");
    ck_assert_msg(clean.failed == 0 && clean.recovered == 0,
                  "the clean run saw refused allocations");

    const uint64_t cap = KC.profile == KC_FULL ? 20000 : 2000;
    uint64_t points = 0, recovered = 0;
    for (uint64_t n = 1;; n++) {
        ck_assert_msg(n <= cap, "the scenario still met an injected failure at allocation "
                      "%llu: more allocations than the cap (%llu)", (unsigned long long)n - 1,
                      (unsigned long long)cap);
        r = clean;
        r.nth = n;
        r.failed = r.recovered = 0;
        r.where[0] = '\0';
        float *outs[4];
        for (int i = 0; i < 4; i++) {
            outs[i] = calloc(no, sizeof(float));
            ck_assert_msg(outs[i] != NULL, "out of memory in the test");
            r.out[i] = outs[i];
        }
        uint64_t f0 = n_failed(&e);
        scenario(&r);
        int met = n_failed(&e) != f0;
        char when[160];
        snprintf(when, sizeof when, "after the run with allocation %llu refused (in %s)",
                 (unsigned long long)n, r.where[0] ? r.where : "no call");
        expect_nothing_live(&e, when);
        compare_runs(&clean, &r);
        for (int i = 0; i < 4; i++)
            free(outs[i]);
        if (!met)
            break; /* the scenario has fewer than n allocations: all were tried */
        points++;
        recovered += r.recovered;
    }
    for (int i = 0; i < 4; i++)
        free(clean.out[i]);
    kc_tokens_free(&t);
    if (recovered)
        kc_figure("%llu allocation points, all clean (%llu recovered)",
                  (unsigned long long)points, (unsigned long long)recovered);
    else
        kc_figure("%llu allocation points, all failed cleanly", (unsigned long long)points);
    kc_unload(&e);
}
END_TEST

/* ---- host_allocator_only -------------------------------------------------------------- */

/* A host allocator that never touches the C heap: a bump arena in its
 * own mapping, so any heap growth during the workload is the plugin's (or
 * libc's). Freeing the newest block steps back, which recycles the
 * alloc/free pairs of scratch memory. */
typedef struct arena {
    unsigned char *base;
    size_t cap, used, last_off;
    uint64_t live, n_alloc;
    pthread_mutex_t mu;
} arena;

#define ARENA_BYTES ((size_t)2 << 30) /* address space only: MAP_NORESERVE */

static void *arena_alloc(void *ud, size_t size, size_t align, int32_t kind, int32_t usage)
{
    arena *a = ud;
    (void)usage;
    if (kind != KVC_MEM_HOST || align < 8 || (align & (align - 1)))
        return NULL;
    pthread_mutex_lock(&a->mu);
    size_t off = (a->used + align - 1) & ~(align - 1);
    void *p = NULL;
    if (off <= a->cap && size <= a->cap - off) {
        p = a->base + off;
        a->last_off = off;
        a->used = off + (size ? size : 1);
        a->live += size;
        a->n_alloc++;
    }
    pthread_mutex_unlock(&a->mu);
    return p;
}

static void arena_free(void *ud, void *ptr, size_t size, int32_t kind)
{
    arena *a = ud;
    (void)kind;
    if (ptr == NULL)
        return;
    pthread_mutex_lock(&a->mu);
    a->live -= size;
    if ((unsigned char *)ptr == a->base + a->last_off)
        a->used = a->last_off;
    pthread_mutex_unlock(&a->mu);
}

static void quiet_log(void *ud, int32_t level, const char *msg)
{
    (void)ud, (void)level, (void)msg;
}

/* Bytes the C heap has handed out (all arenas, plus mmap'ed chunks). */
static long long heap_in_use(void)
{
    struct mallinfo2 mi = mallinfo2();
    return (long long)(mi.uordblks + mi.hblkhd);
}

/* create, a sequence, 1000 tokens on every layer in appends of 100 with an
 * attend after each; returns with the instance alive in *inst. */
static void workload(kc_env *e, const kvc_geometry *g, const kc_tokens *t, float *o,
                     kvc_instance **inst_out, kvc_seq **seq_out)
{
    kvc_instance *inst = kc_create_ready(e, g, NULL);
    kvc_seq *s = open_seq(e, inst);
    for (uint32_t c = 0; c < t->n; c += 100)
        for (uint32_t l = 0; l < g->n_layers; l++) {
            size_t off = (size_t)c * g->n_kv_heads * g->head_dim;
            kvc_status st = e->p->append(s, l, 100, t->pos + c, t->k + off, t->v + off,
                                         t->flags + c);
            ck_assert_msg(st == KVC_OK, "append at %u, layer %u: %s: %s", c, l,
                          kvch_status_string(st), e->p->seq_message(s));
            st = e->p->attend(s, l, 1, t->pos + c + 99, query(g, t, c + 99), o);
            ck_assert_msg(st == KVC_OK, "attend at %u, layer %u: %s: %s", c + 99, l,
                          kvch_status_string(st), e->p->seq_message(s));
        }
    *inst_out = inst;
    *seq_out = s;
}

START_TEST(host_allocator_only)
{
    kc_need_host_data();
    kc_env e;
    kc_load(&e);
    kvc_geometry g = kc_geometry_small();
    kc_rng rng;
    kc_rng_init(&rng, 0x4ea9);
    kc_tokens t;
    kc_tokens_make(&t, &g, 1000, 0, &rng);
    float *o = kc_guarded(out_floats(&g, 1));

    arena a;
    memset(&a, 0, sizeof a);
    pthread_mutex_init(&a.mu, NULL);
    a.cap = ARENA_BYTES;
    a.base = mmap(NULL, a.cap, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                  -1, 0);
    ck_assert_msg(a.base != MAP_FAILED, "cannot map the test's arena");
    kvc_host saved = e.host;
    e.host.user_data = &a;
    e.host.alloc = arena_alloc;
    e.host.free = arena_free;
    e.host.log = quiet_log;

    /* One warm-up round: lazy one-time initialisation (libc, BLAS thread
     * buffers) is allowed and not counted. */
    kvc_instance *inst;
    kvc_seq *s;
    workload(&e, &g, &t, o, &inst, &s);
    e.p->seq_close(s);
    e.p->destroy(inst);

    long long m0 = heap_in_use();
    workload(&e, &g, &t, o, &inst, &s);
    long long m1 = heap_in_use();
    uint64_t through_host = a.live;
    e.p->seq_close(s);
    e.p->destroy(inst);
    long long m2 = heap_in_use();
    uint64_t left = a.live;

    e.host = saved;
    munmap(a.base, a.cap);
    pthread_mutex_destroy(&a.mu);
    kc_guard_free(o);
    kc_tokens_free(&t);

    ck_assert_msg(through_host > 0, "the plugin held 1000 tokens x %u layers without one byte "
                  "from kvc_host.alloc (KVC-REQ-6)", g.n_layers);
    ck_assert_msg(left == 0, "%llu bytes still live at the host allocator after destroy",
                  (unsigned long long)left);
    long long held = m1 - m0, after = m2 - m0;
    if (m0 == 0 && m1 == 0)
        kc_figure("mallinfo2 reports nothing (sanitizer allocator?)");
    else
        kc_figure("heap +%lld B held, +%lld B after destroy (%llu B via host)", held, after,
                  (unsigned long long)through_host);
    if (held > 64 * 1024)
        kc_warn("the plugin holds %lld bytes of C heap outside kvc_host.alloc while a "
                "sequence lives (KVC-REQ-6)", held);
    if (after > 64 * 1024)
        kc_warn("%lld bytes of C heap stay allocated after destroy: a leak outside "
                "kvc_host.alloc", after);
    kc_unload(&e);
}
END_TEST

/* ---- logger_optional --------------------------------------------------------------------- */

START_TEST(logger_optional)
{
    kc_need_host_data();
    kc_env e;
    kc_load(&e);
    e.host.log = NULL; /* kvc.h: "may be NULL (no logging)" */
    kvc_geometry g = kc_geometry_small();
    kc_rng rng;
    kc_rng_init(&rng, 0x1096);
    kc_tokens t;
    kc_tokens_make(&t, &g, 40, 0, &rng);
    kvc_instance *inst = kc_create_ready(&e, &g, NULL);
    kvc_seq *s = open_seq(&e, inst), *left_open = open_seq(&e, inst);
    append_all(&e, s, &g, &t);
    append_all(&e, left_open, &g, &t);
    float *o = kc_guarded(out_floats(&g, 1));
    kvc_status st = e.p->attend(s, 0, 1, &t.pos[39], query(&g, &t, 39), o);
    ck_assert_msg(st == KVC_OK, "attend: %s: %s", kvch_status_string(st), e.p->seq_message(s));
    /* Paths where a plugin is likely to log: errors, a refused create, an
     * allocation failure, destroy with a sequence left open. */
    st = e.p->append(s, g.n_layers, t.n, t.pos, t.k, t.v, t.flags);
    ck_assert_msg(st != KVC_OK, "append to layer %u of %u was accepted", g.n_layers, g.n_layers);
    kvc_instance *bad = NULL;
    char msg[256];
    const char *const opt[] = {"kvc_conform_no_such_option=1", NULL};
    st = kc_create(&e, &g, opt, &bad, msg, sizeof msg);
    ck_assert_msg(st != KVC_OK, "create with an unknown option was accepted");
    kvch_tracker_fail_from(e.tr, 1);
    kc_tokens more;
    kc_tokens_make(&more, &g, 200, 40, &rng);
    st = e.p->append(s, 0, more.n, more.pos, more.k, more.v, more.flags);
    kvch_tracker_fail_from(e.tr, 0);
    ck_assert_msg(st == KVC_E_NOMEM || st == KVC_OK, "append with every allocation refused: %s",
                  kvch_status_string(st));
    e.p->seq_close(s);
    e.p->destroy(inst);
    kc_guard_free(o);
    kc_tokens_free(&t);
    kc_tokens_free(&more);
    kc_figure("ran with kvc_host.log = NULL");
    kc_unload(&e);
}
END_TEST

void kc_group_lifecycle(Suite *s)
{
    kc_add(s, "lifecycle", "create_destroy", create_destroy, 20);
    kc_add(s, "lifecycle", "many_sequences", many_sequences, 30);
    kc_add(s, "lifecycle", "alloc_failure", alloc_failure, 60);
    kc_add(s, "lifecycle", "host_allocator_only", host_allocator_only, 30);
    kc_add(s, "lifecycle", "logger_optional", logger_optional, 20);
}
