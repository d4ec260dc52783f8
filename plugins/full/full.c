/*
 * kvc-full.so: the exact KV cache every compressor is measured against.
 * This file: the descriptor, options, instance and sequence lifecycle,
 * stats. Storage is in full_store.c, attention in full_attend.c,
 * export/import in full_io.c.
 */
#include <stdio.h>
#include <string.h>

#include "full.h"

/* ---- options ------------------------------------------------------------- */

enum { OPT_DTYPE, OPT_KV_RATIO, OPT_BLOCK_TOKENS, OPT_QS, N_OPTS = OPT_QS + KVCP_QS_N_OPTS };

static const kvc_option_desc opt_dtype = {
    sizeof(kvc_option_desc), KVC_OPT_ENUM, "dtype", "fp32", "fp32|fp16", 0, 0,
    "Storage type of the cached keys and values: fp32 is exact, fp16 halves the memory."};
static const kvc_option_desc opt_kv_ratio = {
    sizeof(kvc_option_desc), KVC_OPT_FLOAT, "kv_ratio", "", NULL, 0.01, 64.0,
    "Memory budget as a fraction of an fp16 full cache: picks fp32 or fp16 when it holds them, "
    "below fp16 (k_bits, v_bits and dtype unset) the most accurate key/value widths that fit; "
    "refused when below what the storage needs."};
static const kvc_option_desc opt_block_tokens = {
    sizeof(kvc_option_desc), KVC_OPT_INT, "block_tokens", "64", NULL, 1, 65536,
    "Tokens per storage block: memory grows one block per layer at a time."};
static const kvc_option_desc *const full_options[N_OPTS] = {
    &opt_dtype, &opt_kv_ratio, &opt_block_tokens, KVCP_QS_OPTION_LIST};

/* ---- budget --------------------------------------------------------------- */

/* Worst-case resident bytes per token per layer as a fraction of fp16 full:
 * payload, a position when positions have gaps, and the block table's
 * share (two entries per block after doubling). */
static double declared_ratio(const kvcp_geom *g, size_t elem, uint32_t block_tokens)
{
    double payload = 2.0 * g->n_kv * g->head_dim * (double)elem;
    double meta = sizeof(int32_t) + 2.0 * sizeof(kvcp_block) / block_tokens;
    return (payload + meta) / (double)kvcp_fp16_bytes_per_token_layer(g);
}

size_t full_seq_fixed_bytes(const kvc_instance *inst)
{
    return sizeof(struct kvc_seq) + (size_t)inst->g.n_layers * sizeof(kvcp_pages);
}

/* ---- kv_ratio below fp16: bits ---------------------------------------------- */

/* Key/value widths by accuracy, most accurate first, as measured on
 * SmolLM2 with the store's defaults (keys per channel before RoPE, values
 * per token after a Hadamard rotation): values' bits cost more than keys'
 * there, so the order lowers keys first. */
static const uint8_t FULL_PAIRS[][2] = {{8, 8}, {8, 6}, {6, 6}, {6, 5}, {5, 5}, {8, 4},
                                        {6, 4}, {5, 4}, {4, 4}, {4, 3}, {3, 3}, {3, 2},
                                        {2, 2}, {2, 1}, {1, 1}};
#define N_PAIRS (sizeof FULL_PAIRS / sizeof FULL_PAIRS[0])

/* kv_ratio without k_bits/v_bits and below what fp16 needs: the first
 * pair of FULL_PAIRS whose declared ratio (with the other options given)
 * fits, written into vals as if set. INVALID when none fits. */
