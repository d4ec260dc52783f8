/*
 * common.c -- what every kvc-conform test shares: reporting to the runner
 * through the side file, registration, the fake host (tracking allocator
 * behind canary-checking callbacks), geometries, synthetic data and the
 * exact float64 attention reference.
 *
 * Tests run in forked children, so nothing here may rely on state a child
 * leaves behind: the child reports figures, skips, warnings and its own
 * duration by appending lines to KC.side_path, and the parent reads them
 * after the run (main.c).
 */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "conform.h"
#include "kvck.h"

kc_run KC;
kc_test *kc_tests;
size_t kc_n_tests;
const char *kc_filter;
void (*kc_before_test)(size_t index);
void (*kc_after_test)(size_t index);

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---- side file ------------------------------------------------------------------ */

/* Index of the test this child runs; -1 in the parent. */
static long cur_test = -1;
static double cur_start;
static pid_t cur_pid; /* the test's own process, not a grandchild it forks */

const char *kc_current(void)
{
    return cur_test >= 0 ? kc_tests[cur_test].full : "(runner)";
}

/* Appends "test\tkind\ttext\n" in one write() on an O_APPEND descriptor,
 * so lines from concurrent writers (threads of one test) never interleave.
 * The file is opened per call: a test may close descriptors it did not
 * open, and this costs nothing next to a plugin call. Tabs and line breaks
 * in the text become spaces so the line stays one record. */
static void side_line(const char *kind, const char *fmt, va_list ap)
{
    char text[2048], line[2400];
    vsnprintf(text, sizeof text, fmt, ap);
    for (char *c = text; *c; c++)
        if (*c == '\t' || *c == '\n' || *c == '\r')
            *c = ' ';
    int n = snprintf(line, sizeof line, "%s\t%s\t%s\n", kc_current(), kind, text);
    if (n < 0)
        return;
    if ((size_t)n >= sizeof line) {
        n = (int)sizeof line - 1;
        line[n - 1] = '\n';
    }
    if (KC.side_path == NULL)
        return;
    int fd = open(KC.side_path, O_WRONLY | O_APPEND | O_CLOEXEC);
    if (fd < 0)
        return;
    ssize_t w;
    do
        w = write(fd, line, (size_t)n);
    while (w < 0 && errno == EINTR);
    close(fd);
}

