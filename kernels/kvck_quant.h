/*
 * kvck_quant.h -- kernels of the quantized KV store: bit packing, quantizing
 * rows (per token) and blocks (per channel) to uniform or table levels, the
 * randomized Hadamard rotation, a RoPE table for keys kept before RoPE, and
 * attention computed on the packed codes (scores, P.V, and the streaming
 * pass over f32, f16 or quantized blocks).
 *
 * Internal API (static library, hidden in plugins): not part of the ABI.
 * Nothing here allocates: callers pass scratch sized by the *_floats()
 * helpers. Thread-safe on distinct data. Shapes beside each buffer,
 * outermost first.
 *
 * ---------------------------------------------------------------------------
 * The numbers
 * ---------------------------------------------------------------------------
 * A quantized value is   x^ = zero + scale * level[code]
 * with zero and scale in IEEE fp16 (stored as uint16_t) and level[] the
 * 2^bits levels of its segment, ascending in [0, 1] with level[0] = 0 and
 * level[2^bits - 1] = 1. Uniform levels are level[c] = (float)c / (float)L,
 * L = 2^bits - 1 (a correctly rounded division, so every path uses the same
 * floats). A segment of width 0 stores no codes: x^ = zero.
 * Quantizing a group with min m and max M (over the values the group
 * covers, outliers excluded): zero = fp16(m), scale = fp16 of the smallest
 * value >= (M - zero) (rounded up so that zero + scale covers M), then each
 * code is the level nearest to (x - zero) / scale (clamped to [0, 1]; ties
 * to the lower code). A group whose values are all equal has scale 0.
 *
 * ---------------------------------------------------------------------------
 * Bit packing
 * ---------------------------------------------------------------------------
 * Widths 1, 2, 3, 4, 5, 6 and 8. Widths 1, 2, 4, 8 are PLANES; 3 = 2 + 1,
 * 5 = 4 + 1, 6 = 4 + 2 are two planes, the low bits' plane first, then the
 * high bits' plane, each laid out as below over the same n values.
 *   plane 8: value i in byte i.
 *   plane 4: chunks of 32 values in 16 bytes: value i of a chunk in byte
 *            i % 16, low nibble for i < 16, high nibble for i >= 16.
 *   plane 2: chunks of 64 values in 16 bytes: value i in byte i % 16, bits
 *            2 * (i / 16) .. +1.
 *   plane 1: little-endian bit order: value i in byte i / 8, bit i % 8.
 *   A last partial chunk of r values (planes 4 and 2) uses m = ceil(r * w / 8)
 *   bytes: value i in byte i % m, field i / m.
 * So a SIMD lane j of a 16-byte load holds values j, j + 16, ... of the
 * chunk in its fields, and 16 consecutive 1-bit values are one 16-bit word.
 * Unused bits of the last byte are zero.
 */
#ifndef KVCK_QUANT_H
#define KVCK_QUANT_H

#include <stddef.h>
#include <stdint.h>

#include "kvck.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- bit packing ---------------------------------------------------------- */

/* 1 for the widths above (and 0, which stores nothing), else 0. */
int kvck_qbits_valid(unsigned bits);

/* Bytes n codes of `bits` take (0 for bits 0). */
size_t kvck_pack_bytes(unsigned bits, size_t n);

/* codes [n] (each < 2^bits) -> out [kvck_pack_bytes(bits, n)]. */
void kvck_pack(unsigned bits, const uint8_t *codes, size_t n, uint8_t *out);

/* in [kvck_pack_bytes(bits, n)] -> codes [n]. */
void kvck_unpack(unsigned bits, const uint8_t *in, size_t n, uint8_t *codes);

/* ---- row formats ----------------------------------------------------------- */

#define KVCK_QSEG_MAX 8     /* segments of one width in a row */
#define KVCK_QGROUP_MAX 128 /* per-token scaling groups in a row */

/* Channels [first, first + len) of a row, `bits` wide each. The row's
 * codes of the segment start at byte `offset` of the row. */
typedef struct kvck_qseg {
    uint32_t first, len, bits, offset;
    const float *levels; /* [2^bits] ascending in [0,1], first 0, last 1; NULL = uniform */
} kvck_qseg;

/* How one row of d values (one KV head of one token) is coded. Segments
 * cover 0..d-1 in order. A caller fills d, n_seg, seg[].first/len/bits/
 * levels and `group`, then calls kvck_qfmt_finish. */
typedef struct kvck_qfmt {
    uint32_t d;
    uint32_t n_seg;
    kvck_qseg seg[KVCK_QSEG_MAX];
    uint32_t group;     /* per-token scaling: at most this many channels per group (0 = d) */
    /* filled by kvck_qfmt_finish: */
    uint32_t row_bytes; /* packed codes of one row */
    uint32_t n_groups;  /* per-token groups: each segment split into ceil(len / group) */
    uint16_t gfirst[KVCK_QGROUP_MAX + 1]; /* [n_groups + 1] first channel of each group, then d */
    const float (*ulev)[256]; /* uniform levels by width [9][256] (one shared table) */
} kvck_qfmt;

