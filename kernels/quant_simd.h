/*
 * quant_simd.h -- the SIMD bodies of scores and P.V on packed codes and on
 * fp16 rows, written once over a small set of vector primitives and
 * included by quant_avx2.c (8 lanes) and quant_avx512.c (16 lanes), which
 * define them. Not a header to include anywhere else.
 *
 * The including file defines, all `static inline ATTR`:
 *   V, VL             vector of VL floats
 *   v_zero, v_load, v_loadu, v_store, v_set1, v_bcast(const float *), v_fma,
 *   v_mul, v_add
 *   V v_f16(const uint16_t *p)                VL halves widened
 *   LUT, lut_make(LUT *, const float *lev, unsigned bits, int uniform)
 *   V dec(const uint8_t *p, unsigned bits, unsigned shift, const LUT *)
 *        the levels of the VL codes whose fields sit at `shift` in bytes
 *        p[0 .. VL) (one field per byte lane), for bits 2, 4, 8
 *   __m128 reduce4(V, V, V, V)               the four horizontal sums
 *   float reduce1(V)                          one horizontal sum
 *   SFX(name)                                 name with the ISA suffix
 *
 * Layout facts used (kvck_quant.h): planes 2 and 4 keep a chunk of 128 / w
 * values in 16 bytes, value i in byte i % 16, field i / 16; plane 8 is one
 * value per byte. So 16 bytes of a plane (a "load group") hold CH = 128 / w
 * channels, and lanes [b, b + VL) of field f are channels f * 16 + b ...:
 * chunk k (VL channels) of a load group is bytes (k % BPC) * VL.., field
 * k / BPC, with BPC = 16 / VL byte chunks per load group.
 *
 * Supported formats (else the caller falls back to the plain C path):
 * every segment the same width 2, 4 or 8 in whole load groups (lengths
 * multiples of CH), d a multiple of VL, and per-token groups of whole load
 * groups. The tiles below then see the width and every chunk's byte offset
 * and shift as constants.
 */

#define BPC (16 / VL) /* byte chunks of VL lanes in a 16-byte load group */

/* ---- plan of a format ---------------------------------------------------------- */

typedef struct SFX(plan) {
    unsigned bits, ch;          /* common width; channels per load group */
    uint32_t n_seg;
    uint32_t first[KVCK_QSEG_MAX], len[KVCK_QSEG_MAX], off[KVCK_QSEG_MAX];
    LUT lut[KVCK_QSEG_MAX];
} SFX(plan);

static int SFX(plan_make)(const kvck_qfmt *f, int mode, SFX(plan) *p)
{
    const unsigned b = f->seg[0].bits;
    if ((b != 2 && b != 4 && b != 8) || f->d % VL)
        return 0;
    p->bits = b;
    p->ch = 128 / b;
    p->n_seg = f->n_seg;
    for (uint32_t i = 0; i < f->n_seg; i++) {
        const kvck_qseg *s = &f->seg[i];
        if (s->bits != b || s->len % p->ch)
            return 0;
        p->first[i] = s->first;
        p->len[i] = s->len;
        p->off[i] = s->offset;
        lut_make(&p->lut[i], kvcki_seg_levels(f, s), b, s->levels == NULL);
    }
    if (mode == KVCK_QS_TOKEN)
        for (uint32_t g = 0, i = 0; g < f->n_groups; g++) {
            while (f->gfirst[g] >= p->first[i] + p->len[i])
                i++;
            if ((f->gfirst[g] - p->first[i]) % p->ch)
                return 0;
        }
    return 1;
}

/* Levels of chunk kk (VL channels) of the load group at lg. */
static inline __attribute__((always_inline)) ATTR V SFX(lg_chunk)(const uint8_t *lg,
                                                                  const unsigned bits,
                                                                  const unsigned kk,
                                                                  const LUT *lut)
{
    return dec(lg + (kk % BPC) * VL, bits, bits * (kk / BPC), lut);
}

/* ---- scores ----------------------------------------------------------------------- */

/* Scores of R <= 3 rows against keys j0 .. j0 + 3 (indices past n - 1
 * repeat the last key; only `valid` are stored): 4R independent FMA chains
 * over the channels, then one 4-way reduction per row. cst [R] (or NULL)
 * is added to every score. BITS 16 reads fp16 rows h [n][ldh]; otherwise
 * codes [n][row_bytes] of format pl, with TOK the chunks are dequantized
 * in registers by the key's (scale, zero) per group: sv, zv [n][ng]. */
