/*
 * attention.c -- blocked online-softmax attention over CBLAS.
 *
 * kvck_attn_*: one pass of `rows` query rows (queries x the query heads of
 * one KV head) over keys fed in blocks. Per block: scores S = Q K^T by one
 * SGEMM, the causal/window mask only where the block is not wholly visible
 * to a row, a running max per row (rescaling the row's sum and accumulator
 * when the max grows), P = exp(S - max), then acc += P V by a second SGEMM.
 * Only the span of rows that can see a key of the block takes part. With
 * few rows (decode), hand-written AVX2 kernels (or GEMV) replace the SGEMMs.
 *
 * kvck_attention: the dense whole call. Queries are taken in chunks (to
 * bound scratch); per chunk, each KV head's queries are gathered, rotated
 * and scaled once, then every key block is rotated once (all KV heads at a
 * time: the angles are per token) and folded into the pass of every KV head.
 */
#include "kvck.h"
#include "attn_internal.h"
#include "kvck_quant.h"

#include <cblas.h>
#include <math.h>
#include <string.h>

/* Scratch regions start on 64-byte boundaries (relative to the scratch
 * base) so rows handed to BLAS are cache-line aligned when the base is. */
static size_t up16(size_t n)
{
    return (n + 15u) & ~(size_t)15u;
}

/* Key at kp visible to query t: causal bound (q_hi or the position), the
 * optional lower bound, and the window from the query's position. */
static int visible(const kvck_attn *a, size_t t, int32_t kp)
{
    const int32_t qp = a->q_pos[t], hi = a->q_hi ? a->q_hi[t] : qp;
    return kp <= hi && (!a->q_lo || kp > a->q_lo[t])
           && (a->window == 0 || (int64_t)qp - (int64_t)kp < (int64_t)a->window);
}

/* ---- x86 AVX2/FMA kernels for the hot loops ------------------------------
 *
 * Decode (a handful of rows per KV head) reads every cached key and value
 * once per step and is judged against memory bandwidth. BLAS pays for
 * packing or per-call overhead there, and libm's expf is scalar, so on CPUs
 * with AVX2+FMA (checked at run time: the library is built for the
 * baseline ISA) the few-row products and the exponentials use the
 * intrinsics below; elsewhere GEMV and expf do the same work
 * (-DKVCK_GENERIC_ONLY forces that path; the tests build it too). */
#if defined(__GNUC__) && defined(__x86_64__) && !defined(KVCK_GENERIC_ONLY)
#define KVCK_ATTN_AVX2 1
#include <cpuid.h>
#include "cpufeat.h"
#include <immintrin.h>

/* AVX2 and FMA usable (CPU flags plus OS-saved YMM state). Cached; racing
 * first calls store the same value. */
static int have_avx2_fma(void)
{
    static _Atomic int cached = -1;
    int c = cached;
    if (c < 0)
        cached = c = kvck_x86_has(bit_FMA, bit_AVX2);
    return c;
}

#define AVX2_FN __attribute__((target("avx2,fma")))

/* ln 2 = LN2_HI + LN2_LO, LN2_HI with 12 significant bits so that n * LN2_HI
 * is exact for the |n| <= 127 exp8 meets. */
#define LN2_HI 0.693115234375f
#define LN2_LO 3.1946184945286227e-05f

/* exp(x) for x <= 0, 8 at a time. x = n ln2 + r with |r| <= ln2/2 (ln2
 * split in two so n * LN2_HI is exact), exp(r) by its Taylor series to r^7
 * (truncation error < 6e-9 there, below float rounding), times 2^n built in
 * the exponent bits. Below -87.3 (masked -inf included) the result is
 * exactly 0; NaN stays NaN. */
static inline AVX2_FN __m256 exp8(__m256 x)
{
    const __m256 lo = _mm256_set1_ps(-87.3f);
    const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(lo, x); /* operand order keeps NaN */
    x = _mm256_min_ps(_mm256_set1_ps(88.0f), x);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps((float)(1.0 / 0.6931471805599453))),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    /* 1 + r + r^2 (1/2! + r (1/3! + r (1/4! + r (1/5! + r (1/6! + r / 7!))))) */
    __m256 p = _mm256_set1_ps((float)(1.0 / 5040.0));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps((float)(1.0 / 720.0)));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps((float)(1.0 / 120.0)));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps((float)(1.0 / 24.0)));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps((float)(1.0 / 6.0)));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    __m256 y = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
                                  23);
    y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
    return _mm256_andnot_ps(under, y);
}