/* Computes offsets, row_bytes and the groups. Returns 0, or -1 when the
 * segments do not tile [0, d), a width is invalid, d > KVCK_MAX_HEAD_DIM,
 * there are more than KVCK_QGROUP_MAX groups, or a level table is not
 * ascending in [0, 1] from 0 to 1. */
int kvck_qfmt_finish(kvck_qfmt *f);

/* Fills a one-segment format: d channels of `bits`, `group` channels per
 * per-token group (0 = d), uniform levels; then kvck_qfmt_finish. */
int kvck_qfmt_uniform(kvck_qfmt *f, uint32_t d, unsigned bits, uint32_t group);

/* Where the scales live.
 * KVCK_QS_TOKEN:   sz [n][n_groups][2] (scale, zero) per row and group.
 * KVCK_QS_CHANNEL: sz [d][2] (scale, zero) per channel, shared by the n
 *                  rows of one block. */
enum { KVCK_QS_TOKEN = 0, KVCK_QS_CHANNEL = 1 };

/* Bytes of scales for n rows: n * n_groups * 4 (token), d * 4 (channel). */
size_t kvck_q_scale_bytes(const kvck_qfmt *f, int mode, size_t n);

/* ---- quantize / dequantize -------------------------------------------------- */

/* Quantizes n rows x [n][ldx] (first d values of each) into codes
 * [n][row_bytes] and sz (mode's layout). skip [n][d] (or NULL): nonzero
 * marks a value left out of its group's min/max (an outlier the caller
 * keeps elsewhere); its code is that of the value clamped into the range.
 * CHANNEL mode: the groups are the d channels over the n rows. */
void kvck_q_quantize(const kvck_qfmt *f, int mode, size_t n, const float *x, size_t ldx,
                     const uint8_t *skip, uint8_t *codes, uint16_t *sz);

/* Codes of n rows x [n][ldx] on scales already chosen (sz in `mode`'s
 * layout): values outside a group's range clamp to its ends. For fixed
 * per-channel scales (CHANNEL mode: sz [d][2] shared by all rows). */
void kvck_q_encode(const kvck_qfmt *f, int mode, size_t n, const float *x, size_t ldx,
                   const uint16_t *sz, uint8_t *codes);

/* x [n][ldx] (first d values) <- the quantized values. */
void kvck_q_dequantize(const kvck_qfmt *f, int mode, size_t n, const uint8_t *codes,
                       const uint16_t *sz, float *x, size_t ldx);

/* The quantized value of row j, channel c. */
float kvck_q_value(const kvck_qfmt *f, int mode, const uint8_t *codes, const uint16_t *sz,
                   size_t j, uint32_t c);

/* Chooses k outliers of x [n][ldx] (first d values) for `mode`'s groups:
 * greedily, the value whose removal shrinks the squared range of its group
 * the most (a group keeps at least 2 values). Writes idx [k] (j * d + c,
 * ascending) and returns how many were chosen (< k when groups run out).
 * scratch: kvck_q_outlier_scratch_floats(f, mode, n) floats. */
size_t kvck_q_outliers(const kvck_qfmt *f, int mode, size_t n, const float *x, size_t ldx,
                       size_t k, uint32_t *idx, float *scratch);
size_t kvck_q_outlier_scratch_floats(const kvck_qfmt *f, int mode, size_t n);

/* ---- rotations -------------------------------------------------------------- */

/* x [d] <- H (signs * x): a randomized Walsh-Hadamard rotation, orthogonal
 * (normalized by 1/sqrt(block)). d is split into power-of-two blocks from
 * the largest down (96 = 64 + 32), each rotated on its own. signs [d] of
 * +-1 (or NULL = all +1). */
void kvck_hadamard(float *x, size_t d, const float *signs);
/* The inverse: x <- signs * (H^T x). */
void kvck_hadamard_inv(float *x, size_t d, const float *signs);
/* Fills signs [d] with +-1 from a 64-bit seed (splitmix64), reproducibly. */
void kvck_hadamard_signs(float *signs, size_t d, uint64_t seed);

/* ---- RoPE from a table (keys stored before RoPE) ---------------------------- */

/* cos/sin of every (position, pair), for rotating many cached keys per
 * step without a sine per value: table [n_pos][dims/2][2]. */
size_t kvck_rope_table_floats(const kvck_rope *r, size_t n_pos);
void kvck_rope_table_fill(const kvck_rope *r, size_t n_pos, float *table);
/* As kvck_rope_apply, angles from the table (positions < n_pos). Equal to
 * kvck_rope_apply up to float rounding of the product. */
void kvck_rope_apply_table(const kvck_rope *r, const float *table, size_t n_tok,
                           size_t n_heads, const int32_t *pos, const float *x, float *y);

/* ---- attention on codes -------------------------------------------------------- */

