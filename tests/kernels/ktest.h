/*
 * ktest.h -- helpers the kernel Check suites share: assertions cheap enough
 * for loops, a seeded generator, buffers.
 */
#ifndef KVCK_KTEST_H
#define KVCK_KTEST_H

#include <check.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

/* Check's ck_assert* records every passing assertion through its pipe (a
 * write syscall each); these only call into Check on failure, so they can
 * sit inside loops over millions of elements. */
#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond))                                                                               \
            ck_abort_msg(__VA_ARGS__);                                                             \
    } while (0)
#define CHECK1(cond) CHECK(cond, "failed: %s", #cond)

typedef struct rng {
    uint64_t s;
} rng;

static inline uint64_t rng_next(rng *r)
{
    /* splitmix64 */
    uint64_t z = (r->s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Uniform integer in [lo, hi]. */
static inline size_t rng_range(rng *r, size_t lo, size_t hi)
{
    return lo + (size_t)(rng_next(r) % (uint64_t)(hi - lo + 1));
}

/* Uniform in [-1, 1). */
static inline float rng_unit(rng *r)
{
    return (float)((double)(rng_next(r) >> 11) * 0x1p-53 * 2.0 - 1.0);
}

static inline void fill(rng *r, float *x, size_t n, float amp)
{
    for (size_t i = 0; i < n; i++)
        x[i] = amp * rng_unit(r);
}

static inline void *xmalloc(size_t bytes)
{
    void *p = malloc(bytes ? bytes : 1);
    ck_assert_ptr_nonnull(p);
    return p;
}

/* The suite's seed: KVCK_TEST_SEED when set, else dflt; printed, so a
 * failure can be replayed. */
static inline uint64_t ktest_seed(const char *suite, uint64_t dflt)
{
    const char *env = getenv("KVCK_TEST_SEED");
    const uint64_t seed = env && *env ? strtoull(env, NULL, 0) : dflt;
    printf("%s: seed %llu (set KVCK_TEST_SEED to replay)\n", suite, (unsigned long long)seed);
    fflush(stdout);
    return seed;
}

/* Runs a suite (each test forked, as Check does by default); returns the
 * number of failed tests. */
static inline int ktest_run(Suite *s)
{
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    const int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed;
}

#endif