static inline __attribute__((always_inline)) ATTR void
SFX(scores_tile)(const int R, const unsigned BITS, const int TOK, const SFX(plan) *pl,
                 const uint8_t *codes, size_t row_bytes, const uint16_t *h, size_t ldh,
                 const float *sv, const float *zv, const uint16_t *gfirst, size_t ng,
                 uint32_t d, size_t n,
                 size_t j0, size_t valid, const float *q, size_t ldq, const float *cst, float *s,
                 size_t lds)
{
    V acc[3][4];
    size_t jj[4];
    for (int k = 0; k < 4; k++)
        jj[k] = j0 + (size_t)k < n ? j0 + (size_t)k : n - 1;
    for (int r = 0; r < R; r++)
        for (int k = 0; k < 4; k++)
            acc[r][k] = v_zero();
    if (BITS == 16) {
        for (uint32_t c = 0; c < d; c += VL) {
            V kv[4];
            for (int k = 0; k < 4; k++)
                kv[k] = v_f16(h + jj[k] * ldh + c);
            for (int r = 0; r < R; r++) {
                const V qv = v_load(q + (size_t)r * ldq + c);
                for (int k = 0; k < 4; k++)
                    acc[r][k] = v_fma(qv, kv[k], acc[r][k]);
            }
        }
    } else {
        const unsigned CH = 128 / BITS, CPL = CH / VL;
        size_t g = 0;
        for (uint32_t si = 0; si < pl->n_seg; si++) {
            const uint32_t first = pl->first[si], n_lg = pl->len[si] / CH;
            const LUT *lut = &pl->lut[si];
            const uint8_t *p0 = codes + jj[0] * row_bytes + pl->off[si];
            const uint8_t *p1 = codes + jj[1] * row_bytes + pl->off[si];
            const uint8_t *p2 = codes + jj[2] * row_bytes + pl->off[si];
            const uint8_t *p3 = codes + jj[3] * row_bytes + pl->off[si];
            const float *qc = q + first; /* row 0's channels of this load group */
            for (uint32_t lg = 0; lg < n_lg; lg++, p0 += 16, p1 += 16, p2 += 16, p3 += 16,
                          qc += CH) {
                V sk[4], zk[4]; /* per-token scale, zero of each key */
                if (TOK) {
                    while (first + lg * CH >= gfirst[g + 1])
                        g++;
                    for (int k = 0; k < 4; k++) {
                        sk[k] = v_bcast(sv + jj[k] * ng + g);
                        zk[k] = v_bcast(zv + jj[k] * ng + g);
                    }
                }
                for (unsigned kk = 0; kk < CPL; kk++) {
                    V kv[4];
                    kv[0] = SFX(lg_chunk)(p0, BITS, kk, lut);
                    kv[1] = SFX(lg_chunk)(p1, BITS, kk, lut);
                    kv[2] = SFX(lg_chunk)(p2, BITS, kk, lut);
                    kv[3] = SFX(lg_chunk)(p3, BITS, kk, lut);
                    if (TOK)
                        for (int k = 0; k < 4; k++)
                            kv[k] = v_fma(kv[k], sk[k], zk[k]);
                    for (int r = 0; r < R; r++) {
                        const V qv = v_load(qc + (size_t)r * ldq + kk * VL);
                        for (int k = 0; k < 4; k++)
                            acc[r][k] = v_fma(qv, kv[k], acc[r][k]);
                    }
                }
            }
        }
    }
    for (int r = 0; r < R; r++) {
        __m128 t = reduce4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
        if (cst)
            t = _mm_add_ps(t, _mm_set1_ps(cst[r]));
        float *sr = s + (size_t)r * lds + j0;
        if (valid == 4) {
            _mm_storeu_ps(sr, t);
        } else {
            float o[4];
            _mm_storeu_ps(o, t);
            for (size_t k = 0; k < valid; k++)
                sr[k] = o[k];
        }
    }
}

