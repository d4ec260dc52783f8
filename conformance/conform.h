/*
 * conform.h -- kvc-conform's internals: the run context every test reads,
 * how a test reports (a figure, a skip, a warning; failures through Check's
 * ck_assert_msg / ck_abort_msg with a message that names the problem), the
 * fake host (tracking allocator with canaries and guard bytes), and the
 * registration of tests by group.
 *
 * Every test runs in a forked child (Check's fork mode) with a time limit:
 * a plugin that crashes or hangs fails that test and the run goes on. A
 * test must not rely on state left by another: each loads the plugin
 * itself (kc_load) in its own child.
 */
#ifndef KVC_CONFORM_H
#define KVC_CONFORM_H

#include <check.h>
#include <stddef.h>
#include <stdint.h>

#include "kvc.h"
#include "kvch.h"

/* ---- the run ---------------------------------------------------------------- */

enum { KC_QUICK = 0, KC_FULL = 1 };

typedef struct kc_run {
    const char *plugin;      /* path or name given on the command line */
    kvch_options opts;       /* --opt name=value: the configuration under test */
    const char *model;       /* --model, or the cached SmolLM2, or NULL (model tests skip) */
    const char *text;        /* --text, default /usr/share/common-licenses/GPL-3 */
    int32_t device;          /* KVC_MEM_HOST or KVC_MEM_CUDA (--device) */
    int profile;             /* KC_QUICK or KC_FULL */
    uint64_t seed;           /* printed; --seed replays */
    const char *side_path;   /* file the children append their reports to */
    int max_hangs;           /* --max-hangs: after this many hung tests the rest
                              * are skipped (each hang costs its whole limit); 0 = never */
    int hangs;               /* hung tests so far (the parent counts; children read) */
} kc_run;

/* Set by main before the tests run; children inherit it through fork. */
extern kc_run KC;

/* ---- reporting from inside a test (the child) ----------------------------------- */

/* The figure shown in the table for this test ("max rel err 3.1e-7",
 * "1.003 of fp16"). Last call wins. printf-style. */
