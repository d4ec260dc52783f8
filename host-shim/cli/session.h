/*
 * session.h -- what kvc ppl / generate / prepare set up alike: the model,
 * a plugin instance on the model's geometry behind a tracking allocator
 * (or the built-in exact store), a KV store and a forward-pass context.
 */
#ifndef KVC_CLI_SESSION_H
#define KVC_CLI_SESSION_H

#include <stdio.h>

#include "kvch.h"
#include "run.h"

typedef struct kvc_session {
    kvch_model model;
    kvch_plugin *lib;      /* NULL on the built-in exact path */
    const kvc_plugin *p;   /* lib's descriptor */
    kvch_tracker *tracker; /* every byte the plugin allocates */
    kvch_logger log;
    kvc_host host;
    kvc_geometry geo;
    kvc_instance *inst;
    kvch_kv *kv;           /* NULL until session_kv */
    kvch_llama_ctx *ctx;
    void *artifact;        /* file contents given to create, or NULL */
    size_t artifact_size;
    kvch_options opts;     /* the options create got: the command line's (+ calib_note) */
    /* When the plugin needs preparation, no --artifact was given and no
     * cached artifact was used: the calibration tokens (if it needs
     * calibration) and the note naming them, "Apache-2.0:2215 ... (13967
     * tokens, windows of 512)"; NULL, 0 and "" otherwise. */
    int32_t *calib;
    size_t n_calib;
    char calib_note[1024];
} kvc_session;

/* Command-line pieces every model command accepts. */
typedef struct kvc_session_args {
    const char *model;    /* --model, NULL = the default */
    const char *plugin;   /* --plugin; NULL with exact */
    int exact;            /* --exact: the built-in exact path, no plugin */
    const char *artifact; /* --artifact FILE for create, or NULL */
    kvch_options opts;    /* --opt name=value ... */
    /* Set by the command, not parsed here. */
    int no_autoprep;            /* 1: session_open neither prepares nor uses the artifact
                                 * cache (kvc prepare, which prepares itself) */
    const char *const *calib;   /* calibration files; NULL = kvch_calib_defaults() */
    size_t n_calib;
    uint64_t calib_tokens;      /* calibration tokens at most; 0 = all */
    uint32_t calib_ctx;         /* calibration window; 0 = 512 */
} kvc_session_args;

/* Runs a command body with fresh arguments and frees them after: the
 * commands' main(). */
int session_main(int (*body)(kvc_session_args *a, int argc, char **argv), int argc, char **argv);

/* Consumes argv[*i] (and its value) when it is one of --model, --plugin,
 * --exact, --artifact, --opt: returns 1 then, 0 when not one of them, -1
 * on a bad value (message printed with the command name). */
int session_arg(const char *cmd, kvc_session_args *a, int argc, char **argv, int *i);

/* Loads the model, then the plugin (or not, with exact) and creates its
 * instance with max_positions = max_pos. Prints errors prefixed by cmd;
 * returns 0 or 1.
 *
 * A plugin that needs preparation (KVC_CAP_NEEDS_WEIGHTS or
 * KVC_CAP_NEEDS_CALIBRATION) given no --artifact: session_open tokenizes
 * the calibration text (a->calib..., when it needs calibration) into
 * s->calib, and when the plugin has a "calib_note" option the user did not
 * give, creates with calib_note = s->calib_note. Then, unless
 * a->no_autoprep, it prepares the instance itself through the artifact
 * cache (autoprep.h): a cached artifact for the same model, plugin,
 * options and calibration is loaded instead when there is one; otherwise
 * the instance is prepared (progress on stderr) and its artifact cached.
 * With a->no_autoprep the instance comes back unprepared. */
int session_open(kvc_session *s, const char *cmd, const kvc_session_args *a, uint32_t max_pos);

/* Destroys s->inst if any, then creates it from s->opts on s->geo, loading
 * artifact [size] when not NULL. Returns the plugin's status, its message
 * in err. */
kvc_status session_create(kvc_session *s, const void *artifact, size_t size, char *err,
                          size_t err_size);

/* 1 when p's option table has an option called name. */
int session_has_option(const kvc_plugin *p, const char *name);

/* 1 when the plugin has an option "refit" and a sets it to true/1/yes/on:
 * calibrate sequentially (kvch_prepare_params.sequential). */
int session_sequential(const kvc_session *s, const kvc_session_args *a);

/* The calibration settings of a, defaults filled in. */
const char *const *session_calib_files(const kvc_session_args *a, size_t *n);
uint32_t session_calib_ctx(const kvc_session_args *a);

/* Opens the KV store (plugin sequence or exact) and a forward context of
 * max_batch tokens. Returns 0 or 1 (message printed). The plugin must be
 * ready (prepared or needing no preparation). */
int session_kv(kvc_session *s, const char *cmd, uint32_t max_batch);

/* Frees everything; reports leaks at the tracking allocator on stderr and
 * returns their count. */
uint64_t session_close(kvc_session *s);

/* "full (fp16)"-style label: the plugin id and its options, or "exact". */
void session_label(const kvc_session *s, const kvc_session_args *a, char *buf, size_t cap);

/* Writes s as a JSON string literal (quotes, escapes) to f. */
void json_str(FILE *f, const char *s);

/* Monotonic seconds. */
double session_now(void);

#endif
