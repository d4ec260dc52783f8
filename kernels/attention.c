/*
 * attention.c -- blocked online-softmax attention over CBLAS.
 *
 * kvck_attn_*: one pass of `rows` query rows (queries x the query heads of
 * one KV head) over keys fed in blocks. Per block: scores S = Q K^T by one
 * SGEMM, the causal/window mask only where the block is not wholly visible
 * to a row, a running max per row (rescaling the row's sum and accumulator
 * when the max grows), P = exp(S - max), then acc += P V by a second SGEMM.
 *
 * kvck_attention: the dense whole call. Queries are taken in chunks (to
 * bound scratch); per chunk, each KV head's queries are gathered, rotated
 * and scaled once, then every key block is rotated once (all KV heads at a
 * time: the angles are per token) and folded into the pass of every KV head.
 */
#include "kvck.h"

#include <cblas.h>
#include <math.h>
#include <string.h>

/* Scratch regions start on 64-byte boundaries (relative to the scratch
 * base) so rows handed to BLAS are cache-line aligned when the base is. */
static size_t up16(size_t n)
{
    return (n + 15u) & ~(size_t)15u;
}

static int visible(int32_t kp, int32_t qp, uint32_t window)
{
    return kp <= qp && (window == 0 || (int64_t)qp - (int64_t)kp < (int64_t)window);
}

/* Fills the pass description around caller-placed buffers, without
 * touching their contents. */
static void attn_view(kvck_attn *a, size_t rows, size_t group, size_t dk, size_t dv,
                      size_t block, uint32_t window, const int32_t *q_pos, float *m, float *l,
                      float *acc, float *s)
{
    a->rows = rows;
    a->group = group ? group : 1;
    a->dk = dk;
    a->dv = dv;
    a->block = block ? block : 1;
    a->window = window;
    a->q_pos = q_pos;
    a->m = m;
    a->l = l;
    a->acc = acc;
    a->s = s;
}

/* Empty running state: max -inf, sum 0, accumulator 0. */
static void attn_reset(float *m /* [rows] */, float *l /* [rows] */, float *acc /* [rows][dv] */,
                       size_t rows, size_t dv)
{
    for (size_t r = 0; r < rows; r++) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
    }
    memset(acc, 0, rows * dv * sizeof *acc);
}

size_t kvck_attn_scratch_floats(size_t rows, size_t dv, size_t block)
{
    if (block == 0)
        block = 1;
    return 2 * up16(rows) + up16(rows * dv) + up16(rows * block);
}

void kvck_attn_init(kvck_attn *a, size_t rows, size_t group, size_t dk, size_t dv, size_t block,
                    uint32_t window, const int32_t *q_pos, float *scratch)
{
    size_t b = block ? block : 1;
    float *m = scratch;           /* [rows] */
    float *l = m + up16(rows);    /* [rows] */
    float *acc = l + up16(rows);  /* [rows][dv] */
    float *s = acc + up16(rows * dv); /* [rows][block] */
    attn_view(a, rows, group, dk, dv, b, window, q_pos, m, l, acc, s);
    attn_reset(m, l, acc, rows, dv);
}

/* One block of n <= a->block keys (the public entry splits longer runs). */
static void attn_block1(kvck_attn *a, const float *q, size_t ldq, const float *k, size_t ldk,
                        const float *v, size_t ldv, const int32_t *k_pos, size_t n)
{
    const size_t group = a->group, nq = a->rows / group, bs = a->block, dv = a->dv;
    const uint32_t w = a->window;
    int32_t kmin = k_pos[0], kmax = k_pos[0];
    size_t t0 = nq, t1 = 0;

    for (size_t j = 1; j < n; j++) {
        kmin = k_pos[j] < kmin ? k_pos[j] : kmin;
        kmax = k_pos[j] > kmax ? k_pos[j] : kmax;
    }
    /* Queries that may see a key of the block (kmin <= qp and the newest
     * key inside the window): a necessary test, exact per key below. Only
     * the span [t0, t1) of them goes through the GEMMs. */
    for (size_t t = 0; t < nq; t++) {
        int32_t qp = a->q_pos[t];
        if (kmin <= qp && (w == 0 || (int64_t)qp - kmax < (int64_t)w)) {
            if (t < t0)
                t0 = t;
            t1 = t + 1;
        }
    }
    if (t0 >= t1)
        return;

    const size_t r0 = t0 * group, nr = (t1 - t0) * group;
    float *s0 = a->s + r0 * bs; /* [nr][bs], first n columns used */

    /* S = Q K^T: [nr][dk] x [dk][n]. */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)nr, (int)n, (int)a->dk, 1.0f,
                q + r0 * ldq, (int)ldq, k, (int)ldk, 0.0f, s0, (int)bs);

    for (size_t r = r0; r < r0 + nr; r++) {
        float *sr = a->s + r * bs; /* [n] scores, then probabilities */
        const int32_t qp = a->q_pos[r / group];
        const int all = kmax <= qp && (w == 0 || (int64_t)qp - kmin < (int64_t)w);
        float mb = -INFINITY;

        if (all) {
            for (size_t j = 0; j < n; j++)
                mb = sr[j] > mb ? sr[j] : mb;
        } else {
            for (size_t j = 0; j < n; j++) {
                if (!visible(k_pos[j], qp, w))
                    sr[j] = -INFINITY;
                mb = sr[j] > mb ? sr[j] : mb;
            }
        }
        if (mb == -INFINITY) {
            /* Sees none of this block's keys: a zero row of P leaves its
             * accumulator as is. */
            memset(sr, 0, n * sizeof *sr);
            continue;
        }
        const float mold = a->m[r];
        const float mnew = mold > mb ? mold : mb;
        float sum = 0.0f;
        for (size_t j = 0; j < n; j++) {
            /* Masked scores are -inf: expf gives exactly 0. */
            float p = expf(sr[j] - mnew);
            sr[j] = p;
            sum += p;
        }
        if (mnew != mold) {
            /* The max grew: earlier terms shrink by exp(mold - mnew)
             * (0 on the row's first visible block, where acc is 0). */
            const float alpha = expf(mold - mnew);
            float *ar = a->acc + r * dv;
            a->l[r] *= alpha;
            for (size_t c = 0; c < dv; c++)
                ar[c] *= alpha;
            a->m[r] = mnew;
        }
        a->l[r] += sum;
    }

    /* acc += P V: [nr][n] x [n][dv]. */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)nr, (int)dv, (int)n, 1.0f, s0,
                (int)bs, v, (int)ldv, 1.0f, a->acc + r0 * dv, (int)dv);
}