static void side_printf(const char *kind, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void side_printf(const char *kind, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    side_line(kind, fmt, ap);
    va_end(ap);
}

void kc_figure(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    side_line("figure", fmt, ap);
    va_end(ap);
}

void kc_warn(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    side_line("warn", fmt, ap);
    va_end(ap);
}

/* Check has no "skipped" result. The line says skipped; then the child
 * ends with status 0, which Check's fork mode records as a pass (the same
 * exit(EXIT_SUCCESS) it does itself after a test function returns), and
 * the runner turns pass + skip line into "skipped". exit() rather than
 * _exit() so the duration line (atexit) and stdio still happen. */
void kc_skip(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    side_line("skip", fmt, ap);
    va_end(ap);
    exit(0);
}

/* atexit in the child: every way a test ends except a signal or the
 * timeout's SIGKILL passes through exit() (a return, ck_assert's failure
 * path, kc_skip), so this is where the child's own duration is reported. */
static void child_done(void)
{
    if (cur_test >= 0 && getpid() == cur_pid)
        side_printf("time", "%.6f", now_s() - cur_start);
}

/* What Check runs in the child for test i: kc_add registers this with the
 * loop index i, so one function serves every test. The test's own body
 * calls tcase_fn_start (START_TEST does), so Check's location messages
 * still name the real test. */
static void trampoline(int i)
{
    cur_test = i;
    cur_start = now_s();
    cur_pid = getpid();
    atexit(child_done);
    /* KC.hangs is the parent's count at fork time: a plugin that hung in
     * that many tests would most likely hang here too, at the cost of the
     * whole time limit each, so the rest of the run says so instead. */
    if (KC.max_hangs > 0 && KC.hangs >= KC.max_hangs)
        kc_skip("not run: the plugin hung in %d earlier tests (--max-hangs %d); run this test "
                "alone with --only %s", KC.hangs, KC.max_hangs, kc_tests[i].full);
    kc_tests[i].fn->fn(0);
    /* Reached only when the body returned: a child that exits with status
     * 0 without this line (and without a skip) was ended by something else
     * -- a plugin calling exit() -- and the runner reports it as crashed. */
    side_printf("end", "returned");
}

/* ---- registration ---------------------------------------------------------------- */

/* Unchecked fixtures run in the parent around each TCase; Check runs the
 * TCases in the order they were added and kc_add adds one per test, so a
 * counter pairs each call with its test. The parent's measure is the
 * fallback duration for a child that died before reporting its own. */
static size_t parent_next;
static double parent_t0;

static void parent_setup(void)
{
    if (kc_before_test && parent_next < kc_n_tests)
        kc_before_test(parent_next);
    parent_t0 = now_s();
}

static void parent_teardown(void)
{
    size_t i = parent_next++;
    if (i >= kc_n_tests)
        return;
    kc_tests[i].parent_s = now_s() - parent_t0;
    if (kc_after_test)
        kc_after_test(i);
}

static char *xstrdup(const char *s)
{
    char *d = strdup(s ? s : "");
    if (d == NULL) {
        fprintf(stderr, "kvc-conform: out of memory\n");
        exit(2);
    }
    return d;
}

/* kc_filter is a comma-separated list of groups and group/test names. */
static int matches_filter(const char *group, const char *full)
{
    if (kc_filter == NULL || *kc_filter == '\0')
        return 1;
    for (const char *p = kc_filter; *p;) {
        size_t n = strcspn(p, ",");
        if ((strlen(group) == n && strncmp(p, group, n) == 0) ||
            (strlen(full) == n && strncmp(p, full, n) == 0))
            return 1;
        p += n;
        if (*p == ',')
            p++;
    }
    return 0;
}

void kc_add(Suite *s, const char *group, const char *name, const TTest *fn, double timeout_s)
{
    size_t len = strlen(group) + strlen(name) + 2;
    char *full = malloc(len);
    if (full == NULL) {
        fprintf(stderr, "kvc-conform: out of memory\n");
        exit(2);
    }
    snprintf(full, len, "%s/%s", group, name);
    if (!matches_filter(group, full)) {
        free(full);
        return;
    }
    kc_test *t = realloc(kc_tests, (kc_n_tests + 1) * sizeof *t);
    if (t == NULL) {
        fprintf(stderr, "kvc-conform: out of memory\n");
        exit(2);
    }
    kc_tests = t;
    kc_test *k = &kc_tests[kc_n_tests];
    k->full = full;
    k->group = xstrdup(group);
    k->name = xstrdup(name);
    k->fn = fn;
    k->timeout_s = timeout_s;
    k->parent_s = -1;
    /* Check keeps the TTest's address, and kc_tests moves when it grows:
     * the TTest lives in its own block. */
    k->tramp = malloc(sizeof *k->tramp);
    if (k->tramp == NULL) {
        fprintf(stderr, "kvc-conform: out of memory\n");
        exit(2);
    }
    *k->tramp = (TTest){k->name, trampoline, fn->file, fn->line};
    TCase *tc = tcase_create(full);
    tcase_set_timeout(tc, timeout_s * (KC.profile == KC_FULL ? 4.0 : 1.0));
    tcase_add_unchecked_fixture(tc, parent_setup, parent_teardown);
    tcase_add_loop_test(tc, k->tramp, (int)kc_n_tests, (int)kc_n_tests + 1);
    suite_add_tcase(s, tc);
    kc_n_tests++;
}

/* ---- the fake host ------------------------------------------------------------------ */

#define CANARY_FRONT UINT64_C(0x6b63667266726f6e) /* "kcfrfron" */
#define CANARY_BACK UINT64_C(0x6b6362616b636261)  /* "kcbakcba" */

/* Envs loaded in this child, so a callback can tell a user_data the host
 * handed out from one the plugin made up (before reading through it). */
#define MAX_ENVS 64
static kc_env *live_envs[MAX_ENVS];
static pthread_mutex_t envs_mu = PTHREAD_MUTEX_INITIALIZER;

static kc_env *env_of(void *user_data, const char *cb)
{
    kc_env *found = NULL;
    pthread_mutex_lock(&envs_mu);
    for (int i = 0; i < MAX_ENVS; i++)
        if (live_envs[i] != NULL && (void *)&live_envs[i]->canary_front == user_data)
            found = live_envs[i];
    pthread_mutex_unlock(&envs_mu);
    if (found == NULL)
        ck_abort_msg("the plugin called host %s with a user_data (%p) the host never gave it",
                     cb, user_data);
    if (found->canary_front != CANARY_FRONT || found->self != (void *)found ||
        found->canary_back != CANARY_BACK)
        ck_abort_msg("the plugin changed the host's user_data canaries (seen in %s)", cb);
    return found;
}

static void *cb_alloc(void *ud, size_t size, size_t alignment, int32_t kind, int32_t usage)
{
    kc_env *e = env_of(ud, "alloc");
    return e->inner.alloc(e->inner.user_data, size, alignment, kind, usage);
}

static void cb_free(void *ud, void *ptr, size_t size, int32_t kind)
{
    kc_env *e = env_of(ud, "free");
    e->inner.free(e->inner.user_data, ptr, size, kind);
}

/* Keeps the last message for tests that look at what a plugin says; never
 * prints (children's output would break the table). Racy between threads
 * by design of the field, which tests read only when single-threaded. */
static void cb_log(void *ud, int32_t level, const char *msg)
{
    kc_env *e = env_of(ud, "log");
    (void)level;
    snprintf(e->last_log, sizeof e->last_log, "%s", msg ? msg : "(null)");
}

void kc_load(kc_env *e)
{
    char err[1024];
    memset(e, 0, sizeof *e);
    e->canary_front = CANARY_FRONT;
    e->self = e;
    e->canary_back = CANARY_BACK;
    if (kvch_load(KC.plugin, &e->lib, err, sizeof err) != KVC_OK)
        ck_abort_msg("cannot load the plugin: %s", err);
    e->p = kvch_plugin_desc(e->lib);
    e->tr = kvch_tracker_new();
    ck_assert_msg(e->tr != NULL, "out of memory making the tracker");
    kvch_tracker_host(e->tr, NULL, &e->inner);
    e->host = (kvc_host){
        .struct_size = sizeof(kvc_host),
        .user_data = &e->canary_front,
        .alloc = cb_alloc,
        .free = cb_free,
        .log = cb_log,
    };
    pthread_mutex_lock(&envs_mu);
    int slot = -1;
    for (int i = 0; i < MAX_ENVS && slot < 0; i++)
        if (live_envs[i] == NULL)
            slot = i;
    if (slot >= 0)
        live_envs[slot] = e;
    pthread_mutex_unlock(&envs_mu);
    ck_assert_msg(slot >= 0, "more than %d plugin loads at once in one test", MAX_ENVS);
}

void kc_unload(kc_env *e)
{
    pthread_mutex_lock(&envs_mu);
    for (int i = 0; i < MAX_ENVS; i++)
        if (live_envs[i] == e)
            live_envs[i] = NULL;
    pthread_mutex_unlock(&envs_mu);
    int canaries_ok = e->canary_front == CANARY_FRONT && e->self == (void *)e &&
                      e->canary_back == CANARY_BACK;

    kvch_tracker_stats st;
    kvch_tracker_get(e->tr, &st);
    char report[700] = "";
    if (st.live > 0) {
        /* The report's first lines (oldest allocations first) go into the
         * message; the whole of it could be thousands of lines. */
        char *buf = NULL;
        size_t len = 0;
        FILE *f = open_memstream(&buf, &len);
        if (f != NULL) {
            kvch_tracker_leak_report(e->tr, f);
            fclose(f);
            snprintf(report, sizeof report, "%s", buf ? buf : "");
            for (char *c = report; *c; c++)
                if (*c == '\n')
                    *c = ';';
            free(buf);
        }
    }
    kvch_tracker_free(e->tr);
    e->tr = NULL;
    kvch_unload(e->lib);
    e->lib = NULL;
    e->p = NULL;

    ck_assert_msg(canaries_ok, "the plugin changed the host's user_data canaries");
    ck_assert_msg(st.live == 0,
                  "leak: %llu allocation%s (%llu bytes host, %llu bytes cuda) still live after "
                  "every instance was destroyed: %s",
                  (unsigned long long)st.live, st.live == 1 ? "" : "s",
                  (unsigned long long)st.current[KVC_MEM_HOST],
                  (unsigned long long)st.current[KVC_MEM_CUDA], report);
    ck_assert_msg(st.n_bad_free == 0,
                  "the plugin made %llu bad free%s (unknown pointer, double free, or wrong "
                  "size or memory kind)",
                  (unsigned long long)st.n_bad_free, st.n_bad_free == 1 ? "" : "s");
    ck_assert_msg(st.n_overrun == 0,
                  "the plugin wrote past the end of %llu allocation%s (guard bytes overwritten)",
                  (unsigned long long)st.n_overrun, st.n_overrun == 1 ? "" : "s");
}

/* ---- probing the plugin for the runner ------------------------------------------------ */

/* The child sends the struct whole over a pipe: parent and child are the
 * same program, so the layout is shared. */
void kc_probe(const char *what, kc_plugin_info *out)
{
    int fds[2];
    memset(out, 0, sizeof *out);
    if (pipe(fds) != 0) {
        snprintf(out->error, sizeof out->error, "pipe: %s", strerror(errno));
        return;
    }
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        close(fds[0]);
        alarm(60);
        kc_plugin_info pi;
        memset(&pi, 0, sizeof pi);
        kvch_plugin *lib = NULL;
        if (kvch_load(what, &lib, pi.error, sizeof pi.error) == KVC_OK) {
            const kvc_plugin *p = kvch_plugin_desc(lib);
            pi.loaded = 1;
            snprintf(pi.id, sizeof pi.id, "%s", p->id ? p->id : "?");
            snprintf(pi.name, sizeof pi.name, "%s", p->name ? p->name : "?");
            snprintf(pi.version, sizeof pi.version, "%s", p->version ? p->version : "?");
            snprintf(pi.path, sizeof pi.path, "%s", kvch_plugin_path(lib));
            snprintf(pi.abi, sizeof pi.abi, "%u.%u", KVC_VERSION_MAJOR(p->abi_version),
                     KVC_VERSION_MINOR(p->abi_version));
            kvch_caps_string(p->caps, pi.caps, sizeof pi.caps);
        }
        ssize_t w = write(fds[1], &pi, sizeof pi);
        _exit(w == (ssize_t)sizeof pi ? 0 : 1);
    }
    close(fds[1]);
    if (pid < 0) {
        close(fds[0]);
        snprintf(out->error, sizeof out->error, "fork: %s", strerror(errno));
        return;
    }
    size_t got = 0;
    while (got < sizeof *out) {
        ssize_t r = read(fds[0], (char *)out + got, sizeof *out - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        got += (size_t)r;
    }
    close(fds[0]);
    int st = 0;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
        ;
    if (got == sizeof *out)
        return;
    memset(out, 0, sizeof *out);
    if (WIFSIGNALED(st) && WTERMSIG(st) == SIGALRM)
        snprintf(out->error, sizeof out->error, "hung while loading (no answer in 60 s)");
    else if (WIFSIGNALED(st))
        snprintf(out->error, sizeof out->error, "crashed while loading (signal %d, %s)",
                 WTERMSIG(st), strsignal(WTERMSIG(st)));
    else
        snprintf(out->error, sizeof out->error, "the loading process ended early (status %d)",
                 WIFEXITED(st) ? WEXITSTATUS(st) : -1);
}

/* ---- geometries ------------------------------------------------------------------------ */

kvc_geometry kc_geometry_small(void)
{
    return (kvc_geometry){
        .struct_size = sizeof(kvc_geometry),
        .n_layers = 4,
        .n_heads = 8,
        .n_kv_heads = 2,
        .head_dim = 64,
        .hidden_size = 512,
        .max_positions = 65536,
        .rope_style = KVC_ROPE_ADJACENT,
        .rope_theta = 10000.0f,
    };
}

kvc_geometry kc_geometry_smollm2(void)
{
    return (kvc_geometry){
        .struct_size = sizeof(kvc_geometry),
        .n_layers = 30,
        .n_heads = 9,
        .n_kv_heads = 3,
        .head_dim = 64,
        .hidden_size = 576,
        .max_positions = 8192,
        .rope_style = KVC_ROPE_ADJACENT,
        .rope_theta = 100000.0f,
    };
}

/* Heads this geometry's tensors carry: the shard when one is set. */
static void shard_heads(const kvc_geometry *g, uint32_t *nh, uint32_t *nkv)
{
    uint32_t kv = g->kv_head_count ? g->kv_head_count : g->n_kv_heads;
    *nkv = kv;
    *nh = g->n_kv_heads ? kv * (g->n_heads / g->n_kv_heads) : 0;
}

/* ---- creation ----------------------------------------------------------------------------- */

kvc_status kc_create(kc_env *e, const kvc_geometry *g, const char *const *extra,
                     kvc_instance **out, char *msg, size_t msg_size)
{
    /* KC.opts owns its strings; a fresh table gets copies, so `extra`
     * overrides by name without touching the run's options. */
    kvch_options o;
    memset(&o, 0, sizeof o);
    char err[256], kv[1024];
    for (uint32_t i = 0; i < KC.opts.n; i++) {
        snprintf(kv, sizeof kv, "%s=%s", KC.opts.names[i], KC.opts.values[i]);
        if (kvch_options_add(&o, kv, err, sizeof err) != 0)
            ck_abort_msg("option %s: %s", kv, err);
    }
    for (size_t i = 0; extra != NULL && extra[i] != NULL; i++)
        if (kvch_options_add(&o, extra[i], err, sizeof err) != 0)
            ck_abort_msg("option %s: %s", extra[i], err);

    kvc_create_info info;
    memset(&info, 0, sizeof info);
    info.struct_size = sizeof info;
    info.host = &e->host;
    info.geometry = g;
    kvch_options_apply(&o, &info);
    info.device = KC.device;
    info.dtype = KVC_DTYPE_F32;

    char local[512];
    if (msg == NULL || msg_size == 0) {
        msg = local;
        msg_size = sizeof local;
    }
    msg[0] = '\0';
    kvc_status s = e->p->create(&info, out, msg, msg_size);
    kvch_options_clear(&o);
    return s;
}

static void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size);
    ck_assert_msg(p != NULL, "out of memory (%zu x %zu bytes) in the test itself", n, size);
    return p;
}