static inline AVX2_FN float hsum8(__m256 v)
{
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}

/* Max of s [n]; -inf when n == 0 or all are -inf. */
static AVX2_FN float max_avx2(const float *s, size_t n)
{
    __m256 m = _mm256_set1_ps(-INFINITY);
    size_t j = 0;
    for (; j + 8 <= n; j += 8)
        m = _mm256_max_ps(m, _mm256_loadu_ps(s + j));
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    x = _mm_max_ss(x, _mm_movehdup_ps(x));
    float mb = _mm_cvtss_f32(x);
    for (; j < n; j++)
        mb = s[j] > mb ? s[j] : mb;
    return mb;
}

/* s [n] <- exp(s - m); returns the sum. */
static AVX2_FN float exp_sub_avx2(float *s, size_t n, float m)
{
    const __m256 mv = _mm256_set1_ps(m);
    __m256 acc = _mm256_setzero_ps();
    size_t j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
        _mm256_storeu_ps(s + j, p);
        acc = _mm256_add_ps(acc, p);
    }
    if (j < n) {
        /* Tail through the same polynomial, padded with -inf (gives 0), and
         * into the same lanes: the sum's order depends on a value's index,
         * not on how many values follow (masked ones add exact zeros). */
        float buf[8];
        size_t t = n - j;
        for (size_t i = 0; i < 8; i++)
            buf[i] = i < t ? s[j + i] - m : -INFINITY;
        __m256 p = exp8(_mm256_loadu_ps(buf));
        _mm256_storeu_ps(buf, p);
        acc = _mm256_add_ps(acc, p);
        for (size_t i = 0; i < t; i++)
            s[j + i] = buf[i];
    }
    return hsum8(acc);
}

/* Scores of R <= 3 rows against 4 keys: 4R independent FMA chains (one
 * chain per row would wait on the FMA latency), then one transposing
 * horizontal add per row gives its four scores. Inlined with R constant so
 * the accumulators live in registers. */
static inline __attribute__((always_inline)) AVX2_FN void
scores_tile(const int R, size_t dk, const float *q, size_t ldq, const float *k0, size_t ldk,
            float *s, size_t lds)
{
    const size_t d8 = dk & ~(size_t)7;
    __m256 acc[3][4];
    for (int r = 0; r < R; r++)
        for (int i = 0; i < 4; i++)
            acc[r][i] = _mm256_setzero_ps();
    for (size_t c = 0; c < d8; c += 8) {
        __m256 kv[4];
        for (int i = 0; i < 4; i++)
            kv[i] = _mm256_loadu_ps(k0 + (size_t)i * ldk + c);
        for (int r = 0; r < R; r++) {
            __m256 qv = _mm256_loadu_ps(q + (size_t)r * ldq + c);
            for (int i = 0; i < 4; i++)
                acc[r][i] = _mm256_fmadd_ps(qv, kv[i], acc[r][i]);
        }
    }
    for (int r = 0; r < R; r++) {
        __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[r][0], acc[r][1]),
                                  _mm256_hadd_ps(acc[r][2], acc[r][3]));
        __m128 sum4 = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        if (d8 < dk) {
            const float *qr = q + (size_t)r * ldq;
            float t[4];
            _mm_storeu_ps(t, sum4);
            for (int i = 0; i < 4; i++)
                for (size_t c = d8; c < dk; c++)
                    t[i] += qr[c] * k0[(size_t)i * ldk + c];
            sum4 = _mm_loadu_ps(t);
        }
        _mm_storeu_ps(s + (size_t)r * lds, sum4);
    }
}

