/*
 * gguf.h -- a strict reader of GGUF v2/v3 files (llama.cpp's model format),
 * memory-mapped. Every count, length and offset is checked against the
 * file size before use: a truncated or corrupted file is an error message,
 * never a crash or an out-of-bounds read.
 *
 * Part of the reference model host (not the plugin ABI). Prefix kvch_gguf_.
 * A kvch_gguf is read-only after open: any thread may read it at once.
 */
#ifndef KVCH_GGUF_H
#define KVCH_GGUF_H

#include <stddef.h>
#include <stdint.h>

#include "kvc.h"

/* Metadata value types, numbered as in the GGUF specification. */
enum {
    KVCH_GGUF_UINT8 = 0, KVCH_GGUF_INT8 = 1, KVCH_GGUF_UINT16 = 2, KVCH_GGUF_INT16 = 3,
    KVCH_GGUF_UINT32 = 4, KVCH_GGUF_INT32 = 5, KVCH_GGUF_FLOAT32 = 6, KVCH_GGUF_BOOL = 7,
    KVCH_GGUF_STRING = 8, KVCH_GGUF_ARRAY = 9, KVCH_GGUF_UINT64 = 10, KVCH_GGUF_INT64 = 11,
    KVCH_GGUF_FLOAT64 = 12
};

typedef struct kvch_gguf kvch_gguf;

/* One tensor of the file. ne[0] is the fastest-varying dimension (a row of
 * ne[0] elements), as in ggml: a weight `W` of shape [out][in] is stored
 * with ne[0] = in, ne[1] = out. `data` points into the mapping. */
typedef struct kvch_gguf_tensor {
    const char *name;    /* NUL-terminated copy */
    uint32_t type;       /* ggml type id (KVCK_GGML_* in kvck.h) */
    uint32_t n_dims;     /* 1..4 */
    uint64_t ne[4];      /* dims beyond n_dims are 1 */
    uint64_t n_elements;
    uint64_t n_bytes;    /* exact size of the data */
    const void *data;    /* at a multiple of the file's alignment from the file's
                          * start (so aligned in memory too when mapped, for
                          * alignments up to the page size) */
} kvch_gguf_tensor;

/* Opens and validates `path` (mmap, read-only). Checks: magic, version 2
 * or 3, counts against the file size, every string and array length, key
 * uniqueness, tensor dims (1..4, no zero, no overflow), tensor types known
 * to ggml (an unknown or unsupported type is an error naming it and the
 * tensor), data offsets aligned and inside the file, tensors not
 * overlapping. On failure *out is untouched and err says what and where
 * (byte offset); kvch_gguf_open's messages start with the path.
 *
 * Also refused, as the spec requires or as no model needs: keys that are
 * empty, longer than 65535 bytes or hold a NUL; tensor names that are
 * empty, longer than 64 bytes, hold a NUL or repeat; bool values other than
 * 0 and 1; a general.alignment that is not a uint32 nonzero power of two;
 * arrays of arrays. A file with no tensors needs no data section.
 *
 * Status: KVC_E_CORRUPT malformed (truncated included); KVC_E_VERSION a
 * version other than 2 or 3 (1, or a big-endian file, named as such);
 * KVC_E_UNSUPPORTED a tensor type id unknown to kvck_ggml_block_elems, or
 * a nested array; KVC_E_INVALID NULL arguments, a path that cannot be
 * opened (message with strerror) or is not a regular file; KVC_E_NOMEM;
 * KVC_E_INTERNAL a failed fstat or mmap. */
kvc_status kvch_gguf_open(const char *path, kvch_gguf **out, char *err, size_t err_size);

/* Same, over a caller's buffer (kept by reference until close): tests.
 * The buffer needs no particular alignment. */
kvc_status kvch_gguf_open_memory(const void *data, size_t size, kvch_gguf **out, char *err,
                                 size_t err_size);

/* Unmaps and frees. NULL is a no-op. */
void kvch_gguf_close(kvch_gguf *g);

uint32_t kvch_gguf_version(const kvch_gguf *g);

/* ---- metadata ---------------------------------------------------------- */

/* Type of the value under `key` (KVCH_GGUF_*), or -1 when absent. */
int kvch_gguf_type(const kvch_gguf *g, const char *key);

/* Scalar getters: 0 on success; -1 when the key is absent or its value does
 * not fit. *out untouched on failure.
 *   get_u32, get_i64: a value of any integer type that fits (no bools, no
 *                     floats, no arrays);
 *   get_f32:          a float32, a float64 within float range, or any integer
 *                     (rounded to the nearest float);
 *   get_bool:         a bool only, as 0/1. */
int kvch_gguf_get_u32(const kvch_gguf *g, const char *key, uint32_t *out);
int kvch_gguf_get_i64(const kvch_gguf *g, const char *key, int64_t *out);
int kvch_gguf_get_f32(const kvch_gguf *g, const char *key, float *out);
int kvch_gguf_get_bool(const kvch_gguf *g, const char *key, int *out);

/* A string value (not NUL-terminated in the file: use *len), or NULL. */
const char *kvch_gguf_get_str(const kvch_gguf *g, const char *key, size_t *len);

/* An array: its element type and length; -1 when absent or not an array. */
int kvch_gguf_get_arr(const kvch_gguf *g, const char *key, int *elem_type, uint64_t *n);

/* Element i of a string array (pointer into the mapping, *len bytes), or
 * NULL when out of range or not a string array. O(1). */
const char *kvch_gguf_arr_str(const kvch_gguf *g, const char *key, uint64_t i, size_t *len);

/* Element i of a numeric array converted to int64 (integer element types,
 * the value fitting) or double (integer or float element types); -1 on
 * failure (absent, out of range, wrong element type), *out untouched. O(1). */
int kvch_gguf_arr_i64(const kvch_gguf *g, const char *key, uint64_t i, int64_t *out);
int kvch_gguf_arr_f64(const kvch_gguf *g, const char *key, uint64_t i, double *out);

/* ---- tensors ------------------------------------------------------------- */

uint64_t kvch_gguf_n_tensors(const kvch_gguf *g);
/* In file order; NULL when i >= n_tensors. */
const kvch_gguf_tensor *kvch_gguf_tensor_at(const kvch_gguf *g, uint64_t i);
/* By name, or NULL. */
const kvch_gguf_tensor *kvch_gguf_tensor_by_name(const kvch_gguf *g, const char *name);

/* Dequantizes a whole tensor to float32: dst [n_elements] (row-major, ne[0]
 * fastest). Returns 0, or -1 with err naming the tensor and its type when
 * the type has no dequantizer (kvck_ggml_can_dequantize). */
int kvch_gguf_dequantize(const kvch_gguf_tensor *t, float *dst, char *err, size_t err_size);

#endif /* KVCH_GGUF_H */
