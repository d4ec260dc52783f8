/*
 * kvc.h -- the kvc plugin ABI, version 1.3.
 *
 * A KV-cache compressor is a shared object exporting one symbol,
 * kvc_plugin_entry(). A host (an inference server) dlopen()s it, calls the
 * entry with its ABI version and gets back a constant descriptor: names,
 * capabilities, an option table and a table of functions. Through those
 * functions the host creates an instance per model configuration, opens a
 * sequence per request, and hands each layer's keys and values to the plugin
 * (append); the plugin stores them in its own format and computes attention
 * over them (attend) without the host ever seeing that format.
 *
 * This header is the whole contract. It includes nothing beyond <stddef.h>
 * and <stdint.h> and compiles as C99, C11 and C++. The numbered rules
 * (KVC-REQ-n) are collected in abi/README.md with which of them kvc-conform
 * checks.
 *
 * ---------------------------------------------------------------------------
 * Conventions that hold for every function below
 * ---------------------------------------------------------------------------
 * Versions   KVC_ABI_VERSION is (major << 16) | minor. Same major means
 *            compatible. A minor bump only appends: new fields at the end of
 *            structs, new function pointers at the end of kvc_plugin, new
 *            enum values. Nothing is ever removed, reordered or renumbered.
 * Sizes      Every struct that crosses the boundary starts with
 *            `uint32_t struct_size`, set by whoever fills it to
 *            sizeof(the struct as that side knows it). A reader never looks
 *            at a field beyond struct_size (KVC_HAS_FIELD). Structs travel by
 *            pointer. Enums travel in int32_t fields.
 * Status     Every operation returns kvc_status; KVC_OK is 0. On error the
 *            out-parameters are left untouched (the one documented exception
 *            is the required size written on KVC_E_BUFFER), the object stays
 *            usable and destroyable, and kvc_plugin.instance_message /
 *            seq_message say in words what was wrong.
 * Release    destroy/close functions accept NULL and return nothing.
 * Plugins    never print, never abort(), never exit(); they log through
 *            kvc_host.log and allocate every byte they keep through
 *            kvc_host.alloc (KVC-REQ-6).
 * Tensors    dense, row-major, token-major: [n_tokens][n_heads][head_dim],
 *            float32 on the CPU (kvc_create_info.dtype). Heads are the
 *            instance's shard of heads (kvc_geometry.kv_head_first/count),
 *            query heads being the kv heads' groups of
 *            n_heads / n_kv_heads. Q and K are passed BEFORE RoPE, with
 *            their positions: the plugin applies the model's RoPE.
 * Positions  int32, 0 <= pos < max_positions, strictly increasing within a
 *            layer of a sequence across all appends (gaps allowed).
 *
 * Thread tags on each function:
 *   [any-thread]      callable from any thread at any time, concurrently.
 *   [instance-thread] the instance is used by one thread at a time for this
 *                     call and no sequence of it is in use meanwhile
 *                     (creation, preparation, destruction).
 *   [sequence-owner]  the sequence(s) named are used by one thread at a time;
 *                     distinct sequences of one instance may be used from
 *                     distinct threads at once.
 *
 * The step rule (KVC-REQ-1): appending n tokens in one call and then
 * attending n queries in one call gives the same result as n single-token
 * (append 1, attend 1) steps. A query at position p sees exactly the tokens
 * the cache would hold right after the last token with position <= p was
 * appended, restricted to keys with position <= p (and inside the sliding
 * window). A token evicted at step i is invisible to later queries and
 * visible to earlier ones. A plugin with KVC_CAP_PROMPT_PHASE treats the
 * first attend of each layer of a sequence as the prompt (it profiles the
 * prompt's attention there and fixes its policy); the rule then holds for
 * every call after that first attend.
 */
#ifndef KVC_H
#define KVC_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------ */
/* Versions and visibility                                                  */
/* ------------------------------------------------------------------------ */