/* s [nr][lds] (first n columns) <- q [nr][ldq] . k [n][ldk]^T, dk wide. */
static AVX2_FN void scores_few_avx2(size_t nr, size_t dk, const float *q, size_t ldq,
                                    const float *k, size_t ldk, size_t n, float *s, size_t lds,
                                    const float *v, size_t ldv, size_t dv)
{
    size_t j = 0;
    for (; j + 4 <= n; j += 4) {
        const float *k0 = k + j * ldk;
        /* Start fetching the values of these keys: the P V step reads them
         * next, and the memory fetch overlaps these FMAs. */
        for (size_t i = 0; i < 4; i++)
            for (size_t c = 0; c < dv; c += 16)
                _mm_prefetch((const char *)(v + (j + i) * ldv + c), _MM_HINT_T0);
        size_t r = 0;
        for (; r + 3 <= nr; r += 3)
            scores_tile(3, dk, q + r * ldq, ldq, k0, ldk, s + r * lds + j, lds);
        if (nr - r == 2)
            scores_tile(2, dk, q + r * ldq, ldq, k0, ldk, s + r * lds + j, lds);
        else if (nr - r == 1)
            scores_tile(1, dk, q + r * ldq, ldq, k0, ldk, s + r * lds + j, lds);
    }
    if (j < n) {
        /* The last 1-3 keys go through the same tile as the others, padded
         * with zero keys: a key's score never depends on how many keys the
         * call holds or where it sits among them (batched == single steps
         * to the byte needs that). */
        float k4[4 * KVCK_MAX_HEAD_DIM], s4[KVCK_FEW_ROWS * 4];
        memset(k4, 0, 4 * dk * sizeof(float));
        for (size_t i = 0; j + i < n; i++)
            memcpy(k4 + i * dk, k + (j + i) * ldk, dk * sizeof(float));
        size_t r = 0;
        for (; r + 3 <= nr; r += 3)
            scores_tile(3, dk, q + r * ldq, ldq, k4, dk, s4 + r * 4, 4);
        if (nr - r == 2)
            scores_tile(2, dk, q + r * ldq, ldq, k4, dk, s4 + r * 4, 4);
        else if (nr - r == 1)
            scores_tile(1, dk, q + r * ldq, ldq, k4, dk, s4 + r * 4, 4);
        for (r = 0; r < nr; r++)
            for (size_t i = 0; j + i < n; i++)
                s[r * lds + j + i] = s4[r * 4 + i];
    }
}

/* acc [R][dv] += p [R][ldp] (n wide) . v [n][ldv] for R <= 3 rows: strips
 * of 32 columns x R rows (4R accumulators, enough to hide the FMA latency)
 * so each value is loaded once for all the rows (a block of V does not fit
 * in L1; reloading it per row would be bound by L2). */
static inline __attribute__((always_inline)) AVX2_FN void
pv_tile(const int R, size_t dv, const float *p, size_t ldp, const float *v, size_t ldv, size_t n,
        float *acc)
{
    size_t c = 0;
    for (; c + 32 <= dv; c += 32) {
        __m256 a[3][4];
        for (int r = 0; r < R; r++)
            for (int i = 0; i < 4; i++)
                a[r][i] = _mm256_loadu_ps(acc + (size_t)r * dv + c + 8 * i);
        const float *vj = v + c;
        for (size_t j = 0; j < n; j++, vj += ldv) {
            __m256 vv[4];
            for (int i = 0; i < 4; i++)
                vv[i] = _mm256_loadu_ps(vj + 8 * i);
            for (int r = 0; r < R; r++) {
                __m256 pb = _mm256_broadcast_ss(p + (size_t)r * ldp + j);
                for (int i = 0; i < 4; i++)
                    a[r][i] = _mm256_fmadd_ps(pb, vv[i], a[r][i]);
            }
        }
        for (int r = 0; r < R; r++)
            for (int i = 0; i < 4; i++)
                _mm256_storeu_ps(acc + (size_t)r * dv + c + 8 * i, a[r][i]);
    }
    for (; c + 8 <= dv; c += 8) {
        __m256 a[3];
        for (int r = 0; r < R; r++)
            a[r] = _mm256_loadu_ps(acc + (size_t)r * dv + c);
        const float *vj = v + c;
        for (size_t j = 0; j < n; j++, vj += ldv) {
            __m256 vv = _mm256_loadu_ps(vj);
            for (int r = 0; r < R; r++)
                a[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(p + (size_t)r * ldp + j), vv, a[r]);
        }
        for (int r = 0; r < R; r++)
            _mm256_storeu_ps(acc + (size_t)r * dv + c, a[r]);
    }
    for (; c < dv; c++) {
        for (int r = 0; r < R; r++) {
            float t = acc[(size_t)r * dv + c];
            for (size_t j = 0; j < n; j++)
                t += p[(size_t)r * ldp + j] * v[j * ldv + c];
            acc[(size_t)r * dv + c] = t;
        }
    }
}

/* acc [nr][dv] += p [nr][ldp] (n wide) . v [n][ldv], rows taken three at a
 * time. Rows that saw nothing have p == 0 and add nothing. */
