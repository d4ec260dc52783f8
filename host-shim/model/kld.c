/*
 * kld.c -- KL divergence, top-1 agreement and the perplexity ratio of one
 * logit stream against a reference, token by token, and their statistics.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "errmsg.h"
#include "kld.h"
#include "llama.h"

void kvch_kld_init(kvch_kld *k)
{
    memset(k, 0, sizeof *k);
}

void kvch_kld_free(kvch_kld *k)
{
    if (!k)
        return;
    free(k->kld);
    kvch_kld_init(k);
}

/* One token: the KLD of row q from row ref [V] is returned; *same is 1 when
 * their top-1 tokens agree; *nll_ref and *nll_q are -log p(target) and
 * -log q(target). */
static double token_kld(const float *ref, const float *q, size_t V, size_t target, int *same,
                        double *nll_ref, double *nll_q)
{
    double lz_p, lz_q;
    const double m_p = kvch_log_softmax_norm(ref, V, &lz_p);
    const double m_q = kvch_log_softmax_norm(q, V, &lz_q);
    double kl = 0.0;
    size_t top_p = 0, top_q = 0;
    for (size_t i = 0; i < V; i++) {
        const double lp = ((double)ref[i] - m_p) - lz_p, lq = ((double)q[i] - m_q) - lz_q;
        kl += exp(lp) * (lp - lq);
        top_p = ref[i] > ref[top_p] ? i : top_p;
        top_q = q[i] > q[top_q] ? i : top_q;
    }
    *same = top_p == top_q;
    *nll_ref = -(((double)ref[target] - m_p) - lz_p);
    *nll_q = -(((double)q[target] - m_q) - lz_q);
    return kl;
}

kvc_status kvch_kld_add(kvch_kld *k, const float *ref, const float *q, size_t n_rows,
                        size_t V, const int32_t *targets, char *err, size_t cap)
{
    if (V == 0)
        return kvch_fail(err, cap, KVC_E_INVALID, "kld: empty vocabulary");
    for (size_t r = 0; r < n_rows; r++)
        if (targets[r] < 0 || (size_t)targets[r] >= V)
            return kvch_fail(err, cap, KVC_E_INVALID,
                             "kld: target %d of row %zu is outside the vocabulary of %zu",
                             (int)targets[r], r, V);
    if (k->n + n_rows > k->cap) {
        size_t want = k->cap ? k->cap : 256;
        while (want < k->n + n_rows)
            want *= 2;
        double *v = realloc(k->kld, want * sizeof *v);
        if (!v)
            return kvch_fail(err, cap, KVC_E_NOMEM, "kld: out of memory for %zu values", want);
        k->kld = v;
        k->cap = want;
    }
    for (size_t r = 0; r < n_rows; r++) {
        int same;
        double a, b; /* -log p(next), -log q(next) */
        k->kld[k->n++] = token_kld(ref + r * V, q + r * V, V, (size_t)targets[r], &same, &a, &b);
        k->same_top += (uint64_t)same;
        k->nll += b;
        k->nll_ref += a;
        k->d += b - a;
        k->d2 += (b - a) * (b - a);
    }
    return KVC_OK;
}

double kvch_percentile(const double *sorted, size_t n, double fraction)
{
    if (fraction <= 0.0)
        return sorted[0];
    if (fraction >= 1.0)
        return sorted[n - 1];
    const double at = fraction * (double)(n - 1);
    const size_t i = (size_t)at;
    const double w = at - (double)i;
    return (1.0 - w) * sorted[i] + w * sorted[i + 1 < n ? i + 1 : n - 1];
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

kvc_status kvch_kld_summary(const kvch_kld *k, kvch_kld_stats *st, char *err, size_t cap)
{
    memset(st, 0, sizeof *st);
    if (k->n == 0)
        return kvch_fail(err, cap, KVC_E_INVALID, "kld: no tokens to summarize");
    double *v = malloc(k->n * sizeof *v);
    if (!v)
        return kvch_fail(err, cap, KVC_E_NOMEM, "kld: out of memory for %zu values", k->n);
    memcpy(v, k->kld, k->n * sizeof *v);
    qsort(v, k->n, sizeof *v, cmp_double);

    const size_t n = k->n;
    const double N = (double)n;
    double sum = 0.0, ss = 0.0;
    for (size_t i = 0; i < n; i++)
        sum += v[i];
    st->n = n;
    st->mean = sum / N;
    for (size_t i = 0; i < n; i++)
        ss += (v[i] - st->mean) * (v[i] - st->mean);
    st->err = n > 1 ? sqrt(ss / N / (N - 1.0)) : 0.0;
    st->min = v[0];
    st->p01 = kvch_percentile(v, n, 0.01);
    st->p05 = kvch_percentile(v, n, 0.05);
    st->p10 = kvch_percentile(v, n, 0.10);
    st->median = kvch_percentile(v, n, 0.50);
    st->p90 = kvch_percentile(v, n, 0.90);
    st->p95 = kvch_percentile(v, n, 0.95);
    st->p99 = kvch_percentile(v, n, 0.99);
    st->p999 = kvch_percentile(v, n, 0.999);
    st->max = v[n - 1];
    free(v);

    const double p = (double)k->same_top / N;
    st->same_top = p;
    st->same_top_err = n > 1 ? sqrt(p * (1.0 - p) / (N - 1.0)) : 0.0;

    st->ln_ppl_ratio = k->nll / N - k->nll_ref / N;
    const double md = k->d / N, var = k->d2 / N - md * md;
    st->ln_ppl_ratio_err = var > 0.0 && n > 1 ? sqrt(var / (N - 1.0)) : 0.0;
    return KVC_OK;
}