/* What a block of keys is made of for the score tiles. */
typedef struct SFX(keys) {
    const SFX(plan) *pl;    /* codes: format */
    const uint8_t *codes;   /* [n][row_bytes] */
    size_t row_bytes;
    const uint16_t *h;      /* fp16 [n][ldh] */
    size_t ldh;
    const float *sv, *zv;   /* per-token scales and zeros [n][ng], or NULL */
    const uint16_t *gfirst; /* [ng + 1] */
    size_t ng;
} SFX(keys);

/* s [rows][lds] (n columns) = q . key_j for every key, rows in tiles of 3. */
static inline __attribute__((always_inline)) ATTR void
SFX(scores_body)(const unsigned BITS, const int TOK, const SFX(keys) *K, uint32_t d, size_t rows,
                 const float *q, size_t ldq, const float *cst, size_t n, float *s, size_t lds)
{
    for (size_t j = 0; j < n; j += 4) {
        const size_t valid = n - j < 4 ? n - j : 4;
        for (size_t r = 0; r < rows; r += 3) {
            const float *qr = q + r * ldq, *cr = cst ? cst + r : NULL;
            float *sr = s + r * lds;
#define TILE(RR)                                                                                   \
    SFX(scores_tile)(RR, BITS, TOK, K->pl, K->codes, K->row_bytes, K->h, K->ldh, K->sv, K->zv,    \
                     K->gfirst, K->ng, d, n, j, valid, qr, ldq, cr, sr, lds)
            if (rows - r >= 3)
                TILE(3);
            else if (rows - r == 2)
                TILE(2);
            else
                TILE(1);
#undef TILE
        }
    }
}

/* One instance per width and scaling, so every tile sees constants. */
static ATTR void SFX(scores_run)(const unsigned bits, const int tok, const SFX(keys) *K,
                                 uint32_t d, size_t rows, const float *q, size_t ldq,
                                 const float *cst, size_t n, float *s, size_t lds)
{
#define SC_CASE(B, T) SFX(scores_body)(B, T, K, d, rows, q, ldq, cst, n, s, lds)
    if (bits == 16)
        SC_CASE(16, 0);
    else if (bits == 8)
        tok ? SC_CASE(8, 1) : SC_CASE(8, 0);
    else if (bits == 4)
        tok ? SC_CASE(4, 1) : SC_CASE(4, 0);
    else
        tok ? SC_CASE(2, 1) : SC_CASE(2, 0);
#undef SC_CASE
}

/* m (scale, zero) fp16 pairs sz [m][2] -> sv [m], zv [m]: eight pairs a
 * step through F16C, then even and odd lanes split. */
static ATTR void SFX(sz_split)(const uint16_t *sz, size_t m, float *sv, float *zv)
{
    size_t i = 0;
    for (; i + 8 <= m; i += 8) {
        const __m128i *h = (const __m128i *)(const void *)(sz + 2 * i); /* [8][2] halves */
        const __m256 a = _mm256_cvtph_ps(_mm_loadu_si128(h));
        const __m256 b = _mm256_cvtph_ps(_mm_loadu_si128(h + 1));
        /* [s0 s1 s4 s5 | s2 s3 s6 s7] -> 64-bit pieces reordered 0, 2, 1, 3 */
        const __m256d ev = _mm256_castps_pd(_mm256_shuffle_ps(a, b, 0x88));
        const __m256d od = _mm256_castps_pd(_mm256_shuffle_ps(a, b, 0xdd));
        _mm256_storeu_ps(sv + i, _mm256_castpd_ps(_mm256_permute4x64_pd(ev, 0xd8)));
        _mm256_storeu_ps(zv + i, _mm256_castpd_ps(_mm256_permute4x64_pd(od, 0xd8)));
    }
    for (; i < m; i++) {
        sv[i] = _cvtsh_ss(sz[2 * i]);
        zv[i] = _cvtsh_ss(sz[2 * i + 1]);
    }
}

/* Sum of x [n]. The tail goes into the lanes zero-padded, so x[j] always
 * lands in lane j % VL: appending zeros (masked keys) changes nothing, and
 * a row sums alike whatever the block's length (batched == single steps
 * to the byte). */
static inline ATTR float SFX(sum)(const float *x, size_t n)
{
    V a = v_zero();
    size_t j = 0;
    for (; j + VL <= n; j += VL)
        a = v_add(a, v_load(x + j));
    if (j < n) {
        float t[VL] = {0};
        memcpy(t, x + j, (n - j) * sizeof(float));
        a = v_add(a, v_load(t));
    }
    return reduce1(a);
}

