/*
 * kld.h -- how far one KV store's next-token distributions are from a
 * reference's (the exact path), token by token: the statistics that
 * llama.cpp's `llama-perplexity --kl-divergence` prints, so that its users
 * can compare a KV-cache compressor with a weight quantization.
 *
 * For each scored token, from the two logit rows over the whole vocabulary
 * (log softmax in double): KL(P_ref || P_q) = sum_i p_i (log p_i - log q_i)
 * in nats, whether the top-1 tokens agree (the lowest index among equal
 * maxima, both sides), and the two negative log-likelihoods of the actual
 * next token. The per-token KLDs are kept (N doubles) for percentiles.
 *
 * Prefix kvch_. No threads; an accumulator belongs to one caller.
 */
#ifndef KVCH_KLD_H
#define KVCH_KLD_H

#include <stddef.h>
#include <stdint.h>

#include "kvc.h"

/* The accumulator: zero it ({0} or kvch_kld_init), add rows, summarize,
 * kvch_kld_free. */
typedef struct kvch_kld {
    double *kld;       /* [n] per-token KL(P_ref || P_q), nats, in the order added */
    size_t n, cap;
    uint64_t same_top; /* tokens whose top-1 token is the same in both */
    /* sums over tokens of -log q(next), of -log p(next), and of their
     * difference d = log p(next) - log q(next) and its square: for
     * ln(PPL(q)/PPL(ref)) = mean d, and its error */
    double nll, nll_ref, d, d2;
} kvch_kld;

void kvch_kld_init(kvch_kld *k);
void kvch_kld_free(kvch_kld *k); /* frees the values and zeroes k; NULL ok */

/* Adds n_rows tokens: ref [n_rows][n_vocab] are the reference logits
 * (P), q [n_rows][n_vocab] the compared ones (Q), targets [n_rows] the
 * actual next tokens. Errors: INVALID (n_vocab 0, a target outside the
 * vocabulary; nothing added), NOMEM. */
kvc_status kvch_kld_add(kvch_kld *k, const float *ref, const float *q, size_t n_rows,
                        size_t n_vocab, const int32_t *targets, char *err, size_t err_size);

typedef struct kvch_kld_stats {
    uint64_t n;      /* tokens */
    double mean;     /* mean KLD, nats */
    double err;      /* its standard error: sqrt(var / (N - 1)), var over N; 0 when N < 2 */
    /* percentiles of the per-token KLD (kvch_percentile) */
    double max, p999, p99, p95, p90, median, p10, p05, p01, min;
    double same_top;     /* share of tokens with the same top-1 token, 0..1 */
    double same_top_err; /* sqrt(p (1 - p) / (N - 1)); 0 when N < 2 */
    /* mean(-log q(next)) - mean(-log p(next)) = ln(PPL(q) / PPL(ref)), and
     * its error sqrt(var(d) / (N - 1)) over the per-token differences d
     * (llama.cpp's sqrt(e_q^2 + e_ref^2 - 2 cov), without its cancellation) */
    double ln_ppl_ratio, ln_ppl_ratio_err;
} kvch_kld_stats;

/* The statistics of what k holds (k unchanged; sorts a copy).
 * Errors: INVALID (no tokens), NOMEM. */
kvc_status kvch_kld_summary(const kvch_kld *k, kvch_kld_stats *st, char *err, size_t err_size);

/* The fraction-th value (0..1) of sorted [n] (ascending, n >= 1), by linear
 * interpolation between the two nearest ranks at fraction * (n - 1), as
 * llama-perplexity: 0 gives the minimum, 1 the maximum, 0.5 the median. */
double kvch_percentile(const double *sorted, size_t n, double fraction);

#endif /* KVCH_KLD_H */
