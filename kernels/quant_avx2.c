/*
 * quant_avx2.c -- AVX2 + FMA + F16C instances of quant_simd.h: scores and
 * P.V on packed codes and on fp16 rows, 8 channels a vector.
 *
 * vpermps looks up 8 entries, so a 4-bit code takes two lookups (levels
 * 0-7 and 8-15) and a blend on its bit 3; 2-bit levels are repeated twice
 * over the 8 entries, which masks the neighbouring field's low bit. Only
 * called when kvck_isa() says the CPU has these.
 */
#include "kvck_quant.h"
#include "quant_internal.h"

#include <string.h>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(KVCK_GENERIC_ONLY)
#include <immintrin.h>

#define ATTR __attribute__((target("avx2,fma,f16c")))
#define SFX(x) x##_avx2
#define VL 8
typedef __m256 V;

static inline ATTR V v_zero(void) { return _mm256_setzero_ps(); }
static inline ATTR V v_load(const float *p) { return _mm256_loadu_ps(p); }
static inline ATTR V v_loadu(const float *p) { return _mm256_loadu_ps(p); }
static inline ATTR void v_store(float *p, V x) { _mm256_storeu_ps(p, x); }
static inline ATTR V v_set1(float x) { return _mm256_set1_ps(x); }
static inline ATTR V v_bcast(const float *p) { return _mm256_broadcast_ss(p); }
static inline ATTR V v_fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
static inline ATTR V v_mul(V a, V b) { return _mm256_mul_ps(a, b); }
static inline ATTR V v_add(V a, V b) { return _mm256_add_ps(a, b); }
static inline ATTR V v_f16(const uint16_t *p)
{
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)p));
}

/* Levels of one segment, ready for lookups. */
typedef struct LUT {
    __m256 lo, hi;    /* widths 2, 4: entries 0-7 and 8-15 */
    const float *tab; /* width 8: [256] levels (tables) */
    int uni8;         /* width 8, uniform levels: c / 255 */
} LUT;

static inline ATTR void lut_make(LUT *l, const float *lev, unsigned bits, int uniform)
{
    float t[16];
    for (int i = 0; i < 16; i++)
        t[i] = bits == 4 ? lev[i] : bits == 2 ? lev[i & 3] : 0.0f;
    l->lo = _mm256_loadu_ps(t);
    l->hi = _mm256_loadu_ps(t + 8);
    l->tab = lev;
    l->uni8 = uniform;
}

static inline ATTR V dec(const uint8_t *p, unsigned bits, unsigned shift, const LUT *l)
{
    __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(const void *)p));
    if (bits == 8)
        return l->uni8 ? _mm256_mul_ps(_mm256_cvtepi32_ps(x), _mm256_set1_ps(1.0f / 255.0f))
                       : _mm256_i32gather_ps(l->tab, x, 4);
    if (shift)
        x = _mm256_srli_epi32(x, (int)shift);
    if (bits == 2)
        return _mm256_permutevar8x32_ps(l->lo, x);
    /* bit 3 of the code to the sign bit selects the upper table */
    const __m256 sel = _mm256_castsi256_ps(_mm256_slli_epi32(x, 28));
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(l->lo, x), _mm256_permutevar8x32_ps(l->hi, x),
                            sel);
}

/* The four horizontal sums of a, b, c, d. */
static inline ATTR __m128 reduce4(V a, V b, V c, V d)
{
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

static inline ATTR float reduce1(V a)
{
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}

#include "quant_simd.h"

#else
typedef int kvck_quant_avx2_unused; /* ISO C wants a declaration in every file */
#endif