#define KVC_ABI_VERSION_MAJOR 1
#define KVC_ABI_VERSION_MINOR 3
#define KVC_MAKE_VERSION(major, minor) \
    ((uint32_t)(((uint32_t)(major) << 16) | ((uint32_t)(minor) & 0xffffu)))
#define KVC_VERSION_MAJOR(v) ((uint32_t)(v) >> 16)
#define KVC_VERSION_MINOR(v) ((uint32_t)(v) & 0xffffu)
#define KVC_ABI_VERSION KVC_MAKE_VERSION(KVC_ABI_VERSION_MAJOR, KVC_ABI_VERSION_MINOR)

/* True when the struct at `ptr` (of type `type`, with a struct_size first
 * field) was filled by a side that knows `field`. */
#define KVC_HAS_FIELD(ptr, type, field) \
    ((size_t)(ptr)->struct_size >= offsetof(type, field) + sizeof(((type *)0)->field))

#if defined(_WIN32)
#define KVC_EXPORT __declspec(dllexport)
#elif defined(__GNUC__)
#define KVC_EXPORT __attribute__((visibility("default")))
#else
#define KVC_EXPORT
#endif

/* ------------------------------------------------------------------------ */
/* Enumerations (values frozen; stored in int32_t / uint64_t fields)        */
/* ------------------------------------------------------------------------ */

typedef int32_t kvc_status;
enum {
    KVC_OK = 0,
    KVC_E_INVALID = 1,     /* bad argument: NULL, range, shape, option, NaN */
    KVC_E_UNSUPPORTED = 2, /* this plugin never does this (capability absent) */
    KVC_E_NOMEM = 3,       /* an allocation failed; retry later may succeed */
    KVC_E_CORRUPT = 4,     /* an artifact or export blob fails its checks */
    KVC_E_STATE = 5,       /* call out of order (e.g. attend before prepare) */
    KVC_E_VERSION = 6,     /* struct too small, foreign or newer format */
    KVC_E_BUFFER = 7,      /* caller's buffer too small; required size given */
    KVC_E_INTERNAL = 8     /* a bug or a failed library call in the plugin */
};

/* Capability bits of kvc_plugin.caps. */
#define KVC_CAP_CPU               (UINT64_C(1) << 0)  /* runs on host memory */
#define KVC_CAP_CUDA              (UINT64_C(1) << 1)  /* runs on CUDA devices */
#define KVC_CAP_NEEDS_WEIGHTS     (UINT64_C(1) << 2)  /* prepare_layer wants weights */
#define KVC_CAP_NEEDS_CALIBRATION (UINT64_C(1) << 3)  /* prepare_layer wants activations */
#define KVC_CAP_COMPRESS_FEATURES (UINT64_C(1) << 4)  /* shrinks head_dim (low rank) */
#define KVC_CAP_COMPRESS_TOKENS   (UINT64_C(1) << 5)  /* drops tokens (eviction) */
#define KVC_CAP_QUANTIZES         (UINT64_C(1) << 6)  /* stores fewer bits per value */
#define KVC_CAP_MATERIALIZE       (UINT64_C(1) << 7)  /* materialize() works */
#define KVC_CAP_EXPORT            (UINT64_C(1) << 8)  /* seq_export/seq_import work */
#define KVC_CAP_ARTIFACT          (UINT64_C(1) << 9)  /* save() and create-from-artifact */
#define KVC_CAP_TRUNCATE          (UINT64_C(1) << 10) /* truncate() is exact */
#define KVC_CAP_FORK              (UINT64_C(1) << 11) /* fork() works */
#define KVC_CAP_EXACT             (UINT64_C(1) << 12) /* lossless at default options */
#define KVC_CAP_TOKEN_FLAGS       (UINT64_C(1) << 13) /* reads kvc token flags */
/* 1.2: the first attend of each layer of a sequence is its prompt (profiled
 * to choose a policy; token-eviction methods such as FastGen). */
#define KVC_CAP_PROMPT_PHASE      (UINT64_C(1) << 14)

