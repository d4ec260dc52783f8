/*
 * fastgen.h -- internals of kvc-fastgen.so: FastGen's adaptive per-head
 * token eviction (Ge et al., "Model Tells You What to Discard", 2023).
 *
 * How a layer of a sequence lives:
 * - Every appended token first goes to the layer's PENDING queue (keys
 *   rotated, in the storage type). A token leaves the queue when a query at
 *   or after its position is attended: that is its STEP. Steps run in
 *   position order, interleaved with the queries, exactly as one-token
 *   decoding would run them, so a batch of n appends and n queries equals n
 *   single steps bit for bit (KVC-REQ-1), and a token evicted at step i is
 *   still seen by the batch's earlier queries.
 * - The first attend of a layer is the PROMPT: its tokens are admitted
 *   whole, its queries see all of them (causal), and the pooled attention
 *   of each KV head's query heads is PROFILED; then every head gets the
 *   cheapest policy recovering >= T of that attention (threshold mode) or
 *   the mix that recovers most inside kv_ratio (budget mode), and the
 *   prompt is compressed to it.
 * - Afterwards, a step admits the token to every head, runs the query (its
 *   probabilities add to each kept token's cumulative score), then evicts:
 *   tokens the head's policy does not protect (special, punctuation, local
 *   window) beyond the frequent budget, lowest cumulative score first; in
 *   budget mode a per-head cap is enforced after that.
 * - A query that does not step a token (its position was stepped before,
 *   or holds no token) only reads: it sees the heads as they are now,
 *   restricted to positions <= its own, and changes nothing.
 * - Each head's kept tokens live in a dense, ragged store of fixed-size
 *   blocks from the host allocator; eviction moves the head's last token
 *   into the hole and frees a block as soon as it empties, so memory is
 *   released as tokens go (no masks over a full-size buffer).
 * - Budget mode (kv_ratio): the layer may keep head_tokens_per_token x
 *   length head-tokens; the profiled choice shares that among the heads
 *   and each head's cap (floor(share x length) + 1) is enforced after
 *   every step by evicting the weakest claim: unprotected, then local,
 *   punctuation, special; lowest cumulative attention, then oldest.
 * - truncate(p) removes every token at >= p, pending or kept, and rewinds
 *   the length to the tokens appended before p (runs of positions). Not
 *   recovered: tokens evicted by the removed steps, and the removed
 *   queries' share of the cumulative scores. Truncating to before the
 *   first stepped token starts the layer over (its next attend is a
 *   prompt). Hence no KVC_CAP_TRUNCATE.
 */
#ifndef KVC_FASTGEN_H
#define KVC_FASTGEN_H

#include "kvcp.h"
#include "qstore.h"

#define FG_ID "fastgen"
#define FG_EXPORT_VERSION 2u
#define FG_MAX_CANDIDATES 8u   /* in the policies option */
#define FG_BUDGET_SCALES 3u    /* budget mode tries r_local, r_frequent x 1, 1/2, 1/4 */
#define FG_MAX_CAND_ALL (FG_MAX_CANDIDATES * FG_BUDGET_SCALES)

/* Policy components (bits of a policy). */
enum {
    FG_SPECIAL = 1u,  /* keep special/control tokens */
    FG_PUNCT = 2u,    /* keep punctuation tokens */
    FG_FREQUENT = 4u, /* keep the r_frequent x length highest cumulative-attention tokens */
    FG_LOCAL = 8u,    /* keep the last r_local x length positions */
    FG_FULL = 16u     /* keep everything */
};

enum { FG_F32 = 0, FG_F16 = 1 };

