/*
 * test_kld.c -- model/kld.c on hand-built logits: KL divergences worked
 * out by hand, the percentile rule (llama-perplexity's linear
 * interpolation), top-1 agreement, ln(PPL ratio) and the errors, identical
 * logits giving 0 and 100%, and the refusals. No model needed.
 */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kld.h"

static kvch_kld_stats summary(const kvch_kld *k)
{
    kvch_kld_stats st;
    char err[256];
    ck_assert_msg(kvch_kld_summary(k, &st, err, sizeof err) == KVC_OK, "%s", err);
    return st;
}

static void add(kvch_kld *k, const float *ref, const float *q, size_t rows, size_t V,
                const int32_t *targets)
{
    char err[256];
    ck_assert_msg(kvch_kld_add(k, ref, q, rows, V, targets, err, sizeof err) == KVC_OK, "%s",
                  err);
}

/* P uniform over 3 tokens (logits 0, 0, 0); Q = (1/2, 1/4, 1/4) (logits
 * ln 2, 0, 0). KL(P || Q) = 1/3 ln(2/3) + 2/3 ln(4/3) = (ln 2 - ln 3 + 2 ln 4
 * - 2 ln 3) / 3 = (5 ln 2 - 3 ln 3) / 3 = 0.0566330...; the other direction,
 * KL(Q || P) = 1/2 ln(3/2) + 1/2 ln(3/4) = ln 3 - 3/2 ln 2 = 0.0588915...,
 * is not what is measured. */
START_TEST(kld_of_two_three_token_distributions)
{
    const float P[3] = {0.0f, 0.0f, 0.0f};
    const float Q[3] = {(float)log(2.0), 0.0f, 0.0f};
    const int32_t target = 1;
    kvch_kld k = {0};
    add(&k, P, Q, 1, 3, &target);
    ck_assert_uint_eq(k.n, 1);
    const double want = (5.0 * log(2.0) - 3.0 * log(3.0)) / 3.0;
    ck_assert_double_eq_tol(want, 0.0566330, 1e-7);
    ck_assert_double_eq_tol(k.kld[0], want, 1e-7);
    ck_assert_double_ge(fabs(k.kld[0] - (log(3.0) - 1.5 * log(2.0))), 1e-3);
    /* both tops are token 0: P's by the lowest index among equal maxima */
    ck_assert_uint_eq(k.same_top, 1);
    /* next token 1: -log p = ln 3, -log q = ln 4 */
    ck_assert_double_eq_tol(k.nll_ref, log(3.0), 1e-7);
    ck_assert_double_eq_tol(k.nll, log(4.0), 1e-7);
    kvch_kld_free(&k);
    ck_assert_ptr_null(k.kld);
    ck_assert_uint_eq(k.n, 0);
}
END_TEST

/* (0.5, 0.3, 0.2) against (0.4, 0.4, 0.2), logits log p shifted by a
 * constant (softmax does not see it): KL = 0.5 ln(5/4) + 0.3 ln(3/4)
 * = 0.0252671... */
START_TEST(kld_ignores_a_logit_shift)
{
    float P[3], Q[3];
    const double p[3] = {0.5, 0.3, 0.2}, q[3] = {0.4, 0.4, 0.2};
    for (int i = 0; i < 3; i++) {
        P[i] = (float)(log(p[i]) + 7.0);
        Q[i] = (float)(log(q[i]) - 3.0);
    }
    const int32_t target = 2;
    kvch_kld k = {0};
    add(&k, P, Q, 1, 3, &target);
    ck_assert_double_eq_tol(k.kld[0], 0.5 * log(1.25) + 0.3 * log(0.75), 1e-6);
    ck_assert_double_eq_tol(k.kld[0], 0.0252671, 1e-6);
    ck_assert_uint_eq(k.same_top, 1); /* token 0 both */
    /* next token 2 has 0.2 in both: its NLL difference is 0 */
    ck_assert_double_eq_tol(k.d, 0.0, 1e-6);
    kvch_kld_free(&k);
}
END_TEST

START_TEST(identical_logits_give_zero_and_all_same_top)
{
    enum { ROWS = 7, V = 50 };
    float L[ROWS * V];
    int32_t t[ROWS];
    for (int r = 0; r < ROWS; r++) {
        t[r] = (r * 13) % V;
        for (int i = 0; i < V; i++)
            L[r * V + i] = (float)sin(0.37 * (r * V + i)) * 9.0f;
    }
    kvch_kld k = {0};
    add(&k, L, L, ROWS, V, t);
    for (int r = 0; r < ROWS; r++)
        ck_assert_msg(k.kld[r] == 0.0, "row %d: %g", r, k.kld[r]);
    kvch_kld_stats st = summary(&k);
    ck_assert_uint_eq(st.n, ROWS);
    ck_assert(st.mean == 0.0 && st.err == 0.0 && st.max == 0.0 && st.min == 0.0);
    ck_assert(st.p999 == 0.0 && st.p99 == 0.0 && st.median == 0.0);
    ck_assert(st.same_top == 1.0 && st.same_top_err == 0.0);
    ck_assert(st.ln_ppl_ratio == 0.0 && st.ln_ppl_ratio_err == 0.0);
    kvch_kld_free(&k);
}
END_TEST

