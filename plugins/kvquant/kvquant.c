/*
 * kvc-kvquant.so: the calibrated quantized KV cache (kvquant.h). This
 * file: the descriptor, options, instance and sequence lifecycle, stats,
 * describe; the sequence operations themselves are the shared store's
 * (plugins/common/qs_seq.c). Preparation in kq_calib.c, the formats in
 * kq_build.c, artifact and blobs in kq_io.c.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "kvquant.h"

/* ---- options ------------------------------------------------------------- */

enum { OPT_K_BITS, OPT_V_BITS, OPT_ALLOC, OPT_LEVELS, OPT_RAW_KEYS, OPT_RAW_VALUES, OPT_KV_RATIO,
       OPT_BLOCK, OPT_GROUP, OPT_SINK, OPT_WINDOW, OPT_OUTLIERS, OPT_NOTE, N_OPTS };

#define OPT(name_, type_, def_, choices_, min_, max_, help_)                                    \
    {sizeof(kvc_option_desc), type_, name_, def_, choices_, min_, max_, help_}

static const kvc_option_desc opt_k_bits = OPT(
    "k_bits", KVC_OPT_FLOAT, "", NULL, 1, 8,
    "Average bits per key value (fractions allowed with alloc=sensitivity); unset: 4, or "
    "chosen with v_bits by kv_ratio.");
static const kvc_option_desc opt_v_bits = OPT(
    "v_bits", KVC_OPT_INT, "", NULL, 1, 8,
    "Bits per value (1, 2, 3, 4, 5, 6 or 8); unset: 4, or chosen with k_bits by kv_ratio.");
static const kvc_option_desc opt_alloc = OPT(
    "alloc", KVC_OPT_ENUM, "sensitivity", "uniform|sensitivity", 0, 0,
    "Key channel widths: all k_bits, or more bits where calibration shows large query energy "
    "times key range (averaging k_bits).");
static const kvc_option_desc opt_levels = OPT(
    "levels", KVC_OPT_ENUM, "fit", "uniform|fit", 0, 0,
    "Quantization levels: a uniform grid, or fitted per layer, K/V and width by weighted "
    "k-means on calibration values.");
static const kvc_option_desc opt_raw_keys = OPT(
    "raw_keys", KVC_OPT_ENUM, "q8", "fp16|q8|q6|q5|q4", 0, 0,
    "The key block being filled (quantized per channel once complete): fp16, or 8/6/5/4-bit "
    "codes on calibrated per-channel scales.");
static const kvc_option_desc opt_raw_values = OPT(
    "raw_values", KVC_OPT_ENUM, "q8", "fp16|q8", 0, 0,
    "Values of the newest `window` tokens (quantized to v_bits once older): fp16, or 8-bit "
    "codes with a scale and zero per row.");
static const kvc_option_desc opt_kv_ratio = OPT(
    "kv_ratio", KVC_OPT_FLOAT, "", NULL, 0.01, 64.0,
    "Memory budget as a fraction of an fp16 full cache: with k_bits and v_bits unset, picks the "
    "most accurate pair that fits (by calibrated predicted error); else refused at create when "
    "below what they can need (calibrated key widths: their padding bounded above).");
static const kvc_option_desc opt_block = OPT(
    "block_tokens", KVC_OPT_INT, "64", NULL, 2, 256,
    "Tokens per block: the key scales' span and the unit memory grows by.");
static const kvc_option_desc opt_group = OPT(
    "group", KVC_OPT_INT, "64", NULL, 1, 512,
    "Channels per scaling group of a value row (at most head_dim).");
static const kvc_option_desc opt_sink = OPT(
    "sink", KVC_OPT_INT, "4", NULL, 0, 4096,
    "First tokens of a sequence kept in fp16 (attention sinks).");
static const kvc_option_desc opt_window = OPT(
    "window", KVC_OPT_INT, "64", NULL, 0, 65536,
    "Newest tokens whose values stay raw (in the raw_values form); keys are raw while their "
    "block fills.");
static const kvc_option_desc opt_outliers = OPT(
    "outliers", KVC_OPT_FLOAT, "0", NULL, 0, 0.25,
    "Fraction of key and value entries kept exactly in fp16 beside the codes.");
