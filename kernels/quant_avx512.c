/*
 * quant_avx512.c -- AVX-512 (F, BW, VL, DQ) instances of quant_simd.h:
 * scores and P.V on packed codes and on fp16 rows, 16 channels a vector.
 *
 * A 4-bit code indexes its segment's 16 levels with one vpermps (the
 * levels sit in one register; the index's bits above 3 are ignored, so the
 * high nibble needs a shift and no mask). 2-bit levels are repeated 4
 * times over the 16 entries, which masks the neighbouring field for free.
 * Uniform 8-bit levels are c * (1/255); tables use a gather. Only called
 * when kvck_isa() says the CPU has these (the library is built for the
 * baseline ISA).
 */
#include "kvck_quant.h"
#include "quant_internal.h"

#include <string.h>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(KVCK_GENERIC_ONLY)
#include <immintrin.h>

#define ATTR __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define SFX(x) x##_avx512
#define VL 16
typedef __m512 V;

static inline ATTR V v_zero(void) { return _mm512_setzero_ps(); }
static inline ATTR V v_load(const float *p) { return _mm512_loadu_ps(p); }
static inline ATTR V v_loadu(const float *p) { return _mm512_loadu_ps(p); }
static inline ATTR void v_store(float *p, V x) { _mm512_storeu_ps(p, x); }
static inline ATTR V v_set1(float x) { return _mm512_set1_ps(x); }
static inline ATTR V v_bcast(const float *p) { return _mm512_set1_ps(*p); }
static inline ATTR V v_fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
static inline ATTR V v_mul(V a, V b) { return _mm512_mul_ps(a, b); }
static inline ATTR V v_add(V a, V b) { return _mm512_add_ps(a, b); }
static inline ATTR V v_f16(const uint16_t *p)
{
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(const void *)p));
}

/* Levels of one segment, ready for lookups. */
typedef struct LUT {
    __m512 t;        /* widths 2, 4: the 16-entry table */
    const float *tab; /* width 8: [256] levels (tables) */
    int uni8;        /* width 8, uniform levels: c / 255 */
} LUT;

static inline ATTR void lut_make(LUT *l, const float *lev, unsigned bits, int uniform)
{
    float t[16];
    for (int i = 0; i < 16; i++)
        t[i] = bits == 4 ? lev[i] : bits == 2 ? lev[i & 3] : 0.0f;
    l->t = _mm512_loadu_ps(t);
    l->tab = lev;
    l->uni8 = uniform;
}

static inline ATTR V dec(const uint8_t *p, unsigned bits, unsigned shift, const LUT *l)
{
    __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(const void *)p));
    if (bits == 8)
        return l->uni8 ? _mm512_mul_ps(_mm512_cvtepi32_ps(x), _mm512_set1_ps(1.0f / 255.0f))
                       : _mm512_i32gather_ps(x, l->tab, 4);
    if (shift)
        x = _mm512_srli_epi32(x, shift);
    return _mm512_permutexvar_ps(x, l->t);
}

/* The four horizontal sums of a, b, c, d: pairwise unpacks leave each
 * 128-bit lane holding partial sums of all four in order, then the four
 * lanes are added. */
static inline ATTR __m128 reduce4(V a, V b, V c, V d)
{
    const V ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    const V cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    const __m512d abd = _mm512_castps_pd(ab), cdd = _mm512_castps_pd(cd);
    const V u = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(abd, cdd)),
                              _mm512_castpd_ps(_mm512_unpackhi_pd(abd, cdd)));
    const V x = _mm512_add_ps(u, _mm512_shuffle_f32x4(u, u, 0x4e));
    const __m256 y = _mm512_castps512_ps256(x);
    return _mm_add_ps(_mm256_castps256_ps128(y), _mm256_extractf128_ps(y, 1));
}

static inline ATTR float reduce1(V a)
{
    return _mm512_reduce_add_ps(a);
}

#include "quant_simd.h"

#else
typedef int kvck_quant_avx512_unused; /* ISO C wants a declaration in every file */
#endif