START_TEST(percentile_interpolates_between_ranks)
{
    const double five[5] = {1, 2, 3, 4, 5};
    ck_assert_double_eq(kvch_percentile(five, 5, 0.0), 1.0);
    ck_assert_double_eq(kvch_percentile(five, 5, 1.0), 5.0);
    ck_assert_double_eq(kvch_percentile(five, 5, 0.5), 3.0);
    ck_assert_double_eq(kvch_percentile(five, 5, 0.25), 2.0);
    ck_assert_double_eq_tol(kvch_percentile(five, 5, 0.9), 4.6, 1e-12); /* 3.6 -> 4 + 0.6 */
    ck_assert_double_eq_tol(kvch_percentile(five, 5, 0.99), 4.96, 1e-12);
    /* an even count's median is the mean of the middle two */
    const double four[4] = {1, 2, 10, 20};
    ck_assert_double_eq(kvch_percentile(four, 4, 0.5), 6.0);
    const double one[1] = {7};
    ck_assert_double_eq(kvch_percentile(one, 1, 0.999), 7.0);
    /* 1..1000: 99.9% at rank 998.001 -> 999.001 */
    double *k = malloc(1000 * sizeof *k);
    for (int i = 0; i < 1000; i++)
        k[i] = i + 1;
    ck_assert_double_eq_tol(kvch_percentile(k, 1000, 0.999), 999.001, 1e-9);
    ck_assert_double_eq_tol(kvch_percentile(k, 1000, 0.99), 990.01, 1e-9);
    free(k);
}
END_TEST

/* Rows added unsorted: the summary sorts a copy, the values stay in order. */
START_TEST(summary_of_a_known_list)
{
    /* Row r: P uniform over 2 tokens, Q = softmax(x_r, 0), so that
     * KL = 1/2 ln(1/2 / q0) + 1/2 ln(1/2 / q1) = -ln 2 - (ln q0 + ln q1) / 2. */
    enum { ROWS = 11 };
    const float x[ROWS] = {0.5f, 3.0f, 0.0f, 1.0f, 2.5f, 0.25f, 2.0f, 1.5f, 0.75f, 4.0f, 1.25f};
    float P[ROWS * 2] = {0}, Q[ROWS * 2];
    int32_t t[ROWS];
    double want[ROWS];
    for (int r = 0; r < ROWS; r++) {
        Q[2 * r] = x[r];
        Q[2 * r + 1] = 0.0f;
        t[r] = 0;
        double lz = log(1.0 + exp(x[r]));
        want[r] = -log(2.0) - ((x[r] - lz) + (0.0 - lz)) / 2.0;
    }
    kvch_kld k = {0};
    add(&k, P, Q, 5, 2, t); /* in two calls */
    add(&k, P + 10, Q + 10, ROWS - 5, 2, t + 5);
    ck_assert_uint_eq(k.n, ROWS);
    double sum = 0.0;
    for (int r = 0; r < ROWS; r++) {
        ck_assert_double_eq_tol(k.kld[r], want[r], 1e-9);
        sum += want[r];
    }
    kvch_kld_stats st = summary(&k);
    ck_assert_double_eq_tol(k.kld[0], want[0], 1e-9); /* not sorted in place */
    const double mean = sum / ROWS;
    double ss = 0.0;
    for (int r = 0; r < ROWS; r++)
        ss += (want[r] - mean) * (want[r] - mean);
    ck_assert_double_eq_tol(st.mean, mean, 1e-9);
    ck_assert_double_eq_tol(st.err, sqrt(ss / ROWS / (ROWS - 1)), 1e-9);
    /* KL grows with |x|: x = 0 is the minimum (0), x = 4 the maximum; the
     * median (rank 5 of 0..10) is x = 1.25's, 90% (rank 9) x = 3's */
    ck_assert_double_eq_tol(st.min, 0.0, 1e-12);
    ck_assert_double_eq_tol(st.max, want[9], 1e-12);
    ck_assert_double_eq_tol(st.median, want[10], 1e-12);
    ck_assert_double_eq_tol(st.p90, want[1], 1e-12);
    ck_assert_double_eq_tol(st.p95, (want[1] + want[9]) / 2.0, 1e-12); /* rank 9.5 */
    ck_assert_double_eq_tol(st.p99, 0.1 * want[1] + 0.9 * want[9], 1e-12);
    ck_assert(st.min <= st.p10 && st.p10 <= st.median && st.median <= st.p90 &&
              st.p90 <= st.p95 && st.p95 <= st.p99 && st.p99 <= st.p999 && st.p999 <= st.max);
    /* P's top is token 0 (a tie); Q's is token 0 for x >= 0: all the same */
    ck_assert_double_eq(st.same_top, 1.0);
    kvch_kld_free(&k);
}
END_TEST

