/* session.c -- model + plugin + KV store setup shared by the model commands. */
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "autoprep.h"
#include "calib.h"
#include "session.h"

double session_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int session_main(int (*body)(kvc_session_args *a, int argc, char **argv), int argc, char **argv)
{
    kvc_session_args a = {0};
    int rc = body(&a, argc, argv);
    kvch_options_clear(&a.opts);
    return rc;
}

int session_arg(const char *cmd, kvc_session_args *a, int argc, char **argv, int *i)
{
    const char *o = argv[*i];
    int takes = !strcmp(o, "--model") || !strcmp(o, "--plugin") || !strcmp(o, "--artifact") ||
                !strcmp(o, "--opt");
    if (!strcmp(o, "--exact")) {
        a->exact = 1;
        return 1;
    }
    if (!takes)
        return 0;
    if (*i + 1 >= argc) {
        fprintf(stderr, "kvc %s: %s needs a value\n", cmd, o);
        return -1;
    }
    const char *v = argv[++*i];
    if (!strcmp(o, "--model"))
        a->model = v;
    else if (!strcmp(o, "--plugin"))
        a->plugin = v;
    else if (!strcmp(o, "--artifact"))
        a->artifact = v;
    else {
        char err[256];
        if (kvch_options_add(&a->opts, v, err, sizeof err) != 0) {
            fprintf(stderr, "kvc %s: --opt %s: %s\n", cmd, v, err);
            return -1;
        }
    }
    return 1;
}

/* dst = a copy of src (dst empty). */
static int copy_options(kvch_options *dst, const kvch_options *src, char *err, size_t cap)
{
    for (uint32_t i = 0; i < src->n; i++) {
        size_t len = strlen(src->names[i]) + strlen(src->values[i]) + 2;
        char *kv = malloc(len);
        if (!kv) {
            snprintf(err, cap, "out of memory");
            return -1;
        }
        snprintf(kv, len, "%s=%s", src->names[i], src->values[i]);
        int r = kvch_options_add(dst, kv, err, cap);
        free(kv);
        if (r)
            return -1;
    }
    return 0;
}

/* Tokenizes the calibration text into s->calib and writes s->calib_note;
 * adds calib_note to the create options when the plugin has that option
 * and the user did not give it. */
static int load_calib(kvc_session *s, const char *cmd, const kvc_session_args *a)
{
    char err[1024];
    size_t n_files;
    const char *const *files = session_calib_files(a, &n_files);
    if (kvch_calib_load(s->model.tok, files, n_files, a->calib_tokens, &s->calib, &s->n_calib,
                        s->calib_note, sizeof s->calib_note, err, sizeof err)) {
        fprintf(stderr, "kvc %s: calibration text: %s\n", cmd, err);
        return 1;
    }
    kvch_calib_note_window(s->calib_note, sizeof s->calib_note, session_calib_ctx(a));
    int given = 0;
    for (uint32_t i = 0; i < a->opts.n; i++)
        given |= !strcmp(a->opts.names[i], "calib_note");
    if (!given && session_has_option(s->p, "calib_note")) {
        char kv[sizeof s->calib_note + 16];
        snprintf(kv, sizeof kv, "calib_note=%s", s->calib_note);
        if (kvch_options_add(&s->opts, kv, err, sizeof err)) {
            fprintf(stderr, "kvc %s: %s\n", cmd, err);
            return 1;
        }
    }
    return 0;
}

int session_open(kvc_session *s, const char *cmd, const kvc_session_args *a, uint32_t max_pos)
{
    char err[1024];
    memset(s, 0, sizeof *s);
    if (!a->exact && !a->plugin) {
        fprintf(stderr, "kvc %s: give --plugin NAME|PATH (or --exact for the built-in exact "
                        "attention)\n", cmd);
        return 1;
    }
    if (a->exact && (a->plugin || a->opts.n || a->artifact)) {
        fprintf(stderr, "kvc %s: --exact takes no --plugin, --opt or --artifact\n", cmd);
        return 1;
    }
    if (kvch_model_open(a->model, &s->model, err, sizeof err) != KVC_OK) {
        fprintf(stderr, "kvc %s: %s\n", cmd, err);
        return 1;
    }
    const uint32_t n_ctx_train = s->model.llama->hp.n_ctx_train;
    if (max_pos > n_ctx_train)
        fprintf(stderr, "kvc %s: warning: %u positions exceed the model's training context %u\n",
                cmd, max_pos, n_ctx_train);
    kvch_llama_geometry(s->model.llama, max_pos > n_ctx_train ? max_pos : n_ctx_train, &s->geo);
    if (a->exact)
        return 0;

    if (kvch_load(a->plugin, &s->lib, err, sizeof err) != KVC_OK) {
        fprintf(stderr, "kvc %s: %s\n", cmd, err);
        return 1;
    }
    s->p = kvch_plugin_desc(s->lib);
    s->tracker = kvch_tracker_new();
    if (!s->tracker) {
        fprintf(stderr, "kvc %s: out of memory\n", cmd);
        return 1;
    }
    s->log = (kvch_logger){KVC_LOG_WARN, stderr, s->p->id};
    kvch_tracker_host(s->tracker, &s->log, &s->host);
    if (a->artifact &&
        kvch_read_file(a->artifact, (char **)&s->artifact, &s->artifact_size, err, sizeof err)) {
        fprintf(stderr, "kvc %s: --artifact %s\n", cmd, err);
        return 1;
    }
    if (copy_options(&s->opts, &a->opts, err, sizeof err)) {
        fprintf(stderr, "kvc %s: %s\n", cmd, err);
        return 1;
    }
    const uint64_t caps = s->p->caps;
    const int prep = (caps & (KVC_CAP_NEEDS_WEIGHTS | KVC_CAP_NEEDS_CALIBRATION)) && !a->artifact;
    const int autop = prep && !a->no_autoprep;
    char model_path[4096], cache_path[4096] = "";
    if (autop && (caps & KVC_CAP_ARTIFACT)) {
        const char *mp = a->model ? a->model : kvch_default_model(model_path, sizeof model_path);
        int r = autoprep_lookup(s, cmd, a, mp, cache_path, sizeof cache_path);
        if (r <= 0)
            return -r; /* 0: created from the cached artifact; -1: failed (printed) */
    }
    if (prep && (caps & KVC_CAP_NEEDS_CALIBRATION) && load_calib(s, cmd, a))
        return 1;
    if (session_create(s, s->artifact, s->artifact_size, err, sizeof err) != KVC_OK) {
        fprintf(stderr, "kvc %s: %s: create: %s\n", cmd, s->p->id, err);
        return 1;
    }
    if (autop)
        return autoprep_prepare(s, cmd, a, cache_path[0] ? cache_path : NULL);
    return 0;
}

