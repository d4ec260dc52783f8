/*
 * linalg.c -- fp64 SVD, shifted Cholesky, symmetric eigen and SPD solves
 * over LAPACKE/CBLAS, for the low-rank KV compressors.
 *
 * Row-major without copies: LAPACKE's LAPACK_ROW_MAJOR *_work functions
 * transpose every matrix into buffers they malloc themselves, which a
 * kernel must not do. So every call here is LAPACK_COL_MAJOR on the
 * transposed view: a row-major [m][n] buffer is the column-major n x m
 * matrix A^T. Hence
 *   - SVD: dgesvd of A^T = V S U^T with jobu='N', jobvt='A' yields U^T in
 *     column-major, i.e. U in row-major (the same as dgesvd(A) with
 *     jobu='A', jobvt='N', without the transposes);
 *   - symmetric matrices are their own transposes: uplo 'U' of the
 *     column-major view is the row-major lower triangle, and a column-major
 *     upper Cholesky factor U (G = U^T U) is read row-major as the lower
 *     factor L = U^T (G = L L^T);
 *   - X M = R is M X^T = R^T, and row-major R [nrhs][r] is the column-major
 *     r x nrhs matrix R^T: dpotrs solves it in place.
 * Every argument is checked before LAPACK sees it, so LAPACK's xerbla
 * (which prints) never runs.
 */
#include "kvck_linalg.h"

#include <cblas.h>
#include <float.h>
#include <lapacke.h>
#include <limits.h>
#include <math.h>
#include <string.h>

/* ---- helpers --------------------------------------------------------------- */

/* 1 when a size is usable as a LAPACK/CBLAS dimension. */
static int dim_ok(size_t n)
{
    return n > 0 && n <= (size_t)INT_MAX;
}

static lapack_int lwork_arg(size_t lwork)
{
    return (lapack_int)(lwork > (size_t)INT_MAX ? (size_t)INT_MAX : lwork);
}

/* A workspace query's answer as a size; 0 when it does not fit an int (the
 * call could not be given that much). */
static size_t query_size(double q)
{
    if (!(q >= 1.0))
        return 1;
    q = ceil(q);
    if (q > (double)INT_MAX)
        return 0;
    return (size_t)q;
}

static int all_finite(const double *x /* [n] */, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i]))
            return 0;
    return 1;
}

/* 1 when the lower triangle (j <= i) of a [n][n] is finite. */
static int lower_finite(size_t n, const double *a /* [n][n] */)
{
    for (size_t i = 0; i < n; i++)
        if (!all_finite(a + i * n, i + 1))
            return 0;
    return 1;
}

/* dst = lower triangle of src plus shift on the diagonal; the strictly
 * upper part of dst is not written. */
static void copy_lower(size_t n, const double *src /* [n][n] */, double *dst /* [n][n] */,
                       double shift)
{
    for (size_t i = 0; i < n; i++) {
        memcpy(dst + i * n, src + i * n, (i + 1) * sizeof *dst);
        dst[i * n + i] += shift;
    }
}

static void zero_upper(size_t n, double *a /* [n][n] */)
{
    for (size_t i = 0; i + 1 < n; i++)
        memset(a + i * n + i + 1, 0, (n - i - 1) * sizeof *a);
}

static double max_diag(size_t n, const double *a /* [n][n] */)
{
    double mx = -INFINITY;
    for (size_t i = 0; i < n; i++)
        mx = fmax(mx, a[i * n + i]);
    return mx;
}

/* dsyev's optimal workspace (jobz 'N' or 'V'), 0 on failure. */
static size_t syev_lwork(char jobz, size_t n)
{
    if (!dim_ok(n))
        return 0;
    double dummy_a = 0.0, dummy_w = 0.0, q = 0.0;
    lapack_int info = LAPACKE_dsyev_work(LAPACK_COL_MAJOR, jobz, 'U', (lapack_int)n, &dummy_a,
                                         (lapack_int)n, &dummy_w, &q, -1);
    return info == 0 ? query_size(q) : 0;
}

/* Lower Cholesky factor of the lower triangle of a [n][n] (+ shift I) into
 * l [n][n] (upper part zeroed). 0 when dpotrf succeeded and every pivot
 * l_ii^2 exceeds KVCK_LINALG_RCOND times the largest diagonal entry. */
static int chol_lower(size_t n, const double *a /* [n][n] */, double shift,
                      double *l /* [n][n] */)
{
    copy_lower(n, a, l, shift);
    double dmax = max_diag(n, l);
    lapack_int info = LAPACKE_dpotrf_work(LAPACK_COL_MAJOR, 'U', (lapack_int)n, l, (lapack_int)n);
    zero_upper(n, l);
    if (info != 0 || !(dmax > 0.0))
        return 1;
    for (size_t i = 0; i < n; i++) {
        double p = l[i * n + i];
        if (!(p * p > KVCK_LINALG_RCOND * dmax))
            return 1;
    }
    return 0;
}

