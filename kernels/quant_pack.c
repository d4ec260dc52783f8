/*
 * quant_pack.c -- bit packing of quantization codes (layout: kvck_quant.h).
 *
 * Widths 1, 2, 4 and 8 are planes; 3, 5 and 6 are a low plane followed by a
 * high plane. Planes 2 and 4 interleave a chunk of values across the 16
 * bytes of one SIMD load (value i of a chunk in byte i % 16, field i / 16),
 * so one load and one shift per field give 16 consecutive values in lanes.
 * This file is the scalar definition; the attention kernels decode the same
 * layout with vector loads.
 */
#include "kvck_quant.h"
#include "quant_internal.h"

#include <string.h>

int kvck_qbits_valid(unsigned bits)
{
    return bits <= 6 || bits == 8;
}

/* Plane widths of a code width: low plane first, 0 = none. */
void kvcki_planes(unsigned bits, unsigned *lo, unsigned *hi)
{
    switch (bits) {
    case 3: *lo = 2, *hi = 1; break;
    case 5: *lo = 4, *hi = 1; break;
    case 6: *lo = 4, *hi = 2; break;
    case 1: case 2: case 4: case 8: *lo = bits, *hi = 0; break;
    default: *lo = 0, *hi = 0; break;
    }
}

/* Bytes of one plane of width w over n values: every chunk of r values uses
 * ceil(r * w / 8) bytes, and full chunks are exactly r * w / 8. */
static size_t plane_bytes(unsigned w, size_t n)
{
    return (n * w + 7) / 8;
}

size_t kvck_pack_bytes(unsigned bits, size_t n)
{
    unsigned lo, hi;
    if (!kvck_qbits_valid(bits))
        return 0;
    kvcki_planes(bits, &lo, &hi);
    return (lo ? plane_bytes(lo, n) : 0) + (hi ? plane_bytes(hi, n) : 0);
}

/* Values per 16-byte chunk of plane w (2 or 4): 128 / w. */
static size_t chunk_vals(unsigned w)
{
    return 128u / w;
}

/* Where value i of a plane of width w over n values lives: byte and bit
 * shift of its field. */
static void plane_pos(unsigned w, size_t n, size_t i, size_t *byte, unsigned *shift)
{
    if (w == 8) {
        *byte = i, *shift = 0;
        return;
    }
    if (w == 1) {
        *byte = i / 8, *shift = (unsigned)(i % 8);
        return;
    }
    /* Planes 2 and 4: chunk of C values; the last may be partial (r < C)
     * and then spreads over m = ceil(r * w / 8) bytes. For a full chunk
     * m = 16, the common case of the header's description. */
    const size_t C = chunk_vals(w);
    const size_t base = i / C * C, r = n - base < C ? n - base : C;
    const size_t m = (r * w + 7) / 8, k = i - base;
    *byte = base * w / 8 + k % m;
    *shift = (unsigned)(k / m * w);
}

/* OR the fields (value >> from) & mask(w) of v [n] into plane out (zeroed). */
static void pack_plane(unsigned w, unsigned from, const uint8_t *v, size_t n, uint8_t *out)
{
    const unsigned mask = (1u << w) - 1u;
    for (size_t i = 0; i < n; i++) {
        size_t b;
        unsigned sh;
        plane_pos(w, n, i, &b, &sh);
        out[b] = (uint8_t)(out[b] | (((unsigned)(v[i] >> from) & mask) << sh));
    }
}

/* codes [n] |= field of plane in, shifted up by `to`. Whole 16-byte chunks
 * of planes 2 and 4 are read field by field, byte by byte (value f * 16 +
 * b is byte b, field f): the plain C attention paths unpack every row of
 * every block, so the general per-value position is kept for the last,
 * partial chunk only. */
static void unpack_plane(unsigned w, unsigned to, const uint8_t *in, size_t n, uint8_t *codes)
{
    const unsigned mask = (1u << w) - 1u;
    size_t i = 0;
    if (w == 8 || w == 1) { /* byte i, or bit i % 8 of byte i / 8: no chunks */
        for (; i < n; i++) {
            const unsigned f = (w == 8 ? in[i] : (unsigned)in[i / 8] >> (i % 8)) & mask;
            codes[i] = (uint8_t)(codes[i] | f << to);
        }
        return;
    }
    if (w == 2 || w == 4) {
        const size_t C = chunk_vals(w);
        for (; i + C <= n; i += C, in += 16)
            for (unsigned f = 0; f < 8 / w; f++)
                for (size_t b = 0; b < 16; b++)
                    codes[i + f * 16 + b] = (uint8_t)(codes[i + f * 16 + b]
                                                      | ((unsigned)in[b] >> (f * w) & mask) << to);
        codes += i;
        n -= i;
        i = 0;
    }
    for (; i < n; i++) {
        size_t b;
        unsigned sh;
        plane_pos(w, n, i, &b, &sh);
        codes[i] = (uint8_t)(codes[i] | (((unsigned)in[b] >> sh & mask) << to));
    }
}

void kvck_pack(unsigned bits, const uint8_t *codes, size_t n, uint8_t *out)
{
    unsigned lo, hi;
    if (!kvck_qbits_valid(bits) || bits == 0)
        return;
    kvcki_planes(bits, &lo, &hi);
    memset(out, 0, kvck_pack_bytes(bits, n));
    pack_plane(lo, 0, codes, n, out);
    if (hi)
        pack_plane(hi, lo, codes, n, out + plane_bytes(lo, n));
}

void kvck_unpack(unsigned bits, const uint8_t *in, size_t n, uint8_t *codes)
{
    unsigned lo, hi;
    memset(codes, 0, n);
    if (!kvck_qbits_valid(bits) || bits == 0)
        return;
    kvcki_planes(bits, &lo, &hi);
    unpack_plane(lo, 0, in, n, codes);
    if (hi)
        unpack_plane(hi, lo, in + plane_bytes(lo, n), n, codes);
}

unsigned kvcki_code_at(unsigned bits, const uint8_t *in, size_t n, size_t i)
{
    unsigned lo, hi, c = 0;
    size_t b;
    unsigned sh;
    if (!kvck_qbits_valid(bits) || bits == 0)
        return 0;
    kvcki_planes(bits, &lo, &hi);
    plane_pos(lo, n, i, &b, &sh);
    c = (unsigned)in[b] >> sh & ((1u << lo) - 1u);
    if (hi) {
        plane_pos(hi, n, i, &b, &sh);
        c |= ((unsigned)in[plane_bytes(lo, n) + b] >> sh & ((1u << hi) - 1u)) << lo;
    }
    return c;
}