kvc_status session_create(kvc_session *s, const void *artifact, size_t size, char *err,
                          size_t err_size)
{
    if (s->inst)
        s->p->destroy(s->inst);
    s->inst = NULL;
    kvc_create_info ci = {.struct_size = sizeof ci, .host = &s->host, .geometry = &s->geo,
                          .artifact = artifact, .artifact_size = size,
                          .device = KVC_MEM_HOST, .dtype = KVC_DTYPE_F32};
    kvch_options_apply(&s->opts, &ci);
    if (err && err_size)
        err[0] = '\0';
    return s->p->create(&ci, &s->inst, err, err_size);
}

int session_has_option(const kvc_plugin *p, const char *name)
{
    for (uint32_t i = 0; p && i < p->n_options; i++)
        if (p->options[i] && p->options[i]->name && !strcmp(p->options[i]->name, name))
            return 1;
    return 0;
}

int session_sequential(const kvc_session *s, const kvc_session_args *a)
{
    int seq = 0;
    if (s->p && session_has_option(s->p, "refit"))
        for (uint32_t i = 0; i < a->opts.n; i++)
            if (!strcmp(a->opts.names[i], "refit")) {
                const char *v = a->opts.values[i];
                seq = !strcasecmp(v, "true") || !strcmp(v, "1") || !strcasecmp(v, "yes") ||
                      !strcasecmp(v, "on");
            }
    return seq;
}

const char *const *session_calib_files(const kvc_session_args *a, size_t *n)
{
    if (a->calib && a->n_calib) {
        *n = a->n_calib;
        return a->calib;
    }
    return kvch_calib_defaults(n);
}

uint32_t session_calib_ctx(const kvc_session_args *a)
{
    return a->calib_ctx ? a->calib_ctx : 512;
}

int session_kv(kvc_session *s, const char *cmd, uint32_t max_batch)
{
    char err[1024];
    kvc_status st = s->p ? kvch_kv_plugin(s->p, s->inst, &s->kv, err, sizeof err)
                         : kvch_kv_exact(&s->geo, &s->kv, err, sizeof err);
    if (!st)
        st = kvch_llama_ctx_new(s->model.llama, max_batch, &s->ctx, err, sizeof err);
    if (st) {
        fprintf(stderr, "kvc %s: %s\n", cmd, err);
        return 1;
    }
    return 0;
}

uint64_t session_close(kvc_session *s)
{
    kvch_llama_ctx_free(s->ctx);
    kvch_kv_free(s->kv);
    if (s->p && s->inst)
        s->p->destroy(s->inst);
    uint64_t leaks = 0;
    if (s->tracker) {
        kvch_tracker_stats ts;
        kvch_tracker_get(s->tracker, &ts);
        if (ts.live)
            leaks = kvch_tracker_leak_report(s->tracker, stderr);
        kvch_tracker_free(s->tracker);
    }
    kvch_unload(s->lib);
    free(s->artifact);
    free(s->calib);
    kvch_options_clear(&s->opts);
    kvch_model_close(&s->model);
    memset(s, 0, sizeof *s);
    return leaks;
}

void session_label(const kvc_session *s, const kvc_session_args *a, char *buf, size_t cap)
{
    if (!s->p) {
        snprintf(buf, cap, "exact (built-in)");
        return;
    }
    size_t n = (size_t)snprintf(buf, cap, "%s", s->p->id);
    for (uint32_t i = 0; i < a->opts.n && n < cap; i++)
        n += (size_t)snprintf(buf + n, cap - n, "%s%s=%s", i ? "," : " (", a->opts.names[i],
                              a->opts.values[i]);
    if (a->opts.n && n < cap)
        snprintf(buf + n, cap - n, ")");
}

void json_str(FILE *f, const char *s)
{
    fputc('"', f);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\')
            fprintf(f, "\\%c", *p);
        else if (*p == '\n')
            fputs("\\n", f);
        else if (*p < 0x20)
            fprintf(f, "\\u%04x", *p);
        else
            fputc(*p, f);
    }
    fputc('"', f);
}
