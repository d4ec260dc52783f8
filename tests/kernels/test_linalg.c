/*
 * test_linalg.c -- Check suite for the fp64 linear algebra of
 * kernels/kvck_linalg.h: SVD with left vectors, shifted Cholesky, symmetric
 * eigen, the SPD right solve, and fp32 Gram accumulation.
 *
 * Matrices with a known spectrum are built as Q1 diag(sigma) Q2^T from
 * random orthogonal factors (QR of random matrices). Random data is seeded;
 * the seed is printed and can be set with KVCK_TEST_SEED=<n> to replay.
 */
#include "kvck_linalg.h"

#include <cblas.h>
#include <check.h>
#include <lapacke.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- helpers ------------------------------------------------------------- */

/* Only calls into Check on failure (cheap inside loops). */
#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond))                                                                               \
            ck_abort_msg(__VA_ARGS__);                                                             \
    } while (0)
#define CHECK1(cond) CHECK(cond, "failed: %s", #cond)

static uint64_t g_seed = 0x6c696e61u; /* default: reproducible CI */

typedef struct rng {
    uint64_t s;
} rng;

static uint64_t rng_next(rng *r)
{
    /* splitmix64 */
    uint64_t z = (r->s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static rng rng_make(uint64_t salt)
{
    rng r = {g_seed ^ (salt * 0x2545f4914f6cdd1dull)};
    return r;
}

/* Uniform in [-1, 1). */
static double rng_unit(rng *r)
{
    return (double)(rng_next(r) >> 11) * 0x1p-53 * 2.0 - 1.0;
}

static void fill(rng *r, double *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        x[i] = rng_unit(r);
}

static double *dalloc(size_t n)
{
    double *p = malloc((n ? n : 1) * sizeof *p);
    ck_assert_ptr_nonnull(p);
    return p;
}

/* c [m][n] = op(a) op(b), row-major. */
static void gemm(int ta, int tb, size_t m, size_t n, size_t k, const double *a, size_t lda,
                 const double *b, size_t ldb, double *c, size_t ldc)
{
    cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
                (int)m, (int)n, (int)k, 1.0, a, (int)lda, b, (int)ldb, 0.0, c, (int)ldc);
}

/* Random orthogonal q [n][n]: Q of the QR of a random matrix. */
static void rand_orth(rng *r, size_t n, double *q)
{
    double *tau = dalloc(n);
    fill(r, q, n * n);
    ck_assert_int_eq(LAPACKE_dgeqrf(LAPACK_ROW_MAJOR, (int)n, (int)n, q, (int)n, tau), 0);
    ck_assert_int_eq(LAPACKE_dorgqr(LAPACK_ROW_MAJOR, (int)n, (int)n, (int)n, q, (int)n, tau), 0);
    free(tau);
}

static double max_abs(const double *x, size_t n)
{
    double m = 0.0;
    for (size_t i = 0; i < n; i++)
        m = fmax(m, fabs(x[i]));
    return m;
}

static double max_abs_diff(const double *x, const double *y, size_t n)
{
    double m = 0.0;
    for (size_t i = 0; i < n; i++)
        m = fmax(m, fabs(x[i] - y[i]));
    return m;
}

/* max |Q^T Q - I| over the n x n Gram of the columns of q [m][n]. */
static double orth_err(size_t m, size_t n, const double *q)
{
    double *g = dalloc(n * n);
    gemm(1, 0, n, n, m, q, n, q, n, g, n);
    for (size_t i = 0; i < n; i++)
        g[i * n + i] -= 1.0;
    double e = max_abs(g, n * n);
    free(g);
    return e;
}

/* a [m][n] = Q1[:, :k] diag(sig) Q2[:, :k]^T with q1 [m][m], q2 [n][n]. */
static void build_known(size_t m, size_t n, size_t k, const double *q1, const double *q2,
                        const double *sig, double *a)
{
    double *t = dalloc(m * k);
    for (size_t i = 0; i < m; i++)
        for (size_t j = 0; j < k; j++)
            t[i * k + j] = q1[i * m + j] * sig[j];
    gemm(0, 1, m, n, k, t, k, q2, n, a, n);
    free(t);
}

/* Lower triangle kept, strictly upper part poisoned: the functions must
 * read only the lower triangle. */
static void poison_upper(size_t n, double *a, double v)
{
    for (size_t i = 0; i < n; i++)
        for (size_t j = i + 1; j < n; j++)
            a[i * n + j] = v;
}

/* ---- SVD ----------------------------------------------------------------- */

static void svd_known_case(size_t m, size_t n, uint64_t salt)
{
    rng r = rng_make(salt);
    size_t k = m < n ? m : n;
    double *q1 = dalloc(m * m), *q2 = dalloc(n * n), *sig = dalloc(k);
    double *a = dalloc(m * n), *a0 = dalloc(m * n), *s = dalloc(k), *u = dalloc(m * m);
    rand_orth(&r, m, q1);
    rand_orth(&r, n, q2);
    static const double head[5] = {10.0, 5.0, 2.0, 1.0, 0.5};
    for (size_t i = 0; i < k; i++)
        sig[i] = i < 5 ? head[i] : 0.5 * pow(0.98, (double)(i - 4));
    build_known(m, n, k, q1, q2, sig, a0);
    memcpy(a, a0, m * n * sizeof *a);

    size_t lw = kvck_svd_left_lwork(m, n);
    CHECK(lw > 0, "lwork %zu", lw);
    double *work = dalloc(lw);
    ck_assert_int_eq(kvck_svd_left(m, n, a, s, u, work, lw), 0);

    /* Singular values, relative. */
    for (size_t i = 0; i < k; i++)
        CHECK(fabs(s[i] - sig[i]) <= 1e-10 * sig[i], "%zux%zu: s[%zu] = %.17g, want %.17g", m, n, i,
              s[i], sig[i]);
    /* U orthogonal, completion columns included. */
    double oe = orth_err(m, m, u);
    CHECK(oe <= 1e-12, "%zux%zu: |U^T U - I| = %.3g", m, n, oe);
    /* Column j of U is +-q1[:, j] (distinct singular values) and
     * |A^T u_j| = s_j. */
    double *atu = dalloc(n * m);
    gemm(1, 0, n, m, m, a0, n, u, m, atu, m); /* [n][m] = A^T U */
    for (size_t j = 0; j < m; j++) {
        double dot = 0.0, nrm = 0.0;
        for (size_t i = 0; i < n; i++)
            nrm += atu[i * m + j] * atu[i * m + j];
        nrm = sqrt(nrm);
        if (j < k) {
            for (size_t i = 0; i < m; i++)
                dot += u[i * m + j] * q1[i * m + j];
            CHECK(fabs(fabs(dot) - 1.0) <= 1e-8, "%zux%zu: <u_%zu, q_%zu> = %.17g", m, n, j, j, dot);
            CHECK(fabs(nrm - sig[j]) <= 1e-10 * sig[j], "%zux%zu: |A^T u_%zu| = %.17g", m, n, j,
                  nrm);
        } else { /* completion columns are orthogonal to range(A) */
            CHECK(nrm <= 1e-12 * sig[0], "%zux%zu: |A^T u_%zu| = %.3g", m, n, j, nrm);
        }
    }
    /* A = U_k U_k^T A, and the rank-5 truncation leaves exactly the tail
     * energy (Eckart-Young). */
    double *p = dalloc(m * n), *ap = dalloc(m * n);
    gemm(1, 0, k, n, m, u, m, a0, n, p, n);   /* [k][n] = U_k^T A */
    gemm(0, 0, m, n, k, u, m, p, n, ap, n);   /* [m][n] = U_k U_k^T A */
    double re = max_abs_diff(ap, a0, m * n) / max_abs(a0, m * n);
    CHECK(re <= 1e-10, "%zux%zu: |U_k U_k^T A - A| / |A| = %.3g", m, n, re);
    const size_t r5 = 5;
    gemm(0, 0, m, n, r5, u, m, p, n, ap, n);
    double res = 0.0, tail = 0.0;
    for (size_t i = 0; i < m * n; i++)
        res += (a0[i] - ap[i]) * (a0[i] - ap[i]);
    for (size_t i = r5; i < k; i++)
        tail += sig[i] * sig[i];
    CHECK(fabs(res - tail) <= 1e-10 * tail, "%zux%zu: rank-5 residual %.17g, want %.17g", m, n,
          res, tail);

    free(q1), free(q2), free(sig), free(a), free(a0), free(s), free(u), free(work), free(atu),
        free(p), free(ap);
}

START_TEST(test_svd_known_wide)
{
    svd_known_case(192, 576, 1);
}
END_TEST

START_TEST(test_svd_known_square)
{
    svd_known_case(64, 64, 2);
}
END_TEST

START_TEST(test_svd_known_tall)
{
    svd_known_case(96, 40, 3);
}
END_TEST

START_TEST(test_svd_rank_deficient)
{
    const size_t m = 64, n = 128, rk = 7;
    rng r = rng_make(4);
    double *x = dalloc(m * rk), *y = dalloc(rk * n), *a0 = dalloc(m * n), *a = dalloc(m * n);
    double *s = dalloc(m), *u = dalloc(m * m), *p = dalloc(m * n), *ap = dalloc(m * n);
    fill(&r, x, m * rk);
    fill(&r, y, rk * n);
    gemm(0, 0, m, n, rk, x, rk, y, n, a0, n);
    memcpy(a, a0, m * n * sizeof *a);
    size_t lw = kvck_svd_left_lwork(m, n);
    double *work = dalloc(lw);
    ck_assert_int_eq(kvck_svd_left(m, n, a, s, u, work, lw), 0);
    for (size_t i = 0; i + 1 < m; i++)
        CHECK(s[i] >= s[i + 1], "s not descending at %zu", i);
    CHECK(s[rk - 1] > 1e-3 * s[0], "s[%zu] = %.3g", rk - 1, s[rk - 1]);
    for (size_t i = rk; i < m; i++)
        CHECK(s[i] < 1e-10 * s[0], "s[%zu] = %.3g vs s[0] = %.3g", i, s[i], s[0]);
    gemm(1, 0, rk, n, m, u, m, a0, n, p, n);
    gemm(0, 0, m, n, rk, u, m, p, n, ap, n);
    double re = max_abs_diff(ap, a0, m * n) / max_abs(a0, m * n);
    CHECK(re <= 1e-10, "rank-%zu truncation error %.3g", rk, re);
    CHECK(orth_err(m, m, u) <= 1e-12, "U not orthogonal");
    free(x), free(y), free(a0), free(a), free(s), free(u), free(p), free(ap), free(work);
}
END_TEST

/* ---- Cholesky ------------------------------------------------------------ */

/* G = X^T X of x [n][d]. */
static void gram(size_t n, size_t d, const double *x, double *g)
{
    gemm(1, 0, d, d, n, x, d, x, d, g, d);
}

/* Checks S lower triangular and S S^T = G + shift I (relative to max|G|). */
static void check_factor(size_t d, const double *g, const double *s, double shift,
                         const char *what)
{
    for (size_t i = 0; i < d; i++)
        for (size_t j = i + 1; j < d; j++)
            CHECK(s[i * d + j] == 0.0, "%s: S[%zu][%zu] = %g above the diagonal", what, i, j,
                  s[i * d + j]);
    double *sst = dalloc(d * d);
    gemm(0, 1, d, d, d, s, d, s, d, sst, d);
    double gmax = 0.0, e = 0.0;
    for (size_t i = 0; i < d; i++)
        for (size_t j = 0; j < d; j++) {
            double want = g[i * d + j] + (i == j ? shift : 0.0);
            gmax = fmax(gmax, fabs(want));
            e = fmax(e, fabs(sst[i * d + j] - want));
        }
    CHECK(e <= 1e-10 * gmax, "%s: |S S^T - (G + shift I)| = %.3g (max %.3g)", what, e, gmax);
    free(sst);
}

static double trace(size_t d, const double *g)
{
    double t = 0.0;
    for (size_t i = 0; i < d; i++)
        t += g[i * d + i];
    return t;
}

START_TEST(test_chol_well_conditioned)
{
    const size_t n = 256, d = 48;
    rng r = rng_make(5);
    double *x = dalloc(n * d), *g = dalloc(d * d), *gp = dalloc(d * d), *s = dalloc(d * d);
    fill(&r, x, n * d);
    gram(n, d, x, g);
    memcpy(gp, g, d * d * sizeof *g);
    poison_upper(d, gp, NAN);
    for (size_t i = 0; i < d * d; i++)
        s[i] = 99.0; /* output must be fully written */
    size_t lw = kvck_chol_shifted_lwork(d);
    double *work = dalloc(lw), shift = -1.0;
    ck_assert_int_eq(kvck_chol_shifted(d, gp, s, &shift, work, lw), 0);
    CHECK(shift == 0.0, "shift %.17g on a positive-definite Gram", shift);
    check_factor(d, g, s, 0.0, "well-conditioned");
    free(x), free(g), free(gp), free(s), free(work);
}
END_TEST

static void chol_singular_case(size_t d, const double *g, const char *what)
{
    double *s = dalloc(d * d), *c = dalloc(d * d);
    /* Premise: plain Cholesky fails, or leaves a pivot at rounding level. */
    memcpy(c, g, d * d * sizeof *c);
    int info = LAPACKE_dpotrf(LAPACK_ROW_MAJOR, 'L', (int)d, c, (int)d);
    double pmin = INFINITY;
    for (size_t i = 0; info == 0 && i < d; i++)
        pmin = fmin(pmin, c[i * d + i] * c[i * d + i]);
    double tr = trace(d, g);
    CHECK(info != 0 || pmin <= 1e-12 * tr, "%s: premise: dpotrf info %d, min pivot %.3g", what,
          info, pmin);

    size_t lw = kvck_chol_shifted_lwork(d);
    double *work = dalloc(lw), shift = 0.0;
    ck_assert_int_eq(kvck_chol_shifted(d, g, s, &shift, work, lw), 0);
    CHECK(shift > 0.0, "%s: shift %.3g", what, shift);
    CHECK(shift < 1e-3 * tr / (double)d, "%s: shift %.3g vs trace/d %.3g", what, shift,
          tr / (double)d);
    /* shift = max(-lam_min, 0) + 1e-6 * trace/d, lam_min ~ 0 (rounding). */
    CHECK(fabs(shift - 1e-6 * tr / (double)d) <= 1e-6 * shift, "%s: shift %.17g, want ~%.17g",
          what, shift, 1e-6 * tr / (double)d);
    check_factor(d, g, s, shift, what);
    free(s), free(c), free(work);
}

START_TEST(test_chol_singular_few_rows)
{
    const size_t n = 20, d = 48; /* rank 20 < d */
    rng r = rng_make(6);
    double *x = dalloc(n * d), *g = dalloc(d * d);
    fill(&r, x, n * d);
    gram(n, d, x, g);
    chol_singular_case(d, g, "n < d");
    free(x), free(g);
}
END_TEST

START_TEST(test_chol_singular_dup_columns)
{
    const size_t n = 256, d = 32;
    rng r = rng_make(7);
    double *x = dalloc(n * d), *g = dalloc(d * d);
    fill(&r, x, n * d);
    for (size_t i = 0; i < n; i++) {
        x[i * d + 31] = x[i * d + 3];
        x[i * d + 17] = x[i * d + 5];
    }
    gram(n, d, x, g);
    chol_singular_case(d, g, "duplicated columns");
    free(x), free(g);
}
END_TEST

START_TEST(test_chol_indefinite)
{
    /* Not a Gram: eigenvalues include -2, so shift = 2 + eps. */
    const size_t d = 24;
    rng r = rng_make(8);
    double *q = dalloc(d * d), *l = dalloc(d), *g = dalloc(d * d), *s = dalloc(d * d);
    rand_orth(&r, d, q);
    for (size_t i = 0; i < d; i++)
        l[i] = 1.0 + (double)i;
    l[d - 1] = -2.0;
    build_known(d, d, d, q, q, l, g);
    size_t lw = kvck_chol_shifted_lwork(d);
    double *work = dalloc(lw), shift = 0.0;
    ck_assert_int_eq(kvck_chol_shifted(d, g, s, &shift, work, lw), 0);
    double want = 2.0 + 1e-6 * trace(d, g) / (double)d;
    CHECK(fabs(shift - want) <= 1e-10 * want, "shift %.17g, want %.17g", shift, want);
    check_factor(d, g, s, shift, "indefinite");
    free(q), free(l), free(g), free(s), free(work);
}
END_TEST

START_TEST(test_chol_zero)
{
    const size_t d = 5;
    double g[25] = {0}, s[25];
    size_t lw = kvck_chol_shifted_lwork(d);
    double *work = dalloc(lw), shift = 0.0;
    ck_assert_int_eq(kvck_chol_shifted(d, g, s, &shift, work, lw), 0);
    CHECK(shift > 0.0 && shift < 1e-300, "shift %.3g on G = 0", shift);
    for (size_t i = 0; i < d; i++)
        for (size_t j = 0; j < d; j++)
            CHECK(i == j ? fabs(s[i * d + j] - sqrt(shift)) <= 1e-14 * sqrt(shift)
                         : s[i * d + j] == 0.0,
                  "S[%zu][%zu] = %.3g", i, j, s[i * d + j]);
    free(work);
}
END_TEST

/* ---- symmetric eigen ----------------------------------------------------- */

START_TEST(test_sym_eig_known)
{
    const size_t n = 50;
    rng r = rng_make(9);
    double *q = dalloc(n * n), *l = dalloc(n), *a0 = dalloc(n * n), *a = dalloc(n * n);
    double *w = dalloc(n), *av = dalloc(n * n);
    rand_orth(&r, n, q);
    /* Distinct, unsorted, with negatives: l_i = 7 - 0.25 i, then shuffled. */
    for (size_t i = 0; i < n; i++)
        l[i] = 7.0 - 0.25 * (double)i;
    for (size_t i = n - 1; i > 0; i--) {
        size_t j = (size_t)(rng_next(&r) % (i + 1));
        double t = l[i];
        l[i] = l[j];
        l[j] = t;
    }
    build_known(n, n, n, q, q, l, a0);
    memcpy(a, a0, n * n * sizeof *a);
    poison_upper(n, a, NAN);
    size_t lw = kvck_sym_eig_lwork(n);
    double *work = dalloc(lw);
    ck_assert_int_eq(kvck_sym_eig(n, a, w, work, lw), 0);
    for (size_t i = 0; i < n; i++) {
        double want = 7.0 - 0.25 * (double)i; /* descending */
        CHECK(fabs(w[i] - want) <= 1e-12 * 7.0, "w[%zu] = %.17g, want %.17g", i, w[i], want);
    }
    CHECK(w[n - 1] < 0.0, "no negative eigenvalue");
    CHECK(orth_err(n, n, a) <= 1e-12, "V not orthogonal");
    gemm(0, 0, n, n, n, a0, n, a, n, av, n); /* A V */
    double e = 0.0;
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < n; j++)
            e = fmax(e, fabs(av[i * n + j] - w[j] * a[i * n + j]));
    CHECK(e <= 1e-12 * 7.0, "|A V - V diag(w)| = %.3g", e);
    free(q), free(l), free(a0), free(a), free(w), free(av), free(work);
}
END_TEST

