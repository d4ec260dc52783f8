/*
 * kvc-fastgen.so append, attend, materialize, truncate.
 *
 * append only queues (keys rotated once). attend runs the steps: on a
 * layer's first attend the prompt is admitted whole, attended with all of
 * it visible, profiled and compressed; afterwards each query first admits
 * the pending tokens up to its position, then attends over every head's
 * kept tokens, adds its probabilities to their cumulative scores, and
 * evicts. Every allocation of a call happens before its first step, so a
 * call that fails with NOMEM has changed nothing.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "fastgen.h"

/* Prompt queries per pass over a head's keys: bounds the score matrix. */
#define FG_Q_CHUNK 32u

/* ---- append ----------------------------------------------------------------------- */

kvc_status fg_append(kvc_seq *s, uint32_t layer, uint32_t n, const int32_t *positions,
                     const void *k_pre, const void *v, const uint8_t *flags)
{
    if (!s)
        return KVC_E_INVALID;
    const kvc_instance *in = s->inst;
    const kvcp_geom *g = &in->g;
    int64_t last = layer < g->n_layers ? s->layers[layer].last_pos : -1;
    kvc_status st = kvcp_check_append(g, layer, n, positions, k_pre, v, last, s->msg,
                                      sizeof s->msg);
    if (st)
        return st;
    size_t count = (size_t)n * g->n_kv * g->head_dim;
    /* Rotated keys; with the Hadamard option the values' rotated copy. */
    const size_t bytes = (in->v_had ? 2 : 1) * count * sizeof(float);
    float *k_rot = kvcp_alloc(&in->host, bytes, KVC_USAGE_SCRATCH);
    if (!k_rot)
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_NOMEM,
                         "append: out of memory for %u rotated keys", n);
    kvck_rope_apply(&g->rope, n, g->n_kv, positions, k_pre, k_rot);
    const float *vs = v;
    if (in->k_had)
        for (size_t r = 0; r < (size_t)n * g->n_kv; r++)
            kvck_hadamard(k_rot + r * g->head_dim, g->head_dim, in->k_signs);
    if (in->v_had) {
        float *vr = k_rot + count;
        memcpy(vr, v, count * sizeof(float));
        for (size_t r = 0; r < (size_t)n * g->n_kv; r++)
            kvck_hadamard(vr + r * g->head_dim, g->head_dim, in->v_signs);
        vs = vr;
    }
    st = fg_pending_push(in, &s->layers[layer], &s->bytes, n, positions, flags, k_rot, vs);
    kvcp_free(&in->host, k_rot, bytes);
    if (st)
        return kvcp_fail(s->msg, sizeof s->msg, st, "append: out of memory for %u tokens", n);
    return KVC_OK;
}

/* ---- one call's scratch ------------------------------------------------------------ */

typedef struct fg_scratch {
    float *q;        /* [n_q][n_q_heads][d] rotated, scaled queries */
    float *qrows;    /* [FG_Q_CHUNK * G][d] one head's query rows */
    float *orows;    /* [FG_Q_CHUNK * G][d] their outputs */
    float *p;        /* [FG_Q_CHUNK * G][max_n] scores -> probabilities */
    float *pooled;   /* [max_n] one query's attention pooled over its G heads */
    float *kbuf;     /* [B][d] widened keys (fp16 storage) */
    float *vbuf;     /* [B][d] widened values */
    int32_t *pos;    /* [max_n] prompt positions, position order */
    uint8_t *flags;  /* [max_n] prompt flags */
    uint64_t *evict; /* [2 * max_n] eviction scratch */
    void *prof;      /* fg_profile memory (prompt only) */
    float *qk;       /* kvck_q_scores / kvck_q_pv scratch (quantized tokens) */
} fg_scratch;

static size_t align64(size_t x)
{
    return (x + 63) & ~(size_t)63;
}