/* Option value types (kvc_option_desc.type). */
enum {
    KVC_OPT_BOOL = 0,   /* "true"/"false"/"1"/"0" */
    KVC_OPT_INT = 1,    /* decimal integer in [min, max] */
    KVC_OPT_FLOAT = 2,  /* decimal float in [min, max] */
    KVC_OPT_ENUM = 3,   /* one of the '|'-separated words in `choices` */
    KVC_OPT_STRING = 4  /* free text */
};

/* RoPE pairing (kvc_geometry.rope_style). */
enum {
    KVC_ROPE_NONE = 0,     /* no rotary embedding */
    KVC_ROPE_ADJACENT = 1, /* rotate (x[2i], x[2i+1]): llama.cpp "llama" after its Q/K permutation */
    KVC_ROPE_HALVES = 2    /* rotate (x[i], x[i + rope_dims/2]): NeoX style */
};

/* Element types of tensors passed in and out (kvc_create_info.dtype). */
enum {
    KVC_DTYPE_F32 = 0, /* the only type on the CPU */
    KVC_DTYPE_F16 = 1, /* CUDA only */
    KVC_DTYPE_BF16 = 2 /* CUDA only */
};

/* Where memory lives (kvc_host.alloc mem_kind, kvc_create_info.device). */
enum {
    KVC_MEM_HOST = 0,
    KVC_MEM_CUDA = 1
};

/* What an allocation is for (kvc_host.alloc usage): a hint for the host's
 * accounting and pooling, not a promise the host can rely on. */
enum {
    KVC_USAGE_INSTANCE = 0, /* instance structures and parameters */
    KVC_USAGE_CACHE = 1,    /* a sequence's payload and metadata */
    KVC_USAGE_SCRATCH = 2   /* freed before the call that made it returns */
};

/* Log levels (kvc_host.log). */
enum {
    KVC_LOG_ERROR = 0,
    KVC_LOG_WARN = 1,
    KVC_LOG_INFO = 2,
    KVC_LOG_DEBUG = 3
};

/* Per-token flags passed with appended tokens (one uint8_t per token). */
#define KVC_TOKEN_SPECIAL 0x01u /* BOS/EOS/control token of the tokenizer */
#define KVC_TOKEN_PUNCT   0x02u /* only punctuation and whitespace */

/* ------------------------------------------------------------------------ */
/* Opaque handles                                                           */
/* ------------------------------------------------------------------------ */

typedef struct kvc_instance kvc_instance; /* one model + configuration */
typedef struct kvc_seq kvc_seq;           /* one request's cache */

/* ------------------------------------------------------------------------ */
/* Host services                                                            */
/* ------------------------------------------------------------------------ */

/* Callbacks the host hands to create(). The plugin copies the struct; the
 * user_data it points to must stay valid until destroy() returns. All three
 * callbacks must be safe to call from any thread at once. */
typedef struct kvc_host {
    uint32_t struct_size; /* sizeof(kvc_host) */
    uint32_t reserved0;   /* zero */
    void *user_data;      /* passed back to every callback, never read */
    /* Returns `size` bytes aligned to `alignment` (a power of two >= 8) of
     * kind KVC_MEM_*, or NULL (the plugin then returns KVC_E_NOMEM). */
    void *(*alloc)(void *user_data, size_t size, size_t alignment,
                   int32_t mem_kind, int32_t usage);
    /* Frees what alloc returned, with the same size and kind. NULL is a no-op. */
    void (*free)(void *user_data, void *ptr, size_t size, int32_t mem_kind);
    /* One message, no trailing newline; may be NULL (no logging). `msg` is
     * valid only during the call. */
    void (*log)(void *user_data, int32_t level, const char *msg);
    /* cudaStream_t to enqueue device work on; NULL = the default stream. */
    void *cuda_stream;
} kvc_host;

/* ------------------------------------------------------------------------ */
/* Model geometry                                                           */
/* ------------------------------------------------------------------------ */

/* One model's attention shape. Copied at create; pointers are read only
 * during create. All layers share one shape in v1.0. */