START_TEST(test_sym_eig_small)
{
    /* n = 1 and a 2x2 by hand: [[2, 1], [1, 2]] -> 3 (1,1)/sqrt2, 1 (1,-1)/sqrt2. */
    double a1[1] = {-3.5}, w1[1];
    size_t lw1 = kvck_sym_eig_lwork(1), lw2 = kvck_sym_eig_lwork(2);
    ck_assert_uint_gt(lw1, 0);
    ck_assert_uint_gt(lw2, 0);
    double *work = dalloc(lw1 > lw2 ? lw1 : lw2);
    ck_assert_int_eq(kvck_sym_eig(1, a1, w1, work, lw1), 0);
    ck_assert_double_eq(w1[0], -3.5);
    ck_assert_double_eq(fabs(a1[0]), 1.0);
    double a2[4] = {2, 1, 1, 2}, w2[2];
    ck_assert_int_eq(kvck_sym_eig(2, a2, w2, work, lw2), 0);
    ck_assert_double_eq_tol(w2[0], 3.0, 1e-15);
    ck_assert_double_eq_tol(w2[1], 1.0, 1e-15);
    const double h = sqrt(0.5);
    ck_assert_double_eq_tol(fabs(a2[0]), h, 1e-15); /* column 0 = +-(1, 1)/sqrt2 */
    ck_assert_double_eq_tol(a2[2] - a2[0], 0.0, 1e-15);
    ck_assert_double_eq_tol(fabs(a2[1]), h, 1e-15); /* column 1 = +-(1, -1)/sqrt2 */
    ck_assert_double_eq_tol(a2[3] + a2[1], 0.0, 1e-15);
    free(work);
}
END_TEST

