/*
 * dequant.c -- ggml tensor block formats -> float32.
 *
 * GGUF files store each tensor as a run of fixed-size blocks of one ggml
 * type. The size table covers the types kvck.h enumerates, so a GGUF reader
 * can size (and skip) tensors it cannot dequantize; the dequantizers cover
 * what the model host loads: f32, f16, bf16, q4_0, q4_1, q8_0, q6_K.
 *
 * Block layouts follow ggml's ggml-common.h (block_* structs, all packed to
 * 1-byte alignment: no padding) and the reference dequantize_row_* in
 * ggml-quants.c. File data is little-endian, as is every host kvc targets,
 * and blocks may sit at any byte offset in a mapped file, so fields are read
 * with memcpy, never through a cast pointer. Products are formed in the
 * same order as ggml's reference code, so results are bit-identical to it.
 */
#include "kvck.h"

#include <string.h>

/* Elements in a "K" super-block (ggml's QK_K). */
#define QK_K 256

/* ---- field readers (unaligned, little-endian) --------------------------- */

static float read_f16(const uint8_t *p)
{
    uint16_t h;
    memcpy(&h, p, sizeof h);
    return kvck_f16_to_f32(h);
}

/* Each dequantizer converts nb whole blocks from src to dst. */
typedef void (*dequant_fn)(const uint8_t *src, float *dst, size_t nb);

/* ---- plain float formats ------------------------------------------------- */

/* f32: 4 bytes, IEEE binary32. A copy (src may be unaligned). */
static void dequant_f32(const uint8_t *src, float *dst, size_t nb)
{
    memcpy(dst, src, nb * sizeof(float));
}

/* Conversion chunk for the 16-bit float formats: copied to an aligned
 * buffer first, since the source may sit at an odd address. */
#define HALF_CHUNK 256

/* f16: 2 bytes, IEEE binary16 -> exact in binary32 (NaN quieted, payload
 * kept). Uses the project's converter (F16C where the CPU has it). */
static void dequant_f16(const uint8_t *src, float *dst, size_t nb)
{
    uint16_t tmp[HALF_CHUNK];
    for (size_t i = 0; i < nb; i += HALF_CHUNK) {
        size_t m = nb - i < HALF_CHUNK ? nb - i : HALF_CHUNK;
        memcpy(tmp, src + 2 * i, 2 * m);
        kvck_f16_to_f32_n(tmp, dst + i, m);
    }
}

/* bf16: 2 bytes, the top half of a binary32 (sign, 8-bit exponent, 7-bit
 * mantissa). value bits = h << 16: exact for every input, NaN payloads and
 * subnormals included. */
static void dequant_bf16(const uint8_t *src, float *dst, size_t nb)
{
    uint16_t tmp[HALF_CHUNK];
    for (size_t i = 0; i < nb; i += HALF_CHUNK) {
        size_t m = nb - i < HALF_CHUNK ? nb - i : HALF_CHUNK;
        memcpy(tmp, src + 2 * i, 2 * m);
        for (size_t j = 0; j < m; j++) {
            uint32_t u = (uint32_t)tmp[j] << 16;
            memcpy(dst + i + j, &u, sizeof u);
        }
    }
}

/* ---- 32-element blocks --------------------------------------------------- */

/* q4_0: 32 elements in 18 bytes.
 *   offset 0   f16  d       scale
 *   offset 2   u8   qs[16]  4-bit quants: byte j holds element j in its low
 *                           nibble and element j + 16 in its high nibble
 *   y[j] = d * (q[j] - 8),  q in 0..15, so y in [-8d, 7d]. */
static void dequant_q4_0(const uint8_t *src, float *dst, size_t nb)
{
    for (size_t b = 0; b < nb; b++, src += 18, dst += 32) {
        const float d = read_f16(src);
        const uint8_t *qs = src + 2;
        for (int j = 0; j < 16; j++) {
            dst[j] = (float)((qs[j] & 0x0f) - 8) * d;
            dst[j + 16] = (float)((qs[j] >> 4) - 8) * d;
        }
    }
}