/* One KV head's kept tokens: blocks of block_tokens slots, dense (tokens
 * 0..n-1 fill the blocks in order; only the last block is partial). A
 * block holds, with B = block_tokens, each region 8-byte aligned:
 *   k     [B][krow] post-RoPE keys: d values of the storage type, or a
 *         quantized row's codes (k_bits/v_bits)
 *   ksz   [B][kszb] a quantized key row's fp16 scales and zero points
 *         (kszb = 0 unquantized)
 *   v     [B][vrow] values, likewise (Hadamard-rotated when quantized)
 *   vsz   [B][vszb]
 *   pos   [B] int32 positions
 *   score [B] float cumulative attention (pooled over the query heads)
 *   flags [B] uint8 KVC_TOKEN_*
 * A token's STORAGE ROW is its k then ksz bytes (keys) or v then vsz
 * bytes (values): what push takes, export writes and import reads. */
typedef struct fg_head {
    uint32_t n;          /* tokens kept */
    uint32_t n_blocks;   /* ceil(n / B) */
    uint32_t n_spare;    /* allocated empty blocks after the n_blocks in use */
    uint32_t cap_blocks; /* entries of `blocks` */
    uint32_t policy;     /* FG_* bits; FG_FULL before profiling */
    float recovered;     /* profiled recovery of the chosen policy (1 before) */
    float share;         /* budget mode: cap = floor(share x length) + 1; < 0: no cap */
    float scale;         /* multiplies r_local and r_frequent (budget mode variants; else 1) */
    void **blocks;       /* [cap_blocks] */
} fg_head;

/* Tokens appended but not yet stepped, one allocation per append call:
 * this header, then pos [n], flags [n], k [n][n_kv][d], v [n][n_kv][d]
 * (post-RoPE keys, storage type). */
typedef struct fg_pending {
    struct fg_pending *next;
    uint32_t n;     /* tokens in the chunk (after a truncate: still valid) */
    uint32_t used;  /* tokens already stepped */
    size_t bytes;   /* allocation size */
    int32_t *pos;
    uint8_t *flags;
    void *k, *v;
} fg_pending;

/* Runs of contiguous stepped positions, so that truncate knows how many
 * tokens were appended before a position (evicted ones included). */
typedef struct fg_run {
    int32_t pos0; /* first position */
    uint32_t n;   /* tokens */
} fg_run;

typedef struct fg_layer {
    fg_head *heads;          /* [n_kv], inside the sequence's fixed allocation */
    fg_pending *pend, *pend_tail;
    uint32_t n_pending;      /* tokens waiting (sum of n - used) */
    int profiled;            /* the prompt has been attended */
    uint64_t n_seen;         /* tokens stepped, evicted included: the length of r_l, r_f */
    int32_t last_pos;        /* last appended position, -1 when none */
    int32_t last_step_pos;   /* last stepped position, -1 when none */
    fg_run *runs;            /* [cap_runs] */
    uint32_t n_runs, cap_runs;
} fg_layer;

/* Bytes the sequence holds at the allocator, by kind. */
typedef struct fg_bytes {
    uint64_t blocks;   /* head store blocks */
    uint64_t tables;   /* block tables and run arrays */
    uint64_t pending;  /* pending chunks */
} fg_bytes;

struct kvc_seq {
    kvcp_link link;     /* in the instance's open sequences */
    kvc_instance *inst;
    fg_layer *layers;   /* [n_layers] */
    fg_head *heads;     /* [n_layers][n_kv] */
    fg_bytes bytes;
    char msg[KVCP_MSG_SIZE];
};

/* Options and derived sizes. */
typedef struct fg_config {
    double T;               /* recovery threshold (threshold mode) */
    double r_local, r_frequent;
    double kv_ratio;        /* budget mode when > 0 */
    uint32_t n_cand;        /* candidates: threshold mode in greedy order, the last FG_FULL;
                             * budget mode adds the scaled variants after them */
    uint32_t cand[FG_MAX_CAND_ALL];    /* FG_* bits */
    float cand_scale[FG_MAX_CAND_ALL]; /* r_local, r_frequent multiplier */
    int dtype;              /* FG_F32 / FG_F16; FG_F16 when quantized (pending tokens) */
    uint32_t block_tokens;
    /* Quantized kept tokens (k_bits/v_bits; 0 = storage type), recorded in
     * exports so a blob meets only an instance storing the same way. */
    uint32_t k_bits, v_bits, group, k_had, v_had;
} fg_config;