static const kvc_option_desc opt_note = OPT(
    "calib_note", KVC_OPT_STRING, "", NULL, 0, 0,
    "Free text kept in the artifact: which calibration texts and how many tokens (kvc prepare "
    "fills it).");
static const kvc_option_desc *const kq_options[N_OPTS] = {
    &opt_k_bits, &opt_v_bits,   &opt_alloc,  &opt_levels, &opt_raw_keys, &opt_raw_values,
    &opt_kv_ratio, &opt_block, &opt_group, &opt_sink,   &opt_window,   &opt_outliers,
    &opt_note};

static const kvc_plugin kq_plugin;

/* ---- instance ------------------------------------------------------------- */

static void kq_destroy(kvc_instance *in);

static void seq_free(kvc_seq *s)
{
    kvc_instance *in = s->inst;
    if (s->q.layers)
        kvcp_qss_free(&in->qs, &s->q);
    kvcp_free(&in->host, s, sizeof *s);
}

static void seq_free_link(kvcp_link *x)
{
    seq_free((kvc_seq *)x); /* link is the first member */
}

static kvc_status kq_create(const kvc_create_info *info, kvc_instance **out, char *msg,
                            size_t msg_size)
{
    kvc_host host;
    kvcp_geom g;
    if (!out)
        return kvcp_fail(msg, msg_size, KVC_E_INVALID, "out pointer is NULL");
    kvc_status st = kvcp_create_common(info, 0, &host, &g, msg, msg_size);
    if (st)
        return st;
    kvcp_optval v[N_OPTS];
    if ((st = kvcp_parse_options(kq_options, N_OPTS, info, v, msg, msg_size)))
        return st;
    kq_config c;
    memset(&c, 0, sizeof c);
    c.kv_ratio = v[OPT_KV_RATIO].set ? v[OPT_KV_RATIO].num : 0;
    const int pick = c.kv_ratio > 0 && !v[OPT_K_BITS].set && !v[OPT_V_BITS].set;
    c.k_bits = v[OPT_K_BITS].set ? v[OPT_K_BITS].num : pick ? 0 : 4;
    c.v_bits = v[OPT_V_BITS].set ? (uint32_t)v[OPT_V_BITS].num : pick ? 0 : 4;
    if (!pick && (c.v_bits == 7))
        return kvcp_fail(msg, msg_size, KVC_E_INVALID,
                         "v_bits 7 is not a stored width (1, 2, 3, 4, 5, 6 or 8)");
    c.alloc = (int)v[OPT_ALLOC].num;
    c.levels = (int)v[OPT_LEVELS].num;
    static const unsigned RAW_BITS[] = {0, 8, 6, 5, 4};
    c.raw8 = RAW_BITS[(int)v[OPT_RAW_KEYS].num];
    c.raw8v = v[OPT_RAW_VALUES].num == 1;
    c.block = (uint32_t)v[OPT_BLOCK].num;
    c.group = (uint32_t)v[OPT_GROUP].num;
    c.sink = (uint32_t)v[OPT_SINK].num;
    c.window = (uint32_t)v[OPT_WINDOW].num;
    c.outliers = v[OPT_OUTLIERS].num;
    snprintf(c.note, sizeof c.note, "%s", v[OPT_NOTE].str ? v[OPT_NOTE].str : "");

    if (c.alloc == KQ_ALLOC_UNIFORM && c.k_bits > 0 &&
        !(c.k_bits == 1 || c.k_bits == 2 || c.k_bits == 3 || c.k_bits == 4 || c.k_bits == 5 ||
          c.k_bits == 6 || c.k_bits == 8))
        return kvcp_fail(msg, msg_size, KVC_E_INVALID,
                         "alloc=uniform needs a stored width for k_bits (1, 2, 3, 4, 5, 6 or 8), "
                         "got %g; fractions need alloc=sensitivity",
                         c.k_bits);
    if (c.kv_ratio > 0) {
        double floor_ratio = 0;
        if ((st = kq_ratio_floor(&host, &g, &c, &floor_ratio)))
            return kvcp_fail(msg, msg_size, st, "k_bits %g / v_bits %u make no row format for "
                             "head_dim %u", c.k_bits, c.v_bits, g.head_dim);
        if (c.kv_ratio < floor_ratio)
            return kvcp_fail(msg, msg_size, KVC_E_INVALID,
                             "kv_ratio %g is below what kvquant can promise %s (%.4f of fp16: "
                             "codes, scales, positions and block tables counted%s)",
                             c.kv_ratio,
                             c.k_bits > 0 ? "with these k_bits / v_bits"
                                          : "at its smallest setting (1-bit keys, 2-bit values)",
                             floor_ratio,
                             c.k_bits > 0 && c.alloc == KQ_ALLOC_SENSITIVITY
                                 ? "; calibrated key widths: their padding bounded above"
                                 : "");
    }
    kvc_instance *in = NULL;
    if ((st = kvcp_instance_alloc(&host, sizeof *in, offsetof(kvc_instance, seqs), (void **)&in,
                                  msg, msg_size)))
        return st;
    in->host = host;
    in->g = g;
    in->cfg = c;
    if (kq_stats_alloc(in)) {
        kq_destroy(in);
        return kvcp_fail(msg, msg_size, KVC_E_NOMEM, "out of memory for kvquant's statistics");
    }
    if (info->artifact || info->artifact_size) {
        if (!info->artifact || !info->artifact_size)
            st = kvcp_fail(msg, msg_size, KVC_E_INVALID, "artifact pointer and size disagree");
        else if (!(st = kq_load(in, info->artifact, info->artifact_size, msg, msg_size)))
            st = kq_build(in, msg, msg_size);
        if (st) {
            kq_destroy(in);
            return st;
        }
    }
    *out = in;
    return KVC_OK;
}