void kvck_attn_block(kvck_attn *a, const float *q, size_t ldq, const float *k, size_t ldk,
                     const float *v, size_t ldv, const int32_t *k_pos, size_t n)
{
    if (a->rows == 0)
        return;
    /* n > block breaks the contract; folding it in block-sized pieces is
     * the harmless reading. */
    for (size_t j = 0; j < n; j += a->block) {
        size_t nb = n - j < a->block ? n - j : a->block;
        attn_block1(a, q, ldq, k + j * ldk, ldk, v + j * ldv, ldv, k_pos + j, nb);
    }
}

/* Writes acc / l of row r = (t, g) to out + t * ld_query + g * ld_head. */
static void attn_finish_rows(const kvck_attn *a, float *out, size_t ld_head, size_t ld_query)
{
    for (size_t r = 0; r < a->rows; r++) {
        float *o = out + (r / a->group) * ld_query + (r % a->group) * ld_head; /* [dv] */
        const float *ar = a->acc + r * a->dv;
        const float l = a->l[r];
        if (l > 0.0f) {
            for (size_t c = 0; c < a->dv; c++)
                o[c] = ar[c] / l;
        } else {
            memset(o, 0, a->dv * sizeof *o);
        }
    }
}

void kvck_attn_finish(const kvck_attn *a, float *out, size_t ldo)
{
    attn_finish_rows(a, out, ldo, a->group * ldo);
}

/* ---- dense whole attention ---------------------------------------------- */

/* Query rows (all heads) per chunk: bounds scratch while keeping the score
 * GEMM tall enough to run near peak. */
#define KVCK_CHUNK_ROWS 4096
/* Keys per block: one block of rotated keys for all KV heads stays in L2. */
#define KVCK_BLOCK_KEYS 256

typedef struct dense_plan {
    size_t group, hd, n_kv;
    size_t qc;    /* queries per chunk */
    size_t rows;  /* rows per KV head per chunk = qc * group */
    size_t block; /* keys per block */
    /* float offsets into scratch */
    size_t off_q, off_k, off_s, off_state, state_stride;
    size_t total;
} dense_plan;

static void dense_plan_make(const kvck_dense *d, size_t n_q, size_t n_k, dense_plan *p)
{
    p->n_kv = d->n_kv_heads ? d->n_kv_heads : 1;
    p->group = d->n_heads / p->n_kv;
    if (p->group == 0)
        p->group = 1;
    p->hd = d->head_dim;
    size_t per = KVCK_CHUNK_ROWS / (d->n_heads ? d->n_heads : 1);
    if (per == 0)
        per = 1;
    p->qc = n_q < per ? n_q : per;
    if (p->qc == 0)
        p->qc = 1;
    p->rows = p->qc * p->group;
    p->block = n_k < KVCK_BLOCK_KEYS ? n_k : KVCK_BLOCK_KEYS;
    if (p->block == 0)
        p->block = 1;
    p->off_q = 0; /* [n_kv][rows][hd] rotated, scaled queries */
    p->off_k = p->off_q + up16(p->n_kv * p->rows * p->hd); /* [block][n_kv][hd] rotated keys */
    p->off_s = p->off_k + up16(p->block * p->n_kv * p->hd); /* [rows][block] shared scores */
    p->off_state = p->off_s + up16(p->rows * p->block);
    /* per KV head: m [rows], l [rows], acc [rows][hd] */
    p->state_stride = 2 * up16(p->rows) + up16(p->rows * p->hd);
    p->total = p->off_state + p->n_kv * p->state_stride;
}