typedef struct kvc_geometry {
    uint32_t struct_size;   /* sizeof(kvc_geometry) */
    uint32_t n_layers;      /* > 0 */
    uint32_t n_heads;       /* query heads of the whole model, multiple of n_kv_heads */
    uint32_t n_kv_heads;    /* key/value heads of the whole model (GQA when < n_heads) */
    uint32_t head_dim;      /* > 0, even when RoPE is used */
    uint32_t hidden_size;   /* model width: columns of W_q/W_k/W_v */
    uint32_t max_positions; /* positions must be < this */
    int32_t rope_style;     /* KVC_ROPE_* */
    uint32_t rope_dims;     /* rotated dims from the start of a head; 0 = head_dim; even */
    float rope_theta;       /* base, e.g. 10000; inv_freq[i] = theta^(-2i/rope_dims) */
    float rope_mscale;      /* multiplies cos and sin (YaRN magnitude); 0 = 1 */
    float attn_scale;       /* score scale; 0 = 1/sqrt(head_dim) */
    /* [rope_dims/2] inverse frequencies replacing theta's (linear, NTK,
     * YaRN, Llama-3 scaling are all expressible); NULL = from rope_theta. */
    const float *rope_inv_freq;
    uint32_t sliding_window; /* a key at position k is seen from p iff p - k < window; 0 = none */
    uint32_t kv_head_first;  /* head shard for tensor parallelism: first KV head */
    uint32_t kv_head_count;  /* KV heads this instance serves; 0 = all */
    uint32_t reserved0;      /* zero */
} kvc_geometry;

/* ------------------------------------------------------------------------ */
/* Options                                                                  */
/* ------------------------------------------------------------------------ */

/* One entry of a plugin's option table. Every plugin understands the
 * option "kv_ratio" (KVC-REQ-9): resident bytes per token as a fraction of
 * an fp16 full cache of the same geometry. */
typedef struct kvc_option_desc {
    uint32_t struct_size;      /* sizeof(kvc_option_desc) */
    int32_t type;              /* KVC_OPT_* */
    const char *name;          /* [a-z0-9_]+, unique in the table */
    const char *default_value; /* as text; "" = unset */
    const char *choices;       /* KVC_OPT_ENUM: "a|b|c"; else NULL */
    double min;                /* KVC_OPT_INT/FLOAT: inclusive range */
    double max;
    const char *help;          /* one sentence */
} kvc_option_desc;

/* ------------------------------------------------------------------------ */
/* Creation                                                                 */
/* ------------------------------------------------------------------------ */

/* Everything create() needs. Read only during create; nothing is retained
 * except copies. */
typedef struct kvc_create_info {
    uint32_t struct_size;         /* sizeof(kvc_create_info) */
    uint32_t n_options;           /* entries in option_names/option_values */
    const kvc_host *host;         /* required */
    const kvc_geometry *geometry; /* required */
    const char *const *option_names;  /* [n_options], names from the option table */
    const char *const *option_values; /* [n_options], values as text */
    const void *artifact;         /* save() output to load, or NULL */
    size_t artifact_size;         /* bytes at artifact */
    int32_t device;               /* KVC_MEM_HOST or KVC_MEM_CUDA: where tensors live */
    int32_t device_ordinal;       /* CUDA device index; 0 on the host */
    int32_t dtype;                /* KVC_DTYPE_* of tensors passed in and out */
    uint32_t reserved0;           /* zero */
} kvc_create_info;

/* ------------------------------------------------------------------------ */
/* Preparation inputs                                                       */
/* ------------------------------------------------------------------------ */

/* One layer's attention weights, dequantized to float32, in the layout a
 * GGUF holds them: row-major [out][in], y = W x. Q and K rows are in the
 * order the model's rope_style expects (for llama GGUFs: already permuted
 * by the converter to adjacent pairs). Whole model, not the shard: plugins
 * pick their heads. Valid only during the call. */