/* Synthetic preparation, enough for contract tests: weights of unit-scale
 * rows times 1/sqrt(hidden) (as an initialised model's), and Gaussian-ish
 * activations in chunks of 256 rows, at least twice hidden_size rows in
 * all so that X^T X is well conditioned for whitening methods. */
static void prepare_synthetic(kc_env *e, kvc_instance *inst, const kvc_geometry *g)
{
    int weights = (e->p->caps & KVC_CAP_NEEDS_WEIGHTS) != 0;
    int calib = (e->p->caps & KVC_CAP_NEEDS_CALIBRATION) != 0;
    if (!weights && !calib)
        return;
    size_t hid = g->hidden_size, hd = g->head_dim;
    size_t qd = (size_t)g->n_heads * hd, kd = (size_t)g->n_kv_heads * hd;
    enum { ROWS = 256 };
    size_t n_chunks = (2 * hid + ROWS - 1) / ROWS;
    if (n_chunks < 2)
        n_chunks = 2;
    float *wq = NULL, *wk = NULL, *wv = NULL, *wo = NULL, *x = NULL;
    int32_t *pos = NULL;
    if (weights) {
        wq = xcalloc(qd * hid, sizeof *wq);
        wk = xcalloc(kd * hid, sizeof *wk);
        wv = xcalloc(kd * hid, sizeof *wv);
        wo = xcalloc(hid * qd, sizeof *wo);
    }
    if (calib) {
        x = xcalloc((size_t)ROWS * hid, sizeof *x);
        pos = xcalloc(ROWS, sizeof *pos);
        for (int i = 0; i < ROWS; i++)
            pos[i] = i;
    }
    kc_rng r;
    kc_rng_init(&r, UINT64_C(0x70726570)); /* "prep" */
    /* sqrt(3) makes uniform [-1,1) unit-variance. */
    float ws = (float)(sqrt(3.0) / sqrt((double)hid));
    for (uint32_t l = 0; l < g->n_layers; l++) {
        kvc_layer_weights w = {.struct_size = sizeof w};
        if (weights) {
            for (size_t i = 0; i < qd * hid; i++) {
                wq[i] = ws * kc_rng_f(&r);
                wo[i] = ws * kc_rng_f(&r);
            }
            for (size_t i = 0; i < kd * hid; i++) {
                wk[i] = ws * kc_rng_f(&r);
                wv[i] = ws * kc_rng_f(&r);
            }
            w.w_q = wq;
            w.w_k = wk;
            w.w_v = wv;
            w.w_o = wo;
            kvc_status s = e->p->prepare_layer(inst, l, &w, NULL);
            ck_assert_msg(s == KVC_OK, "prepare_layer(layer %u, synthetic weights): %s: %s", l,
                          kvch_status_string(s), e->p->instance_message(inst));
        }
        for (size_t c = 0; calib && c < n_chunks; c++) {
            /* Sum of three uniforms: closer to the bell-shaped activations
             * of a normed layer input than a flat distribution. */
            for (size_t i = 0; i < (size_t)ROWS * hid; i++)
                x[i] = kc_rng_f(&r) + kc_rng_f(&r) + kc_rng_f(&r);
            kvc_calib_chunk ch = {.struct_size = sizeof ch, .n_rows = ROWS, .x = x,
                                  .positions = pos};
            kvc_status s = e->p->prepare_layer(inst, l, NULL, &ch);
            ck_assert_msg(s == KVC_OK, "prepare_layer(layer %u, synthetic calibration): %s: %s",
                          l, kvch_status_string(s), e->p->instance_message(inst));
        }
    }
    free(wq);
    free(wk);
    free(wv);
    free(wo);
    free(x);
    free(pos);
}

