/*
 * kvcp.h -- code every kvc plugin shares: messages, host allocation,
 * geometry validation, option parsing, and the framing of serialized blobs
 * (artifacts and sequence exports).
 *
 * Linked statically with hidden visibility into each plugin: nothing here
 * is part of the ABI. Prefix kvcp_. None of it prints, aborts or exits.
 */
#ifndef KVCP_H
#define KVCP_H

#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "kvc.h"
#include "kvck.h"

#define KVCP_MSG_SIZE 256

/* Sizes of the v1.0 ABI structs: a struct_size below these is refused. */
#define KVCP_V10_SIZE(type, last) (offsetof(type, last) + sizeof(((type *)0)->last))

/* ---- messages ------------------------------------------------------------ */

/* printf into msg[cap] (truncating, always NUL-terminated); returns `st`
 * so error paths read `return kvcp_fail(msg, cap, KVC_E_INVALID, "...")`.
 * msg may be NULL (nothing written). */
kvc_status kvcp_fail(char *msg, size_t cap, kvc_status st, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 4, 5)))
#endif
    ;

/* ---- host services ------------------------------------------------------- */

/* Copies *src into *dst after checking struct_size and that alloc and free
 * are set. Fields the host's (older) struct lacks are zero. */
kvc_status kvcp_host_copy(kvc_host *dst, const kvc_host *src, char *msg, size_t cap);

/* Host memory through the host allocator, 64-byte aligned. Zero-filled
 * (callers rely on it for structs). NULL on failure or size 0. */
void *kvcp_alloc(const kvc_host *h, size_t size, int32_t usage);
void kvcp_free(const kvc_host *h, void *p, size_t size);