static void kq_destroy(kvc_instance *in)
{
    if (!in)
        return;
    kvcp_seqlist_drain(&in->seqs, seq_free_link, &in->host, KQ_ID);
    kq_build_free(in);
    kq_stats_free(in);
    kvc_host host = in->host;
    kvcp_free(&host, in, sizeof *in);
}

static const char *kq_instance_message(const kvc_instance *in)
{
    return in ? in->msg : "instance is NULL";
}

static kvc_status kq_finalize(kvc_instance *in)
{
    if (!in)
        return KVC_E_INVALID;
    if (in->ready)
        return KVC_OK;
    for (uint32_t l = 0; l < in->g.n_layers; l++)
        if (!in->finalized[l]) {
            kvc_status st = kq_finalize_layer(in, l);
            if (st)
                return st;
        }
    kq_prep_free(in);
    return kq_build(in, in->msg, sizeof in->msg);
}

static kvc_status kq_save_op(kvc_instance *in, void *buf, size_t buf_size, size_t *size)
{
    if (!in)
        return KVC_E_INVALID;
    return kq_save(in, buf, buf_size, size);
}

static kvc_status kq_instance_stats(const kvc_instance *in, kvc_instance_stats *out)
{
    if (!in)
        return KVC_E_INVALID;
    /* Not lossless, and truncate is never exact (a key block cut short
     * was scaled with the removed tokens): neither cap is in the
     * descriptor, so the instance's are the descriptor's. */
    const uint64_t params = in->bytes_params + in->bytes_prep + (in->ready ? in->qs.param_bytes : 0);
    return kvcp_instance_stats_out(out, params, sizeof *in, in->ready ? in->kv_ratio : 1.0,
                                   in->seq_overhead, kq_plugin.caps);
}

/* ---- sequences ------------------------------------------------------------ */

static kvc_status kq_seq_open(kvc_instance *in, kvc_seq **out)
{
    if (!in || !out)
        return KVC_E_INVALID;
    kvc_seq *s = kvcp_alloc(&in->host, sizeof *s, KVC_USAGE_CACHE);
    if (!s)
        return KVC_E_NOMEM;
    s->inst = in;
    /* Before finalize the layers wait: the store is built then. */
    if (in->ready && kvcp_qss_init(&in->qs, &s->q)) {
        kvcp_free(&in->host, s, sizeof *s);
        return KVC_E_NOMEM;
    }
    kvcp_seqlist_add(&in->seqs, &s->link);
    *out = s;
    return KVC_OK;
}

/* The sequence's layers exist: STATE before the instance is prepared,
 * NOMEM when they cannot be made (a sequence opened before finalize). */
