/*
 * kvck_linalg.h -- fp64 dense linear algebra for the low-rank KV compressors
 * (LoRC, SVD-LLM, Palu): thin wrappers over LAPACK/CBLAS.
 *
 * Internal API (static library, hidden in plugins): not part of the ABI.
 * Conventions of kvck.h: every matrix is row-major, shapes are in the
 * comment beside each buffer (outermost first); nothing here allocates, the
 * caller passes `work` of at least the matching *_lwork() doubles (its
 * contents on return are unspecified); nothing prints or aborts. All
 * functions are thread-safe on distinct data.
 *
 * Return values of the int functions: 0 on success; -1 for bad arguments
 * (a NULL pointer, a zero size, a size over INT_MAX, lwork below the
 * *_lwork() value, a non-finite input); a positive LAPACK info when LAPACK
 * itself failed (no convergence). LAPACK is never called with an invalid
 * argument, so its error handler (which prints) never runs.
 *
 * The *_lwork() functions return 0 for a zero size or a size over INT_MAX.
 */
#ifndef KVCK_LINALG_H
#define KVCK_LINALG_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Relative threshold below which kvck_spd_solve_right treats M as singular
 * (eigenvalues with |lambda| <= KVCK_LINALG_RCOND * max|lambda| are dropped
 * from the pseudo-inverse) and both Cholesky functions treat a factor whose
 * smallest pivot S_ii^2 is <= KVCK_LINALG_RCOND * max_i G_ii as failed. */
#define KVCK_LINALG_RCOND 1e-12

/* ---- SVD: singular values and all left singular vectors ----------------- */

/* Doubles of work kvck_svd_left needs (LAPACK dgesvd's optimal size, from a
 * workspace query). */
size_t kvck_svd_left_lwork(size_t m, size_t n);

/* A = U diag(s) V^T; V is not computed (dgesvd, left vectors 'A', right
 * vectors 'N'). s [min(m,n)] comes out descending and >= 0; column j of u is
 * the left singular vector of s[j]; columns min(m,n)..m-1 complete an
 * orthonormal basis of R^m. Signs of the vectors are LAPACK's (arbitrary
 * but deterministic). */
int kvck_svd_left(size_t m, size_t n,
                  double *a    /* [m][n] in: A; out: destroyed */,
                  double *s    /* [min(m,n)] out: singular values, descending */,
                  double *u    /* [m][m] out: U, column j = j-th left singular vector */,
                  double *work /* [lwork] */, size_t lwork);

/* ---- Cholesky with a diagonal shift (SVD-LLM whitening) ------------------ */

/* Doubles of work kvck_chol_shifted needs: a [d][d] copy of G, [d]
 * eigenvalues and dsyev's eigenvalues-only workspace. */
size_t kvck_chol_shifted_lwork(size_t d);

/* Factors G + shift*I = S S^T, S lower triangular (upper part set to 0).
 * First tries shift = 0 (dpotrf). When that fails, or succeeds with a pivot
 * S_ii^2 <= KVCK_LINALG_RCOND * max_i G_ii (G numerically singular, cond
 * > 1e12), computes lam_min, the smallest eigenvalue of G (dsyev,
 * eigenvalues only; a Gershgorin bound should dsyev not converge), and uses
 *     shift = max(-lam_min, 0) + eps,  eps = 1e-6 * max(trace(G)/d, DBL_MIN)
 * so shift > 0 even when lam_min >= 0 and the factorization failed only
 * through rounding; 1e-6 of the mean diagonal perturbs a Gram matrix by far
 * less than calibration noise yet lifts its smallest pivot well above
 * rounding (d * 1e-16 * trace). Should the shifted factorization fail too,
 * eps is multiplied by 10, up to 4 times. Returns 0, -1 (bad arguments) or
 * 1 (every shift failed; s and *shift are then unspecified).
 * Only the lower triangle of g (j <= i) is read. An all-zero G gives
 * shift = 1e-6 * DBL_MIN. */
int kvck_chol_shifted(size_t d,
                      const double *g /* [d][d] symmetric G, e.g. the Gram X^T X */,
                      double *s       /* [d][d] out: lower-triangular S, upper part 0 */,
                      double *shift   /* [1] out: 0 when G was positive definite */,
                      double *work    /* [lwork] */, size_t lwork);

/* ---- symmetric eigendecomposition ---------------------------------------- */

/* Doubles of work kvck_sym_eig needs (dsyev's optimal size). */
size_t kvck_sym_eig_lwork(size_t n);

/* A = V diag(w) V^T by LAPACK dsyev (QR iteration: no integer workspace,
 * unlike dsyevd). LAPACK gives ascending order; this reorders values and
 * vectors to DESCENDING: w[0] is the largest. On return column j of a is the
 * unit eigenvector of w[j] (sign arbitrary but deterministic). Only the
 * lower triangle of a (j <= i) is read. */
int kvck_sym_eig(size_t n,
                 double *a    /* [n][n] in: symmetric A; out: V, column j = eigenvector of w[j] */,
                 double *w    /* [n] out: eigenvalues, descending */,
                 double *work /* [lwork] */, size_t lwork);

/* ---- right solve with a symmetric positive semi-definite matrix --------- */

/* Doubles of work kvck_spd_solve_right needs (either path below). */
size_t kvck_spd_solve_right_lwork(size_t r);

/* Solves X M = R for X, overwriting R in b. As M is symmetric this is
 * M X^T = R^T: Cholesky (dpotrf + dpotrs) when M is numerically positive
 * definite (dpotrf succeeds and every pivot L_ii^2 > KVCK_LINALG_RCOND *
 * max_i M_ii). Otherwise X = R M^+, the pseudo-inverse from kvck_sym_eig
 * dropping eigenvalues with |lambda| <= KVCK_LINALG_RCOND * max|lambda|: the
 * minimum-norm least-squares solution (X M = R exactly when the rows of R
 * lie in the range of M; X = 0 when M = 0). Only the lower triangle of m
 * (j <= i) is read. */
int kvck_spd_solve_right(size_t r, size_t nrhs,
                         const double *m /* [r][r] symmetric positive semi-definite M */,
                         double *b       /* [nrhs][r] in: R; out: X with X M = R */,
                         double *work    /* [lwork] */, size_t lwork);

/* ---- fp32 Gram accumulation (accumulate in fp32, factor in fp64) -------- */

/* g += x^T x by cblas_ssyrk: only the UPPER triangle of g (j >= i) is
 * updated; the strictly lower part is left as it was. Does nothing when a
 * pointer is NULL, n == 0, d == 0 or d > INT_MAX (n over INT_MAX is done in
 * chunks). */
void kvck_gram_accum_f32(size_t n, size_t d,
                         const float *x /* [n][d] rows of activations */,
                         float *g       /* [d][d] in/out: upper triangle += x^T x */);

/* out = the full symmetric matrix whose upper triangle is g_upper's, in
 * fp64 (the strictly lower part of g_upper is not read). Does nothing when
 * a pointer is NULL or d == 0. */
void kvck_gram_to_f64(size_t d,
                      const float *g_upper /* [d][d] upper triangle valid */,
                      double *out          /* [d][d] out: full symmetric */);

#ifdef __cplusplus
}
#endif

#endif /* KVCK_LINALG_H */