ATTR int SFX(kvcki_q_scores)(const kvck_qfmt *f, int mode, size_t rows, const float *q, size_t ldq,
                        size_t n, const uint8_t *codes, const uint16_t *sz, float *s, size_t lds,
                        const kvcki_qscr *w)
{
    SFX(plan) pl;
    if (!SFX(plan_make)(f, mode, &pl))
        return 0;
    const uint32_t d = f->d;
    SFX(keys) K = {&pl, codes, f->row_bytes, NULL, 0, NULL, NULL, f->gfirst, f->n_groups};
    if (mode == KVCK_QS_CHANNEL) {
        /* Fold the channel scales into the queries once per block:
         * qf = q * scale, cst = q . zero (the scores' constant). */
        float *sc = w->lev, *zc = w->blk; /* [d] scales, [d] zeros */
        SFX(sz_split)(sz, d, sc, zc);
        for (size_t r = 0; r < rows; r++) {
            V k = v_zero();
            for (uint32_t c = 0; c < d; c += VL) {
                const V qv = v_load(q + r * ldq + c);
                v_store(w->qf + r * d + c, v_mul(qv, v_load(sc + c)));
                k = v_fma(qv, v_load(zc + c), k);
            }
            w->cst[r] = reduce1(k);
        }
        SFX(scores_run)(pl.bits, 0, &K, d, rows, w->qf, d, w->cst, n, s, lds);
        return 1;
    }
    /* Per-token scales: each key chunk is dequantized in registers. */
    K.sv = w->w2;                       /* [n][ng] */
    K.zv = w->w2 + n * f->n_groups;     /* [n][ng] */
    SFX(sz_split)(sz, n * f->n_groups, w->w2, w->w2 + n * f->n_groups);
    SFX(scores_run)(pl.bits, 1, &K, d, rows, q, ldq, NULL, n, s, lds);
    return 1;
}

ATTR int SFX(kvcki_f16_scores)(size_t rows, size_t d, const float *q, size_t ldq, const uint16_t *k,
                          size_t ldk, size_t n, float *s, size_t lds)
{
    if (d % VL)
        return 0;
    SFX(keys) K = {NULL, NULL, 0, k, ldk, NULL, NULL, NULL, 0};
    SFX(scores_run)(16, 0, &K, (uint32_t)d, rows, q, ldq, NULL, n, s, lds);
    return 1;
}

/* ---- P.V ---------------------------------------------------------------------------- */

/* What a block of values is made of for the P.V tiles. */
typedef struct SFX(vals) {
    const SFX(plan) *pl;  /* codes: format */
    const uint8_t *codes; /* [n][row_bytes] */
    size_t row_bytes;
    const uint16_t *h;    /* fp16 [n][ldh] */
    size_t ldh;
    const float *wt;      /* [rows][ng][n] per-token weights p * scale, or NULL (weights = p) */
    const uint16_t *gfirst;
    size_t ng, n;
} SFX(vals);

/* acc [R][ldacc] (channels c0 .. c0 + W * VL) += weight_rj * row_j over
 * all n rows, R <= 3, W <= 4 vectors: the value vectors are decoded once
 * for all R rows and RW accumulators hide the FMA latency. The strip
 * starts at chunk KK0 of a load group (0, or 4 when a load group holds 8
 * vectors) at byte o of the segment si. Weights: p, or per-token wt (p *
 * the scale of the token's group g). */