/* 4 rows, 3 with the same top: 75 % ± sqrt(0.75 0.25 / 3) = 25 %. */
START_TEST(same_top_counts_argmax_agreement)
{
    const float P[4 * 3] = {1, 2, 0, /**/ 5, 1, 1, /**/ 0, 0, 3, /**/ 2, 1, 0};
    const float Q[4 * 3] = {0, 3, 1, /**/ 4, 2, 2, /**/ 1, 0, 2, /**/ 1, 2, 0};
    const int32_t t[4] = {0, 0, 0, 0};
    kvch_kld k = {0};
    add(&k, P, Q, 4, 3, t);
    ck_assert_uint_eq(k.same_top, 3);
    kvch_kld_stats st = summary(&k);
    ck_assert_double_eq_tol(st.same_top, 0.75, 1e-12);
    ck_assert_double_eq_tol(st.same_top_err, 0.25, 1e-12);
    for (int r = 0; r < 4; r++)
        ck_assert_double_gt(k.kld[r], 0.0);
    kvch_kld_free(&k);
}
END_TEST

/* Two rows, P uniform over 3, Q = (1/2, 1/4, 1/4); next tokens 0 then 1:
 * d = ln 2 - ln 3, then ln 4 - ln 3. Mean 3/2 ln 2 - ln 3; the d differ by
 * ln 2, so var = (ln 2 / 2)^2 and the error sqrt(var / 1) = ln 2 / 2. */
START_TEST(ln_ppl_ratio_and_its_error)
{
    const float P[6] = {0, 0, 0, 0, 0, 0};
    const float l2 = (float)log(2.0);
    const float Q[6] = {l2, 0, 0, l2, 0, 0};
    const int32_t t[2] = {0, 1};
    kvch_kld k = {0};
    add(&k, P, Q, 2, 3, t);
    kvch_kld_stats st = summary(&k);
    ck_assert_double_eq_tol(st.ln_ppl_ratio, 1.5 * log(2.0) - log(3.0), 1e-7);
    ck_assert_double_eq_tol(st.ln_ppl_ratio_err, log(2.0) / 2.0, 1e-7);
    /* equal KLDs: no spread */
    ck_assert_double_eq_tol(st.err, 0.0, 1e-12);
    kvch_kld_free(&k);
}
END_TEST

START_TEST(many_rows_grow_the_store)
{
    const float P[2] = {0, 0}, Q[2] = {1, 0};
    const int32_t t = 1;
    kvch_kld k = {0};
    for (int i = 0; i < 3000; i++)
        add(&k, P, Q, 1, 2, &t);
    ck_assert_uint_eq(k.n, 3000);
    ck_assert_uint_ge(k.cap, 3000);
    kvch_kld_stats st = summary(&k);
    ck_assert_double_eq_tol(st.mean, k.kld[0], 1e-12); /* 3000 sums of one value */
    ck_assert_double_eq_tol(st.max, st.min, 1e-15);
    kvch_kld_free(&k);
}
END_TEST

START_TEST(refusals_leave_the_accumulator_alone)
{
    const float P[3] = {0, 1, 2};
    char err[256];
    kvch_kld k;
    kvch_kld_init(&k);
    kvch_kld_stats st;
    ck_assert_int_eq(kvch_kld_summary(&k, &st, err, sizeof err), KVC_E_INVALID);
    ck_assert_ptr_nonnull(strstr(err, "no tokens"));
    const int32_t bad[2] = {1, 3};
    ck_assert_int_eq(kvch_kld_add(&k, P, P, 2, 3, bad, err, sizeof err), KVC_E_INVALID);
    ck_assert_ptr_nonnull(strstr(err, "outside the vocabulary"));
    const int32_t neg = -1;
    ck_assert_int_eq(kvch_kld_add(&k, P, P, 1, 3, &neg, err, sizeof err), KVC_E_INVALID);
    ck_assert_int_eq(kvch_kld_add(&k, P, P, 1, 0, bad, err, sizeof err), KVC_E_INVALID);
    ck_assert_uint_eq(k.n, 0);
    ck_assert_uint_eq(k.same_top, 0);
    kvch_kld_free(&k);
    kvch_kld_free(NULL);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("kld");
    TCase *t = tcase_create("kld");
    tcase_add_test(t, kld_of_two_three_token_distributions);
    tcase_add_test(t, kld_ignores_a_logit_shift);
    tcase_add_test(t, identical_logits_give_zero_and_all_same_top);
    tcase_add_test(t, percentile_interpolates_between_ranks);
    tcase_add_test(t, summary_of_a_known_list);
    tcase_add_test(t, same_top_counts_argmax_agreement);
    tcase_add_test(t, ln_ppl_ratio_and_its_error);
    tcase_add_test(t, many_rows_grow_the_store);
    tcase_add_test(t, refusals_leave_the_accumulator_alone);
    suite_add_tcase(s, t);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