/* Carves (base != NULL) or sizes (base == NULL) the scratch. */
static size_t scratch_layout(const kvc_instance *in, uint32_t n_q, uint64_t max_n, int prompt,
                             char *base, fg_scratch *sc)
{
    const kvcp_geom *g = &in->g;
    const size_t d = g->head_dim, G = g->group, B = in->cfg.block_tokens;
    const size_t rows = (size_t)FG_Q_CHUNK * G;
    size_t qk = 0;
    if (in->quant) {
        size_t a = kvck_q_scratch_floats(&in->kf, rows, B), b = kvck_q_scratch_floats(&in->vf, rows, B);
        qk = (a > b ? a : b) * sizeof(float);
    }
    size_t sizes[12] = {
        (size_t)n_q * g->n_q * d * sizeof(float),
        rows * d * sizeof(float),
        rows * d * sizeof(float),
        rows * (size_t)max_n * sizeof(float),
        (size_t)max_n * sizeof(float),
        B * d * sizeof(float),
        B * d * sizeof(float),
        (size_t)max_n * sizeof(int32_t),
        (size_t)max_n,
        2 * (size_t)max_n * sizeof(uint64_t),
        prompt ? fg_profile_bytes(in, (uint32_t)max_n) : 0,
        qk,
    };
    void **slots[12] = {(void **)&sc->q,     (void **)&sc->qrows, (void **)&sc->orows,
                        (void **)&sc->p,     (void **)&sc->pooled, (void **)&sc->kbuf,
                        (void **)&sc->vbuf,  (void **)&sc->pos,   (void **)&sc->flags,
                        (void **)&sc->evict, (void **)&sc->prof,  (void **)&sc->qk};
    size_t off = 0;
    for (int i = 0; i < 12; i++) {
        if (base)
            *slots[i] = sizes[i] ? base + off : NULL;
        off += align64(sizes[i]);
    }
    return off;
}

/* ---- attention over one head ---------------------------------------------------------- */

/* A block's rows [nb][d] of keys or values (storage at `src`) as floats:
 * in place for fp32, widened into `buf` for fp16. */
static const float *block_rows(const kvc_instance *in, const void *src, uint32_t nb, float *buf)
{
    if (in->cfg.dtype == FG_F32)
        return src;
    kvck_f16_to_f32_n(src, buf, (size_t)nb * in->g.head_dim);
    return buf;
}

/* Attention of `rows` query rows (query r / G at qpos[r / G]) over head
 * h's kept tokens: probabilities into sc->p [rows][h->n], outputs into
 * out [rows][d]. A key is seen iff its position <= the query's and inside
 * the window; a row that sees none gets zeros. Explicit softmax (the
 * probabilities feed the cumulative scores) on the kernels' score, exp and
 * P.V pieces. */