/* s [rows][lds] (first n columns) = q [rows][ldq] . x^[j]^T for the n
 * quantized rows (codes [n][row_bytes], sz in `mode`'s layout). */
void kvck_q_scores(const kvck_qfmt *f, int mode, size_t rows, const float *q, size_t ldq,
                   size_t n, const uint8_t *codes, const uint16_t *sz, float *s, size_t lds,
                   float *scratch);

/* acc [rows][d] += p [rows][ldp] (n wide) . x^ [n][d]. */
void kvck_q_pv(const kvck_qfmt *f, int mode, size_t rows, const float *p, size_t ldp, size_t n,
               const uint8_t *codes, const uint16_t *sz, float *acc, float *scratch);

/* Floats of scratch kvck_q_scores / kvck_q_pv need for `rows` rows and
 * blocks of up to n rows. */
size_t kvck_q_scratch_floats(const kvck_qfmt *f, size_t rows, size_t n);

/* One exactly kept value of a quantized block: row j, channel c. */
typedef struct kvck_qout {
    uint16_t j, c;
    uint16_t value; /* fp16 */
    uint16_t reserved;
} kvck_qout;

/* A block of n key or value rows as the streaming pass reads it. */
enum { KVCK_SRC_F32 = 0, KVCK_SRC_F16 = 1, KVCK_SRC_Q = 2 };
typedef struct kvck_src {
    int kind;             /* KVCK_SRC_* */
    const void *data;     /* F32: float [n][ld]; F16: uint16_t [n][ld]; Q: codes [n][fmt->row_bytes] */
    size_t ld;            /* F32/F16: row stride in elements */
    const kvck_qfmt *fmt; /* Q only */
    int mode;             /* Q only: KVCK_QS_* */
    const uint16_t *sz;   /* Q only */
    const kvck_qout *out; /* Q only: exact values replacing x^ at (j, c), or NULL */
    size_t n_out;
} kvck_src;

/* kvck_attn_block over any source: keys k and values v of n tokens at
 * k_pos [n] (n <= a->block), scores from q [rows][ldq] (rotated, scaled).
 * Scratch for the Q kind: kvck_attn_src_scratch_floats. Equal to
 * dequantizing (f16 widening) then kvck_attn_block, up to float rounding. */
void kvck_attn_block_src(kvck_attn *a, const float *q, size_t ldq, const kvck_src *k,
                         const kvck_src *v, const int32_t *k_pos, size_t n, float *scratch);
size_t kvck_attn_src_scratch_floats(const kvck_qfmt *fk, const kvck_qfmt *fv, size_t rows,
                                    size_t block);

/* Added: starts loading rows [0, n) of a source (codes and scales, or the
 * d values of each f32/f16 row) into the caches, without waiting. Call it
 * on the next block before kvck_attn_block_src on this one: a block spans
 * a few 4 KiB pages, which the hardware prefetchers do not cross, so a
 * cold cache otherwise stalls at the start of every block. */
void kvck_src_prefetch(const kvck_src *x, size_t n, size_t d);

/* Per-query key bounds of a pass, besides causality and the window: a key
 * at kp is visible to query t only if q_lo[t] < kp (q_lo NULL = no lower
 * bound) and kp <= q_hi[t] (q_hi replaces the query positions as the
 * causal bound; NULL = the positions given at init). The arrays must stay
 * valid until the next call. Used to show a query some tokens in one form
 * (quantized) and the newer ones in another (raw) within one pass. */
void kvck_attn_bounds(kvck_attn *a, const int32_t *q_hi, const int32_t *q_lo);

/* Makes the passes of kvck_attn_block_src compute every row exactly as
 * they would in a pass of that row alone: rows go through the few-row
 * kernels in tiles, never through SGEMM, so a batch of queries gives the
 * bytes that one query per call gives (the step rule to the byte, at some
 * cost in prefill speed). */
void kvck_attn_row_invariant(kvck_attn *a);

/* ---- instruction sets ------------------------------------------------------------ */

/* The path the kernels of this header (and the fp16 source) take:
 * KVCK_ISA_GENERIC, KVCK_ISA_AVX2 (AVX2+FMA+F16C), KVCK_ISA_AVX512
 * (F, BW, VL, DQ). Chosen once from the CPU; the environment variable
 * KVCK_ISA=generic|avx2|avx512 caps it (for tests and comparisons; a path
 * the CPU lacks is never taken). */
enum { KVCK_ISA_GENERIC = 0, KVCK_ISA_AVX2 = 1, KVCK_ISA_AVX512 = 2 };
int kvck_isa(void);
const char *kvck_isa_name(int isa);

/* Added: caps the path at run time, for tests and benchmarks that compare
 * paths within one process (KVCK_ISA is read once). isa < 0 restores the
 * start-up choice. Returns the path now taken (never one the CPU lacks).
 * Kernels running meanwhile take either path, both correct. */
int kvck_isa_set(int isa);

#ifdef __cplusplus
}
#endif

#endif /* KVCK_QUANT_H */