kvc_instance *kc_create_ready(kc_env *e, const kvc_geometry *g, const char *const *extra)
{
    kvc_instance *inst = NULL;
    char msg[512];
    kvc_status s = kc_create(e, g, extra, &inst, msg, sizeof msg);
    ck_assert_msg(s == KVC_OK, "create failed: %s: %s", kvch_status_string(s), msg);
    ck_assert_msg(inst != NULL, "create returned OK but no instance");
    prepare_synthetic(e, inst, g);
    s = e->p->finalize(inst);
    ck_assert_msg(s == KVC_OK, "finalize: %s: %s", kvch_status_string(s),
                  e->p->instance_message(inst));
    return inst;
}

/* ---- data ------------------------------------------------------------------------------------ */

static uint64_t splitmix64(uint64_t *s)
{
    uint64_t z = (*s += UINT64_C(0x9e3779b97f4a7c15));
    z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
    return z ^ (z >> 31);
}

void kc_rng_init(kc_rng *r, uint64_t salt)
{
    /* The salt goes through one mixing step first, so salts 1 and 2 give
     * unrelated streams rather than shifted copies of one. */
    uint64_t m = salt;
    r->s = KC.seed ^ splitmix64(&m);
}

float kc_rng_f(kc_rng *r)
{
    /* 24 random bits: every value exactly representable in a float. */
    return (float)(splitmix64(&r->s) >> 40) * (2.0f / 16777216.0f) - 1.0f;
}