/* ---- SVD ------------------------------------------------------------------- */

size_t kvck_svd_left_lwork(size_t m, size_t n)
{
    if (!dim_ok(m) || !dim_ok(n))
        return 0;
    double dummy = 0.0, q = 0.0;
    /* Column-major A^T: n rows, m columns; right vectors 'A' (m x m). */
    lapack_int info = LAPACKE_dgesvd_work(LAPACK_COL_MAJOR, 'N', 'A', (lapack_int)n, (lapack_int)m,
                                          &dummy, (lapack_int)n, &dummy, &dummy, 1, &dummy,
                                          (lapack_int)m, &q, -1);
    return info == 0 ? query_size(q) : 0;
}

int kvck_svd_left(size_t m, size_t n, double *a, double *s, double *u, double *work,
                  size_t lwork)
{
    if (!a || !s || !u || !work || !dim_ok(m) || !dim_ok(n))
        return -1;
    size_t need = kvck_svd_left_lwork(m, n);
    if (need == 0 || lwork < need || !all_finite(a, m * n))
        return -1;
    double dummy_u = 0.0;
    lapack_int info = LAPACKE_dgesvd_work(LAPACK_COL_MAJOR, 'N', 'A', (lapack_int)n, (lapack_int)m,
                                          a, (lapack_int)n, s, &dummy_u, 1, u, (lapack_int)m, work,
                                          lwork_arg(lwork));
    return info == 0 ? 0 : (info > 0 ? (int)info : -1);
}

/* ---- shifted Cholesky ------------------------------------------------------ */

size_t kvck_chol_shifted_lwork(size_t d)
{
    size_t q = syev_lwork('N', d);
    if (q == 0)
        return 0;
    return d * d + d + q;
}

int kvck_chol_shifted(size_t d, const double *g, double *s, double *shift, double *work,
                      size_t lwork)
{
    if (!g || !s || !shift || !work || !dim_ok(d))
        return -1;
    size_t need = kvck_chol_shifted_lwork(d);
    if (need == 0 || lwork < need || !lower_finite(d, g))
        return -1;

    if (chol_lower(d, g, 0.0, s) == 0) {
        *shift = 0.0;
        return 0;
    }

    /* Smallest eigenvalue of G. */
    double *c = work;          /* [d][d] copy of G */
    double *w = c + d * d;     /* [d] eigenvalues, ascending */
    double *sw = w + d;        /* [lwork - d*d - d] dsyev's workspace */
    copy_lower(d, g, c, 0.0);
    lapack_int info = LAPACKE_dsyev_work(LAPACK_COL_MAJOR, 'N', 'U', (lapack_int)d, c,
                                         (lapack_int)d, w, sw, lwork_arg(lwork - d * d - d));
    double lam_min;
    if (info == 0) {
        lam_min = w[0];
    } else {
        /* No convergence: Gershgorin's lower bound instead. */
        lam_min = INFINITY;
        for (size_t i = 0; i < d; i++) {
            double off = 0.0;
            for (size_t j = 0; j < d; j++)
                if (j != i)
                    off += fabs(j < i ? g[i * d + j] : g[j * d + i]);
            lam_min = fmin(lam_min, g[i * d + i] - off);
        }
    }

    double trace = 0.0;
    for (size_t i = 0; i < d; i++)
        trace += g[i * d + i];
    double eps = 1e-6 * fmax(trace / (double)d, DBL_MIN);
    double base = fmax(-lam_min, 0.0);
    for (int attempt = 0; attempt < 5; attempt++, eps *= 10.0) {
        double sh = base + eps;
        if (chol_lower(d, g, sh, s) == 0) {
            *shift = sh;
            return 0;
        }
    }
    return 1;
}

/* ---- symmetric eigen ------------------------------------------------------- */

size_t kvck_sym_eig_lwork(size_t n)
{
    return syev_lwork('V', n);
}

