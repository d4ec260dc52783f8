/*
 * pages.h -- the paged token store kvc's caching plugins share (full, the
 * low-rank core): one layer of one sequence is a table of fixed-size
 * blocks of `block_tokens` tokens, so memory grows one block at a time (no
 * reallocation, no 2x slack), truncate frees whole blocks, and attention
 * walks blocks. What a block holds is the plugin's business: it sees a
 * `block_bytes` buffer and writes token slots through a callback.
 *
 * Positions cost nothing while contiguous: a block keeps its first
 * position and allocates a per-token array only when a gap appears.
 * Every byte goes through the host allocator (KVC_USAGE_CACHE) and is
 * counted in a kvcp_page_bytes, which is what seq_stats reports.
 * Internal (prefix kvcp_), linked statically and hidden.
 */
#ifndef KVCP_PAGES_H
#define KVCP_PAGES_H

#include "kvcp.h"

/* Initial block-table entries of a layer (then doubled as needed). */
#define KVCP_TABLE_INIT 8u

typedef struct kvcp_block {
    int32_t pos0; /* position of the block's first token */
    int32_t *pos; /* [block_tokens] positions, or NULL while contiguous from pos0 */
    void *data;   /* [block_bytes], the plugin's layout */
} kvcp_block;

typedef struct kvcp_pages {
    uint32_t n;          /* tokens held */
    uint32_t n_blocks;   /* ceil(n / block_tokens) */
    uint32_t cap_blocks; /* entries allocated in `blocks` */
    int32_t last_pos;    /* position of the last token, -1 when empty */
    kvcp_block *blocks;  /* [cap_blocks] */
} kvcp_pages;

/* Bytes held at the allocator, by kind. */
typedef struct kvcp_page_bytes {
    uint64_t blocks; /* block data */
    uint64_t pos;    /* per-token position arrays */
    uint64_t table;  /* block tables */
} kvcp_page_bytes;

/* How one layer's blocks are sized. */
typedef struct kvcp_page_fmt {
    const kvc_host *host;
    uint32_t block_tokens;
    size_t block_bytes;
} kvcp_page_fmt;

/* Writes token t of an append into slot `slot` of a block's data. Called
 * only once every allocation of the append has succeeded. */
typedef void (*kvcp_page_write)(void *ctx, void *block_data, uint32_t slot, uint32_t t);

/* An empty layer (last_pos = -1). */
void kvcp_pages_init(kvcp_pages *L);

/* Position of token i of a block. */
static inline int32_t kvcp_block_pos(const kvcp_block *b, uint32_t i)
{
    return b->pos ? b->pos[i] : b->pos0 + (int32_t)i;
}

/* Tokens in block b of L. */
static inline uint32_t kvcp_block_count(const kvcp_pages *L, uint32_t b, uint32_t block_tokens)
{
    return b + 1 == L->n_blocks ? L->n - b * block_tokens : block_tokens;
}

/* Appends n tokens at positions [n] (already checked: strictly increasing
 * after L->last_pos), writing token t through write(ctx, data, slot, t).
 * All-or-nothing: NOMEM leaves L and *cnt as they were. */
kvc_status kvcp_pages_append(const kvcp_page_fmt *f, kvcp_pages *L, kvcp_page_bytes *cnt,
                             uint32_t n, const int32_t *positions, kvcp_page_write write,
                             void *ctx);

/* Checks an append to layer `layer` of `layers` [n_layers]: layer range,
 * token count, NULL pointers, positions after the layer's last, NaN/Inf
 * in k_pre and v [n][n_kv][head_dim]. */
kvc_status kvcp_pages_check_append(const kvcp_geom *g, const kvcp_pages *layers, uint32_t layer,
                                   uint32_t n, const int32_t *positions, const void *k_pre,
                                   const void *v, char *msg, size_t cap);

/* Keeps the tokens with position < `position`, freeing whole blocks. */
void kvcp_pages_truncate(const kvcp_page_fmt *f, kvcp_pages *L, kvcp_page_bytes *cnt,
                         int32_t position);

/* Frees everything of L and empties it. */
void kvcp_pages_release(const kvcp_page_fmt *f, kvcp_pages *L, kvcp_page_bytes *cnt);

/* dst (empty) = an independent copy of src. On NOMEM dst is released
 * again (empty) and its bytes are back out of *cnt. */
kvc_status kvcp_pages_copy(const kvcp_page_fmt *f, const kvcp_pages *src, kvcp_pages *dst,
                           kvcp_page_bytes *cnt);

#endif /* KVCP_PAGES_H */