void kc_tokens_make(kc_tokens *t, const kvc_geometry *g, uint32_t n, int32_t start, kc_rng *r)
{
    uint32_t nh, nkv;
    shard_heads(g, &nh, &nkv);
    size_t hd = g->head_dim;
    memset(t, 0, sizeof *t);
    t->n = n;
    t->pos = xcalloc(n, sizeof *t->pos);
    t->q = xcalloc((size_t)n * nh * hd, sizeof *t->q);
    t->k = xcalloc((size_t)n * nkv * hd, sizeof *t->k);
    t->v = xcalloc((size_t)n * nkv * hd, sizeof *t->v);
    t->flags = xcalloc(n, sizeof *t->flags);
    for (uint32_t i = 0; i < n; i++) {
        int32_t p = start + (int32_t)i;
        t->pos[i] = p;
        /* By position, not index: the same token gets the same flag
         * whether it is appended alone or in a batch. */
        t->flags[i] = p == 0 ? KVC_TOKEN_SPECIAL : (p % 7 == 6 ? KVC_TOKEN_PUNCT : 0);
    }
    for (size_t i = 0; i < (size_t)n * nh * hd; i++)
        t->q[i] = kc_rng_f(r);
    for (size_t i = 0; i < (size_t)n * nkv * hd; i++) {
        t->k[i] = kc_rng_f(r);
        t->v[i] = kc_rng_f(r);
    }
}

