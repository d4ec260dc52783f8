/*
 * ktest.h -- helpers the kernel Check suites share: assertions cheap enough
 * for loops, a seeded generator, buffers.
 */
#ifndef KVCK_KTEST_H
#define KVCK_KTEST_H

#include <check.h>
#include <stdint.h>
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

#endif