void kc_figure(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Ends the test as skipped, with the reason (e.g. "no model: give --model").
 * Does not return. */
void kc_skip(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

/* Marks the test as a warning (timing-dependent checks only) with the
 * reason; the test goes on and, if nothing fails, reports "warning". */
void kc_warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* The name of the running test, "group/test" (set by the runner). */
const char *kc_current(void);

/* ---- registration ------------------------------------------------------------------ */

/* Adds test `fn` named `name` to group `group` (one Check TCase per test,
 * named "group/name", with its own time limit in seconds; the runner
 * scales limits by profile). */
void kc_add(Suite *s, const char *group, const char *name, const TTest *fn, double timeout_s);

/* Each group file registers its tests. */
void kc_group_abi(Suite *s);
void kc_abi_exports(Suite *s); /* abi/only_export, called by kc_group_abi in order */
void kc_group_lifecycle(Suite *s);
void kc_group_badinput(Suite *s);
void kc_group_semantics(Suite *s);
void kc_group_memory(Suite *s);
void kc_group_accuracy(Suite *s);

/* ---- the fake host and the plugin --------------------------------------------------- */

/* What a test drives: the loaded plugin, a tracking allocator behind the
 * kvc_host (whose user_data is a canary-checked struct), and a logger that
 * keeps the last message. */
typedef struct kc_env {
    kvch_plugin *lib;
    const kvc_plugin *p;
    kvch_tracker *tr;
    kvc_host host;
    uint64_t canary_front; /* the kvc_host's user_data points here... */
    void *self;            /* ...and the allocator checks both canaries on every call */
    uint64_t canary_back;
    char last_log[512];
    /* The tracker's own alloc/free: the callbacks in `host` check the
     * canaries, then forward here. Appended; tests leave it alone. */
    kvc_host inner;
} kc_env;

/* Loads KC.plugin (ck_abort_msg with the loader's words on failure) and
 * sets up the host. The env must not move after this (user_data points
 * into it). */
void kc_load(kc_env *e);

/* Destroys nothing: checks the canaries, frees the tracker (after the
 * caller destroyed every instance) and unloads. Fails the test when bytes
 * are still live at the allocator, naming count and bytes. */
void kc_unload(kc_env *e);

/* A small synthetic geometry (4 layers, 8 query heads over 2 KV heads of
 * 64, hidden 512, RoPE adjacent theta 10000, max 65536 positions), and
 * SmolLM2-135M's shape (30 layers, 9/3 heads of 64, theta 100000). */
kvc_geometry kc_geometry_small(void);
kvc_geometry kc_geometry_smollm2(void);

/* create() with KC.opts plus `extra` "name=value" strings (NULL-terminated
 * list, may be NULL; later names override). Returns the status; *out set
 * on success; msg receives the plugin's reason. */
kvc_status kc_create(kc_env *e, const kvc_geometry *g, const char *const *extra,
                     kvc_instance **out, char *msg, size_t msg_size);

/* create() that must succeed: prepares the instance when the plugin needs
 * weights or calibration (synthetic random weights and activations for
 * the geometry: enough to run the contract tests; accuracy on the real
 * model uses the real preparation feed), then finalize(). */
kvc_instance *kc_create_ready(kc_env *e, const kvc_geometry *g, const char *const *extra);

/* Tests that feed tensors pass host pointers (kvc_create_info.device
 * picks where tensors live): with --device cuda they skip, saying so,
 * rather than hand host pointers to a device plugin. */
void kc_need_host_data(void);

/* The capabilities that hold for `inst`: its instance_stats caps from a
 * plugin of ABI 1.3 or newer (KVC-REQ-22), else the descriptor's. */
uint64_t kc_instance_caps(const kc_env *e, kvc_instance *inst);

/* 1 when the configuration under test is lossless. ABI 1.3: an instance
 * with the run's options (small geometry, prepared as kc_create_ready)
 * keeps KVC_CAP_EXACT. Older plugins: the plugin declares KVC_CAP_EXACT
 * ("lossless at default options") and every --opt given equals that
 * option's default (numbers compared as numbers). */
int kc_config_lossless(kc_env *e);

/* ---- data ---------------------------------------------------------------------------- */

/* Deterministic pseudo-random stream (splitmix64), seeded from KC.seed
 * and a per-test salt. */
typedef struct kc_rng {
    uint64_t s;
} kc_rng;
void kc_rng_init(kc_rng *r, uint64_t salt);
float kc_rng_f(kc_rng *r); /* [-1, 1) */

/* A run of n tokens for geometry g: positions start..start+n-1, pre-RoPE
 * queries [n][n_heads][head_dim], keys and values [n][n_kv][head_dim],
 * flags [n] (a few special and punctuation). kc_tokens_free frees. */
typedef struct kc_tokens {
    uint32_t n;
    int32_t *pos;
    float *q, *k, *v;
    uint8_t *flags;
} kc_tokens;
void kc_tokens_make(kc_tokens *t, const kvc_geometry *g, uint32_t n, int32_t start, kc_rng *r);
void kc_tokens_free(kc_tokens *t);

/* Exact attention of q over keys/values [0, n_k) (all layers alike) in
 * float64 (kernels' reference) into out [n_q][n_heads][head_dim]. */
void kc_exact(const kvc_geometry *g, const kc_tokens *keys, uint32_t n_k, const int32_t *q_pos,
              const float *q, uint32_t n_q, double *out);

/* ||a - ref|| / ||ref|| */
double kc_rel_err(const float *a, const double *ref, size_t n);

/* ---- guarded output buffers ------------------------------------------------------ */

/* n floats for a plugin to write into, with KC_GUARD_FLOATS guard floats
 * before and after holding a known bit pattern. The n floats themselves are
 * filled with a NaN pattern (KC_UNWRITTEN), so an element the plugin failed
 * to write shows up as NaN. Aborts the test when out of memory. Free with
 * kc_guard_free. */
#define KC_GUARD_FLOATS 16
float *kc_guarded(size_t n);

/* Fails the test (naming `what`, the side and the first index touched) when
 * a guard float of p (from kc_guarded(n)) was changed. */
void kc_guard_check(const float *p, size_t n, const char *what);

/* 1 when none of the n floats of p was written since kc_guarded (all still
 * KC_UNWRITTEN): for "out-parameters are left untouched on error". */
int kc_guard_untouched(const float *p, size_t n);

/* Frees what kc_guarded returned; NULL is a no-op. Does not check. */
void kc_guard_free(float *p);

/* ---- runner side (main.c and common.c only; tests do not use these) ---------- */

/* One registered test, in registration order. */
typedef struct kc_test {
    char *full;         /* "group/name", also the Check TCase name */
    char *group, *name; /* copies */
    const TTest *fn;    /* the test as START_TEST made it */
    double timeout_s;   /* as registered, before the profile's scaling */
    TTest *tramp;       /* what Check runs (fixed address, owned here): sets
                           kc_current, times the child, calls fn */
    double parent_s;    /* fork to reap, measured by the parent; -1 = not run */
} kc_test;

/* The registry kc_add fills (only tests that pass kc_filter). */
extern kc_test *kc_tests;
extern size_t kc_n_tests;

/* --only: "group" or "group/test"; NULL runs everything. Set before the
 * kc_group_* calls. */
extern const char *kc_filter;

/* Parent-side hooks, called by kc_add's fixture around each test's child:
 * before the fork, and after the child ended (its result is then already in
 * the SRunner). Either may be NULL. */
extern void (*kc_before_test)(size_t index);
extern void (*kc_after_test)(size_t index);

/* What the runner shows of the plugin, learnt by kc_probe. */
typedef struct kc_plugin_info {
    int loaded;                 /* 0: error says why */
    char id[128], name[256], version[64], path[1024];
    char caps[512];             /* kvch_caps_string words */
    char abi[32];               /* "1.0": the ABI the plugin was built against */
    char error[1024];
} kc_plugin_info;

/* Loads `what` in a forked child (so a plugin that crashes or hangs at
 * load cannot take the runner down; 60 s limit) and fills *out from it. */
void kc_probe(const char *what, kc_plugin_info *out);

#endif /* KVC_CONFORM_H */