void kc_tokens_free(kc_tokens *t)
{
    free(t->pos);
    free(t->q);
    free(t->k);
    free(t->v);
    free(t->flags);
    memset(t, 0, sizeof *t);
}

void kc_exact(const kvc_geometry *g, const kc_tokens *keys, uint32_t n_k, const int32_t *q_pos,
              const float *q, uint32_t n_q, double *out)
{
    uint32_t nh, nkv;
    shard_heads(g, &nh, &nkv);
    kvck_rope rope;
    int rc = kvck_rope_init(&rope, g->rope_style, (int)g->head_dim, (int)g->rope_dims,
                            g->rope_theta, g->rope_inv_freq, g->rope_mscale);
    ck_assert_msg(rc == 0, "kc_exact: the geometry's RoPE is not valid for the reference");
    kvck_dense d = {
        .rope = &rope,
        .scale = g->attn_scale > 0 ? g->attn_scale : (float)(1.0 / sqrt((double)g->head_dim)),
        .window = g->sliding_window,
        .n_heads = nh,
        .n_kv_heads = nkv,
        .head_dim = g->head_dim,
    };
    kvck_attention_ref(&d, n_q, q_pos, q, n_k, keys->pos, keys->k, keys->v, out);
}

double kc_rel_err(const float *a, const double *ref, size_t n)
{
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - ref[i];
        num += d * d;
        den += ref[i] * ref[i];
    }
    /* A NaN anywhere must not read as "no error". */
    if (isnan(num))
        return INFINITY;
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* ---- guarded buffers ----------------------------------------------------------------------- */

