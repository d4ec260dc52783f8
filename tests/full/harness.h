/*
 * harness.h -- helpers for tests that drive a plugin through the ABI:
 * loading, a tracked host, geometry presets, random data, error norms.
 */
#ifndef KVC_TEST_HARNESS_H
#define KVC_TEST_HARNESS_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kvc.h"
#include "kvch.h"

/* A loaded plugin with a tracked host. */
typedef struct th_env {
    kvch_plugin *lib;
    const kvc_plugin *p;
    kvch_tracker *tr;
    kvch_logger log;
    kvc_host host;
} th_env;

/* Loads `name` (through KVC_PLUGIN_PATH) with a fresh tracker; returns 0 or
 * -1 with the reason in err. */
static inline int th_open(th_env *e, const char *name, char *err, size_t err_size)
{
    memset(e, 0, sizeof *e);
    if (kvch_load(name, &e->lib, err, err_size) != KVC_OK)
        return -1;
    e->p = kvch_plugin_desc(e->lib);
    e->tr = kvch_tracker_new();
    e->log.level = KVC_LOG_WARN;
    e->log.out = NULL;
    e->log.prefix = name;
    kvch_tracker_host(e->tr, &e->log, &e->host);
    return 0;
}

static inline void th_close(th_env *e)
{
    kvch_tracker_free(e->tr);
    kvch_unload(e->lib);
    memset(e, 0, sizeof *e);
}

static inline uint64_t th_live_bytes(const th_env *e)
{
    kvch_tracker_stats st;
    kvch_tracker_get(e->tr, &st);
    return st.current[KVC_MEM_HOST];
}

/* SmolLM2-135M's attention shape. */
static inline kvc_geometry th_smollm2(void)
{
    kvc_geometry g;
    memset(&g, 0, sizeof g);
    g.struct_size = sizeof g;
    g.n_layers = 30;
    g.n_heads = 9;
    g.n_kv_heads = 3;
    g.head_dim = 64;
    g.hidden_size = 576;
    g.max_positions = 1 << 17;
    g.rope_style = KVC_ROPE_ADJACENT;
    g.rope_theta = 100000.0f;
    return g;
}

/* create() with "name=value" strings (NULL-terminated list, may be NULL). */
static inline kvc_status th_create(const th_env *e, const kvc_geometry *g,
                                   const char *const *opts, kvc_instance **out, char *msg,
                                   size_t msg_size)
{
    const char *names[16], *values[16];
    char store[16][64];
    uint32_t n = 0;
    for (; opts && opts[n] && n < 16; n++) {
        strncpy(store[n], opts[n], sizeof store[n] - 1);
        store[n][sizeof store[n] - 1] = 0;
        char *eq = strchr(store[n], '=');
        if (eq)
            *eq = 0;
        names[n] = store[n];
        values[n] = eq ? eq + 1 : "";
    }
    kvc_create_info ci;
    memset(&ci, 0, sizeof ci);
    ci.struct_size = sizeof ci;
    ci.host = &e->host;
    ci.geometry = g;
    ci.n_options = n;
    ci.option_names = names;
    ci.option_values = values;
    ci.device = KVC_MEM_HOST;
    ci.dtype = KVC_DTYPE_F32;
    return e->p->create(&ci, out, msg, msg_size);
}

/* xorshift64*: reproducible data from a printed seed. */
static inline uint64_t th_next(uint64_t *s)
{
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 2685821657736338717ull;
}
static inline float th_uniform(uint64_t *s) /* [-1, 1) */
{
    return (float)((th_next(s) >> 40) * (2.0 / 16777216.0) - 1.0);
}
static inline void th_fill(uint64_t *s, float *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        x[i] = th_uniform(s);
}

/* ||a - b|| / ||b|| with b in double. */
static inline double th_rel_err(const float *a, const double *b, size_t n)
{
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - b[i];
        num += d * d;
        den += b[i] * b[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}
static inline double th_rel_err_f(const float *a, const float *b, size_t n)
{
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - b[i];
        num += d * d;
        den += (double)b[i] * b[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

#endif