struct kvc_instance {
    kvc_host host;
    kvcp_geom g;
    fg_config cfg;
    size_t elem;            /* bytes per value of pending tokens (and of kept ones unquantized) */
    size_t krow, kszb, vrow, vszb; /* bytes per slot of the block regions above */
    size_t off_ksz, off_v, off_vsz, off_pos; /* region offsets in a block */
    int quant;              /* kept tokens quantized per token (k_bits/v_bits) */
    kvck_qfmt kf, vf;       /* their row formats */
    int k_had, v_had;       /* Hadamard rotation of keys (queries alike) / values (outputs back) */
    float k_signs[KVCK_MAX_HEAD_DIM], v_signs[KVCK_MAX_HEAD_DIM];
    size_t block_bytes;     /* one head block */
    size_t tok_bytes;       /* bytes one kept head-token costs in a block */
    double head_tokens_per_token; /* budget mode: head-tokens a layer may keep per token */
    double kv_ratio;        /* declared (KVC-REQ-9) */
    uint64_t seq_overhead;  /* declared per-sequence constant */
    kvcp_seqlist seqs;
    char msg[KVCP_MSG_SIZE];
};

/* ---- block access ------------------------------------------------------- */

static inline void *fg_blk_k(const kvc_instance *in, void *blk)
{
    (void)in;
    return blk;
}
static inline void *fg_blk_ksz(const kvc_instance *in, void *blk)
{
    return (char *)blk + in->off_ksz;
}
static inline void *fg_blk_v(const kvc_instance *in, void *blk)
{
    return (char *)blk + in->off_v;
}
static inline void *fg_blk_vsz(const kvc_instance *in, void *blk)
{
    return (char *)blk + in->off_vsz;
}
static inline int32_t *fg_blk_pos(const kvc_instance *in, void *blk)
{
    return (int32_t *)((char *)blk + in->off_pos);
}
static inline float *fg_blk_score(const kvc_instance *in, void *blk)
{
    return (float *)(fg_blk_pos(in, blk) + in->cfg.block_tokens);
}
static inline uint8_t *fg_blk_flags(const kvc_instance *in, void *blk)
{
    return (uint8_t *)(fg_blk_score(in, blk) + in->cfg.block_tokens);
}

/* Token i of head h: its block and slot. */
static inline void *fg_tok_block(const kvc_instance *in, const fg_head *h, uint32_t i)
{
    return h->blocks[i / in->cfg.block_tokens];
}

/* ---- fg_store.c: head stores, pending queue, runs --------------------------- */

/* Makes sure head h has blocks for `tokens` more tokens (allocated spares
 * at the end of its table), so pushes cannot fail. NOMEM: no spares added
 * beyond those already there. */
kvc_status fg_head_reserve(const kvc_instance *in, fg_head *h, fg_bytes *cnt, uint64_t tokens);
/* Gives head h, which has no table yet, one of exactly `cap` entries
 * (import: the exported sequence's, so its stats come back the same).
 * NOMEM changes nothing. */
kvc_status fg_head_table(const kvc_instance *in, fg_head *h, fg_bytes *cnt, uint32_t cap);
/* Frees h's spare blocks (after a call that reserved, or removed tokens). */
void fg_head_trim(const kvc_instance *in, fg_head *h, fg_bytes *cnt);
/* Appends one token (its key and value storage rows, see the block
 * layout) to a head with room reserved. */
void fg_head_push(const kvc_instance *in, fg_head *h, const void *k, const void *v, int32_t pos,
                  uint8_t flags, float score);
/* Removes token i: the last token moves into its slot; an emptied last
 * block becomes a spare (fg_head_trim frees it). */