static void head_attend(const kvc_instance *in, const fg_head *h, size_t rows,
                        const float *q, const int32_t *qpos, const fg_scratch *sc, float *out)
{
    const kvcp_geom *g = &in->g;
    const size_t d = g->head_dim, G = g->group, B = in->cfg.block_tokens, n = h->n;
    float *p = sc->p;
    memset(out, 0, rows * d * sizeof(float));
    if (n == 0)
        return;
    for (uint32_t b = 0; b < h->n_blocks; b++) {
        size_t nb = b + 1 == h->n_blocks ? n - b * B : B;
        void *blk = h->blocks[b];
        if (in->quant) {
            kvck_q_scores(&in->kf, KVCK_QS_TOKEN, rows, q, d, nb, fg_blk_k(in, blk),
                          fg_blk_ksz(in, blk), p + b * B, n, sc->qk);
            continue;
        }
        const float *k = block_rows(in, fg_blk_k(in, blk), (uint32_t)nb, sc->kbuf);
        kvck_scores(rows, d, q, d, k, d, nb, p + b * B, n);
    }
    for (size_t r = 0; r < rows; r++) {
        float *pr = p + r * n;
        int32_t qp = qpos[r / G];
        for (uint32_t b = 0; b < h->n_blocks; b++) {
            size_t nb = b + 1 == h->n_blocks ? n - b * B : B;
            const int32_t *kp = fg_blk_pos(in, h->blocks[b]);
            float *pb = pr + b * B;
            for (size_t j = 0; j < nb; j++)
                if (kp[j] > qp || (g->window && (int64_t)qp - kp[j] >= (int64_t)g->window))
                    pb[j] = -INFINITY;
        }
        float m = kvck_row_max(pr, n);
        if (m == -INFINITY) {
            memset(pr, 0, n * sizeof(float));
            continue;
        }
        float inv = 1.0f / kvck_row_exp(pr, n, m);
        for (size_t j = 0; j < n; j++)
            pr[j] *= inv;
    }
    for (uint32_t b = 0; b < h->n_blocks; b++) {
        size_t nb = b + 1 == h->n_blocks ? n - b * B : B;
        void *blk = h->blocks[b];
        if (in->quant) {
            kvck_q_pv(&in->vf, KVCK_QS_TOKEN, rows, p + b * B, n, nb, fg_blk_v(in, blk),
                      fg_blk_vsz(in, blk), out, sc->qk);
            continue;
        }
        const float *v = block_rows(in, fg_blk_v(in, blk), (uint32_t)nb, sc->vbuf);
        kvck_pv(rows, d, p + b * B, n, v, d, nb, out);
    }
}

/* Adds the probabilities of `rows` rows [rows][h->n] to h's scores. */
static void add_scores(const kvc_instance *in, fg_head *h, const float *p, size_t rows)
{
    const uint32_t B = in->cfg.block_tokens;
    for (uint32_t j = 0; j < h->n; j++) {
        float add = 0;
        for (size_t r = 0; r < rows; r++)
            add += p[r * h->n + j];
        fg_blk_score(in, h->blocks[j / B])[j % B] += add;
    }
}

/* Gathers query rows of KV head kh for queries [q0, q0 + nc) and scatters
 * outputs back: rows (i, j) = query i, query head kh * G + j. */
static void gather_q(const kvcp_geom *g, const float *q, uint32_t q0, uint32_t nc, uint32_t kh,
                     float *rows)
{
    const size_t d = g->head_dim, G = g->group;
    for (uint32_t i = 0; i < nc; i++)
        memcpy(rows + (size_t)i * G * d, q + ((size_t)(q0 + i) * g->n_q + kh * G) * d,
               G * d * sizeof(float));
}

static void scatter_out(const kvcp_geom *g, const float *rows, uint32_t q0, uint32_t nc,
                        uint32_t kh, float *out)
{
    const size_t d = g->head_dim, G = g->group;
    for (uint32_t i = 0; i < nc; i++)
        memcpy(out + ((size_t)(q0 + i) * g->n_q + kh * G) * d, rows + (size_t)i * G * d,
               G * d * sizeof(float));
}

/* ---- steps --------------------------------------------------------------------------- */

/* Moves the next pending token into every head (room reserved). */
static void admit_next(const kvc_instance *in, fg_layer *L, fg_bytes *cnt)
{
    fg_pending *c = L->pend;
    const size_t hd = (size_t)in->g.head_dim * in->elem;
    const size_t row = (size_t)in->g.n_kv * hd;
    uint32_t t = c->used;
    /* Storage rows: a quantized row is at most codes of 8 bits plus a scale
     * and zero per group. */
    uint8_t kr[KVCK_MAX_HEAD_DIM * 4 + KVCK_QGROUP_MAX * 4];
    uint8_t vr[KVCK_MAX_HEAD_DIM * 4 + KVCK_QGROUP_MAX * 4];
    for (uint32_t h = 0; h < in->g.n_kv; h++) {
        fg_storage_rows(in, (char *)c->k + t * row + h * hd, (char *)c->v + t * row + h * hd, kr,
                        vr);
        fg_head_push(in, &L->heads[h], kr, vr, c->pos[t], c->flags[t], 0.0f);
    }
    fg_runs_push(L, c->pos[t]);
    L->n_seen++;
    L->last_step_pos = c->pos[t];
    c->used++;
    L->n_pending--;
    fg_pending_pop_used(in, L, cnt);
}

