/*
 * convert.c -- IEEE binary16 <-> binary32 and a finiteness check.
 *
 * The scalar functions are the definition: integer-only, round to nearest
 * even, exact on subnormals, overflow to infinity, NaN stays NaN (quieted,
 * top payload bits kept). The array versions give bit-identical results and
 * use the F16C instructions where the CPU and OS offer them, because a
 * plugin that stores fp16 converts every cached element on every attend,
 * and a scalar branchy loop would cost more than the memory traffic.
 * -DKVCK_GENERIC_ONLY leaves the scalar loops only (tested too).
 */
#include "kvck.h"

#include <string.h>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(KVCK_GENERIC_ONLY)
#define KVCK_HAVE_F16C_PATH 1
#include <cpuid.h>
#include "cpufeat.h"
#include <immintrin.h>
#endif

static uint32_t f32_bits(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}

static float bits_f32(uint32_t u)
{
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

uint16_t kvck_f32_to_f16(float x)
{
    uint32_t u = f32_bits(x);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu; /* magnitude bits */

    if (a >= 0x7f800000u) {
        if (a > 0x7f800000u) /* NaN: quiet it, keep the top 9 payload bits */
            return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
        return (uint16_t)(sign | 0x7c00u);
    }
    /* 65520 = 65504 + half an ulp: the tie rounds to the even neighbour,
     * which is 65536, i.e. infinity. */
    if (a >= 0x477ff000u)
        return (uint16_t)(sign | 0x7c00u);
    if (a >= 0x38800000u) {
        /* Normal half (>= 2^-14): rebias the exponent (127 -> 15) and drop
         * 13 mantissa bits with round to nearest even. A carry out of the
         * mantissa correctly bumps the exponent. */
        uint32_t v = a - 0x38000000u;
        uint32_t r = v >> 13, rest = v & 0x1fffu;
        r += (rest > 0x1000u) || (rest == 0x1000u && (r & 1u));
        return (uint16_t)(sign | r);
    }
    /* Below 2^-25 everything rounds to zero (2^-25 itself ties to 0). */
    if (a < 0x33000000u)
        return sign;
    {
        /* Subnormal half, in units of 2^-24: value = m * 2^(e - 150), so the
         * half mantissa is m >> (126 - e), shift in 14..24. Rounding up
         * from 0x3ff gives 0x400, the smallest normal: also correct. */
        uint32_t e = a >> 23;
        uint32_t m = (a & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126u - e;
        uint32_t r = m >> shift, rest = m & ((1u << shift) - 1u);
        uint32_t half = 1u << (shift - 1u);
        r += (rest > half) || (rest == half && (r & 1u));
        return (uint16_t)(sign | r);
    }
}

float kvck_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;

    if (e == 0x1fu) {
        /* Inf, or NaN quieted (as F16C does) with its payload kept. */
        uint32_t quiet = m ? 0x400000u : 0u;
        return bits_f32(sign | 0x7f800000u | quiet | (m << 13));
    }
    if (e)
        return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
    /* Zero or subnormal: m * 2^-24 is exact in float (a normal number, so
     * flush-to-zero modes do not touch it). */
    {
        float f = (float)m * 0x1p-24f;
        return bits_f32(f32_bits(f) | sign);
    }
}

#ifdef KVCK_HAVE_F16C_PATH
/* 1 when F16C and AVX state are usable: F16C instructions are VEX-encoded
 * and fault unless the OS saves the YMM state (OSXSAVE + XCR0 bits 1, 2).
 * The answer is cached; racing first calls compute the same value. */
static int have_f16c(void)
{
    static _Atomic int cached = -1;
    int c = cached;
    if (c < 0)
        cached = c = kvck_x86_has(bit_F16C, 0);
    return c;
}

__attribute__((target("avx,f16c"))) static void f32_to_f16_f16c(const float *in, uint16_t *out,
                                                                 size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(in + i);
        /* imm 0: round to nearest even, whatever MXCSR says. */
        __m128i h = _mm256_cvtps_ph(x, 0);
        _mm_storeu_si128((__m128i *)(void *)(out + i), h);
    }
    for (; i < n; i++)
        out[i] = kvck_f32_to_f16(in[i]);
}

__attribute__((target("avx,f16c"))) static void f16_to_f32_f16c(const uint16_t *in, float *out,
                                                                 size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm_loadu_si128((const __m128i *)(const void *)(in + i));
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(h));
    }
    for (; i < n; i++)
        out[i] = kvck_f16_to_f32(in[i]);
}
#endif

void kvck_f32_to_f16_n(const float *in, uint16_t *out, size_t n)
{
#ifdef KVCK_HAVE_F16C_PATH
    if (have_f16c()) {
        f32_to_f16_f16c(in, out, n);
        return;
    }
#endif
    for (size_t i = 0; i < n; i++)
        out[i] = kvck_f32_to_f16(in[i]);
}

void kvck_f16_to_f32_n(const uint16_t *in, float *out, size_t n)
{
#ifdef KVCK_HAVE_F16C_PATH
    if (have_f16c()) {
        f16_to_f32_f16c(in, out, n);
        return;
    }
#endif
    for (size_t i = 0; i < n; i++)
        out[i] = kvck_f16_to_f32(in[i]);
}

int kvck_all_finite(const float *x, size_t n)
{
    /* Bit test instead of isfinite(): immune to -ffinite-math-only and
     * branch-free, so it vectorizes; OR-reduce the "exponent all ones"
     * flags. */
    uint32_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, x + i, sizeof u);
        bad |= (uint32_t)((u & 0x7f800000u) == 0x7f800000u);
    }
    return bad == 0;
}