void fg_head_remove(const kvc_instance *in, fg_head *h, uint32_t i);
/* Frees every block and the table of h (policy fields kept). */
void fg_head_release(const kvc_instance *in, fg_head *h, fg_bytes *cnt);
/* dst = copy of src (without spares). NOMEM: dst released again. */
kvc_status fg_head_copy(const kvc_instance *in, const fg_head *src, fg_head *dst, fg_bytes *cnt);
/* Position of token i of h. */
int32_t fg_head_pos(const kvc_instance *in, const fg_head *h, uint32_t i);

/* Queues n appended tokens (k_rot, v [n][n_kv][d] float, already rotated)
 * on layer L, converting to the storage type. NOMEM changes nothing. */
kvc_status fg_pending_push(const kvc_instance *in, fg_layer *L, fg_bytes *cnt, uint32_t n,
                           const int32_t *pos, const uint8_t *flags, const float *k_rot,
                           const float *v);
/* Frees the front chunk when it is fully stepped. */
void fg_pending_pop_used(const kvc_instance *in, fg_layer *L, fg_bytes *cnt);
/* Drops pending tokens with position >= p. */
void fg_pending_truncate(const kvc_instance *in, fg_layer *L, fg_bytes *cnt, int32_t p);
void fg_pending_release(const kvc_instance *in, fg_layer *L, fg_bytes *cnt);
/* Bytes of the pending chunks' still-waiting payload (K/V) and the rest. */
void fg_pending_split(const kvc_instance *in, const fg_layer *L, uint64_t *payload,
                      uint64_t *other);

/* Room for `extra` more runs. NOMEM changes nothing. */
kvc_status fg_runs_reserve(const kvc_instance *in, fg_layer *L, fg_bytes *cnt, uint32_t extra);
/* Gives layer L, which has no runs table yet, one of exactly `cap` runs
 * (import, as fg_head_table). NOMEM changes nothing. */
kvc_status fg_runs_table(const kvc_instance *in, fg_layer *L, fg_bytes *cnt, uint32_t cap);
/* 1 when stepping `pos` starts a new run. */
int fg_runs_breaks(const fg_layer *L, int32_t pos);
/* Records a stepped position (room reserved). */
void fg_runs_push(fg_layer *L, int32_t pos);
/* Keeps stepped positions < p; returns how many remain. */
uint64_t fg_runs_truncate(fg_layer *L, int32_t p);
void fg_runs_release(const kvc_instance *in, fg_layer *L, fg_bytes *cnt);

/* A pending token's rows of head h (d values of the pending type, already
 * rotated) as key and value storage rows: copied, or quantized. */
void fg_storage_rows(const kvc_instance *in, const void *k, const void *v, uint8_t *krow,
                     uint8_t *vrow);
/* Slot i of a block's keys or values back as d floats (dequantized), in
 * the stored basis (rotated when quantized with Hadamard). */
void fg_slot_keys(const kvc_instance *in, void *blk, uint32_t i, float *dst);
void fg_slot_values(const kvc_instance *in, void *blk, uint32_t i, float *dst);

/* Frees the stepped part of a layer (heads, runs) and unprofiles it;
 * pending tokens stay. */
void fg_layer_reset_steps(const kvc_instance *in, fg_layer *L, fg_bytes *cnt);
/* Frees everything a layer holds and empties it (heads unprofiled). */
void fg_layer_release(const kvc_instance *in, fg_layer *L, fg_bytes *cnt);

/* ---- fg_policy.c: policies, eviction, profiling, selection ------------------ */

/* "special+punct+frequent" etc. for bits; static storage. */
const char *fg_policy_name(uint32_t bits);
/* In budget mode, adds each candidate with a frequent or local part again
 * at r_local and r_frequent x 1/2 and x 1/4, so a head can keep a smaller
 * window and fewer heavy hitters instead of dropping a component. */