#define GUARD_BITS UINT32_C(0x7f8a5a5a)  /* a signalling NaN: no computation yields it */
#define UNWRITTEN_BITS UINT32_C(0x7fc0dead) /* a quiet NaN with a payload */

/* Bits through memcpy, not a cast: the buffer is float to the plugin and
 * the pattern compare must not depend on aliasing rules. */
static uint32_t bits_at(const float *p)
{
    uint32_t b;
    memcpy(&b, p, sizeof b);
    return b;
}

static void set_bits(float *p, uint32_t b)
{
    memcpy(p, &b, sizeof b);
}

float *kc_guarded(size_t n)
{
    size_t total = n + 2 * KC_GUARD_FLOATS;
    float *b = xcalloc(total, sizeof *b);
    for (size_t i = 0; i < total; i++)
        set_bits(&b[i], (i < KC_GUARD_FLOATS || i >= KC_GUARD_FLOATS + n) ? GUARD_BITS
                                                                          : UNWRITTEN_BITS);
    return b + KC_GUARD_FLOATS;
}

void kc_guard_check(const float *p, size_t n, const char *what)
{
    for (size_t i = KC_GUARD_FLOATS; i > 0; i--)
        ck_assert_msg(bits_at(p - i) == GUARD_BITS,
                      "%s: the plugin wrote %zu float%s before the start of the buffer", what, i,
                      i == 1 ? "" : "s");
    for (size_t i = 0; i < KC_GUARD_FLOATS; i++)
        ck_assert_msg(bits_at(p + n + i) == GUARD_BITS,
                      "%s: the plugin wrote past the end of the buffer (%zu floats, element %zu "
                      "after it)", what, n, i);
}

