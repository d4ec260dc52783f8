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
} kvc_session;

/* Command-line pieces every model command accepts. */
typedef struct kvc_session_args {
    const char *model;    /* --model, NULL = the default */
    const char *plugin;   /* --plugin; NULL with exact */
    int exact;            /* --exact: the built-in exact path, no plugin */
    const char *artifact; /* --artifact FILE for create, or NULL */
    kvch_options opts;    /* --opt name=value ... */
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
 * returns 0 or 1. */
int session_open(kvc_session *s, const char *cmd, const kvc_session_args *a, uint32_t max_pos);

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