int kvck_sym_eig(size_t n, double *a, double *w, double *work, size_t lwork)
{
    if (!a || !w || !work || !dim_ok(n))
        return -1;
    size_t need = kvck_sym_eig_lwork(n);
    if (need == 0 || lwork < need || !lower_finite(n, a))
        return -1;
    lapack_int info = LAPACKE_dsyev_work(LAPACK_COL_MAJOR, 'V', 'U', (lapack_int)n, a,
                                         (lapack_int)n, w, work, lwork_arg(lwork));
    if (info != 0)
        return info > 0 ? (int)info : -1;

    /* Row k of the buffer is now the eigenvector of the k-th smallest
     * eigenvalue. Reverse the rows (and w) to descending, then transpose so
     * the vectors become columns. */
    for (size_t k = 0; k < n / 2; k++) {
        double *r0 = a + k * n, *r1 = a + (n - 1 - k) * n;
        for (size_t i = 0; i < n; i++) {
            double t = r0[i];
            r0[i] = r1[i];
            r1[i] = t;
        }
        double t = w[k];
        w[k] = w[n - 1 - k];
        w[n - 1 - k] = t;
    }
    for (size_t i = 0; i < n; i++)
        for (size_t j = i + 1; j < n; j++) {
            double t = a[i * n + j];
            a[i * n + j] = a[j * n + i];
            a[j * n + i] = t;
        }
    return 0;
}

/* ---- X M = R --------------------------------------------------------------- */

size_t kvck_spd_solve_right_lwork(size_t r)
{
    size_t q = kvck_sym_eig_lwork(r);
    if (q == 0)
        return 0;
    return r * r + r + (q > r * r ? q : r * r);
}

int kvck_spd_solve_right(size_t r, size_t nrhs, const double *m, double *b, double *work,
                         size_t lwork)
{
    if (!m || !b || !work || !dim_ok(r) || !dim_ok(nrhs))
        return -1;
    size_t need = kvck_spd_solve_right_lwork(r);
    if (need == 0 || lwork < need || !lower_finite(r, m) || !all_finite(b, nrhs * r))
        return -1;

    double *v = work;                       /* [r][r] Cholesky factor, or eigenvectors */
    double *w = v + r * r;                  /* [r] eigenvalues, then their inverses */
    double *sc = w + r;                     /* [lwork - r*r - r] dsyev workspace, then T */
    size_t sc_len = lwork - r * r - r;

    if (chol_lower(r, m, 0.0, v) == 0) {
        /* Column-major: v is U (M = U^T U), b is R^T (r x nrhs). */
        lapack_int info = LAPACKE_dpotrs_work(LAPACK_COL_MAJOR, 'U', (lapack_int)r,
                                              (lapack_int)nrhs, v, (lapack_int)r, b,
                                              (lapack_int)r);
        return info == 0 ? 0 : -1;
    }

    /* Pseudo-inverse: X = ((R V) diag(1/w)) V^T over the kept eigenvalues. */
    copy_lower(r, m, v, 0.0);
    int rc = kvck_sym_eig(r, v, w, sc, sc_len);
    if (rc != 0)
        return rc;
    double wmax = fmax(fabs(w[0]), fabs(w[r - 1]));
    if (!(wmax > 0.0)) {
        memset(b, 0, nrhs * r * sizeof *b);
        return 0;
    }
    for (size_t j = 0; j < r; j++)
        w[j] = fabs(w[j]) > KVCK_LINALG_RCOND * wmax ? 1.0 / w[j] : 0.0;

    size_t blk_max = sc_len / r; /* >= r */
    for (size_t i0 = 0; i0 < nrhs; i0 += blk_max) {
        size_t blk = nrhs - i0 < blk_max ? nrhs - i0 : blk_max;
        double *bb = b + i0 * r;
        /* sc [blk][r] = B_blk V */
        cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)blk, (int)r, (int)r, 1.0, bb,
                    (int)r, v, (int)r, 0.0, sc, (int)r);
        for (size_t i = 0; i < blk; i++)
            for (size_t j = 0; j < r; j++)
                sc[i * r + j] *= w[j];
        /* B_blk = sc V^T */
        cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)blk, (int)r, (int)r, 1.0, sc,
                    (int)r, v, (int)r, 0.0, bb, (int)r);
    }
    return 0;
}

/* ---- fp32 Gram ------------------------------------------------------------- */

void kvck_gram_accum_f32(size_t n, size_t d, const float *x, float *g)
{
    if (!x || !g || n == 0 || d == 0 || d > (size_t)INT_MAX)
        return;
    while (n > 0) {
        size_t k = n > (size_t)INT_MAX ? (size_t)INT_MAX : n;
        cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, (int)d, (int)k, 1.0f, x, (int)d, 1.0f,
                    g, (int)d);
        x += k * d;
        n -= k;
    }
}

void kvck_gram_to_f64(size_t d, const float *g_upper, double *out)
{
    if (!g_upper || !out || d == 0)
        return;
    for (size_t i = 0; i < d; i++)
        for (size_t j = i; j < d; j++) {
            double v = (double)g_upper[i * d + j];
            out[i * d + j] = v;
            out[j * d + i] = v;
        }
}
