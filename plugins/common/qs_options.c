/* The quantized store's options, shared by the plugins that offer it
 * (qstore.h): their descriptors and their translation into kvcp_qs_opts. */
#include <string.h>

#include "qstore.h"

#define OPT(name_, type_, def_, choices_, min_, max_, help_)                                    \
    {sizeof(kvc_option_desc), type_, name_, def_, choices_, min_, max_, help_}

const kvc_option_desc kvcp_qs_opt_k_bits = OPT(
    "k_bits", KVC_OPT_INT, "", NULL, 1, 16,
    "Bits per cached key value: 1, 2, 3, 4, 5, 6 or 8 quantizes (with v_bits); 16 or unset "
    "keeps the dtype storage.");
const kvc_option_desc kvcp_qs_opt_v_bits = OPT(
    "v_bits", KVC_OPT_INT, "", NULL, 1, 16,
    "Bits per cached value: 1, 2, 3, 4, 5, 6 or 8 quantizes (with k_bits); 16 or unset keeps "
    "the dtype storage.");
const kvc_option_desc kvcp_qs_opt_k_scale = OPT(
    "k_scale", KVC_OPT_ENUM, "channel", "channel|token", 0, 0,
    "Key scaling groups: per channel over a block of tokens (the block is held in fp16 until "
    "it is full), or per token in groups of `group` channels.");
const kvc_option_desc kvcp_qs_opt_k_rope = OPT(
    "k_rope", KVC_OPT_ENUM, "pre", "pre|post", 0, 0,
    "Quantize keys before RoPE (RoPE applied after dequantization: outlier channels stay "
    "put) or after it (attention scores straight from the codes).");
const kvc_option_desc kvcp_qs_opt_group = OPT(
    "group", KVC_OPT_INT, "64", NULL, 1, 512,
    "Channels per scaling group of a token row (values; keys with k_scale=token); at most "
    "head_dim.");
const kvc_option_desc kvcp_qs_opt_hadamard = OPT(
    "hadamard", KVC_OPT_ENUM, "auto", "auto|none|v|k|kv", 0, 0,
    "Randomized Hadamard rotation of values (v), keys after RoPE (k) or both before "
    "quantizing; auto: values, and keys when they are post-RoPE and per token.");
const kvc_option_desc kvcp_qs_opt_sink = OPT(
    "sink", KVC_OPT_INT, "0", NULL, 0, 4096,
    "First tokens of a sequence kept in fp16 (attention sinks).");
const kvc_option_desc kvcp_qs_opt_window = OPT(
    "window", KVC_OPT_INT, "0", NULL, 0, 65536,
    "Newest tokens kept in fp16 (a recent window), besides the key block being filled.");
const kvc_option_desc kvcp_qs_opt_outliers = OPT(
    "outliers", KVC_OPT_FLOAT, "0", NULL, 0, 0.25,
    "Fraction of key and value entries kept exactly in fp16 beside the codes (dense and "
    "sparse): those that widen their group's range most.");

static int bits_ok(double b)
{
    return b == 16 || (b >= 1 && b <= 8 && b != 7);
}

kvc_status kvcp_qs_opts_parse(const kvcp_optval *v, const kvcp_geom *g, uint32_t block,
                              kvcp_qs_opts *o, kvck_qfmt *kf, kvck_qfmt *vf, int *on, char *msg,
                              size_t cap)
{
    const kvcp_optval *kb = &v[KVCP_QS_OPT_K_BITS], *vb = &v[KVCP_QS_OPT_V_BITS];
    *on = 0;
    for (int i = 0; i < 2; i++) {
        const kvcp_optval *b = i ? vb : kb;
        if (b->set && !bits_ok(b->num))
            return kvcp_fail(msg, cap, KVC_E_INVALID,
                             "%s %g is not a stored width (1, 2, 3, 4, 5, 6, 8, or 16 = fp16)",
                             i ? "v_bits" : "k_bits", b->num);
    }
    const int kq = kb->set && kb->num < 16, vq = vb->set && vb->num < 16;
    if (!kq && !vq)
        return KVC_OK;
    if (kq != vq)
        return kvcp_fail(msg, cap, KVC_E_INVALID,
                         "k_bits and v_bits quantize together: set both below 16 (use 8 for a "
                         "near-lossless side)");
    memset(o, 0, sizeof *o);
    o->block = block;
    o->k_mode = v[KVCP_QS_OPT_K_SCALE].num == 0 ? KVCK_QS_CHANNEL : KVCK_QS_TOKEN;
    o->k_pre = v[KVCP_QS_OPT_K_ROPE].num == 0;
    o->sink = (uint32_t)v[KVCP_QS_OPT_SINK].num;
    o->k_window = o->v_window = (uint32_t)v[KVCP_QS_OPT_WINDOW].num;
    o->k_outliers = o->v_outliers = v[KVCP_QS_OPT_OUTLIERS].num;
    o->seed = KVCP_QS_SEED;
    switch ((int)v[KVCP_QS_OPT_HADAMARD].num) {
    case 0: /* auto */
        o->v_hadamard = 1;
        o->k_hadamard = !o->k_pre && o->k_mode == KVCK_QS_TOKEN;
        break;
    case 1: /* none */
        break;
    case 2: /* v */
        o->v_hadamard = 1;
        break;
    case 3: /* k */
        o->k_hadamard = 1;
        break;
    default: /* kv */
        o->k_hadamard = o->v_hadamard = 1;
        break;
    }
    if (o->k_hadamard && o->k_pre)
        return kvcp_fail(msg, cap, KVC_E_INVALID,
                         "hadamard=%s rotates keys, which needs k_rope=post (keys kept before "
                         "RoPE are rotated by RoPE after dequantization)",
                         v[KVCP_QS_OPT_HADAMARD].str);
    if (block > 256)
        return kvcp_fail(msg, cap, KVC_E_INVALID,
                         "quantized storage takes at most 256 tokens per block (block_tokens %u)",
                         block);
    uint32_t group = (uint32_t)v[KVCP_QS_OPT_GROUP].num;
    if (group > g->head_dim)
        group = g->head_dim;
    if (kvck_qfmt_uniform(kf, g->head_dim, (unsigned)kb->num, group) ||
        kvck_qfmt_uniform(vf, g->head_dim, (unsigned)vb->num, group))
        return kvcp_fail(msg, cap, KVC_E_INVALID,
                         "k_bits %g / v_bits %g with group %u do not make a row format for "
                         "head_dim %u",
                         kb->num, vb->num, group, g->head_dim);
    o->k_fmt_all = kf;
    o->v_fmt_all = vf;
    *on = 1;
    return KVC_OK;
}