static inline __attribute__((always_inline)) ATTR void
SFX(pv_tile)(const int R, const int W, const unsigned BITS, const unsigned KK0,
             const SFX(vals) *X, uint32_t c0, uint32_t si, size_t o, size_t g, const float *p,
             size_t ldp, float *acc, size_t ldacc)
{
    V a[3][4];
    for (int r = 0; r < R; r++)
        for (int i = 0; i < W; i++)
            a[r][i] = v_load(acc + (size_t)r * ldacc + c0 + (size_t)i * VL);
    const float *wr[3]; /* [n] weights of each row */
    for (int r = 0; r < R; r++)
        wr[r] = X->wt ? X->wt + ((size_t)r * X->ng + g) * X->n : p + (size_t)r * ldp;
    const unsigned CPL = BITS == 16 ? 1 : 128 / BITS / VL;
    const uint8_t *row = BITS == 16 ? NULL : X->codes + X->pl->off[si] + o; /* row 0 */
    const LUT *lut = BITS == 16 ? NULL : &X->pl->lut[si];
    for (size_t j = 0; j < X->n; j++) {
        V xv[4];
        for (int i = 0; i < W; i++) {
            const unsigned kk = KK0 + (unsigned)i;
            xv[i] = BITS == 16 ? v_f16(X->h + j * X->ldh + c0 + (size_t)i * VL)
                               : SFX(lg_chunk)(row + j * X->row_bytes + kk / CPL * 16, BITS,
                                               kk % CPL, lut);
        }
        for (int r = 0; r < R; r++) {
            const V pb = v_bcast(wr[r] + j);
            for (int i = 0; i < W; i++)
                a[r][i] = v_fma(pb, xv[i], a[r][i]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int i = 0; i < W; i++)
            v_store(acc + (size_t)r * ldacc + c0 + (size_t)i * VL, a[r][i]);
}

/* Strips of up to 4 vectors that never straddle a segment or a per-token
 * group (so one weight per row and token), rows in tiles of 3. */
static inline __attribute__((always_inline)) ATTR void
SFX(pv_body)(const unsigned BITS, const SFX(vals) *X, uint32_t d, size_t rows, const float *p,
             size_t ldp, float *acc, size_t ldacc)
{
    const unsigned CH = BITS == 16 ? VL : 128 / BITS;
    uint32_t si = 0;
    size_t g = 0;
    for (uint32_t c = 0; c < d;) {
        uint32_t end = d, first = 0;
        if (BITS != 16) {
            while (c >= X->pl->first[si] + X->pl->len[si])
                si++;
            first = X->pl->first[si];
            end = first + X->pl->len[si];
        }
        if (X->wt) {
            while (c >= X->gfirst[g + 1])
                g++;
            end = X->gfirst[g + 1] < end ? X->gfirst[g + 1] : end;
        }
        const int W = end - c >= 4 * VL ? 4 : (int)((end - c) / VL);
        const size_t o = (size_t)(c - first) / CH * 16;            /* load group's byte */
        const unsigned kk0 = (unsigned)((c - first) % CH / VL); /* 0, or 4 (8-vector groups) */
        for (size_t r = 0; r < rows; r += 3) {
            const size_t R = rows - r < 3 ? rows - r : 3;
            SFX(vals) Xr = *X;
            if (Xr.wt)
                Xr.wt += r * X->ng * X->n;
            const float *pr = p + r * ldp;
            float *ar = acc + r * ldacc;
            /* The tile wants its shape constant: spell out the cases. */
#define PV_W(RR, WW)                                                                               \
    do {                                                                                           \
        if (kk0)                                                                                   \
            SFX(pv_tile)(RR, WW, BITS, 4, &Xr, c, si, o, g, pr, ldp, ar, ldacc);                   \
        else                                                                                       \
            SFX(pv_tile)(RR, WW, BITS, 0, &Xr, c, si, o, g, pr, ldp, ar, ldacc);                   \
    } while (0)
#define PV_R(RR)                                                                                   \
    do {                                                                                           \
        if (W == 4)                                                                                \
            PV_W(RR, 4);                                                                           \
        else if (W == 3)                                                                           \
            PV_W(RR, 3);                                                                           \
        else if (W == 2)                                                                           \
            PV_W(RR, 2);                                                                           \
        else                                                                                       \
            PV_W(RR, 1);                                                                           \
    } while (0)
            if (R == 3)
                PV_R(3);
            else if (R == 2)
                PV_R(2);
            else
                PV_R(1);
#undef PV_R
#undef PV_W
        }
        c += (uint32_t)W * VL;
    }
}

static ATTR void SFX(pv_run)(const unsigned bits, const SFX(vals) *X, uint32_t d, size_t rows,
                             const float *p, size_t ldp, float *acc, size_t ldacc)
{
    if (bits == 16)
        SFX(pv_body)(16, X, d, rows, p, ldp, acc, ldacc);
    else if (bits == 8)
        SFX(pv_body)(8, X, d, rows, p, ldp, acc, ldacc);
    else if (bits == 4)
        SFX(pv_body)(4, X, d, rows, p, ldp, acc, ldacc);
    else
        SFX(pv_body)(2, X, d, rows, p, ldp, acc, ldacc);
}

ATTR int SFX(kvcki_q_pv)(const kvck_qfmt *f, int mode, size_t rows, const float *p, size_t ldp,
                    size_t n, const uint8_t *codes, const uint16_t *sz, float *acc,
                    const kvcki_qscr *w)
{
    SFX(plan) pl;
    if (!SFX(plan_make)(f, mode, &pl))
        return 0;
    const uint32_t d = f->d;
    const size_t ng = f->n_groups;
    SFX(vals) X = {&pl, codes, f->row_bytes, NULL, 0, NULL, f->gfirst, ng, n};
    if (mode == KVCK_QS_CHANNEL) {
        /* u = sum_j p_j lev_j in qf, then acc += scale * u + zero * sum_j p_j. */
        float *u = w->qf; /* [rows][d] */
        memset(u, 0, rows * d * sizeof *u);
        SFX(pv_run)(pl.bits, &X, d, rows, p, ldp, u, d);
        float *sc = w->lev, *zc = w->blk; /* [d] scales, [d] zeros */
        SFX(sz_split)(sz, d, sc, zc);
        for (size_t r = 0; r < rows; r++) {
            const V P = v_set1(SFX(sum)(p + r * ldp, n));
            for (uint32_t c = 0; c < d; c += VL) {
                V a = v_load(acc + r * d + c);
                a = v_fma(v_load(sc + c), v_load(u + r * d + c), a);
                a = v_fma(v_load(zc + c), P, a);
                v_store(acc + r * d + c, a);
            }
        }
        return 1;
    }
    /* Per token: weights p * scale [rows][ng][n], and the zeros' part
     * sum_j p_j zero_jg added per group. */
    float *sv = w->w2, *zv = w->w2 + n * ng; /* [n][ng] scales, zeros */
    float *wt = w->w1;                       /* [rows][ng][n] */
    SFX(sz_split)(sz, n * ng, sv, zv);
    for (size_t r = 0; r < rows; r++) {
        const float *pr = p + r * ldp; /* [n] */
        for (size_t g = 0; g < ng; g++) {
            float *wr = wt + (r * ng + g) * n; /* [n] */
            /* zs = sum_j p_j zero_jg, p_j zero_jg in lane j % VL (the tail
             * zero-padded): the same sum whatever the block's length. */
            V z = v_zero();
            for (size_t j = 0; j < n; j += VL) {
                float pt[VL] = {0}, st[VL] = {0}, zt[VL] = {0};
                const size_t m = n - j < VL ? n - j : VL;
                for (size_t i = 0; i < m; i++) {
                    pt[i] = pr[j + i];
                    st[i] = sv[(j + i) * ng + g];
                    zt[i] = zv[(j + i) * ng + g];
                }
                const V pj = v_load(pt);
                v_store(pt, v_mul(pj, v_load(st)));
                memcpy(wr + j, pt, m * sizeof(float));
                z = v_fma(pj, v_load(zt), z);
            }
            w->gs[r * ng + g] = reduce1(z);
        }
    }
    X.wt = wt;
    SFX(pv_run)(pl.bits, &X, d, rows, p, ldp, acc, d);
    for (size_t r = 0; r < rows; r++)
        for (size_t g = 0; g < ng; g++) {
            const V z = v_set1(w->gs[r * ng + g]);
            for (uint32_t c = f->gfirst[g]; c < f->gfirst[g + 1]; c += VL)
                v_store(acc + r * d + c, v_add(v_load(acc + r * d + c), z));
        }
    return 1;
}

ATTR int SFX(kvcki_f16_pv)(size_t rows, size_t d, const float *p, size_t ldp, const uint16_t *v,
                      size_t ldv, size_t n, float *acc)
{
    if (d % VL)
        return 0;
    SFX(vals) X = {NULL, NULL, 0, v, ldv, NULL, NULL, 0, n};
    SFX(pv_run)(16, &X, (uint32_t)d, rows, p, ldp, acc, d);
    return 1;
}

#undef BPC