/* ---- X M = R --------------------------------------------------------------- */

START_TEST(test_spd_solve_spd)
{
    const size_t r = 40, nrhs = 100, n = 200;
    rng g = rng_make(10);
    double *x = dalloc(n * r), *m = dalloc(r * r), *mp = dalloc(r * r), *rr = dalloc(nrhs * r);
    double *b = dalloc(nrhs * r), *xm = dalloc(nrhs * r);
    fill(&g, x, n * r);
    gram(n, r, x, m);
    memcpy(mp, m, r * r * sizeof *m);
    poison_upper(r, mp, 1e300);
    fill(&g, rr, nrhs * r);
    memcpy(b, rr, nrhs * r * sizeof *b);
    size_t lw = kvck_spd_solve_right_lwork(r);
    double *work = dalloc(lw);
    ck_assert_int_eq(kvck_spd_solve_right(r, nrhs, mp, b, work, lw), 0);
    gemm(0, 0, nrhs, r, r, b, r, m, r, xm, r);
    double e = max_abs_diff(xm, rr, nrhs * r) / max_abs(rr, nrhs * r);
    CHECK(e <= 1e-10, "|X M - R| / |R| = %.3g", e);
    free(x), free(m), free(mp), free(rr), free(b), free(xm), free(work);
}
END_TEST