static AVX2_FN void pv_few_avx2(size_t nr, size_t dv, const float *p, size_t ldp, const float *v,
                                size_t ldv, size_t n, float *acc)
{
    size_t r = 0;
    for (; r + 3 <= nr; r += 3)
        pv_tile(3, dv, p + r * ldp, ldp, v, ldv, n, acc + r * dv);
    if (nr - r == 2)
        pv_tile(2, dv, p + r * ldp, ldp, v, ldv, n, acc + r * dv);
    else if (nr - r == 1)
        pv_tile(1, dv, p + r * ldp, ldp, v, ldv, n, acc + r * dv);
}

/* The same max and exponentials 16 wide, for CPUs with AVX-512 (and
 * kvck_isa() allowing it): the polynomial and rounding steps of exp8, so
 * each p is the same float; only the sum's order differs. Decode spends a
 * tenth of its time here, on 64 scores per row and block. */
#define AVX512_FN __attribute__((target("avx512f,avx512dq,avx2,fma")))

static inline AVX512_FN __m512 exp16(__m512 x)
{
    const __m512 lo = _mm512_set1_ps(-87.3f);
    const __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
    x = _mm512_max_ps(lo, x); /* operand order keeps NaN */
    x = _mm512_min_ps(_mm512_set1_ps(88.0f), x);
    const __m512 inv_ln2 = _mm512_set1_ps((float)(1.0 / 0.6931471805599453));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, inv_ln2),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    __m512 p = _mm512_set1_ps((float)(1.0 / 5040.0));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps((float)(1.0 / 720.0)));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps((float)(1.0 / 120.0)));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps((float)(1.0 / 24.0)));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps((float)(1.0 / 6.0)));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    __m512 y = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)),
                                  23);
    y = _mm512_mul_ps(y, _mm512_castsi512_ps(e));
    return _mm512_maskz_mov_ps((__mmask16)~under, y);
}

/* Max of s [n]; -inf when n == 0 or all are -inf. */
static AVX512_FN float max_avx512(const float *s, size_t n)
{
    __m512 m = _mm512_set1_ps(-INFINITY);
    size_t j = 0;
    for (; j + 16 <= n; j += 16)
        m = _mm512_max_ps(m, _mm512_loadu_ps(s + j));
    if (j < n) /* masked-off lanes read as -inf */
        m = _mm512_max_ps(m, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY),
                                                  (__mmask16)((1u << (n - j)) - 1u), s + j));
    return _mm512_reduce_max_ps(m);
}

/* s [n] <- exp(s - m); returns the sum. */
static AVX512_FN float exp_sub_avx512(float *s, size_t n, float m)
{
    const __m512 mv = _mm512_set1_ps(m);
    __m512 acc = _mm512_setzero_ps();
    size_t j = 0;
    for (; j + 16 <= n; j += 16) {
        __m512 p = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j), mv));
        _mm512_storeu_ps(s + j, p);
        acc = _mm512_add_ps(acc, p);
    }
    if (j < n) {
        const __mmask16 k = (__mmask16)((1u << (n - j)) - 1u);
        __m512 p = exp16(_mm512_sub_ps(_mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), k, s + j),
                                       mv));
        _mm512_mask_storeu_ps(s + j, k, p);
        acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(k, p));
    }
    return _mm512_reduce_add_ps(acc);
}

/* AVX-512 usable and allowed (kvck_isa() is cached and capped by
 * KVCK_ISA, so comparisons of paths cover this too). */
static int use_avx512(void)
{
    return kvck_isa() >= KVCK_ISA_AVX512;
}
#endif /* x86 */

static float row_max(const float *s, size_t n)
{
#ifdef KVCK_ATTN_AVX2
    if (use_avx512())
        return max_avx512(s, n);
    if (have_avx2_fma())
        return max_avx2(s, n);
#endif
    float mb = -INFINITY;
    for (size_t j = 0; j < n; j++)
        mb = s[j] > mb ? s[j] : mb;
    return mb;
}

/* s [n] <- exp(s - m) (masked -inf scores give 0); returns the sum. */
static float row_exp(float *s, size_t n, float m)
{
#ifdef KVCK_ATTN_AVX2
    if (use_avx512())
        return exp_sub_avx512(s, n, m);
    if (have_avx2_fma())
        return exp_sub_avx2(s, n, m);
#endif
    float sum = 0.0f;
    for (size_t j = 0; j < n; j++) {
        float p = expf(s[j] - m);
        s[j] = p;
        sum += p;
    }
    return sum;
}

/* Fills the pass description around caller-placed buffers, without
 * touching their contents. */