static int32_t next_pending_pos(const fg_layer *L)
{
    return L->pend ? L->pend->pos[L->pend->used] : INT32_MAX;
}

static void evict_all(const kvc_instance *in, fg_layer *L, uint64_t *scratch)
{
    for (uint32_t h = 0; h < in->g.n_kv; h++)
        fg_evict(in, &L->heads[h], L->n_seen, L->last_step_pos, scratch);
}

/* The prompt: admit every pending token up to the last query, attend all
 * queries (nothing evicted yet), profile, choose, compress. */
static void run_prompt(kvc_seq *s, fg_layer *L, uint32_t n_q, const int32_t *qpos, float *out,
                       const fg_scratch *sc, int32_t qmax)
{
    const kvc_instance *in = s->inst;
    const kvcp_geom *g = &in->g;
    const size_t G = g->group;
    while (next_pending_pos(L) <= qmax)
        admit_next(in, L, &s->bytes);
    /* Every head holds the same tokens in position order now. */
    const fg_head *h0 = &L->heads[0];
    const uint32_t n = h0->n, B = in->cfg.block_tokens;
    for (uint32_t j = 0; j < n; j++) {
        void *blk = h0->blocks[j / B];
        sc->pos[j] = fg_blk_pos(in, blk)[j % B];
        sc->flags[j] = fg_blk_flags(in, blk)[j % B];
    }
    fg_profile prof;
    fg_profile_init(in, &prof, n, sc->prof);
    for (uint32_t h = 0; h < g->n_kv; h++) {
        fg_head *hd = &L->heads[h];
        for (uint32_t q0 = 0; q0 < n_q; q0 += FG_Q_CHUNK) {
            uint32_t nc = n_q - q0 < FG_Q_CHUNK ? n_q - q0 : FG_Q_CHUNK;
            gather_q(g, sc->q, q0, nc, h, sc->qrows);
            head_attend(in, hd, (size_t)nc * G, sc->qrows, qpos + q0, sc, sc->orows);
            scatter_out(g, sc->orows, q0, nc, h, out);
            add_scores(in, hd, sc->p, (size_t)nc * G);
            for (uint32_t i = 0; i < nc; i++) {
                /* Pool the query's G rows; it sees tokens with pos <= its own. */
                uint32_t ns = 0;
                while (ns < n && sc->pos[ns] <= qpos[q0 + i])
                    ns++;
                for (uint32_t j = 0; j < ns; j++) {
                    float a = 0;
                    for (size_t r = 0; r < G; r++)
                        a += sc->p[((size_t)i * G + r) * n + j];
                    sc->pooled[j] = a / (float)G;
                }
                fg_profile_row(in, &prof, h, sc->pooled, sc->pos, sc->flags, ns);
            }
        }
    }
    fg_choose(in, &prof, L->heads, sc->pos, sc->flags, n);
    L->profiled = 1;
    evict_all(in, L, sc->evict);
}

/* After the prompt: one query at a time, each preceded by the steps of the
 * tokens up to its position. A query whose own token it admits is that
 * token's step: its probabilities add to the scores and eviction follows.
 * Any other query (a position already stepped, or one without a token)
 * only reads the heads as they are. */