START_TEST(test_spd_solve_singular)
{
    /* M = Q_k diag(l) Q_k^T, rank k < r; R = Y M lies in range(M). The
     * minimum-norm solution is R M^+ = Y P with P = Q_k Q_k^T. nrhs > r so
     * the pseudo-inverse path runs in several row blocks. */
    const size_t r = 40, k = 25, nrhs = 100;
    rng g = rng_make(11);
    double *q = dalloc(r * r), *l = dalloc(r), *m = dalloc(r * r), *y = dalloc(nrhs * r);
    double *rr = dalloc(nrhs * r), *b = dalloc(nrhs * r), *xm = dalloc(nrhs * r);
    double *pr = dalloc(r * r), *xe = dalloc(nrhs * r);
    rand_orth(&g, r, q);
    for (size_t i = 0; i < r; i++)
        l[i] = i < k ? 0.5 + (double)i : 0.0;
    build_known(r, r, r, q, q, l, m);
    for (size_t i = 0; i < r; i++)
        l[i] = i < k ? 1.0 : 0.0;
    build_known(r, r, r, q, q, l, pr); /* projector onto range(M) */
    fill(&g, y, nrhs * r);
    gemm(0, 0, nrhs, r, r, y, r, m, r, rr, r);
    gemm(0, 0, nrhs, r, r, y, r, pr, r, xe, r);
    memcpy(b, rr, nrhs * r * sizeof *b);
    size_t lw = kvck_spd_solve_right_lwork(r);
    double *work = dalloc(lw);
    ck_assert_int_eq(kvck_spd_solve_right(r, nrhs, m, b, work, lw), 0);
    gemm(0, 0, nrhs, r, r, b, r, m, r, xm, r);
    double e = max_abs_diff(xm, rr, nrhs * r) / max_abs(rr, nrhs * r);
    CHECK(e <= 1e-10, "|X M - R| / |R| = %.3g", e);
    double e2 = max_abs_diff(b, xe, nrhs * r) / max_abs(xe, nrhs * r);
    CHECK(e2 <= 1e-10, "|X - R M^+| / |R M^+| = %.3g", e2);

    /* M = 0: X = 0. */
    memset(m, 0, r * r * sizeof *m);
    ck_assert_int_eq(kvck_spd_solve_right(r, nrhs, m, b, work, lw), 0);
    ck_assert_double_eq(max_abs(b, nrhs * r), 0.0);
    free(q), free(l), free(m), free(y), free(rr), free(b), free(xm), free(pr), free(xe),
        free(work);
}
END_TEST