static kvc_status pick_bits(const kvc_host *host, const kvcp_geom *g, kvcp_optval *vals,
                            uint32_t block, double want, char *msg, size_t cap)
{
    const size_t bytes = 2 * (size_t)g->n_kv * sizeof(kvck_qfmt);
    kvck_qfmt *fk = kvcp_alloc(host, bytes, KVC_USAGE_SCRATCH);
    if (!fk)
        return kvcp_fail(msg, cap, KVC_E_NOMEM, "out of memory choosing widths for kv_ratio");
    kvck_qfmt *fv = fk + g->n_kv;
    kvc_status st = KVC_E_INVALID;
    double smallest = 0;
    for (size_t i = 0; i < N_PAIRS && st; i++) {
        kvcp_optval t[KVCP_QS_N_OPTS];
        memcpy(t, vals, sizeof t);
        t[KVCP_QS_OPT_K_BITS] = (kvcp_optval){1, FULL_PAIRS[i][0], ""};
        t[KVCP_QS_OPT_V_BITS] = (kvcp_optval){1, FULL_PAIRS[i][1], ""};
        kvcp_qs_opts o;
        int on = 0;
        if (kvcp_qs_opts_parse(t, g, block, &o, &fk[0], &fv[0], &on, msg, cap) || !on)
            continue;
        for (uint32_t h = 1; h < g->n_kv; h++) {
            fk[h] = fk[0];
            fv[h] = fv[0];
        }
        smallest = kvcp_qs_ratio_of(g, kvcp_qs_block_bytes(fk, fv, g->n_kv, o.k_mode, block,
                                                            o.k_outliers, o.v_outliers),
                                    block);
        if (smallest <= want) {
            vals[KVCP_QS_OPT_K_BITS] = t[KVCP_QS_OPT_K_BITS];
            vals[KVCP_QS_OPT_V_BITS] = t[KVCP_QS_OPT_V_BITS];
            st = KVC_OK;
        }
    }
    kvcp_free(host, fk, bytes);
    if (st)
        return kvcp_fail(msg, cap, KVC_E_INVALID,
                         "kv_ratio %g is below what full can store (1-bit keys and values need "
                         "%.4f of fp16, scales, positions and block tables counted)",
                         want, smallest);
    return KVC_OK;
}

/* ---- instance ------------------------------------------------------------- */

static void full_destroy(kvc_instance *in);
static const kvc_plugin full_plugin;

