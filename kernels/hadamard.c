/*
 * hadamard.c -- randomized Walsh-Hadamard rotation (kvck_quant.h).
 *
 * A rotation spreads an outlier channel over all channels of its block, so
 * per-channel or per-token ranges shrink before quantizing, and since it is
 * orthogonal, q.k is unchanged when both sides are rotated. A d that is not
 * a power of two is split into power-of-two blocks from the largest down
 * (96 = 64 + 32), each rotated on its own: still orthogonal.
 */
#include "kvck_quant.h"

#include <math.h>

/* Largest power of two <= n (n >= 1). */
static size_t pow2_floor(size_t n)
{
    size_t b = 1;
    while (b <= n / 2)
        b *= 2;
    return b;
}

/* x [b] <- H_b x / sqrt(b), Sylvester order, b a power of two. The
 * normalized H is symmetric and its own inverse. */
static void fwht(float *x, size_t b)
{
    for (size_t h = 1; h < b; h *= 2)
        for (size_t i = 0; i < b; i += 2 * h)
            for (size_t j = i; j < i + h; j++) {
                const float u = x[j], v = x[j + h];
                x[j] = u + v;
                x[j + h] = u - v;
            }
    const float s = (float)(1.0 / sqrt((double)b));
    for (size_t j = 0; j < b; j++)
        x[j] *= s;
}

static void blocks(float *x, size_t d)
{
    for (size_t off = 0; off < d;) {
        const size_t b = pow2_floor(d - off);
        fwht(x + off, b);
        off += b;
    }
}

void kvck_hadamard(float *x, size_t d, const float *signs)
{
    if (signs)
        for (size_t i = 0; i < d; i++)
            x[i] *= signs[i];
    blocks(x, d);
}

void kvck_hadamard_inv(float *x, size_t d, const float *signs)
{
    blocks(x, d);
    if (signs)
        for (size_t i = 0; i < d; i++)
            x[i] *= signs[i];
}

/* Sign i is the top bit of the i-th splitmix64 output from the seed. */
void kvck_hadamard_signs(float *signs, size_t d, uint64_t seed)
{
    uint64_t s = seed;
    for (size_t i = 0; i < d; i++) {
        uint64_t z = (s += 0x9e3779b97f4a7c15ull);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        z ^= z >> 31;
        signs[i] = (z >> 63) ? -1.0f : 1.0f;
    }
}