/* ---- fp32 Gram ------------------------------------------------------------ */

START_TEST(test_gram_f32)
{
    const size_t n1 = 37, n2 = 50, d = 24;
    rng r = rng_make(12);
    float *x = malloc((n1 + n2) * d * sizeof *x), *g = malloc(d * d * sizeof *g);
    double *out = dalloc(d * d);
    ck_assert_ptr_nonnull(x);
    ck_assert_ptr_nonnull(g);
    for (size_t i = 0; i < (n1 + n2) * d; i++)
        x[i] = (float)rng_unit(&r);
    for (size_t i = 0; i < d; i++)
        for (size_t j = 0; j < d; j++)
            g[i * d + j] = j >= i ? 0.0f : 123.0f;
    kvck_gram_accum_f32(n1, d, x, g);
    kvck_gram_accum_f32(0, d, x, g); /* no-op */
    kvck_gram_accum_f32(n2, d, x + n1 * d, g);
    for (size_t i = 0; i < d; i++)
        for (size_t j = 0; j < d; j++) {
            if (j < i) {
                CHECK(g[i * d + j] == 123.0f, "lower g[%zu][%zu] touched", i, j);
                continue;
            }
            double want = 0.0, mag = 0.0;
            for (size_t t = 0; t < n1 + n2; t++) {
                double p = (double)x[t * d + i] * (double)x[t * d + j];
                want += p;
                mag += fabs(p);
            }
            CHECK(fabs((double)g[i * d + j] - want) <= 1e-5 * mag + 1e-30,
                  "g[%zu][%zu] = %.9g, want %.9g", i, j, (double)g[i * d + j], want);
        }
    kvck_gram_to_f64(d, g, out);
    for (size_t i = 0; i < d; i++)
        for (size_t j = 0; j < d; j++) {
            double want = (double)(j >= i ? g[i * d + j] : g[j * d + i]);
            CHECK(out[i * d + j] == want, "out[%zu][%zu] = %.9g, want %.9g", i, j,
                  out[i * d + j], want);
        }
    free(x), free(g), free(out);
}
END_TEST