static void attn_view(kvck_attn *a, size_t rows, size_t group, size_t dk, size_t dv,
                      size_t block, uint32_t window, const int32_t *q_pos, float *m, float *l,
                      float *acc, float *s)
{
    a->rows = rows;
    a->group = group ? group : 1;
    a->dk = dk;
    a->dv = dv;
    a->block = block ? block : 1;
    a->window = window;
    a->q_pos = q_pos;
    a->q_hi = NULL;
    a->q_lo = NULL;
    a->row_invariant = 0;
    a->m = m;
    a->l = l;
    a->acc = acc;
    a->s = s;
}

/* Empty running state: max -inf, sum 0, accumulator 0. */
static void attn_reset(float *m /* [rows] */, float *l /* [rows] */, float *acc /* [rows][dv] */,
                       size_t rows, size_t dv)
{
    for (size_t r = 0; r < rows; r++) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
    }
    memset(acc, 0, rows * dv * sizeof *acc);
}

size_t kvck_attn_scratch_floats(size_t rows, size_t dv, size_t block)
{
    if (block == 0)
        block = 1;
    return 2 * up16(rows) + up16(rows * dv) + up16(rows * block);
}

void kvck_attn_init(kvck_attn *a, size_t rows, size_t group, size_t dk, size_t dv, size_t block,
                    uint32_t window, const int32_t *q_pos, float *scratch)
{
    size_t b = block ? block : 1;
    float *m = scratch;           /* [rows] */
    float *l = m + up16(rows);    /* [rows] */
    float *acc = l + up16(rows);  /* [rows][dv] */
    float *s = acc + up16(rows * dv); /* [rows][block] */
    attn_view(a, rows, group, dk, dv, b, window, q_pos, m, l, acc, s);
    attn_reset(m, l, acc, rows, dv);
}

void kvck_attn_bounds(kvck_attn *a, const int32_t *q_hi, const int32_t *q_lo)
{
    a->q_hi = q_hi;
    a->q_lo = q_lo;
}

/* ---- explicit-softmax pieces (kvck.h) ------------------------------------ */

void kvck_scores(size_t rows, size_t d, const float *q, size_t ldq, const float *k, size_t ldk,
                 size_t n, float *s, size_t lds)
{
    if (rows == 0 || n == 0)
        return;
#ifdef KVCK_ATTN_AVX2
    if (rows <= KVCK_FEW_ROWS && have_avx2_fma()) {
        /* dv = 0: nothing to prefetch. */
        scores_few_avx2(rows, d, q, ldq, k, ldk, n, s, lds, k, ldk, 0);
        return;
    }
#endif
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)rows, (int)n, (int)d, 1.0f, q,
                (int)ldq, k, (int)ldk, 0.0f, s, (int)lds);
}

void kvck_pv(size_t rows, size_t dv, const float *p, size_t ldp, const float *v, size_t ldv,
             size_t n, float *acc)
{
    if (rows == 0 || n == 0)
        return;
#ifdef KVCK_ATTN_AVX2
    if (rows <= KVCK_FEW_ROWS && have_avx2_fma()) {
        pv_few_avx2(rows, dv, p, ldp, v, ldv, n, acc);
        return;
    }
#endif
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)rows, (int)dv, (int)n, 1.0f, p,
                (int)ldp, v, (int)ldv, 1.0f, acc, (int)dv);
}

float kvck_row_max(const float *s, size_t n)
{
    return n ? row_max(s, n) : -INFINITY;
}

float kvck_row_exp(float *s, size_t n, float m)
{
    return n ? row_exp(s, n, m) : 0.0f;
}

int kvcki_attn_span(const kvck_attn *a, const int32_t *k_pos, size_t n, kvcki_span *sp)
{
    const size_t group = a->group, nq = a->rows / group;
    const uint32_t w = a->window;
    int32_t kmin = k_pos[0], kmax = k_pos[0];
    size_t t0 = nq, t1 = 0;

    for (size_t j = 1; j < n; j++) {
        kmin = k_pos[j] < kmin ? k_pos[j] : kmin;
        kmax = k_pos[j] > kmax ? k_pos[j] : kmax;
    }
    /* Queries that may see a key of the block (kmin within the causal
     * bound, kmax above the lower one and the newest key inside the
     * window): a necessary test, exact per key later. Only the span
     * [t0, t1) of them goes through the GEMMs. */
    for (size_t t = 0; t < nq; t++) {
        const int32_t qp = a->q_pos[t], hi = a->q_hi ? a->q_hi[t] : qp;
        if (kmin <= hi && (!a->q_lo || kmax > a->q_lo[t])
            && (w == 0 || (int64_t)qp - kmax < (int64_t)w)) {
            if (t < t0)
                t0 = t;
            t1 = t + 1;
        }
    }
    if (t0 >= t1)
        return 0;
    sp->r0 = t0 * group;
    sp->nr = (t1 - t0) * group;
    sp->kmin = kmin;
    sp->kmax = kmax;
    return 1;
}