/* Logs through the host when it has a logger. */
void kvcp_log(const kvc_host *h, int32_t level, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* ---- geometry ------------------------------------------------------------ */

/* The validated geometry a plugin works with: the whole model plus the
 * shard this instance serves. */
typedef struct kvcp_geom {
    uint32_t n_layers, n_heads, n_kv_heads, head_dim, hidden_size, max_positions;
    uint32_t window;    /* 0 = none */
    uint32_t kv_first;  /* first KV head of the shard */
    uint32_t n_kv;      /* KV heads of the shard */
    uint32_t group;     /* query heads per KV head */
    uint32_t n_q;       /* query heads of the shard = n_kv * group */
    int32_t rope_style;
    uint32_t rope_dims;
    float rope_theta, rope_mscale;
    float scale;        /* attention score scale in force */
    kvck_rope rope;     /* ready-to-use rotation (inv_freq resolved) */
} kvcp_geom;

/* Validates g (struct size, counts, divisibility, head_dim limit, RoPE,
 * shard range, finite scales) and fills *out. */
kvc_status kvcp_geom_from(const kvc_geometry *g, kvcp_geom *out, char *msg, size_t cap);

/* Checks the common create_info fields (struct size, host, geometry, CPU
 * float32 only unless `allow_cuda`) and fills host and geometry. */
kvc_status kvcp_create_common(const kvc_create_info *info, int allow_cuda,
                              kvc_host *host, kvcp_geom *geom, char *msg, size_t cap);

/* Bytes an fp16 full cache holds per token per layer for the shard:
 * 2 (K and V) * n_kv * head_dim * 2 bytes. */
uint64_t kvcp_fp16_bytes_per_token_layer(const kvcp_geom *g);

/* Checks positions[n]: each in [0, max_positions), strictly increasing and
 * greater than `after` (-1 = nothing held). */
kvc_status kvcp_check_positions(const kvcp_geom *g, const int32_t *positions, uint32_t n,
                                int64_t after, char *msg, size_t cap);

/* Checks an append of n tokens to `layer`: layer range, token count, NULL
 * pointers, positions after `last_pos` (-1 = nothing held), NaN/Inf in
 * k_pre and v [n][n_kv][head_dim]. */
kvc_status kvcp_check_append(const kvcp_geom *g, uint32_t layer, uint32_t n,
                             const int32_t *positions, const void *k_pre, const void *v,
                             int64_t last_pos, char *msg, size_t cap);

/* ---- open sequences and batches ------------------------------------------ */

/* An instance's open sequences, so destroy can free those left open: an
 * intrusive list behind a mutex (seq_open/close are [any-thread] on one
 * instance). The link is a member of the plugin's struct kvc_seq. */
typedef struct kvcp_link {
    struct kvcp_link *prev, *next;
} kvcp_link;

typedef struct kvcp_seqlist {
    pthread_mutex_t lock;
    kvcp_link *head;
} kvcp_seqlist;

/* 0, or -1 when the mutex cannot be made. */
int kvcp_seqlist_init(kvcp_seqlist *l);
void kvcp_seqlist_destroy(kvcp_seqlist *l);
void kvcp_seqlist_add(kvcp_seqlist *l, kvcp_link *x);
void kvcp_seqlist_remove(kvcp_seqlist *l, kvcp_link *x);
/* Unlinks and returns the first entry, NULL when empty (destroy only). */
kvcp_link *kvcp_seqlist_pop(kvcp_seqlist *l);

/* Allocates a zeroed instance struct of `size` bytes (KVC_USAGE_INSTANCE)
 * whose kvcp_seqlist sits at byte `seqs_offset`, and initializes that list.
 * NOMEM or INTERNAL (mutex) with the reason; *out untouched on error. */
kvc_status kvcp_instance_alloc(const kvc_host *h, size_t size, size_t seqs_offset, void **out,
                               char *msg, size_t cap);

/* Pops every sequence left open on an instance being destroyed and frees
 * each with free_seq (its link is the first member of the plugin's struct
 * kvc_seq); logs a warning naming the plugin when there were any. Then
 * destroys the list. */
void kvcp_seqlist_drain(kvcp_seqlist *l, void (*free_seq)(kvcp_link *), const kvc_host *h,
                        const char *plugin_id);

/* What attend_batch needs to know of a plugin's sequences. */
typedef struct kvcp_batch_ops {
    const kvc_instance *(*inst)(const kvc_seq *s);
    char *(*msg)(kvc_seq *s); /* the sequence's KVCP_MSG_SIZE message buffer */
    kvc_status (*check)(kvc_seq *s, uint32_t layer, uint32_t n_q, const int32_t *positions,
                        const void *q_pre, const void *out);
} kvcp_batch_ops;

/* Checks every item of an attend_batch before anything is written: item
 * struct, sequence of this instance, no sequence twice, ops->check; the
 * failing item's sequence carries the message. *max_q = largest n_q. */
kvc_status kvcp_batch_check(const kvc_instance *in, uint32_t layer, uint32_t n_items,
                            const kvc_attend_item *const *items, const kvcp_batch_ops *ops,
                            uint32_t *max_q);

/* ---- options --------------------------------------------------------------- */

/* One parsed option value. */
typedef struct kvcp_optval {
    int set;         /* 1 when the host passed it, 0 when the default applies */
    double num;      /* INT, FLOAT, BOOL (0/1), ENUM (index into choices) */
    const char *str; /* the text (host's string or the default), valid during create */
} kvcp_optval;

/* Parses info's options against table[n] into vals[n]: defaults for unset
 * ones; unknown names, duplicates, wrong types, out-of-range values and
 * unknown enum words are INVALID with the option and the accepted values
 * named. An unset option with default "" has set = 0, str = "". */
kvc_status kvcp_parse_options(const kvc_option_desc *const *table, uint32_t n,
                              const kvc_create_info *info, kvcp_optval *vals,
                              char *msg, size_t cap);

/* ---- serialized blobs ------------------------------------------------------ */

/* Every blob: a 48-byte header then the payload.
 *   0  char[4]  magic "KVC1"
 *   4  u32      kind (KVCP_BLOB_*)
 *   8  u32      format version of the payload
 *  12  u32      CRC-32 of the payload
 *  16  u64      payload bytes
 *  24  char[16] plugin id, NUL-padded
 *  40  u32      reserved, zero
 *  44  u32      CRC-32 of bytes 0..43
 * All integers little-endian. */
#define KVCP_BLOB_HEADER 48u
#define KVCP_BLOB_ARTIFACT 1u
#define KVCP_BLOB_SEQUENCE 2u

/* Bounded little-endian writer. With buf == NULL it only counts, so one
 * function computes the size and writes the blob (size-then-copy). */
typedef struct kvcp_writer {
    uint8_t *buf;
    size_t cap, pos;
    int overflow;
} kvcp_writer;

void kvcp_w_init(kvcp_writer *w, void *buf, size_t cap);
void kvcp_w_u32(kvcp_writer *w, uint32_t v);
void kvcp_w_i32(kvcp_writer *w, int32_t v);
void kvcp_w_u64(kvcp_writer *w, uint64_t v);
void kvcp_w_f32(kvcp_writer *w, float v);
void kvcp_w_bytes(kvcp_writer *w, const void *p, size_t n);

/* Bounded reader: any read past the end sets err and returns zeros. */
typedef struct kvcp_reader {
    const uint8_t *p;
    size_t size, pos;
    int err;
} kvcp_reader;

void kvcp_r_init(kvcp_reader *r, const void *p, size_t size);
uint32_t kvcp_r_u32(kvcp_reader *r);
int32_t kvcp_r_i32(kvcp_reader *r);
uint64_t kvcp_r_u64(kvcp_reader *r);
float kvcp_r_f32(kvcp_reader *r);
/* Pointer to the next n bytes (advancing), or NULL with err set. */
const void *kvcp_r_view(kvcp_reader *r, size_t n);

/* Writes the header in front of a payload already written at
 * blob + KVCP_BLOB_HEADER (payload_size bytes). */
void kvcp_blob_seal(void *blob, uint32_t kind, uint32_t version, const char *plugin_id,
                    uint64_t payload_size);

/* Size-then-copy of a whole blob (export, save): payload(ctx, w) writes
 * the payload, called once to count (w->buf NULL) and once to write.
 * buf == NULL: *size = bytes needed. buf_size too small: *size = needed,
 * KVC_E_BUFFER. Messages start with `what` ("export", "save"). */
kvc_status kvcp_blob_write(void (*payload)(void *ctx, kvcp_writer *w), void *ctx, uint32_t kind,
                           uint32_t version, const char *plugin_id, void *buf, size_t buf_size,
                           size_t *size, const char *what, char *msg, size_t cap);

/* Words of one seq_describe line for KV head h ("tokens=37 policy=full"),
 * written into words[cap] (snprintf-style; truncation is harmless). */
typedef void (*kvcp_describe_line)(const void *ctx, uint32_t h, char *words, size_t cap);

/* Size-then-copy of a seq_describe text (KVC ABI 1.2): "head <h> <words>\n"
 * for h < n_heads, NUL-terminated. Protocol as kvcp_blob_write. */
kvc_status kvcp_describe(uint32_t n_heads, kvcp_describe_line line, const void *ctx, char *buf,
                         size_t buf_size, size_t *size, char *msg, size_t cap);

/* Fills a caller's stats struct of out_size (its struct_size) from a full
 * one, never past what the caller's struct holds; keeps its struct_size. */
void kvcp_stats_out(void *out, const void *full, size_t full_size);

/* instance_stats' common body: the size check and the fields; caps are
 * the instance's (ABI 1.3: the descriptor's less what the options give
 * up). */
kvc_status kvcp_instance_stats_out(kvc_instance_stats *out, uint64_t bytes_params,
                                   uint64_t bytes_fixed, double kv_ratio, uint64_t overhead,
                                   uint64_t caps);

/* Checks a materialize request: out (struct size, n_tokens) and layer
 * range; INVALID with the reason. */
kvc_status kvcp_check_materialize(const kvcp_geom *g, uint32_t layer, const kvc_materialized *out,
                                  char *msg, size_t cap);

/* Checks an attend request against the geometry: layer, query count,
 * NULL pointers, query positions, finiteness of q_pre. */
kvc_status kvcp_check_attend(const kvcp_geom *g, uint32_t layer, uint32_t n_q,
                             const int32_t *positions, const void *q_pre, const void *out,
                             char *msg, size_t cap);

/* Checks a blob of `size` bytes: header length, magic, header CRC, kind,
 * plugin id, format version <= max_version, payload length, payload CRC.
 * On success *payload reads the payload and *version is its format.
 * CORRUPT for damage, VERSION for a newer format, INVALID for a blob of
 * another kind or plugin; the message names the mismatch. */
kvc_status kvcp_blob_open(const void *blob, size_t size, uint32_t kind, uint32_t max_version,
                          const char *plugin_id, kvcp_reader *payload, uint32_t *version,
                          char *msg, size_t cap);

/* Decodes n little-endian int32 positions of an imported layer from raw
 * [n*4] into pos [n] and checks them (range, strictly increasing):
 * CORRUPT naming the layer when they fail. */
kvc_status kvcp_import_positions(const kvcp_geom *g, const uint8_t *raw, uint32_t n,
                                 uint32_t layer, int32_t *pos, char *msg, size_t cap);

/* Geometry record inside blobs, so a blob made for another model or shard
 * is refused by name. */
void kvcp_geom_write(kvcp_writer *w, const kvcp_geom *g);
kvc_status kvcp_geom_read_check(kvcp_reader *r, const kvcp_geom *g, char *msg, size_t cap);

#endif /* KVCP_H */