static kvc_status ready(kvc_seq *s, const char *what)
{
    const kvc_instance *in = s->inst;
    if (!in->ready)
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_STATE,
                         "%s: kvquant is not prepared (feed weights and calibration, then "
                         "finalize, or create from an artifact)",
                         what);
    if (!s->q.layers && kvcp_qss_init(&in->qs, &s->q))
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_NOMEM, "%s: out of memory", what);
    return KVC_OK;
}

static void kq_seq_close(kvc_seq *s)
{
    if (!s)
        return;
    kvcp_seqlist_remove(&s->inst->seqs, &s->link);
    seq_free(s);
}

static const char *kq_seq_message(const kvc_seq *s)
{
    return s ? s->msg : "sequence is NULL";
}

static kvc_status kq_append(kvc_seq *s, uint32_t layer, uint32_t n, const int32_t *positions,
                            const void *k_pre, const void *v, const uint8_t *flags)
{
    (void)flags;
    if (!s)
        return KVC_E_INVALID;
    kvc_status st = ready(s, "append");
    if (st)
        return st;
    return kvcp_qss_append(&s->inst->qs, &s->q, layer, n, positions, k_pre, v, s->msg);
}

static kvc_status kq_attend(kvc_seq *s, uint32_t layer, uint32_t n_q, const int32_t *positions,
                            const void *q_pre, void *out)
{
    if (!s)
        return KVC_E_INVALID;
    kvc_status st = ready(s, "attend");
    if (st)
        return st;
    return kvcp_qss_attend(&s->inst->qs, &s->q, layer, n_q, positions, q_pre, out, s->msg);
}

static const kvc_instance *seq_inst(const kvc_seq *s)
{
    return s->inst;
}

static char *seq_msg(kvc_seq *s)
{
    return s->msg;
}

static kvc_status check_attend(kvc_seq *s, uint32_t layer, uint32_t n_q,
                               const int32_t *positions, const void *q_pre, const void *out)
{
    return kvcp_check_attend(&s->inst->g, layer, n_q, positions, q_pre, out, s->msg,
                             sizeof s->msg);
}

static const kvcp_batch_ops batch_ops = {seq_inst, seq_msg, check_attend};

static kvc_status kq_attend_batch(kvc_instance *in, uint32_t layer, uint32_t n_items,
                                  const kvc_attend_item *const *items)
{
    uint32_t max_q = 0;
    kvc_status st = kvcp_batch_check(in, layer, n_items, items, &batch_ops, &max_q);
    for (uint32_t i = 0; !st && i < n_items; i++) {
        const kvc_attend_item *it = items[i];
        st = kq_attend(it->seq, layer, it->n_q, it->positions, it->q_pre, it->out);
    }
    return st;
}

static kvc_status kq_materialize(kvc_seq *s, uint32_t layer, kvc_materialized *out)
{
    if (!s)
        return KVC_E_INVALID;
    kvc_status st = ready(s, "materialize");
    if (st)
        return st;
    return kvcp_qss_materialize(&s->inst->qs, &s->q, layer, out, s->msg);
}

static kvc_status kq_truncate(kvc_seq *s, int32_t position)
{
    if (!s)
        return KVC_E_INVALID;
    if (s->q.layers)
        kvcp_qss_truncate(&s->inst->qs, &s->q, position);
    return KVC_OK;
}

static kvc_status kq_fork(const kvc_seq *src, kvc_seq *dst)
{
    if (!src || !dst)
        return KVC_E_INVALID;
    if (src == dst)
        return KVC_OK;
    if (dst->inst != src->inst)
        return kvcp_fail(dst->msg, sizeof dst->msg, KVC_E_INVALID,
                         "fork: source and destination belong to different instances");
    kvc_status st = ready(dst, "fork");
    if (st)
        return st;
    /* A source opened before finalize gets its (empty) layers first. */
    if (!src->q.layers && (st = ready((kvc_seq *)src, "fork")))
        return st;
    return kvcp_qss_fork(&src->inst->qs, &src->q, &dst->q, dst->msg);
}

static kvc_status kq_seq_stats(const kvc_seq *s, kvc_seq_stats *out)
{
    if (!s || !out)
        return KVC_E_INVALID;
    if (out->struct_size < KVCP_V10_SIZE(kvc_seq_stats, bytes_fp16_full))
        return KVC_E_VERSION;
    kvc_seq_stats st;
    memset(&st, 0, sizeof st);
    if (s->q.layers) {
        kvcp_qss_stats(&s->inst->qs, &s->q, sizeof *s, &st);
    } else {
        st.bytes_fixed = st.bytes_resident = sizeof *s;
    }
    kvcp_stats_out(out, &st, sizeof st);
    return KVC_OK;
}

