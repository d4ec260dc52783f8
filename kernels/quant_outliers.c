/*
 * quant_outliers.c -- choosing the values a quantized block keeps exactly.
 *
 * Only a group's current smallest or largest value can shrink its range
 * when removed, so with each group's values sorted, a greedy step looks at
 * two candidates per group: drop the bottom (range hi - lo2) or the top
 * (range hi2 - lo). The step takes the candidate that cuts the squared
 * range most (first group, bottom side on ties), k times or until every
 * group is down to 2 values. The sort is in place (heapsort: qsort may
 * allocate), in the caller's scratch.
 */
#include "kvck_quant.h"
#include "quant_internal.h"

/* Heapsort of v [n] ascending. */
static void sift(float *v, size_t i, size_t n)
{
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n)
            return;
        if (c + 1 < n && v[c + 1] > v[c])
            c++;
        if (!(v[c] > v[i]))
            return;
        float t = v[c];
        v[c] = v[i];
        v[i] = t;
        i = c;
    }
}

static void sort_floats(float *v, size_t n)
{
    for (size_t i = n / 2; i-- > 0;)
        sift(v, i, n);
    for (size_t e = n; e-- > 1;) {
        float t = v[0];
        v[0] = v[e];
        v[e] = t;
        sift(v, 0, e);
    }
}

/* Values of v [n] (sorted) below x, and at most x. */
static size_t count_below(const float *v, size_t n, float x)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (v[mid] < x)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static size_t count_upto(const float *v, size_t n, float x)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (v[mid] <= x)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* Groups of a mode over n rows: TOKEN (row j, per-token group g) is group
 * j * n_groups + g, CHANNEL channel c is group c. */
static size_t n_groups_of(const kvck_qfmt *f, int mode, size_t n)
{
    return mode == KVCK_QS_CHANNEL ? f->d : n * f->n_groups;
}

/* Start (in the sorted area) and size of group gi. TOKEN groups sit where
 * their values sit in a row-major [n][d] copy; CHANNEL groups are the
 * columns of that copy, transposed to [d][n]. */
static void group_span(const kvck_qfmt *f, int mode, size_t n, size_t gi, size_t *start,
                       size_t *cnt)
{
    if (mode == KVCK_QS_CHANNEL) {
        *start = gi * n, *cnt = n;
        return;
    }
    const size_t j = gi / f->n_groups, g = gi % f->n_groups;
    *start = j * f->d + f->gfirst[g];
    *cnt = (size_t)f->gfirst[g + 1] - f->gfirst[g];
}

size_t kvck_q_outlier_scratch_floats(const kvck_qfmt *f, int mode, size_t n)
{
    return kvcki_up16(n * f->d) + 4 * n_groups_of(f, mode, n);
}

size_t kvck_q_outliers(const kvck_qfmt *f, int mode, size_t n, const float *x, size_t ldx,
                       size_t k, uint32_t *idx, float *scratch)
{
    const size_t d = f->d, G = n_groups_of(f, mode, n);
    float *v = scratch;                          /* [n * d] values, sorted per group */
    float *st = scratch + kvcki_up16(n * d);     /* [G][4] dropped at bottom, top; ties left */
    /* Counts live in floats: exact, they never exceed n * d < 2^24 here. */
    for (size_t j = 0; j < n; j++)
        for (size_t c = 0; c < d; c++)
            v[mode == KVCK_QS_CHANNEL ? c * n + j : j * d + c] = x[j * ldx + c];
    for (size_t gi = 0; gi < G; gi++) {
        size_t s0, cnt;
        group_span(f, mode, n, gi, &s0, &cnt);
        sort_floats(v + s0, cnt);
        st[4 * gi] = st[4 * gi + 1] = 0.0f;
    }

    size_t chosen = 0;
    for (; chosen < k; chosen++) {
        double best = -1.0;
        size_t bg = 0;
        int top = 0;
        for (size_t gi = 0; gi < G; gi++) {
            size_t s0, cnt;
            group_span(f, mode, n, gi, &s0, &cnt);
            const size_t a = (size_t)st[4 * gi], b = (size_t)st[4 * gi + 1];
            if (cnt - a - b <= 2)
                continue;
            const float *s = v + s0; /* [cnt] sorted */
            const double lo = s[a], lo2 = s[a + 1], hi = s[cnt - 1 - b], hi2 = s[cnt - 2 - b];
            const double r2 = (hi - lo) * (hi - lo);
            const double g_lo = r2 - (hi - lo2) * (hi - lo2), g_hi = r2 - (hi2 - lo) * (hi2 - lo);
            if (g_lo > best)
                best = g_lo, bg = gi, top = 0;
            if (g_hi > best)
                best = g_hi, bg = gi, top = 1;
        }
        if (best < 0.0)
            break; /* every group is down to 2 values */
        st[4 * bg + top] += 1.0f;
    }

    /* The dropped values per group are the a smallest and b largest in
     * sorted order; values equal to the boundary one are taken in index
     * order, as many as the sort put on the dropped side. */
    for (size_t gi = 0; gi < G; gi++) {
        size_t s0, cnt;
        group_span(f, mode, n, gi, &s0, &cnt);
        const float *s = v + s0;
        const size_t a = (size_t)st[4 * gi], b = (size_t)st[4 * gi + 1];
        st[4 * gi + 2] = a ? (float)(a - count_below(s, cnt, s[a - 1])) : 0.0f;
        st[4 * gi + 3] = b ? (float)(b - (cnt - count_upto(s, cnt, s[cnt - b]))) : 0.0f;
    }
    size_t w = 0;
    for (size_t j = 0; j < n; j++) {
        for (size_t c = 0; c < d; c++) {
            const size_t gi = mode == KVCK_QS_CHANNEL
                                  ? c
                                  : j * f->n_groups + (size_t)kvcki_group_of(f, (uint32_t)c);
            size_t s0, cnt;
            group_span(f, mode, n, gi, &s0, &cnt);
            const float *s = v + s0, xv = x[j * ldx + c];
            const size_t a = (size_t)st[4 * gi], b = (size_t)st[4 * gi + 1];
            int out = 0;
            if (a && xv < s[a - 1]) {
                out = 1;
            } else if (b && xv > s[cnt - b]) {
                out = 1;
            } else if (a && xv == s[a - 1] && st[4 * gi + 2] > 0.0f) {
                st[4 * gi + 2] -= 1.0f;
                out = 1;
            } else if (b && xv == s[cnt - b] && st[4 * gi + 3] > 0.0f) {
                st[4 * gi + 3] -= 1.0f;
                out = 1;
            }
            if (out && w < chosen)
                idx[w++] = (uint32_t)(j * d + c);
        }
    }
    return w;
}