void kvcki_attn_softmax(kvck_attn *a, const int32_t *k_pos, size_t n, const kvcki_span *sp,
                        unsigned char *seen)
{
    const size_t group = a->group, bs = a->block, dv = a->dv, r0 = sp->r0;
    const uint32_t w = a->window;
    for (size_t r = r0; r < r0 + sp->nr; r++) {
        float *sr = a->s + r * bs; /* [n] scores, then probabilities */
        const size_t t = r / group;
        const int32_t qp = a->q_pos[t], hi = a->q_hi ? a->q_hi[t] : qp;
        const int all = sp->kmax <= hi && (!a->q_lo || sp->kmin > a->q_lo[t])
                        && (w == 0 || (int64_t)qp - sp->kmin < (int64_t)w);

        if (!all) {
            for (size_t j = 0; j < n; j++)
                if (!visible(a, t, k_pos[j]))
                    sr[j] = -INFINITY;
        }
        const float mb = row_max(sr, n);
        if (mb == -INFINITY) {
            /* Sees none of this block's keys: a zero row of P leaves its
             * accumulator as is (and the few-row path skips the row). */
            memset(sr, 0, n * sizeof *sr);
            if (seen)
                seen[r - r0] = 0;
            continue;
        }
        if (seen)
            seen[r - r0] = 1;
        const float mold = a->m[r];
        const float mnew = mold > mb ? mold : mb;
        const float sum = row_exp(sr, n, mnew);
        if (mnew != mold) {
            /* The max grew: earlier terms shrink by exp(mold - mnew)
             * (0 on the row's first visible block, where acc is 0). */
            const float alpha = expf(mold - mnew);
            float *ar = a->acc + r * dv;
            a->l[r] *= alpha;
            for (size_t c = 0; c < dv; c++)
                ar[c] *= alpha;
            a->m[r] = mnew;
        }
        a->l[r] += sum;
    }
}

/* One block of n <= a->block keys (the public entry splits longer runs). */
static void attn_block1(kvck_attn *a, const float *q, size_t ldq, const float *k, size_t ldk,
                        const float *v, size_t ldv, const int32_t *k_pos, size_t n)
{
    const size_t bs = a->block, dv = a->dv;
    kvcki_span sp;
    if (!kvcki_attn_span(a, k_pos, n, &sp))
        return;
    const size_t r0 = sp.r0, nr = sp.nr;
    float *s0 = a->s + r0 * bs; /* [nr][bs], first n columns used */

    /* S = Q K^T: [nr][dk] x [dk][n]. A few rows (decode) skip SGEMM: it
     * would pack (copy) K and V on every block, which costs more than
     * reading them; the few-row kernels stream them once from memory and
     * then from cache for the other rows. */
    const int few = nr <= KVCK_FEW_ROWS;
    int simd = 0;
#ifdef KVCK_ATTN_AVX2
    simd = few && have_avx2_fma();
    if (simd)
        scores_few_avx2(nr, a->dk, q + r0 * ldq, ldq, k, ldk, n, s0, bs, v, ldv, dv);
#endif
    if (!simd && few) {
        for (size_t r = r0; r < r0 + nr; r++)
            cblas_sgemv(CblasRowMajor, CblasNoTrans, (int)n, (int)a->dk, 1.0f, k, (int)ldk,
                        q + r * ldq, 1, 0.0f, a->s + r * bs, 1);
    } else if (!few) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)nr, (int)n, (int)a->dk, 1.0f,
                    q + r0 * ldq, (int)ldq, k, (int)ldk, 0.0f, s0, (int)bs);
    }

    unsigned char seen[KVCK_FEW_ROWS]; /* [nr] when few: row sees a key of the block */
    kvcki_attn_softmax(a, k_pos, n, &sp, few ? seen : NULL);

    /* acc += P V: [nr][n] x [n][dv]. */