/* One seq_describe line: tokens, the head's key widths (channels per
 * width) and value width. */
typedef struct describe_ctx {
    const kvc_instance *in;
    uint32_t layer, tokens;
} describe_ctx;

static void describe_line(const void *ctx, uint32_t h, char *words, size_t cap)
{
    const describe_ctx *c = ctx;
    const kvc_instance *in = c->in;
    if (!in->ready) {
        snprintf(words, cap, "tokens=0 prepared=no");
        return;
    }
    const kvck_qfmt *kf = &in->qs.lf[c->layer].k[h];
    int at = snprintf(words, cap, "tokens=%u k_widths=", c->tokens);
    for (uint32_t i = 0; i < kf->n_seg && at > 0 && (size_t)at < cap; i++)
        at += snprintf(words + at, cap - (size_t)at, "%s%ux%u", i ? "," : "", kf->seg[i].len,
                       kf->seg[i].bits);
    if (at > 0 && (size_t)at < cap)
        snprintf(words + at, cap - (size_t)at, " v_bits=%u", in->v_bits_built);
}

static kvc_status kq_seq_describe(const kvc_seq *s, uint32_t layer, char *buf, size_t buf_size,
                                  size_t *size)
{
    if (!s)
        return KVC_E_INVALID;
    char *msg = ((kvc_seq *)s)->msg;
    const kvc_instance *in = s->inst;
    if (layer >= in->g.n_layers)
        return kvcp_fail(msg, KVCP_MSG_SIZE, KVC_E_INVALID,
                         "describe: layer %u out of range (%u layers)", layer, in->g.n_layers);
    describe_ctx c = {in, layer, s->q.layers ? s->q.layers[layer].n : 0};
    return kvcp_describe(in->g.n_kv, describe_line, &c, buf, buf_size, size, msg, KVCP_MSG_SIZE);
}

/* ---- descriptor ------------------------------------------------------------ */

static const kvc_plugin kq_plugin = {
    .struct_size = sizeof(kvc_plugin),
    .abi_version = KVC_ABI_VERSION,
    .id = KQ_ID,
    .name = "KVQuant-style calibrated quantized KV cache",
    .version = "1.0.0",
    .description =
        "Keys quantized before RoPE per channel over blocks of tokens, each channel's width from "
        "calibration (sensitivity-weighted allocation averaging k_bits) and optional fitted "
        "non-uniform levels; values per token after a Hadamard rotation; the block being filled "
        "held as 8-bit codes on calibrated channel scales; attention on the codes.",
    .license = "MIT",
    .caps = KVC_CAP_CPU | KVC_CAP_NEEDS_WEIGHTS | KVC_CAP_NEEDS_CALIBRATION |
            KVC_CAP_QUANTIZES | KVC_CAP_MATERIALIZE | KVC_CAP_EXPORT | KVC_CAP_ARTIFACT |
            KVC_CAP_FORK,
    .n_options = N_OPTS,
    .options = kq_options,
    .create = kq_create,
    .destroy = kq_destroy,
    .instance_message = kq_instance_message,
    .prepare_layer = kq_prepare_layer,
    .finalize_layer = kq_finalize_layer,
    .finalize = kq_finalize,
    .save = kq_save_op,
    .instance_stats = kq_instance_stats,
    .seq_open = kq_seq_open,
    .seq_close = kq_seq_close,
    .seq_message = kq_seq_message,
    .append = kq_append,
    .attend = kq_attend,
    .attend_batch = kq_attend_batch,
    .materialize = kq_materialize,
    .truncate = kq_truncate,
    .fork = kq_fork,
    .seq_export = kq_export,
    .seq_import = kq_import,
    .seq_stats = kq_seq_stats,
    .seq_describe = kq_seq_describe,
};

KVC_EXPORT const kvc_plugin *kvc_plugin_entry(uint32_t host_abi_version)
{
    if (KVC_VERSION_MAJOR(host_abi_version) != KVC_ABI_VERSION_MAJOR)
        return NULL;
    return &kq_plugin;
}