size_t kvck_attention_scratch_floats(const kvck_dense *d, size_t n_q, size_t n_k)
{
    dense_plan p;
    if (n_q == 0 || n_k == 0)
        return 0;
    dense_plan_make(d, n_q, n_k, &p);
    return p.total;
}

/* Running state of KV head h inside the scratch. */
static void dense_view(const dense_plan *p, float *scratch, size_t h, size_t rows,
                       uint32_t window, const int32_t *q_pos, kvck_attn *a)
{
    float *m = scratch + p->off_state + h * p->state_stride; /* [rows] */
    float *l = m + up16(p->rows);                            /* [rows] */
    float *acc = l + up16(p->rows);                          /* [rows][hd] */
    attn_view(a, rows, p->group, p->hd, p->hd, p->block, window, q_pos, m, l, acc,
              scratch + p->off_s);
}

void kvck_attention(const kvck_dense *d, size_t n_q, const int32_t *q_pos, const float *q_pre,
                    size_t n_k, const int32_t *k_pos, const float *k_pre, const float *v,
                    float *out, float *scratch)
{
    dense_plan p;
    if (n_q == 0)
        return;
    if (n_k == 0) {
        /* No key at all: every query sees none. */
        memset(out, 0, n_q * d->n_heads * d->head_dim * sizeof *out);
        return;
    }
    dense_plan_make(d, n_q, n_k, &p);
    const size_t hd = p.hd, n_kv = p.n_kv, group = p.group, nh = d->n_heads;
    const size_t ldkv = n_kv * hd; /* token stride of k_pre, v, and the rotated block */
    float *qs = scratch + p.off_q; /* [n_kv][rows][hd] */
    float *kb = scratch + p.off_k; /* [block][n_kv][hd] */

    for (size_t c0 = 0; c0 < n_q; c0 += p.qc) {
        const size_t qc = n_q - c0 < p.qc ? n_q - c0 : p.qc;
        const size_t rows = qc * group;
        const int32_t *qp = q_pos + c0; /* [qc] */
        int32_t qmin = qp[0], qmax = qp[0];
        kvck_attn a;

        for (size_t t = 1; t < qc; t++) {
            qmin = qp[t] < qmin ? qp[t] : qmin;
            qmax = qp[t] > qmax ? qp[t] : qmax;
        }
        /* Gather each KV head's queries as [qc][group][hd] (token-major, so
         * kvck_rope_apply rotates them in place), then scale: the GEMM rows
         * of one KV head end up contiguous with stride hd. */
        for (size_t h = 0; h < n_kv; h++) {
            float *qh = qs + h * p.rows * hd; /* [qc][group][hd] */
            for (size_t t = 0; t < qc; t++)
                memcpy(qh + t * group * hd, q_pre + ((c0 + t) * nh + h * group) * hd,
                       group * hd * sizeof *qh);
            kvck_rope_apply(d->rope, qc, group, qp, qh, qh);
            for (size_t i = 0; i < rows * hd; i++)
                qh[i] *= d->scale;
            dense_view(&p, scratch, h, rows, d->window, qp, &a);
            attn_reset(a.m, a.l, a.acc, rows, hd);
        }

        for (size_t b0 = 0; b0 < n_k; b0 += p.block) {
            const size_t nb = n_k - b0 < p.block ? n_k - b0 : p.block;
            const int32_t *kp = k_pos + b0; /* [nb] */
            int32_t kmin = kp[0], kmax = kp[0];
            for (size_t j = 1; j < nb; j++) {
                kmin = kp[j] < kmin ? kp[j] : kmin;
                kmax = kp[j] > kmax ? kp[j] : kmax;
            }
            /* Nothing in the chunk sees this block: skip before paying for
             * its rotation (half the blocks of a causal prefill). */
            if (kmin > qmax
                || (d->window && (int64_t)qmin - (int64_t)kmax >= (int64_t)d->window))
                continue;
            kvck_rope_apply(d->rope, nb, n_kv, kp, k_pre + b0 * ldkv, kb);
            for (size_t h = 0; h < n_kv; h++) {
                dense_view(&p, scratch, h, rows, d->window, qp, &a);
                attn_block1(&a, qs + h * p.rows * hd, hd, kb + h * hd, ldkv,
                            v + b0 * ldkv + h * hd, ldkv, kp, nb);
            }
        }

        for (size_t h = 0; h < n_kv; h++) {
            dense_view(&p, scratch, h, rows, d->window, qp, &a);
            attn_finish_rows(&a, out + (c0 * nh + h * group) * hd, hd, nh * hd);
        }
    }
}