static kvc_status full_create(const kvc_create_info *info, kvc_instance **out, char *msg,
                              size_t msg_size)
{
    kvc_host host;
    kvcp_geom g;
    if (!out)
        return kvcp_fail(msg, msg_size, KVC_E_INVALID, "out pointer is NULL");
    kvc_status st = kvcp_create_common(info, 0, &host, &g, msg, msg_size);
    if (st)
        return st;
    if (info->artifact || info->artifact_size)
        return kvcp_fail(msg, msg_size, KVC_E_INVALID,
                         "full needs no artifact, but one was given");
    kvcp_optval v[N_OPTS];
    st = kvcp_parse_options(full_options, N_OPTS, info, v, msg, msg_size);
    if (st)
        return st;

    int dtype = (int)v[OPT_DTYPE].num;
    uint32_t block_tokens = (uint32_t)v[OPT_BLOCK_TOKENS].num;
    kvcp_qs_opts qo;
    kvck_qfmt kf, vf;
    int quant = 0;
    double r32 = declared_ratio(&g, 4, block_tokens), r16 = declared_ratio(&g, 2, block_tokens);
    /* kv_ratio below fp16 with no widths given: widths that fit. */
    if (v[OPT_KV_RATIO].set && v[OPT_KV_RATIO].num < r16 && !v[OPT_DTYPE].set &&
        !v[OPT_QS + KVCP_QS_OPT_K_BITS].set && !v[OPT_QS + KVCP_QS_OPT_V_BITS].set &&
        (st = pick_bits(&host, &g, v + OPT_QS, block_tokens, v[OPT_KV_RATIO].num, msg, msg_size)))
        return st;
    st = kvcp_qs_opts_parse(v + OPT_QS, &g, block_tokens, &qo, &kf, &vf, &quant, msg, msg_size);
    if (st)
        return st;
    if (v[OPT_KV_RATIO].set && !quant) {
        double want = v[OPT_KV_RATIO].num;
        if (!v[OPT_DTYPE].set)
            dtype = want >= r32 ? FULL_F32 : FULL_F16;
        double need = dtype == FULL_F32 ? r32 : r16;
        if (want < need)
            return kvcp_fail(msg, msg_size, KVC_E_INVALID,
                             "kv_ratio %g is below what full's %s storage needs (%.4f, "
                             "positions and block tables counted); set k_bits and v_bits to "
                             "quantize",
                             want, dtype == FULL_F32 ? "fp32" : "fp16", need);
    }

    kvc_instance *in = NULL;
    st = kvcp_instance_alloc(&host, sizeof *in, offsetof(kvc_instance, seqs), (void **)&in, msg,
                             msg_size);
    if (st)
        return st;
    in->host = host;
    in->g = g;
    in->dtype = dtype;
    in->block_tokens = block_tokens;
    in->elem = dtype == FULL_F32 ? 4 : 2;
    in->block_bytes = 2ull * g.n_kv * block_tokens * g.head_dim * in->elem;
    in->kv_ratio = dtype == FULL_F32 ? r32 : r16;
    /* Per layer: one partly filled block, its position array, and the
     * block table's initial entries plus rounding; plus the fixed structs. */
    in->seq_overhead = full_seq_fixed_bytes(in) +
                       (uint64_t)g.n_layers *
                           (in->block_bytes + (uint64_t)block_tokens * sizeof(int32_t) +
                            (KVCP_TABLE_INIT + 2) * sizeof(kvcp_block));
    if (quant) {
        st = kvcp_qs_init(&in->qs, &in->host, &in->g, &qo, msg, msg_size);
        if (st) {
            full_destroy(in);
            return st;
        }
        in->quant = 1;
        in->kv_ratio = kvcp_qs_token_ratio(&in->qs);
        in->seq_overhead = sizeof(struct kvc_seq) + kvcp_qss_fixed_bytes(&in->qs) +
                           kvcp_qs_seq_overhead(&in->qs);
        if (v[OPT_KV_RATIO].set && v[OPT_KV_RATIO].num < in->kv_ratio) {
            kvcp_fail(msg, msg_size, KVC_E_INVALID,
                      "kv_ratio %g is below what k_bits %g / v_bits %g need (%.4f of fp16, "
                      "scales, outlier slots, positions and block tables counted)",
                      v[OPT_KV_RATIO].num, v[OPT_QS + KVCP_QS_OPT_K_BITS].num,
                      v[OPT_QS + KVCP_QS_OPT_V_BITS].num, in->kv_ratio);
            full_destroy(in);
            return KVC_E_INVALID;
        }
    }
    *out = in;
    return KVC_OK;
}

static void seq_free(kvc_seq *s)
{
    kvc_instance *in = s->inst;
    full_layers_release(in, s->layers, &s->bytes);
    kvcp_free(&in->host, s->layers, (size_t)in->g.n_layers * sizeof(kvcp_pages));
    kvcp_qss_free(&in->qs, &s->q);
    kvcp_free(&in->host, s, sizeof *s);
}

static void seq_free_link(kvcp_link *x)
{
    seq_free((kvc_seq *)x); /* link is the first member */
}

static void full_destroy(kvc_instance *in)
{
    if (!in)
        return;
    kvcp_seqlist_drain(&in->seqs, seq_free_link, &in->host, FULL_ID);
    kvcp_qs_free(&in->qs);
    kvc_host host = in->host;
    kvcp_free(&host, in, sizeof *in);
}

static const char *full_instance_message(const kvc_instance *in)
{
    return in ? in->msg : "instance is NULL";
}

static kvc_status full_prepare_layer(kvc_instance *in, uint32_t layer,
                                     const kvc_layer_weights *w, const kvc_calib_chunk *c)
{
    (void)layer, (void)w, (void)c;
    if (!in)
        return KVC_E_INVALID;
    return kvcp_fail(in->msg, sizeof in->msg, KVC_E_UNSUPPORTED,
                     "full needs no preparation (no weights, no calibration)");
}

static kvc_status full_finalize_layer(kvc_instance *in, uint32_t layer)
{
    if (!in)
        return KVC_E_INVALID;
    if (layer >= in->g.n_layers)
        return kvcp_fail(in->msg, sizeof in->msg, KVC_E_INVALID, "layer %u >= n_layers %u",
                         layer, in->g.n_layers);
    return KVC_OK; /* ready since create */
}

