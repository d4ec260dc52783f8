/*
 * autoprep.h -- preparation on demand, behind session_open: when a plugin
 * needs weights or calibration and no --artifact was given, the host
 * prepares the instance itself and caches its artifact, keyed by model,
 * plugin, options and calibration, so that the next run with the same
 * inputs loads it instead.
 *
 * Cache directory: $KVC_ARTIFACT_CACHE, else $XDG_CACHE_HOME/kvc/artifacts,
 * else ~/.cache/kvc/artifacts; KVC_ARTIFACT_CACHE=off prepares every time
 * and keeps nothing. Files: <plugin id>-<16 hex digits of the key>.kvca,
 * written atomically (a temporary file renamed into place).
 *
 * The pure pieces (key, paths, the atomic write) are separate functions so
 * that tests link this file and call them.
 */
#ifndef KVC_CLI_AUTOPREP_H
#define KVC_CLI_AUTOPREP_H

#include <stddef.h>
#include <stdint.h>

#include "session.h"

/* Bytes of the model file hashed at each end: its identity is its size and
 * its first and last AUTOPREP_MODEL_ENDS bytes (a moved or copied model
 * keeps its key; an edited one almost surely does not). */
#define AUTOPREP_MODEL_ENDS ((size_t)1 << 20)

/* What the cache key covers. */
typedef struct autoprep_key_in {
    const char *model_path;     /* read: size, first and last AUTOPREP_MODEL_ENDS bytes */
    const char *plugin_id;
    const char *plugin_version; /* NULL = "" */
    const char *plugin_path;    /* the plugin's file, hashed whole (a rebuilt plugin of the
                                 * same version misses); NULL = not part of the key */
    const kvch_options *opts;   /* as given, order irrelevant; calib_note left out */
    const char *const *calib;   /* calibration files (paths as given), in order; */
    size_t n_calib;             /* 0 when the plugin needs no calibration */
    uint64_t calib_tokens;      /* calibration token cap, 0 = all */
    uint32_t calib_ctx;         /* calibration window */
    uint32_t max_positions;     /* the geometry's (an artifact names its geometry) */
} autoprep_key_in;

/* 64-bit FNV-1a of data [n], continuing from h (start with
 * AUTOPREP_FNV_OFFSET). */
#define AUTOPREP_FNV_OFFSET UINT64_C(0xcbf29ce484222325)
uint64_t autoprep_fnv1a(uint64_t h, const void *data, size_t n);

/* The key of in: FNV-1a over a versioned, length-prefixed serialization of
 * every field. Returns 0, or -1 with err naming the model file when it
 * cannot be read. */
int autoprep_key(const autoprep_key_in *in, uint64_t *key, char *err, size_t err_size);

/* The cache directory into buf [cap]: 1 when caching is on, 0 when
 * KVC_ARTIFACT_CACHE=off, -1 when there is no place for it (no HOME, or
 * the path does not fit). Does not create it. */
int autoprep_cache_dir(char *buf, size_t cap);

/* mkdir -p dir (mode 0777 less umask). Returns 0, or -1 with err. */
int autoprep_mkdirs(const char *dir, char *err, size_t err_size);

/* "<dir>/<plugin id>-<16 hex>.kvca" into buf [cap] (characters of the id
 * other than [A-Za-z0-9._-] become '_'). Returns 0, or -1 when it does
 * not fit. */
int autoprep_path(char *buf, size_t cap, const char *dir, const char *plugin_id, uint64_t key);

/* Writes data [size] to path atomically: to "<path>.tmp.<pid>", fsync,
 * rename over path. Returns 0, or -1 with err (the temporary file
 * removed). */
int autoprep_write_atomic(const char *path, const void *data, size_t size, char *err,
                          size_t err_size);

/* ---- session_open's two steps ----------------------------------------------- */

/* With s's model and plugin loaded (no instance yet): computes the key and
 * looks in the cache. Hit: creates s->inst from the cached artifact (the
 * contents kept in s->artifact), prints "kvc CMD: using cached ID artifact
 * PATH" and returns 0. A cached artifact the plugin refuses (CORRUPT,
 * VERSION, INVALID) is reported as a warning and removed, and counts as a
 * miss. Miss: returns 1 with the path to write to in cache_path [cap], or
 * "" when caching is off or impossible (a warning says why). -1: an error,
 * printed. */
int autoprep_lookup(kvc_session *s, const char *cmd, const kvc_session_args *a,
                    const char *model_path, char *cache_path, size_t cap);

/* Prepares s->inst (created, unprepared; s->calib loaded when the plugin
 * needs calibration): weights and calibration through kvch_prepare, with
 * progress on stderr; sequential when the plugin has an option "refit"
 * that a sets true. Then, when cache_path is not NULL and the plugin has
 * KVC_CAP_ARTIFACT, saves the artifact there (a failure to write it is a
 * warning). Returns 0, or 1 on an error (printed). */
int autoprep_prepare(kvc_session *s, const char *cmd, const kvc_session_args *a,
                     const char *cache_path);

#endif