int kc_guard_untouched(const float *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (bits_at(p + i) != UNWRITTEN_BITS)
            return 0;
    return 1;
}

void kc_guard_free(float *p)
{
    if (p != NULL)
        free(p - KC_GUARD_FLOATS);
}

/* ---- what a configuration is ---------------------------------------------------------- */

void kc_need_host_data(void)
{
    if (KC.device != KVC_MEM_HOST)
        kc_skip("feeds host tensors: run with --device cpu");
}

uint64_t kc_instance_caps(const kc_env *e, kvc_instance *inst)
{
    const kvc_plugin *p = e->p;
    if (KVC_VERSION_MINOR(p->abi_version) < 3)
        return p->caps;
    kvc_instance_stats st;
    memset(&st, 0, sizeof st);
    st.struct_size = sizeof st;
    kvc_status s = p->instance_stats(inst, &st);
    ck_assert_msg(s == KVC_OK, "instance_stats: %s", kvch_status_string(s));
    ck_assert_msg((st.caps & ~p->caps) == 0,
                  "KVC-REQ-22: instance caps 0x%llx hold bits the descriptor (0x%llx) lacks",
                  (unsigned long long)st.caps, (unsigned long long)p->caps);
    return st.caps;
}

int kc_config_lossless(kc_env *e)
{
    const kvc_plugin *p = e->p;
    if (!(p->caps & KVC_CAP_EXACT))
        return 0;
    if (KVC_VERSION_MINOR(p->abi_version) >= 3) {
        kvc_geometry g = kc_geometry_small();
        kvc_instance *inst = kc_create_ready(e, &g, NULL);
        uint64_t caps = kc_instance_caps(e, inst);
        p->destroy(inst);
        return (caps & KVC_CAP_EXACT) != 0;
    }
    for (uint32_t i = 0; i < KC.opts.n; i++) {
        const kvc_option_desc *d = NULL;
        for (uint32_t j = 0; j < p->n_options; j++)
            if (p->options[j] && p->options[j]->name &&
                strcmp(p->options[j]->name, KC.opts.names[i]) == 0)
                d = p->options[j];
        if (!d || !d->default_value)
            return 0;
        if (strcmp(d->default_value, KC.opts.values[i]) == 0)
            continue;
        char *e1, *e2;
        double a = strtod(d->default_value, &e1), b = strtod(KC.opts.values[i], &e2);
        if (e1 == d->default_value || *e1 || e2 == KC.opts.values[i] || *e2 || a != b)
            return 0;
    }
    return 1;
}