static kvc_status full_finalize(kvc_instance *in)
{
    return in ? KVC_OK : KVC_E_INVALID;
}

static kvc_status full_save(kvc_instance *in, void *buf, size_t buf_size, size_t *size)
{
    (void)buf, (void)buf_size, (void)size;
    if (!in)
        return KVC_E_INVALID;
    return kvcp_fail(in->msg, sizeof in->msg, KVC_E_UNSUPPORTED,
                     "full has no parameters, so no artifact to save");
}

static kvc_status full_instance_stats(const kvc_instance *in, kvc_instance_stats *out)
{
    if (!in)
        return KVC_E_INVALID;
    /* Lossless only in fp32; truncate exact unless quantized tokens can be
     * rounded again (per-channel key blocks, a window). */
    uint64_t caps = full_plugin.caps;
    if (in->quant || in->dtype != FULL_F32)
        caps &= ~KVC_CAP_EXACT;
    if (in->quant && (in->qs.o.k_mode == KVCK_QS_CHANNEL || in->qs.o.k_window || in->qs.o.v_window))
        caps &= ~KVC_CAP_TRUNCATE;
    return kvcp_instance_stats_out(out, in->quant ? in->qs.param_bytes : 0, sizeof *in,
                                   in->kv_ratio, in->seq_overhead, caps);
}

/* ---- sequences ------------------------------------------------------------ */

static kvc_status full_seq_open(kvc_instance *in, kvc_seq **out)
{
    if (!in || !out)
        return KVC_E_INVALID;
    kvc_seq *s = kvcp_alloc(&in->host, sizeof *s, KVC_USAGE_CACHE);
    if (!s)
        return KVC_E_NOMEM;
    s->inst = in;
    if (in->quant) {
        if (kvcp_qss_init(&in->qs, &s->q)) {
            kvcp_free(&in->host, s, sizeof *s);
            return KVC_E_NOMEM;
        }
    } else {
        s->layers = kvcp_alloc(&in->host, (size_t)in->g.n_layers * sizeof(kvcp_pages),
                               KVC_USAGE_CACHE);
        if (!s->layers) {
            kvcp_free(&in->host, s, sizeof *s);
            return KVC_E_NOMEM;
        }
        for (uint32_t l = 0; l < in->g.n_layers; l++)
            s->layers[l].last_pos = -1;
    }
    s->inst = in;
    kvcp_seqlist_add(&in->seqs, &s->link);
    *out = s;
    return KVC_OK;
}

static void full_seq_close(kvc_seq *s)
{
    if (!s)
        return;
    kvc_instance *in = s->inst;
    kvcp_seqlist_remove(&in->seqs, &s->link);
    seq_free(s);
}

static const char *full_seq_message(const kvc_seq *s)
{
    return s ? s->msg : "sequence is NULL";
}

static kvc_status full_seq_stats(const kvc_seq *s, kvc_seq_stats *out)
{
    if (!s || !out)
        return KVC_E_INVALID;
    if (out->struct_size < KVCP_V10_SIZE(kvc_seq_stats, bytes_fp16_full))
        return KVC_E_VERSION;
    const kvc_instance *in = s->inst;
    kvc_seq_stats st = {0};
    if (in->quant) {
        kvcp_qss_stats(&in->qs, &s->q, sizeof(struct kvc_seq), &st);
        kvcp_stats_out(out, &st, sizeof st);
        return KVC_OK;
    }
    uint64_t tokens = 0;
    for (uint32_t l = 0; l < in->g.n_layers; l++)
        tokens += s->layers[l].n;
    st.tokens_appended = tokens;
    st.head_tokens_resident = tokens * in->g.n_kv;
    st.bytes_payload = tokens * 2ull * in->g.n_kv * in->g.head_dim * in->elem;
    st.bytes_reserved = s->bytes.blocks - st.bytes_payload;
    st.bytes_metadata = s->bytes.pos + s->bytes.table;
    st.bytes_fixed = full_seq_fixed_bytes(in);
    st.bytes_resident = st.bytes_payload + st.bytes_reserved + st.bytes_metadata + st.bytes_fixed;
    st.bytes_fp16_full = tokens * kvcp_fp16_bytes_per_token_layer(&in->g);
    kvcp_stats_out(out, &st, sizeof st);
    return KVC_OK;
}