typedef struct kvc_layer_weights {
    uint32_t struct_size; /* sizeof(kvc_layer_weights) */
    uint32_t reserved0;   /* zero */
    const float *w_q; /* [n_heads*head_dim][hidden_size] */
    const float *w_k; /* [n_kv_heads*head_dim][hidden_size] */
    const float *w_v; /* [n_kv_heads*head_dim][hidden_size] */
    const float *w_o; /* [hidden_size][n_heads*head_dim] */
    const float *b_q; /* [n_heads*head_dim] or NULL */
    const float *b_k; /* [n_kv_heads*head_dim] or NULL */
    const float *b_v; /* [n_kv_heads*head_dim] or NULL */
} kvc_layer_weights;

/* A chunk of calibration activations for one layer: the rows that feed the
 * K/V projections (the attention input after its norm), with their
 * positions. Valid only during the call. A 1.0 host fills up to
 * `positions` (struct_size 24); read x_ref only when
 * KVC_HAS_FIELD(chunk, kvc_calib_chunk, x_ref) and it is non-NULL. */
typedef struct kvc_calib_chunk {
    uint32_t struct_size;     /* sizeof(kvc_calib_chunk) as the host knows it */
    uint32_t n_rows;          /* tokens in this chunk, > 0 */
    const float *x;           /* [n_rows][hidden_size] */
    const int32_t *positions; /* [n_rows] */
    /* --- ABI 1.1 --- */
    const float *x_ref; /* [n_rows][hidden_size]: the same tokens' rows in the uncompressed
                         * model when the host calibrates through layers already finalized
                         * (x then comes from the compressed model); NULL otherwise. ABI 1.1. */
} kvc_calib_chunk;

/* ------------------------------------------------------------------------ */
/* Outputs                                                                  */
/* ------------------------------------------------------------------------ */

/* What one sequence holds. resident = payload + metadata + reserved + fixed
 * equals the bytes the sequence holds at the host allocator (KVC-REQ-7). */
typedef struct kvc_seq_stats {
    uint32_t struct_size;          /* set by the caller */
    uint32_t reserved0;
    uint64_t tokens_appended;      /* sum over layers of tokens appended and not truncated */
    uint64_t head_tokens_resident; /* sum over layers and KV heads of tokens held */
    uint64_t bytes_payload;        /* key/value data (or latents) of held tokens */
    uint64_t bytes_metadata;       /* per-token side data: positions, scales, indices, policy state */
    uint64_t bytes_reserved;       /* allocated for tokens not yet appended (block tails) */
    uint64_t bytes_fixed;          /* per-sequence structures, independent of tokens */
    uint64_t bytes_resident;       /* payload + metadata + reserved + fixed */
    uint64_t bytes_fp16_full;      /* what an fp16 full cache would hold for tokens_appended */
    /* --- ABI 1.2 --- */
    /* The part of bytes_resident held for tokens appended but not yet
     * attended: a token-evicting plugin keeps a batch whole until the
     * queries of that batch have run (the step rule needs them), and a
     * prompt until its first attend. Also counted in the fields above.
     * 0 after an attend whose last query is at or after every appended
     * position; always 0 for plugins that compress on append. */
    uint64_t bytes_pending;
} kvc_seq_stats;

/* What an instance holds and promises. */
typedef struct kvc_instance_stats {
    uint32_t struct_size; /* set by the caller */
    uint32_t reserved0;
    uint64_t bytes_params;   /* method parameters (factors, rotations, tables) */
    uint64_t bytes_fixed;    /* instance structures */
    /* The budget promise (KVC-REQ-9), for every sequence after every append:
     * bytes_resident - bytes_pending <= kv_ratio * bytes_fp16_full +
     * seq_overhead_bytes; bytes_pending (1.2) is 0 after an attend whose
     * last query is at or after every appended position, so the plain
     * bound holds there. */
    double kv_ratio;
    uint64_t seq_overhead_bytes;
    /* --- ABI 1.3 --- */
    /* The capabilities that hold for this instance with its options: the
     * descriptor's caps less those the options give up (KVC-REQ-22), e.g.
     * KVC_CAP_EXACT and KVC_CAP_TRUNCATE when the setting quantizes. Read
     * only from a plugin whose abi_version is 1.3 or newer (an older one
     * leaves the field as the caller set it); never holds a bit the
     * descriptor lacks. */
    uint64_t caps;
} kvc_instance_stats;