/* q4_1: 32 elements in 20 bytes.
 *   offset 0   f16  d       scale
 *   offset 2   f16  m       minimum (offset added to every element)
 *   offset 4   u8   qs[16]  nibbles as in q4_0: low = j, high = j + 16
 *   y[j] = q[j] * d + m,  q in 0..15 (no centering). */
static void dequant_q4_1(const uint8_t *src, float *dst, size_t nb)
{
    for (size_t b = 0; b < nb; b++, src += 20, dst += 32) {
        const float d = read_f16(src);
        const float m = read_f16(src + 2);
        const uint8_t *qs = src + 4;
        for (int j = 0; j < 16; j++) {
            dst[j] = (float)(qs[j] & 0x0f) * d + m;
            dst[j + 16] = (float)(qs[j] >> 4) * d + m;
        }
    }
}

/* q8_0: 32 elements in 34 bytes.
 *   offset 0   f16  d       scale
 *   offset 2   i8   qs[32]  quants, two's complement, in element order
 *   y[j] = q[j] * d,  q in -128..127. */
static void dequant_q8_0(const uint8_t *src, float *dst, size_t nb)
{
    for (size_t b = 0; b < nb; b++, src += 34, dst += 32) {
        const float d = read_f16(src);
        int8_t qs[32];
        memcpy(qs, src + 2, sizeof qs);
        for (int j = 0; j < 32; j++)
            dst[j] = (float)qs[j] * d;
    }
}

/* ---- 256-element super-blocks ------------------------------------------- */

/* q6_K: 256 elements in 210 bytes, 16 sub-blocks of 16 with 8-bit scales.
 *   offset   0  u8  ql[128]     low 4 bits of the quants
 *   offset 128  u8  qh[64]      high 2 bits of the quants
 *   offset 192  i8  scales[16]  scale of sub-block s = elements 16s..16s+15
 *   offset 208  f16 d           super-block scale
 *   y[e] = d * scales[e / 16] * (q[e] - 32),  q in 0..63.
 * The block is two halves of 128 elements (h = 0, 1), each using 64 ql
 * bytes, 32 qh bytes and 8 scales. Within a half, element 32k + l
 * (quarter k = 0..3, l = 0..31) takes:
 *   low 4 bits  from ql[64h + l + 32 (k & 1)], low nibble for k < 2, high
 *               nibble for k >= 2;
 *   high 2 bits from qh[32h + l], bits 2k and 2k + 1. */
static void dequant_q6_K(const uint8_t *src, float *dst, size_t nb)
{
    for (size_t b = 0; b < nb; b++, src += 210, dst += QK_K) {
        const float d = read_f16(src + 208);
        int8_t sc[16];
        memcpy(sc, src + 192, sizeof sc);
        float ds[16]; /* d * scale per sub-block, as ggml groups it */
        for (int s = 0; s < 16; s++)
            ds[s] = d * (float)sc[s];

        for (int h = 0; h < 2; h++) {
            const uint8_t *ql = src + 64 * h;
            const uint8_t *qh = src + 128 + 32 * h;
            const float *dh = ds + 8 * h;
            float *y = dst + 128 * h;
            /* Two runs of 16 l's: each run stays in one sub-block per
             * quarter (sub-block 2k + l / 16 of this half). */
            for (int r = 0; r < 2; r++) {
                const float d0 = dh[r], d1 = dh[r + 2], d2 = dh[r + 4], d3 = dh[r + 6];
                for (int l = 16 * r; l < 16 * r + 16; l++) {
                    const int q0 = (ql[l] & 0x0f) | ((qh[l] & 0x03) << 4);
                    const int q1 = (ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 0x03) << 4);
                    const int q2 = (ql[l] >> 4) | (((qh[l] >> 4) & 0x03) << 4);
                    const int q3 = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 0x03) << 4);
                    y[l] = d0 * (float)(q0 - 32);
                    y[l + 32] = d1 * (float)(q1 - 32);
                    y[l + 64] = d2 * (float)(q2 - 32);
                    y[l + 96] = d3 * (float)(q3 - 32);
                }
            }
        }
    }
}

