/*
 * stream.h -- a stream of random tokens (queries, pre-RoPE keys, values,
 * positions with optional gaps) and its float64 attention oracle, for the
 * tests that drive kvc-full.so (test_full.c, test_full_quant.c).
 */
#ifndef KVC_TEST_STREAM_H
#define KVC_TEST_STREAM_H

#include <check.h>

#include "harness.h"
#include "kvck.h"

#define OPEN_FULL(e)                                                                        \
    char err_[512];                                                                         \
    ck_assert_msg(th_open(&(e), "full", err_, sizeof err_) == 0, "load full: %s", err_)

/* ---- a stream of tokens with a float64 oracle ----------------------------- */

typedef struct stream {
    kvc_geometry g;
    kvck_rope rope;
    kvck_dense dense;
    size_t n;        /* tokens generated */
    int32_t *pos;    /* [cap] */
    float *q, *k, *v; /* [cap][heads][d] pre-RoPE */
} stream;

static inline void stream_init(stream *s, const kvc_geometry *g, size_t cap, uint64_t *rng, int gaps)
{
    memset(s, 0, sizeof *s);
    s->g = *g;
    ck_assert_int_eq(kvck_rope_init(&s->rope, g->rope_style, (int)g->head_dim,
                                    (int)(g->rope_dims ? g->rope_dims : g->head_dim),
                                    g->rope_theta, g->rope_inv_freq, g->rope_mscale),
                     0);
    uint32_t n_kv = g->kv_head_count ? g->kv_head_count : g->n_kv_heads;
    size_t group = g->n_heads / g->n_kv_heads;
    s->dense.rope = &s->rope;
    s->dense.scale = g->attn_scale > 0 ? g->attn_scale : 1.0f / sqrtf((float)g->head_dim);
    s->dense.window = g->sliding_window;
    s->dense.n_heads = n_kv * group;
    s->dense.n_kv_heads = n_kv;
    s->dense.head_dim = g->head_dim;
    s->pos = malloc(cap * sizeof(int32_t));
    s->q = malloc(cap * s->dense.n_heads * g->head_dim * sizeof(float));
    s->k = malloc(cap * n_kv * g->head_dim * sizeof(float));
    s->v = malloc(cap * n_kv * g->head_dim * sizeof(float));
    int32_t p = 0;
    for (size_t i = 0; i < cap; i++) {
        p += (gaps && th_next(rng) % 5 == 0) ? 1 + (int32_t)(th_next(rng) % 7) : 1;
        s->pos[i] = p - 1;
    }
    th_fill(rng, s->q, cap * s->dense.n_heads * g->head_dim);
    th_fill(rng, s->k, cap * n_kv * g->head_dim);
    th_fill(rng, s->v, cap * n_kv * g->head_dim);
    /* Scale keys up so softmax is peaked, not uniform: a harder test. */
    for (size_t i = 0; i < cap * n_kv * g->head_dim; i++)
        s->k[i] *= 3.0f;
}

static inline void stream_free(stream *s)
{
    free(s->pos), free(s->q), free(s->k), free(s->v);
}

static inline size_t qrow(const stream *s) { return s->dense.n_heads * s->g.head_dim; }
static inline size_t krow(const stream *s) { return s->dense.n_kv_heads * s->g.head_dim; }

/* Appends tokens [t0, t0+n) to `layer` and attends their queries. */
static inline kvc_status step(const th_env *e, kvc_seq *seq, const stream *s, uint32_t layer, size_t t0,
                       size_t n, float *out)
{
    kvc_status st = e->p->append(seq, layer, (uint32_t)n, s->pos + t0, s->k + t0 * krow(s),
                                 s->v + t0 * krow(s), NULL);
    if (st)
        return st;
    return e->p->attend(seq, layer, (uint32_t)n, s->pos + t0, s->q + t0 * qrow(s), out);
}

/* Tokens [0, total) of `s` through `seq` at `layer` in batches: the first
 * of `first` tokens, then 1 .. max_batch at random; outputs into out
 * [total][qrow]. */
static inline void run_batches(const th_env *e, kvc_seq *seq, const stream *s, uint32_t layer,
                               size_t total, size_t first, size_t max_batch, uint64_t *rng,
                               float *out)
{
    for (size_t t = 0; t < total;) {
        size_t n = t == 0 ? first : 1 + (size_t)(th_next(rng) % max_batch);
        n = n < total - t ? n : total - t;
        kvc_status st = step(e, seq, s, layer, t, n, out + t * qrow(s));
        ck_assert_msg(st == KVC_OK, "step at %zu (+%zu): %s", t, n, e->p->seq_message(seq));
        t += n;
    }
}

/* Size-then-copy export; the malloc'd blob in *blob, its size returned. */
static inline size_t export_blob(const th_env *e, kvc_seq *seq, void **blob)
{
    size_t need = 0, got = 0;
    ck_assert_int_eq(e->p->seq_export(seq, NULL, 0, &need), KVC_OK);
    *blob = malloc(need);
    ck_assert_int_eq(e->p->seq_export(seq, *blob, need, &got), KVC_OK);
    ck_assert_uint_eq(got, need);
    return need;
}

/* Reference output of queries [t0, t0+n) over keys [0, t0+n). */
static inline void oracle(const stream *s, size_t t0, size_t n, double *ref)
{
    kvck_attention_ref(&s->dense, n, s->pos + t0, s->q + t0 * qrow(s), t0 + n, s->pos, s->k,
                       s->v, ref);
}

#endif