/* One seq_describe line: every head of a layer holds every token. */
typedef struct full_describe_ctx {
    const kvc_instance *in;
    uint32_t tokens;
} full_describe_ctx;

static void full_describe_line(const void *ctx, uint32_t h, char *words, size_t cap)
{
    const full_describe_ctx *c = ctx;
    const kvc_instance *in = c->in;
    if (in->quant)
        snprintf(words, cap, "tokens=%u k_bits=%u v_bits=%u k_scale=%s k_rope=%s", c->tokens,
                 in->qs.lf[0].k[h].seg[0].bits, in->qs.lf[0].v[h].seg[0].bits,
                 in->qs.o.k_mode == KVCK_QS_CHANNEL ? "channel" : "token",
                 in->qs.o.k_pre ? "pre" : "post");
    else
        snprintf(words, cap, "tokens=%u dtype=%s", c->tokens,
                 in->dtype == FULL_F16 ? "fp16" : "fp32");
}

static kvc_status full_seq_describe(const kvc_seq *s, uint32_t layer, char *buf,
                                    size_t buf_size, size_t *size)
{
    if (!s)
        return KVC_E_INVALID;
    char *msg = ((kvc_seq *)s)->msg; /* the message is the sequence's, as for any call */
    const kvc_instance *in = s->inst;
    if (layer >= in->g.n_layers)
        return kvcp_fail(msg, KVCP_MSG_SIZE, KVC_E_INVALID,
                         "describe: layer %u out of range (%u layers)", layer, in->g.n_layers);
    full_describe_ctx c = {in, in->quant ? s->q.layers[layer].n : s->layers[layer].n};
    return kvcp_describe(in->g.n_kv, full_describe_line, &c, buf, buf_size, size, msg,
                         KVCP_MSG_SIZE);
}

/* ---- descriptor ------------------------------------------------------------ */

static const kvc_plugin full_plugin = {
    .struct_size = sizeof(kvc_plugin),
    .abi_version = KVC_ABI_VERSION,
    .id = FULL_ID,
    .name = "Full (exact) KV cache",
    .version = "1.0.0",
    .description =
        "The uncompressed control: keys (after RoPE) and values stored exactly in fp32, or in "
        "fp16, in paged blocks; exact causal GQA attention with a streaming softmax. Every "
        "compressor is measured against it.",
    .license = "MIT",
    .caps = KVC_CAP_CPU | KVC_CAP_QUANTIZES | KVC_CAP_MATERIALIZE | KVC_CAP_EXPORT |
            KVC_CAP_TRUNCATE | KVC_CAP_FORK | KVC_CAP_EXACT,
    .n_options = N_OPTS,
    .options = full_options,
    .create = full_create,
    .destroy = full_destroy,
    .instance_message = full_instance_message,
    .prepare_layer = full_prepare_layer,
    .finalize_layer = full_finalize_layer,
    .finalize = full_finalize,
    .save = full_save,
    .instance_stats = full_instance_stats,
    .seq_open = full_seq_open,
    .seq_close = full_seq_close,
    .seq_message = full_seq_message,
    .append = full_append,
    .attend = full_attend,
    .attend_batch = full_attend_batch,
    .materialize = full_materialize,
    .truncate = full_truncate,
    .fork = full_fork,
    .seq_export = full_export,
    .seq_import = full_import,
    .seq_stats = full_seq_stats,
    .seq_describe = full_seq_describe,
};

KVC_EXPORT const kvc_plugin *kvc_plugin_entry(uint32_t host_abi_version)
{
    if (KVC_VERSION_MAJOR(host_abi_version) != KVC_ABI_VERSION_MAJOR)
        return NULL;
    return &full_plugin;
}