/* ---- type table ---------------------------------------------------------- */

typedef struct type_info {
    const char *name; /* ggml's spelling; NULL: not a type we know */
    uint16_t elems;   /* elements per block */
    uint16_t bytes;   /* bytes per block */
    dequant_fn fn;    /* NULL: known size, no dequantizer */
} type_info;

/* Indexed by ggml type id. Sizes from ggml-common.h:
 *   q5_0  d, qh[4], qs[16]                    2 + 4 + 16        =  22
 *   q5_1  d, m, qh[4], qs[16]                 4 + 4 + 16        =  24
 *   q8_1  d, s, qs[32]                        4 + 32            =  36
 *   q2_K  scales[16], qs[64], d, dmin         16 + 64 + 4       =  84
 *   q3_K  hmask[32], qs[64], scales[12], d    32 + 64 + 12 + 2  = 110
 *   q4_K  d, dmin, scales[12], qs[128]        4 + 12 + 128      = 144
 *   q5_K  d, dmin, scales[12], qh[32], qs[128] 4 + 12 + 32 + 128 = 176
 *   q8_K  f32 d, qs[256], i16 bsums[16]       4 + 256 + 32      = 292 */
static const type_info k_types[] = {
    [KVCK_GGML_F32] = {"f32", 1, 4, dequant_f32},
    [KVCK_GGML_F16] = {"f16", 1, 2, dequant_f16},
    [KVCK_GGML_Q4_0] = {"q4_0", 32, 18, dequant_q4_0},
    [KVCK_GGML_Q4_1] = {"q4_1", 32, 20, dequant_q4_1},
    [KVCK_GGML_Q5_0] = {"q5_0", 32, 22, NULL},
    [KVCK_GGML_Q5_1] = {"q5_1", 32, 24, NULL},
    [KVCK_GGML_Q8_0] = {"q8_0", 32, 34, dequant_q8_0},
    [KVCK_GGML_Q8_1] = {"q8_1", 32, 36, NULL},
    [KVCK_GGML_Q2_K] = {"q2_K", QK_K, 84, NULL},
    [KVCK_GGML_Q3_K] = {"q3_K", QK_K, 110, NULL},
    [KVCK_GGML_Q4_K] = {"q4_K", QK_K, 144, NULL},
    [KVCK_GGML_Q5_K] = {"q5_K", QK_K, 176, NULL},
    [KVCK_GGML_Q6_K] = {"q6_K", QK_K, 210, dequant_q6_K},
    [KVCK_GGML_Q8_K] = {"q8_K", QK_K, 292, NULL},
    [KVCK_GGML_BF16] = {"bf16", 1, 2, dequant_bf16},
};

static const type_info *lookup(uint32_t type)
{
    if (type >= sizeof k_types / sizeof k_types[0] || !k_types[type].name)
        return NULL;
    return &k_types[type];
}

const char *kvck_ggml_type_name(uint32_t type)
{
    const type_info *t = lookup(type);
    return t ? t->name : "unknown";
}

size_t kvck_ggml_block_elems(uint32_t type)
{
    const type_info *t = lookup(type);
    return t ? t->elems : 0;
}

size_t kvck_ggml_block_bytes(uint32_t type)
{
    const type_info *t = lookup(type);
    return t ? t->bytes : 0;
}

int kvck_ggml_can_dequantize(uint32_t type)
{
    const type_info *t = lookup(type);
    return t && t->fn;
}

int kvck_dequantize(uint32_t type, const void *src, float *dst, size_t n)
{
    const type_info *t = lookup(type);
    if (!t || !t->fn || n % t->elems)
        return -1;
    if (n == 0)
        return 0;
    if (!src || !dst)
        return -1;
    t->fn((const uint8_t *)src, dst, n / t->elems);
    return 0;
}