#ifdef KVCK_ATTN_AVX2
    if (simd) {
        pv_few_avx2(nr, dv, s0, bs, v, ldv, n, a->acc + r0 * dv);
        return;
    }
#endif
    if (few) {
        for (size_t r = r0; r < r0 + nr; r++) {
            if (!seen[r - r0])
                continue;
            cblas_sgemv(CblasRowMajor, CblasTrans, (int)n, (int)dv, 1.0f, v, (int)ldv,
                        a->s + r * bs, 1, 1.0f, a->acc + r * dv, 1);
        }
    } else {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)nr, (int)dv, (int)n, 1.0f,
                    s0, (int)bs, v, (int)ldv, 1.0f, a->acc + r0 * dv, (int)dv);
    }
}

void kvck_attn_block(kvck_attn *a, const float *q, size_t ldq, const float *k, size_t ldk,
                     const float *v, size_t ldv, const int32_t *k_pos, size_t n)
{
    if (a->rows == 0)
        return;
    /* n > block breaks the contract; folding it in block-sized pieces is
     * the harmless reading. */
    for (size_t j = 0; j < n; j += a->block) {
        size_t nb = n - j < a->block ? n - j : a->block;
        attn_block1(a, q, ldq, k + j * ldk, ldk, v + j * ldv, ldv, k_pos + j, nb);
    }
}

/* Writes acc / l of row r = (t, g) to out + t * ld_query + g * ld_head. */
static void attn_finish_rows(const kvck_attn *a, float *out, size_t ld_head, size_t ld_query)
{
    for (size_t r = 0; r < a->rows; r++) {
        float *o = out + (r / a->group) * ld_query + (r % a->group) * ld_head; /* [dv] */
        const float *ar = a->acc + r * a->dv;
        const float l = a->l[r];
        if (l > 0.0f) {
            for (size_t c = 0; c < a->dv; c++)
                o[c] = ar[c] / l;
        } else {
            memset(o, 0, a->dv * sizeof *o);
        }
    }
}

void kvck_attn_finish(const kvck_attn *a, float *out, size_t ldo)
{
    attn_finish_rows(a, out, ldo, a->group * ldo);
}

/* ---- dense whole attention ---------------------------------------------- */

/* Query rows (all heads) per chunk: bounds scratch while keeping the score
 * GEMM tall enough to run near peak. */
#define KVCK_CHUNK_ROWS 4096
/* Keys per block: one block of rotated keys for all KV heads stays in L2. */
#define KVCK_BLOCK_KEYS 256

typedef struct dense_plan {
    size_t group, hd, n_kv;
    size_t qc;    /* queries per chunk */
    size_t rows;  /* rows per KV head per chunk = qc * group */
    size_t block; /* keys per block */
    /* float offsets into scratch */
    size_t off_q, off_k, off_s, off_state, state_stride;
    size_t total;
} dense_plan;

static void dense_plan_make(const kvck_dense *d, size_t n_q, size_t n_k, dense_plan *p)
{
    p->n_kv = d->n_kv_heads ? d->n_kv_heads : 1;
    p->group = d->n_heads / p->n_kv;
    if (p->group == 0)
        p->group = 1;
    p->hd = d->head_dim;
    size_t per = KVCK_CHUNK_ROWS / (d->n_heads ? d->n_heads : 1);
    if (per == 0)
        per = 1;
    p->qc = n_q < per ? n_q : per;
    if (p->qc == 0)
        p->qc = 1;
    p->rows = p->qc * p->group;
    p->block = n_k < KVCK_BLOCK_KEYS ? n_k : KVCK_BLOCK_KEYS;
    if (p->block == 0)
        p->block = 1;
    p->off_q = 0; /* [n_kv][rows][hd] rotated, scaled queries */
    p->off_k = p->off_q + up16(p->n_kv * p->rows * p->hd); /* [block][n_kv][hd] rotated keys */
    p->off_s = p->off_k + up16(p->block * p->n_kv * p->hd); /* [rows][block] shared scores */
    p->off_state = p->off_s + up16(p->rows * p->block);
    /* per KV head: m [rows], l [rows], acc [rows][hd] */
    p->state_stride = 2 * up16(p->rows) + up16(p->rows * p->hd);
    p->total = p->off_state + p->n_kv * p->state_stride;
}

/* Never decreases as n_q or n_k grow, so scratch sized for the largest call
 * serves every smaller one. */