/* ---- bad arguments -------------------------------------------------------- */

START_TEST(test_bad_args)
{
    double a[16] = {4, 1, 0, 0, 1, 4, 1, 0, 0, 1, 4, 1, 0, 0, 1, 4}, s[16], u[16], w[4], sh;
    double *work = dalloc(4096);
    const size_t big = 4096;

    ck_assert_uint_eq(kvck_svd_left_lwork(0, 4), 0);
    ck_assert_uint_eq(kvck_svd_left_lwork(4, 0), 0);
    ck_assert_uint_eq(kvck_chol_shifted_lwork(0), 0);
    ck_assert_uint_eq(kvck_sym_eig_lwork(0), 0);
    ck_assert_uint_eq(kvck_spd_solve_right_lwork(0), 0);
    ck_assert_uint_eq(kvck_sym_eig_lwork((size_t)1 << 40), 0); /* over INT_MAX */

    size_t lsvd = kvck_svd_left_lwork(4, 4);
    ck_assert_uint_gt(lsvd, 0);
    ck_assert_uint_le(lsvd, big);
    ck_assert_int_ne(kvck_svd_left(4, 4, NULL, s, u, work, big), 0);
    ck_assert_int_ne(kvck_svd_left(4, 4, a, NULL, u, work, big), 0);
    ck_assert_int_ne(kvck_svd_left(4, 4, a, s, NULL, work, big), 0);
    ck_assert_int_ne(kvck_svd_left(4, 4, a, s, u, NULL, big), 0);
    ck_assert_int_ne(kvck_svd_left(0, 4, a, s, u, work, big), 0);
    ck_assert_int_ne(kvck_svd_left(4, 0, a, s, u, work, big), 0);
    ck_assert_int_ne(kvck_svd_left(4, 4, a, s, u, work, lsvd - 1), 0);
    ck_assert_int_ne(kvck_svd_left(4, 4, a, s, u, work, 0), 0);
    double an[16];
    memcpy(an, a, sizeof an);
    an[5] = NAN;
    ck_assert_int_ne(kvck_svd_left(4, 4, an, s, u, work, big), 0);

    size_t lch = kvck_chol_shifted_lwork(4);
    ck_assert_uint_gt(lch, 16);
    ck_assert_int_ne(kvck_chol_shifted(4, NULL, s, &sh, work, big), 0);
    ck_assert_int_ne(kvck_chol_shifted(4, a, NULL, &sh, work, big), 0);
    ck_assert_int_ne(kvck_chol_shifted(4, a, s, NULL, work, big), 0);
    ck_assert_int_ne(kvck_chol_shifted(4, a, s, &sh, NULL, big), 0);
    ck_assert_int_ne(kvck_chol_shifted(0, a, s, &sh, work, big), 0);
    ck_assert_int_ne(kvck_chol_shifted(4, a, s, &sh, work, lch - 1), 0);
    an[5] = INFINITY;
    ck_assert_int_ne(kvck_chol_shifted(4, an, s, &sh, work, big), 0);

    size_t leig = kvck_sym_eig_lwork(4);
    double b[16];
    memcpy(b, a, sizeof b);
    ck_assert_int_ne(kvck_sym_eig(4, NULL, w, work, big), 0);
    ck_assert_int_ne(kvck_sym_eig(4, b, NULL, work, big), 0);
    ck_assert_int_ne(kvck_sym_eig(4, b, w, NULL, big), 0);
    ck_assert_int_ne(kvck_sym_eig(0, b, w, work, big), 0);
    ck_assert_int_ne(kvck_sym_eig(4, b, w, work, leig - 1), 0);
    ck_assert_int_ne(kvck_sym_eig(4, an, w, work, big), 0);

    size_t lsol = kvck_spd_solve_right_lwork(4);
    double rhs[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    ck_assert_int_ne(kvck_spd_solve_right(4, 2, NULL, rhs, work, big), 0);
    ck_assert_int_ne(kvck_spd_solve_right(4, 2, a, NULL, work, big), 0);
    ck_assert_int_ne(kvck_spd_solve_right(4, 2, a, rhs, NULL, big), 0);
    ck_assert_int_ne(kvck_spd_solve_right(0, 2, a, rhs, work, big), 0);
    ck_assert_int_ne(kvck_spd_solve_right(4, 0, a, rhs, work, big), 0);
    ck_assert_int_ne(kvck_spd_solve_right(4, 2, a, rhs, work, lsol - 1), 0);
    ck_assert_int_ne(kvck_spd_solve_right(4, 2, an, rhs, work, big), 0);
    rhs[3] = NAN;
    ck_assert_int_ne(kvck_spd_solve_right(4, 2, a, rhs, work, big), 0);

    /* Rejected calls leave their outputs alone where they are inputs too. */
    ck_assert_double_eq(a[5], 4.0);

    /* The void functions do nothing on NULL or zero sizes. */
    float x[4] = {1, 2, 3, 4}, g[4] = {0, 0, 0, 0};
    kvck_gram_accum_f32(2, 2, NULL, g);
    kvck_gram_accum_f32(2, 2, x, NULL);
    kvck_gram_accum_f32(0, 2, x, g);
    kvck_gram_accum_f32(2, 0, x, g);
    for (int i = 0; i < 4; i++)
        ck_assert_float_eq(g[i], 0.0f);
    kvck_gram_to_f64(2, NULL, s);
    kvck_gram_to_f64(2, g, NULL);
    kvck_gram_to_f64(0, g, s);
    free(work);
}
END_TEST

static Suite *linalg_suite(void)
{
    Suite *s = suite_create("linalg");
    TCase *tc;

    tc = tcase_create("svd");
    tcase_add_test(tc, test_svd_known_wide);
    tcase_add_test(tc, test_svd_known_square);
    tcase_add_test(tc, test_svd_known_tall);
    tcase_add_test(tc, test_svd_rank_deficient);
    suite_add_tcase(s, tc);

    tc = tcase_create("chol");
    tcase_add_test(tc, test_chol_well_conditioned);
    tcase_add_test(tc, test_chol_singular_few_rows);
    tcase_add_test(tc, test_chol_singular_dup_columns);
    tcase_add_test(tc, test_chol_indefinite);
    tcase_add_test(tc, test_chol_zero);
    suite_add_tcase(s, tc);

    tc = tcase_create("eig");
    tcase_add_test(tc, test_sym_eig_known);
    tcase_add_test(tc, test_sym_eig_small);
    suite_add_tcase(s, tc);

    tc = tcase_create("solve");
    tcase_add_test(tc, test_spd_solve_spd);
    tcase_add_test(tc, test_spd_solve_singular);
    suite_add_tcase(s, tc);

    tc = tcase_create("gram");
    tcase_add_test(tc, test_gram_f32);
    suite_add_tcase(s, tc);

    tc = tcase_create("args");
    tcase_add_test(tc, test_bad_args);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    const char *env = getenv("KVCK_TEST_SEED");
    if (env && *env)
        g_seed = strtoull(env, NULL, 0);
    printf("linalg: seed %llu (set KVCK_TEST_SEED to replay)\n", (unsigned long long)g_seed);
    fflush(stdout);

    SRunner *sr = srunner_create(linalg_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