static void run_steps(kvc_seq *s, fg_layer *L, uint32_t n_q, const int32_t *qpos, float *out,
                      const fg_scratch *sc)
{
    const kvc_instance *in = s->inst;
    const kvcp_geom *g = &in->g;
    const size_t G = g->group;
    for (uint32_t i = 0; i < n_q; i++) {
        /* Tokens before the query's position: steps without a query. */
        while (next_pending_pos(L) < qpos[i]) {
            admit_next(in, L, &s->bytes);
            evict_all(in, L, sc->evict);
        }
        int step = next_pending_pos(L) == qpos[i];
        if (step)
            admit_next(in, L, &s->bytes);
        for (uint32_t h = 0; h < g->n_kv; h++) {
            fg_head *hd = &L->heads[h];
            gather_q(g, sc->q, i, 1, h, sc->qrows);
            head_attend(in, hd, G, sc->qrows, qpos + i, sc, sc->orows);
            scatter_out(g, sc->orows, i, 1, h, out);
            if (step)
                add_scores(in, hd, sc->p, G);
        }
        if (step)
            evict_all(in, L, sc->evict);
    }
}

/* Reserves what stepping the pending tokens up to qmax can need: blocks
 * for every head (as if nothing were evicted) and runs. */
static kvc_status reserve_steps(kvc_seq *s, fg_layer *L, int32_t qmax, uint64_t *steps)
{
    const kvc_instance *in = s->inst;
    uint64_t m = 0;
    uint32_t runs = 0;
    int32_t prev = L->last_step_pos;
    int have = L->n_runs > 0;
    for (const fg_pending *c = L->pend; c; c = c->next)
        for (uint32_t t = c->used; t < c->n && c->pos[t] <= qmax; t++) {
            runs += !have || c->pos[t] != prev + 1;
            have = 1;
            prev = c->pos[t];
            m++;
        }
    *steps = m;
    if (fg_runs_reserve(in, L, &s->bytes, runs))
        return KVC_E_NOMEM;
    for (uint32_t h = 0; h < in->g.n_kv; h++)
        if (fg_head_reserve(in, &L->heads[h], &s->bytes, m)) {
            for (uint32_t k = 0; k < h; k++)
                fg_head_trim(in, &L->heads[k], &s->bytes);
            return KVC_E_NOMEM;
        }
    return KVC_OK;
}

static kvc_status check_attend(kvc_seq *s, uint32_t layer, uint32_t n_q,
                               const int32_t *positions, const void *q_pre, const void *out)
{
    return kvcp_check_attend(&s->inst->g, layer, n_q, positions, q_pre, out, s->msg,
                             sizeof s->msg);
}

/* One sequence's attend after its checks. */
static kvc_status attend_one(kvc_seq *s, uint32_t layer, uint32_t n_q, const int32_t *positions,
                             const float *q_pre, float *out)
{
    const kvc_instance *in = s->inst;
    const kvcp_geom *g = &in->g;
    fg_layer *L = &s->layers[layer];
    int32_t qmax = positions[0];
    for (uint32_t i = 1; i < n_q; i++)
        qmax = positions[i] > qmax ? positions[i] : qmax;
    uint64_t steps;
    if (reserve_steps(s, L, qmax, &steps))
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_NOMEM,
                         "attend: out of memory for the blocks of %llu tokens",
                         (unsigned long long)steps);
    uint64_t max_n = 0;
    for (uint32_t h = 0; h < g->n_kv; h++)
        max_n = L->heads[h].n > max_n ? L->heads[h].n : max_n;
    max_n += steps;
    if (max_n == 0)
        max_n = 1;
    int prompt = !L->profiled;
    fg_scratch sc;
    size_t bytes = scratch_layout(in, n_q, max_n, prompt, NULL, &sc);
    char *base = kvcp_alloc(&in->host, bytes, KVC_USAGE_SCRATCH);
    if (!base) {
        for (uint32_t h = 0; h < g->n_kv; h++)
            fg_head_trim(in, &L->heads[h], &s->bytes);
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_NOMEM,
                         "attend: out of memory for scratch (%zu bytes)", bytes);
    }
    scratch_layout(in, n_q, max_n, prompt, base, &sc);
    kvck_rope_apply(&g->rope, n_q, g->n_q, positions, q_pre, sc.q);
    size_t nq_all = (size_t)n_q * g->n_q * g->head_dim;
    for (size_t i = 0; i < nq_all; i++)
        sc.q[i] *= g->scale;
    if (in->k_had) /* keys are kept rotated: so are the queries (q.k unchanged) */
        for (size_t r = 0; r < (size_t)n_q * g->n_q; r++)
            kvck_hadamard(sc.q + r * g->head_dim, g->head_dim, in->k_signs);
    if (prompt)
        run_prompt(s, L, n_q, positions, out, &sc, qmax);
    else
        run_steps(s, L, n_q, positions, out, &sc);
    if (in->v_had) /* outputs are sums of rotated values: rotate back */
        for (size_t r = 0; r < (size_t)n_q * g->n_q; r++)
            kvck_hadamard_inv(out + r * g->head_dim, g->head_dim, in->v_signs);
    for (uint32_t h = 0; h < g->n_kv; h++)
        fg_head_trim(in, &L->heads[h], &s->bytes);
    kvcp_free(&in->host, base, bytes);
    return KVC_OK;
}