size_t kvck_attention_scratch_floats(const kvck_dense *d, size_t n_q, size_t n_k)
{
    dense_plan p;
    if (n_q == 0 || n_k == 0)
        return 0;
    dense_plan_make(d, n_q, n_k, &p);
    return p.total;
}

/* Running state of KV head h inside the scratch. */
static void dense_view(const dense_plan *p, float *scratch, size_t h, size_t rows,
                       uint32_t window, const int32_t *q_pos, kvck_attn *a)
{
    float *m = scratch + p->off_state + h * p->state_stride; /* [rows] */
    float *l = m + up16(p->rows);                            /* [rows] */
    float *acc = l + up16(p->rows);                          /* [rows][hd] */
    attn_view(a, rows, p->group, p->hd, p->hd, p->block, window, q_pos, m, l, acc,
              scratch + p->off_s);
}

void kvck_attention(const kvck_dense *d, size_t n_q, const int32_t *q_pos, const float *q_pre,
                    size_t n_k, const int32_t *k_pos, const float *k_pre, const float *v,
                    float *out, float *scratch)
{
    dense_plan p;
    if (n_q == 0)
        return;
    if (n_k == 0) {
        /* No key at all: every query sees none. */
        memset(out, 0, n_q * d->n_heads * d->head_dim * sizeof *out);
        return;
    }
    dense_plan_make(d, n_q, n_k, &p);
    const size_t hd = p.hd, n_kv = p.n_kv, group = p.group, nh = d->n_heads;
    const size_t ldkv = n_kv * hd; /* token stride of k_pre, v, and the rotated block */
    float *qs = scratch + p.off_q; /* [n_kv][rows][hd] */
    float *kb = scratch + p.off_k; /* [block][n_kv][hd] */

    for (size_t c0 = 0; c0 < n_q; c0 += p.qc) {
        const size_t qc = n_q - c0 < p.qc ? n_q - c0 : p.qc;
        const size_t rows = qc * group;
        const int32_t *qp = q_pos + c0; /* [qc] */
        int32_t qmin = qp[0], qmax = qp[0];
        kvck_attn a;

        for (size_t t = 1; t < qc; t++) {
            qmin = qp[t] < qmin ? qp[t] : qmin;
            qmax = qp[t] > qmax ? qp[t] : qmax;
        }
        /* Gather each KV head's queries as [qc][group][hd] (token-major, so
         * kvck_rope_apply rotates them in place), then scale: the GEMM rows
         * of one KV head end up contiguous with stride hd. */
        for (size_t h = 0; h < n_kv; h++) {
            float *qh = qs + h * p.rows * hd; /* [qc][group][hd] */
            for (size_t t = 0; t < qc; t++)
                memcpy(qh + t * group * hd, q_pre + ((c0 + t) * nh + h * group) * hd,
                       group * hd * sizeof *qh);
            kvck_rope_apply(d->rope, qc, group, qp, qh, qh);
            for (size_t i = 0; i < rows * hd; i++)
                qh[i] *= d->scale;
            dense_view(&p, scratch, h, rows, d->window, qp, &a);
            attn_reset(a.m, a.l, a.acc, rows, hd);
        }

        for (size_t b0 = 0; b0 < n_k; b0 += p.block) {
            const size_t nb = n_k - b0 < p.block ? n_k - b0 : p.block;
            const int32_t *kp = k_pos + b0; /* [nb] */
            int32_t kmin = kp[0], kmax = kp[0];
            for (size_t j = 1; j < nb; j++) {
                kmin = kp[j] < kmin ? kp[j] : kmin;
                kmax = kp[j] > kmax ? kp[j] : kmax;
            }
            /* Nothing in the chunk sees this block: skip before paying for
             * its rotation (half the blocks of a causal prefill). */
            if (kmin > qmax
                || (d->window && (int64_t)qmin - (int64_t)kmax >= (int64_t)d->window))
                continue;
            kvck_rope_apply(d->rope, nb, n_kv, kp, k_pre + b0 * ldkv, kb);
            for (size_t h = 0; h < n_kv; h++) {
                dense_view(&p, scratch, h, rows, d->window, qp, &a);
                attn_block1(&a, qs + h * p.rows * hd, hd, kb + h * hd, ldkv,
                            v + b0 * ldkv + h * hd, ldkv, kp, nb);
            }
        }

        for (size_t h = 0; h < n_kv; h++) {
            dense_view(&p, scratch, h, rows, d->window, qp, &a);
            attn_finish_rows(&a, out + (c0 * nh + h * group) * hd, hd, nh * hd);
        }
    }
}