/* Materialized keys and values of one layer, head-major because a plugin
 * may hold a different set of tokens per head (token eviction). The caller
 * fills the pointers and capacity; the plugin fills the arrays. */
typedef struct kvc_materialized {
    uint32_t struct_size; /* sizeof(kvc_materialized) */
    uint32_t capacity;    /* tokens per head the arrays below can take */
    uint32_t *n_tokens;   /* [kv_head_count] out: tokens held per head */
    int32_t *positions;   /* [kv_head_count][capacity], or NULL: counts only */
    float *k;             /* [kv_head_count][capacity][head_dim], post-RoPE; NULL with positions */
    float *v;             /* [kv_head_count][capacity][head_dim]; NULL with positions */
} kvc_materialized;

/* One sequence's queries in a batched attend. */
typedef struct kvc_attend_item {
    uint32_t struct_size;     /* sizeof(kvc_attend_item) */
    uint32_t n_q;             /* queries, > 0 */
    kvc_seq *seq;             /* distinct across the batch */
    const int32_t *positions; /* [n_q] */
    const void *q_pre;        /* [n_q][n_heads_shard][head_dim], before RoPE */
    void *out;                /* [n_q][n_heads_shard][head_dim] */
} kvc_attend_item;

/* ------------------------------------------------------------------------ */
/* The plugin descriptor                                                    */
/* ------------------------------------------------------------------------ */

/* Constant for the life of the loaded object. Every function pointer of the
 * version in abi_version is non-NULL; an operation a plugin does not offer
 * returns KVC_E_UNSUPPORTED (and its capability bit is clear). */
