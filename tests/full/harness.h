/*
 * harness.h -- helpers for tests that drive a plugin through the ABI:
 * loading, a tracked host, geometry presets, random data, error norms.
 */
#ifndef KVC_TEST_HARNESS_H
#define KVC_TEST_HARNESS_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
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

/* 1 when the line [line, line+len) has the space-separated word `w`. */
static inline int th_line_has_word(const char *line, size_t len, const char *w)
{
    size_t wl = strlen(w);
    for (size_t i = 0; i + wl <= len; i++)
        if ((i == 0 || line[i - 1] == ' ') && memcmp(line + i, w, wl) == 0 &&
            (i + wl == len || line[i + wl] == ' '))
            return 1;
    return 0;
}

/* seq_describe (ABI 1.2) of `layer` against what the caller knows: the
 * size query; KVC_E_BUFFER with the same size on a 1-byte buffer, nothing
 * past buf[0] written (guard bytes); then the text: exactly n_kv lines
 * "head <h> ..." in order, each with the word tokens=<tokens> and, when
 * `word` is not NULL, that word too; KVC_E_INVALID for layer n_layers and
 * for a NULL size. Returns 0 with the text in *text_out (malloc'd, caller
 * frees; text_out may be NULL), or -1 with the problem in why. */
static inline int th_check_describe(const th_env *e, const kvc_seq *s, uint32_t n_layers,
                                    uint32_t layer, uint32_t n_kv, uint32_t tokens,
                                    const char *word, char **text_out, char *why, size_t cap)
{
    size_t need = 0, got = 0;
    kvc_status st = e->p->seq_describe(s, layer, NULL, 0, &need);
    if (st != KVC_OK || need < 2)
        return snprintf(why, cap, "size query: status %d, size %zu: %s", st, need,
                        e->p->seq_message(s)), -1;
    char small[16];
    memset(small, 0x5a, sizeof small);
    st = e->p->seq_describe(s, layer, small + 4, 1, &got);
    for (size_t i = 0; i < sizeof small; i++)
        if (i != 4 && small[i] != 0x5a)
            return snprintf(why, cap, "1-byte buffer: byte %d written", (int)i - 4), -1;
    if (st != KVC_E_BUFFER || got != need)
        return snprintf(why, cap, "1-byte buffer: status %d (want %d), size %zu (want %zu)", st,
                        KVC_E_BUFFER, got, need), -1;
    if (!e->p->seq_message(s)[0])
        return snprintf(why, cap, "KVC_E_BUFFER without a message"), -1;
    char *text = malloc(need + 8);
    if (!text)
        return snprintf(why, cap, "out of memory"), -1;
    memset(text, 0x5a, need + 8);
    got = 0;
    st = e->p->seq_describe(s, layer, text, need, &got);
    int bad = st != KVC_OK || got != need || text[need - 1] != '\0' || strlen(text) != need - 1;
    for (size_t i = need; i < need + 8; i++)
        bad |= text[i] != 0x5a;
    if (bad) {
        snprintf(why, cap, "copy: status %d, size %zu of %zu, text not NUL-terminated at its "
                 "size or written past it", st, got, need);
        free(text);
        return -1;
    }
    const char *line = text;
    for (uint32_t h = 0; h < n_kv; h++) {
        const char *nl = strchr(line, '\n');
        char head[32], tok[40];
        snprintf(head, sizeof head, "head %u ", h);
        snprintf(tok, sizeof tok, "tokens=%u", tokens);
        if (!nl || strncmp(line, head, strlen(head)) != 0 ||
            !th_line_has_word(line, (size_t)(nl - line), tok) ||
            (word && !th_line_has_word(line, (size_t)(nl - line), word))) {
            snprintf(why, cap, "line %u is not \"%s... %s%s%s\": %s", h, head, tok,
                     word ? " " : "", word ? word : "", text);
            free(text);
            return -1;
        }
        line = nl + 1;
    }
    if (*line) {
        snprintf(why, cap, "more than %u lines: %s", n_kv, text);
        free(text);
        return -1;
    }
    st = e->p->seq_describe(s, n_layers, NULL, 0, &got);
    kvc_status st2 = e->p->seq_describe(s, layer, NULL, 0, NULL);
    if (st != KVC_E_INVALID || st2 != KVC_E_INVALID) {
        snprintf(why, cap, "layer %u: status %d, NULL size: status %d (want INVALID)", n_layers,
                 st, st2);
        free(text);
        return -1;
    }
    if (text_out)
        *text_out = text;
    else
        free(text);
    return 0;
}

#endif