kvc_status fg_attend(kvc_seq *s, uint32_t layer, uint32_t n_q, const int32_t *positions,
                     const void *q_pre, void *out)
{
    if (!s)
        return KVC_E_INVALID;
    kvc_status st = check_attend(s, layer, n_q, positions, q_pre, out);
    if (st)
        return st;
    return attend_one(s, layer, n_q, positions, q_pre, out);
}

static const kvc_instance *seq_inst(const kvc_seq *s)
{
    return s->inst;
}

static char *seq_msg(kvc_seq *s)
{
    return s->msg;
}

static const kvcp_batch_ops batch_ops = {seq_inst, seq_msg, check_attend};

kvc_status fg_attend_batch(kvc_instance *in, uint32_t layer, uint32_t n_items,
                           const kvc_attend_item *const *items)
{
    uint32_t max_q = 0;
    kvc_status st = kvcp_batch_check(in, layer, n_items, items, &batch_ops, &max_q);
    if (st)
        return st;
    for (uint32_t i = 0; i < n_items; i++) {
        const kvc_attend_item *it = items[i];
        st = attend_one(it->seq, layer, it->n_q, it->positions, it->q_pre, it->out);
        if (st)
            return st;
    }
    return KVC_OK;
}

/* ---- materialize ---------------------------------------------------------------------- */

typedef struct pos_idx {
    int32_t pos;
    uint32_t idx;
} pos_idx;

static int pos_idx_cmp(const void *a, const void *b)
{
    int32_t x = ((const pos_idx *)a)->pos, y = ((const pos_idx *)b)->pos;
    return x < y ? -1 : x > y;
}

/* Row `t` of a storage-type array [..][d] as floats. */
static void read_row(const kvc_instance *in, const void *base, size_t t, float *dst)
{
    const size_t d = in->g.head_dim;
    if (in->cfg.dtype == FG_F32)
        memcpy(dst, (const float *)base + t * d, d * sizeof(float));
    else
        kvck_f16_to_f32_n((const uint16_t *)base + t * d, dst, d);
}

/* Materialized row `at` back from the Hadamard basis it is kept in. */
static void unrotate(const kvc_instance *in, const kvc_materialized *out, size_t at)
{
    const size_t d = in->g.head_dim;
    if (out->k && in->k_had)
        kvck_hadamard_inv(out->k + at * d, d, in->k_signs);
    if (out->v && in->v_had)
        kvck_hadamard_inv(out->v + at * d, d, in->v_signs);
}