void fg_add_budget_variants(fg_config *cfg);
/* Parses the `policies` option: candidates separated by ',', components by
 * '+' (special, punct, frequent, local, full). FG_FULL is appended when
 * missing. */
kvc_status fg_parse_policies(const char *text, fg_config *cfg, char *msg, size_t cap);

/* Evicts from head h what its policy (and, in budget mode, its cap) does
 * not keep at length n_seen with the last stepped position last_pos.
 * `scratch` holds 2 x h->n entries of uint64. Never fails. */
void fg_evict(const kvc_instance *in, fg_head *h, uint64_t n_seen,
              int32_t last_pos, uint64_t *scratch);

/* The profiler of one layer's prompt: per KV head and candidate, the sum
 * over queries of the recovered attention. */
typedef struct fg_profile {
    uint32_t n_kv, n_cand;
    uint32_t n_rows;   /* queries profiled */
    double *recovered; /* [n_kv][n_cand] sums */
    uint64_t *cost;    /* [n_kv][n_cand] tokens kept at the end of the prompt */
    uint32_t *pick;    /* [n_kv] chosen candidate (in a uint64 slot each) */
    float *cum;        /* [n_kv][n_tok] cumulative pooled attention */
    float *work;       /* [n_tok] selection scratch */
    uint32_t n_tok;    /* prompt tokens (store order = position order) */
} fg_profile;

/* Floats/doubles of scratch fg_profile needs, in bytes. */
size_t fg_profile_bytes(const kvc_instance *in, uint32_t n_tok);
void fg_profile_init(const kvc_instance *in, fg_profile *p, uint32_t n_tok, void *mem);
/* Adds one query row of head h: a [n_tok] pooled attention over the prompt
 * tokens (pos [n_tok], flags [n_tok], position order), the query seeing
 * tokens 0..ns-1. */
void fg_profile_row(const kvc_instance *in, fg_profile *p, uint32_t h, const float *a,
                    const int32_t *pos, const uint8_t *flags, uint32_t ns);
/* Chooses each head's policy (threshold or budget mode) from p, for a
 * prompt of n_tok tokens, and sets heads[h].policy/recovered/share. */
void fg_choose(const kvc_instance *in, fg_profile *p, fg_head *heads, const int32_t *pos,
               const uint8_t *flags, uint32_t n_tok);

/* ---- fg_attend.c -------------------------------------------------------------- */

kvc_status fg_append(kvc_seq *s, uint32_t layer, uint32_t n, const int32_t *positions,
                     const void *k_pre, const void *v, const uint8_t *flags);
kvc_status fg_attend(kvc_seq *s, uint32_t layer, uint32_t n_q, const int32_t *positions,
                     const void *q_pre, void *out);
kvc_status fg_attend_batch(kvc_instance *inst, uint32_t layer, uint32_t n_items,
                           const kvc_attend_item *const *items);
kvc_status fg_materialize(kvc_seq *s, uint32_t layer, kvc_materialized *out);
kvc_status fg_truncate(kvc_seq *s, int32_t position);

/* ---- fg_io.c -------------------------------------------------------------------- */

kvc_status fg_fork(const kvc_seq *src, kvc_seq *dst);
kvc_status fg_export(kvc_seq *s, void *buf, size_t buf_size, size_t *size);
kvc_status fg_import(kvc_seq *s, const void *blob, size_t size);

/* fastgen.c */
size_t fg_seq_fixed_bytes(const kvc_instance *in);
/* An empty sequence not in the instance's list (fork and import build
 * into one, then swap contents); NULL on NOMEM. */
kvc_seq *fg_seq_alloc(kvc_instance *in);
void fg_seq_free(kvc_seq *s);
/* Exchanges the contents (layers, heads, byte counts) of a and b. */
void fg_seq_swap(kvc_seq *a, kvc_seq *b);
/* Frees all layers of s (empty afterwards). */
void fg_seq_clear(kvc_seq *s);

#endif /* KVC_FASTGEN_H */