typedef struct kvc_plugin {
    uint32_t struct_size; /* sizeof(kvc_plugin) as the plugin knows it */
    uint32_t abi_version; /* KVC_ABI_VERSION the plugin was built against */
    const char *id;          /* short name, [a-z0-9_-]+: "full", "lorc" */
    const char *name;        /* human name */
    const char *version;     /* plugin's own version, "1.2.0" */
    const char *description; /* one paragraph */
    const char *license;     /* SPDX identifier */
    uint64_t caps;           /* KVC_CAP_* */
    uint32_t n_options;
    uint32_t reserved0;
    const kvc_option_desc *const *options; /* [n_options] */

    /* --- instance ------------------------------------------------------ */

    /* [instance-thread] Creates an instance for info->geometry with the
     * given options, loading info->artifact when given. Nothing in `info`
     * is retained. On failure *out is untouched and, when msg is not NULL,
     * a NUL-terminated reason (at most msg_size bytes) is written to msg.
     * Errors: INVALID (geometry, options, device), VERSION (struct sizes,
     * artifact format), CORRUPT (artifact checks), NOMEM, UNSUPPORTED
     * (device or dtype). */
    kvc_status (*create)(const kvc_create_info *info, kvc_instance **out,
                         char *msg, size_t msg_size);

    /* [instance-thread] Frees the instance and every sequence still open
     * on it (whose handles then dangle). NULL is a no-op. */
    void (*destroy)(kvc_instance *inst);

    /* [instance-thread] The reason for the last failed instance-level call
     * ("" if none). Valid until the next call on the instance. */
    const char *(*instance_message)(const kvc_instance *inst);

    /* [instance-thread] Feeds layer `layer` weights and/or one chunk of
     * calibration activations; either may be NULL if the plugin does not
     * need it. May be called many times per layer (chunks stream). Pointers
     * are read only during the call. Errors: INVALID, STATE (already
     * finalized or created from an artifact), NOMEM, UNSUPPORTED.
     *
     * A host feeds in one of two orders:
     * - Exact (1.0): weights of every layer, then the chunks of every layer
     *   from passes of the uncompressed model, then finalize(). x_ref is
     *   NULL (or absent: struct_size below it).
     * - Sequential (1.1): weights of every layer; then for l = 0 .. L-1:
     *   every chunk of layer l, finalize_layer(l), and the host advances
     *   its calibration tokens through layer l with sequences of this
     *   instance opened before finalize() (append/attend of layer l only,
     *   now prepared; one sequence per window, all closed again before
     *   layer l+1's chunks), so layer l+1's chunks see the error of layers
     *   0..l. In each chunk x holds the rows of that
     *   compressed pass and x_ref the same tokens' rows in the uncompressed
     *   model (equal to x at layer 0); finalize() comes last. A plugin that
     *   refits on compressed inputs (SVD-LLM's sequential update) reads
     *   x_ref only when KVC_HAS_FIELD says the host filled it and it is
     *   non-NULL, and otherwise treats x as both. */
    kvc_status (*prepare_layer)(kvc_instance *inst, uint32_t layer,
                                const kvc_layer_weights *weights,
                                const kvc_calib_chunk *calib);

    /* [instance-thread] Computes layer `layer`'s parameters from what was
     * fed; afterwards the layer accepts append/attend (so a host can run
     * calibration through already-compressed layers: the sequential order
     * above), while later layers may still be fed. Errors: STATE (nothing
     * fed, already finalized), NOMEM, INTERNAL. */
    kvc_status (*finalize_layer)(kvc_instance *inst, uint32_t layer);

    /* [instance-thread] Finalizes every layer not yet finalized and makes
     * the instance ready. A plugin needing no preparation is ready at
     * create and returns KVC_OK here. */
    kvc_status (*finalize)(kvc_instance *inst);

    /* [instance-thread] Size-then-copy of the instance's artifact
     * (versioned, checksummed, naming geometry and options). buf == NULL:
     * *size = bytes needed, KVC_OK. size too small: *size = bytes needed,
     * KVC_E_BUFFER. Else writes and sets *size. Errors: STATE (not ready),
     * UNSUPPORTED. */
    kvc_status (*save)(kvc_instance *inst, void *buf, size_t buf_size,
                       size_t *size);

    /* [any-thread] Fills *out up to out->struct_size. */
    kvc_status (*instance_stats)(const kvc_instance *inst,
                                 kvc_instance_stats *out);

    /* --- sequences ------------------------------------------------------- */

    /* [any-thread] Opens an empty sequence. Errors: NOMEM (the only one
     * with valid arguments; no message is kept), INVALID. */
    kvc_status (*seq_open)(kvc_instance *inst, kvc_seq **out);

    /* [sequence-owner] Frees the sequence. NULL is a no-op. */
    void (*seq_close)(kvc_seq *seq);

    /* [sequence-owner] The reason for the sequence's last failed call ("" if
     * none). Valid until the next call on the sequence. */
    const char *(*seq_message)(const kvc_seq *seq);

    /* [sequence-owner] Appends n tokens to layer `layer`: pre-RoPE keys
     * k_pre and values v, [n][kv_head_count][head_dim], at `positions`
     * [n] (strictly increasing, after every position the layer holds), with
     * per-token `flags` [n] (KVC_TOKEN_*, may be NULL = all zero). Inputs
     * are read during the call only. Errors: INVALID (layer, positions,
     * NaN/Inf, n == 0), STATE (layer not prepared), NOMEM (nothing was
     * appended). */
    kvc_status (*append)(kvc_seq *seq, uint32_t layer, uint32_t n,
                         const int32_t *positions, const void *k_pre,
                         const void *v, const uint8_t *flags);

    /* [sequence-owner] Causal attention of n_q queries q_pre
     * [n_q][n_heads_shard][head_dim] (before RoPE) at `positions` [n_q]
     * over what the sequence holds for `layer`, by the step rule; writes
     * softmax(scale * q k^T) v to out [n_q][n_heads_shard][head_dim]. A
     * query that sees no key gets zeros. Errors: INVALID, STATE, NOMEM. */
    kvc_status (*attend)(kvc_seq *seq, uint32_t layer, uint32_t n_q,
                         const int32_t *positions, const void *q_pre,
                         void *out);

    /* [sequence-owner of every item's seq] attend() for several sequences
     * of this instance on one layer, as one launch where the device allows.
     * Equal to calling attend() on each item in order. All items are
     * checked before any output is written; on error the failing item's
     * sequence message says why. */
    kvc_status (*attend_batch)(kvc_instance *inst, uint32_t layer,
                               uint32_t n_items,
                               const kvc_attend_item *const *items);

    /* [sequence-owner] Expands what layer `layer` holds into out (post-RoPE
     * keys, values, positions; head-major). With out->positions == NULL only
     * out->n_tokens is filled, so the caller can size its arrays. Errors:
     * BUFFER (capacity below a head's count; nothing written), INVALID,
     * UNSUPPORTED. */
    kvc_status (*materialize)(kvc_seq *seq, uint32_t layer,
                              kvc_materialized *out);

    /* [sequence-owner] Rolls every layer back to the tokens with position <
     * `position` (speculative decoding, beam search). Exact when
     * KVC_CAP_TRUNCATE; otherwise the plugin's documentation says what is
     * recovered. Never fails on a valid sequence. */
    kvc_status (*truncate)(kvc_seq *seq, int32_t position);

    /* [sequence-owner of both] Replaces dst's contents by an independent
     * copy of src (same instance). On error dst is unchanged. Errors:
     * INVALID, NOMEM, UNSUPPORTED. */
    kvc_status (*fork)(const kvc_seq *src, kvc_seq *dst);

    /* [sequence-owner] Size-then-copy of a self-describing blob (magic,
     * format version, checksum, geometry) holding the sequence. Protocol as
     * save(). Errors: BUFFER, UNSUPPORTED. */
    kvc_status (*seq_export)(kvc_seq *seq, void *buf, size_t buf_size,
                             size_t *size);

    /* [sequence-owner] Replaces seq's contents by those in blob (made by
     * seq_export of an instance with the same geometry and options). `blob`
     * is read during the call only. On error seq is unchanged. Errors:
     * CORRUPT, VERSION, INVALID (other geometry/options), NOMEM. */
    kvc_status (*seq_import)(kvc_seq *seq, const void *blob, size_t size);

    /* [sequence-owner] Fills *out up to out->struct_size. */
    kvc_status (*seq_stats)(const kvc_seq *seq, kvc_seq_stats *out);

    /* --- ABI 1.2 (read only when the descriptor's struct_size covers it) */

    /* [sequence-owner] Size-then-copy of a NUL-terminated text saying what
     * the plugin holds and decided for layer `layer` of the sequence, for
     * hosts to log and tally: one line per KV head of the shard,
     * "head <h>" then space-separated key=value words, e.g. FastGen's
     * "head 0 policy=special+punct tokens=37 recovered=0.962". Keys every
     * plugin writes: tokens (held for that head). buf == NULL: *size =
     * bytes needed (with the NUL), KVC_OK. buf_size too small: *size =
     * needed, KVC_E_BUFFER. Errors: INVALID (NULL size, layer range). */
    kvc_status (*seq_describe)(const kvc_seq *seq, uint32_t layer, char *buf,
                               size_t buf_size, size_t *size);
} kvc_plugin;

/* The one exported symbol (KVC-REQ-2). [any-thread] Returns the plugin's
 * constant descriptor when it can serve a host of `host_abi_version` (same
 * major), else NULL. Has no side effects; may be called many times. */
typedef const kvc_plugin *(*kvc_plugin_entry_fn)(uint32_t host_abi_version);
#define KVC_PLUGIN_ENTRY_SYMBOL "kvc_plugin_entry"

KVC_EXPORT const kvc_plugin *kvc_plugin_entry(uint32_t host_abi_version);

#ifdef __cplusplus
}
#endif

#endif /* KVC_H */
