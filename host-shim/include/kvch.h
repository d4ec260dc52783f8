/*
 * kvch.h -- libkvc-host: what a host needs around abi/kvc.h.
 *
 *  - loading a plugin by path or by name (KVC_PLUGIN_PATH, then the install
 *    directory), with version negotiation and errors in words;
 *  - a tracking allocator implementing kvc_host.alloc/free: current and
 *    peak bytes per memory kind, failure injection, guard bytes, a leak
 *    report;
 *  - a logger implementing kvc_host.log;
 *  - option parsing helpers ("name=value").
 *
 * Prefix kvch_. Every function documents ownership and threading. No
 * function prints unless it takes a FILE*.
 */
#ifndef KVCH_H
#define KVCH_H

#include <stdint.h>
#include <stdio.h>

#include "kvc.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvch_logger kvch_logger; /* defined below */

/* ---- loading ------------------------------------------------------------ */

typedef struct kvch_plugin kvch_plugin; /* a loaded plugin: dl handle + descriptor */

/* Loads a plugin. `what` is a path (contains '/' or ends in ".so") or a
 * name: "full" is looked up as "kvc-full.so" in each directory of
 * $KVC_PLUGIN_PATH (':'-separated), then in the install directory
 * (kvch_install_dir()). Checks: dlopen (dlerror() text on failure), the
 * entry symbol, the plugin's answer for this host's ABI version (a plugin of
 * another major is named with its major), descriptor struct_size, required
 * fields and function pointers of ABI 1.0 (and seq_describe when a 1.2
 * descriptor's struct_size holds it). On failure returns non-OK, *out
 * untouched, and writes a NUL-terminated reason to err (err_size bytes at
 * most; err may be NULL). [any-thread] The returned object is owned by the
 * caller: kvch_unload(). */
kvc_status kvch_load(const char *what, kvch_plugin **out, char *err, size_t err_size);

/* dlcloses the plugin. Every instance made from it must be destroyed first.
 * NULL is a no-op. */
void kvch_unload(kvch_plugin *p);

/* The descriptor (valid until kvch_unload) and the resolved file path. */
const kvc_plugin *kvch_plugin_desc(const kvch_plugin *p);
const char *kvch_plugin_path(const kvch_plugin *p);

/* seq_describe of ABI 1.2 with the allocation done: the plugin's text for
 * `layer` of sequence s (one line per KV head of the shard, "head <h>"
 * then key=value words, always a tokens= word) in *text_out, malloc'd,
 * NUL-terminated; the caller frees it. p is the sequence's plugin
 * (kvch_plugin_desc). Returns KVC_E_UNSUPPORTED, *text_out untouched, when
 * the descriptor predates 1.2 (a 1.0/1.1 plugin has no seq_describe);
 * otherwise the plugin's status (INVALID for a layer out of range) with
 * its seq_message in err, NOMEM, or INTERNAL when the plugin breaks the
 * size-then-copy protocol. [sequence-owner of s] */
kvc_status kvch_seq_describe(const kvc_plugin *p, const kvc_seq *s, uint32_t layer,
                             char **text_out, char *err, size_t err_size);

/* The directory plugins are installed in ($libdir/kvc), as configured. */
const char *kvch_install_dir(void);

/* Calls fn(user, path) for every file named kvc-*.so in the search
 * directories ($KVC_PLUGIN_PATH, then the install directory), in that
 * order, sorted by name within a directory, skipping a name already seen in
 * an earlier directory. Returns the number of files reported. */
int kvch_find_plugins(void (*fn)(void *user, const char *path), void *user);

/* Writes the capability bits as words ("cpu cuda export ...") into buf. */
void kvch_caps_string(uint64_t caps, char *buf, size_t buf_size);

/* "invalid argument", "out of memory", ... for a kvc_status. Static. */
const char *kvch_status_string(kvc_status s);

/* ---- tracking allocator -------------------------------------------------- */

typedef struct kvch_tracker kvch_tracker;

typedef struct kvch_tracker_stats {
    uint64_t current[2]; /* bytes live, per KVC_MEM_HOST / KVC_MEM_CUDA */
    uint64_t peak[2];    /* highest `current` seen */
    uint64_t n_alloc;    /* successful allocations */
    uint64_t n_free;     /* frees of live pointers */
    uint64_t n_failed;   /* allocations refused (injected or real) */
    uint64_t n_bad_free; /* frees of unknown pointers or with a wrong size/kind */
    uint64_t n_overrun;  /* frees whose guard bytes were overwritten */
    uint64_t live;       /* allocations not yet freed */
} kvch_tracker_stats;

/* New tracker; NULL when out of memory. Host memory comes from the C heap,
 * surrounded by guard bytes; CUDA memory from cudaMalloc when the library
 * was built with CUDA, else such requests fail. [any-thread] */
kvch_tracker *kvch_tracker_new(void);

/* Frees the tracker's own memory (not live allocations: call
 * kvch_tracker_leak_report first). NULL is a no-op. */
void kvch_tracker_free(kvch_tracker *t);

/* Fills *host with this tracker's alloc/free and the given logger (may be
 * NULL; copied by value, but its prefix string must stay valid). The
 * tracker must outlive every instance using *host. */
void kvch_tracker_host(kvch_tracker *t, const kvch_logger *log, kvc_host *host);

/* Makes the n-th allocation from now (1 = the next) fail; 0 disables.
 * Only that one fails. [any-thread] */
void kvch_tracker_fail_nth(kvch_tracker *t, uint64_t n);

/* Makes every allocation from the n-th on fail; 0 disables. [any-thread] */
void kvch_tracker_fail_from(kvch_tracker *t, uint64_t n);

/* Snapshot of the counters. [any-thread] */
void kvch_tracker_get(const kvch_tracker *t, kvch_tracker_stats *out);

/* Sets peak to current. [any-thread] */
void kvch_tracker_reset_peak(kvch_tracker *t);

/* Writes one line per live allocation (size, kind, usage) and a summary
 * to f; returns the number of live allocations. */
uint64_t kvch_tracker_leak_report(const kvch_tracker *t, FILE *f);

/* ---- logger -------------------------------------------------------------- */

/* Messages at or below `level` (KVC_LOG_*) go to `out` as
 * "kvc[prefix] level: message\n". Plain struct, no allocation. */
struct kvch_logger {
    int32_t level;
    FILE *out;          /* NULL = stderr */
    const char *prefix; /* e.g. the plugin id; may be NULL */
};

/* kvc_host.log-compatible callback; user_data is a kvch_logger*. */
void kvch_log_cb(void *user_data, int32_t level, const char *msg);

/* ---- options ------------------------------------------------------------- */

#define KVCH_MAX_OPTIONS 64

/* "name=value" pairs split for kvc_create_info. Strings point into a copy
 * owned by the struct. */
typedef struct kvch_options {
    uint32_t n;
    const char *names[KVCH_MAX_OPTIONS];
    const char *values[KVCH_MAX_OPTIONS];
    char *storage[KVCH_MAX_OPTIONS];
} kvch_options;

/* Adds one "name=value". Returns 0, or -1 with a reason in err (no '=',
 * empty name, table full, out of memory). A later name replaces an earlier
 * one. */
int kvch_options_add(kvch_options *o, const char *kv, char *err, size_t err_size);

/* Frees the copies; leaves an empty table. */
void kvch_options_clear(kvch_options *o);

/* Fills info->n_options/option_names/option_values from o. */
void kvch_options_apply(const kvch_options *o, kvc_create_info *info);

#ifdef __cplusplus
}
#endif

#endif /* KVCH_H */