kvc_status fg_materialize(kvc_seq *s, uint32_t layer, kvc_materialized *out)
{
    if (!s)
        return KVC_E_INVALID;
    const kvc_instance *in = s->inst;
    const kvcp_geom *g = &in->g;
    kvc_status st = kvcp_check_materialize(g, layer, out, s->msg, sizeof s->msg);
    if (st)
        return st;
    const fg_layer *L = &s->layers[layer];
    uint32_t most = 0;
    for (uint32_t h = 0; h < g->n_kv; h++)
        most = L->heads[h].n > most ? L->heads[h].n : most;
    most += L->n_pending;
    if (out->positions && out->capacity < most)
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_BUFFER,
                         "materialize: capacity %u is below the %u tokens a head holds",
                         out->capacity, most);
    pos_idx *order = NULL;
    size_t order_bytes = (size_t)(most ? most : 1) * sizeof *order;
    if (out->positions) {
        order = kvcp_alloc(&in->host, order_bytes, KVC_USAGE_SCRATCH);
        if (!order)
            return kvcp_fail(s->msg, sizeof s->msg, KVC_E_NOMEM,
                             "materialize: out of memory for scratch");
    }
    const size_t d = g->head_dim, cap = out->capacity, B = in->cfg.block_tokens;
    for (uint32_t h = 0; h < g->n_kv; h++) {
        const fg_head *hd = &L->heads[h];
        out->n_tokens[h] = hd->n + L->n_pending;
        if (!out->positions)
            continue;
        /* Kept tokens by position, then the pending ones (all later). */
        for (uint32_t j = 0; j < hd->n; j++)
            order[j] = (pos_idx){fg_head_pos(in, hd, j), j};
        qsort(order, hd->n, sizeof *order, pos_idx_cmp);
        size_t at = (size_t)h * cap;
        for (uint32_t j = 0; j < hd->n; j++, at++) {
            void *blk = hd->blocks[order[j].idx / B];
            size_t slot = order[j].idx % B;
            out->positions[at] = order[j].pos;
            if (out->k)
                fg_slot_keys(in, blk, (uint32_t)slot, out->k + at * d);
            if (out->v)
                fg_slot_values(in, blk, (uint32_t)slot, out->v + at * d);
            unrotate(in, out, at);
        }
        for (const fg_pending *c = L->pend; c; c = c->next)
            for (uint32_t t = c->used; t < c->n; t++, at++) {
                out->positions[at] = c->pos[t];
                size_t r = (size_t)t * g->n_kv + h;
                if (out->k)
                    read_row(in, c->k, r, out->k + at * d);
                if (out->v)
                    read_row(in, c->v, r, out->v + at * d);
                unrotate(in, out, at);
            }
    }
    if (order)
        kvcp_free(&in->host, order, order_bytes);
    return KVC_OK;
}

/* ---- truncate -------------------------------------------------------------------------- */

kvc_status fg_truncate(kvc_seq *s, int32_t position)
{
    if (!s)
        return KVC_E_INVALID;
    const kvc_instance *in = s->inst;
    for (uint32_t l = 0; l < in->g.n_layers; l++) {
        fg_layer *L = &s->layers[l];
        fg_pending_truncate(in, L, &s->bytes, position);
        uint64_t kept = fg_runs_truncate(L, position);
        if (kept == 0) {
            /* No stepped token before `position`: the layer starts over
             * (what is still pending stays), its next attend is a prompt. */
            fg_layer_reset_steps(in, L, &s->bytes);
            L->last_pos = L->pend_tail ? L->pend_tail->pos[L->pend_tail->n - 1] : -1;
            continue;
        }
        for (uint32_t h = 0; h < in->g.n_kv; h++) {
            fg_head *hd = &L->heads[h];
            for (uint32_t j = hd->n; j-- > 0;)
                if (fg_head_pos(in, hd, j) >= position)
                    fg_head_remove(in, hd, j);
            fg_head_trim(in, hd, &s->bytes);
        }
        L->n_seen = kept;
        L->last_step_pos = L->n_runs ? L->runs[L->n_runs - 1].pos0 +
                                           (int32_t)L->runs[L->n_runs - 1].n - 1
                                     : -1;
        L->last_pos = L->pend_tail ? L->pend_tail->pos[L->pend_tail->n - 1] : L->last_step_pos;
    }
    return KVC_OK;
}
