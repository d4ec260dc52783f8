/*
 * kvc-fastgen.so: FastGen's adaptive per-head token eviction. This file:
 * the descriptor, options, budget arithmetic, instance and sequence
 * lifecycle, stats and describe. Storage is in fg_store.c, policies and
 * profiling in fg_policy.c, the steps and attention in fg_attend.c,
 * fork/export/import in fg_io.c. See fastgen.h for how a layer lives.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "fastgen.h"

/* ---- options ------------------------------------------------------------- */

enum { OPT_T, OPT_R_LOCAL, OPT_R_FREQUENT, OPT_POLICIES, OPT_KV_RATIO, OPT_DTYPE,
       OPT_BLOCK_TOKENS, OPT_K_BITS, OPT_V_BITS, OPT_GROUP, OPT_HADAMARD, N_OPTS };

#define DEFAULT_POLICIES "special,special+punct,special+punct+frequent,special+punct+frequent+local,full"

static const kvc_option_desc opt_T = {
    sizeof(kvc_option_desc), KVC_OPT_FLOAT, "t", "0.95", NULL, 0.0, 1.0,
    "Threshold mode (the paper's T): each KV head takes the first policy whose recovered share "
    "of the prompt's attention is at least t; t = 1 keeps every token (exact)."};
static const kvc_option_desc opt_r_local = {
    sizeof(kvc_option_desc), KVC_OPT_FLOAT, "r_local", "0.3", NULL, 0.0, 1.0,
    "Local window of the local policy, as a fraction of the current length (positions within "
    "ceil(r_local x length) of the newest token)."};
static const kvc_option_desc opt_r_frequent = {
    sizeof(kvc_option_desc), KVC_OPT_FLOAT, "r_frequent", "0.3", NULL, 0.0, 1.0,
    "Budget of the frequent policy: the ceil(r_frequent x length) unprotected tokens with the "
    "highest cumulative attention stay."};
static const kvc_option_desc opt_policies = {
    sizeof(kvc_option_desc), KVC_OPT_STRING, "policies", DEFAULT_POLICIES, NULL, 0, 0,
    "Candidate policies in greedy order, ',' between candidates, '+' joining components "
    "(special, punct, frequent, local, full); full is appended when missing."};
static const kvc_option_desc opt_kv_ratio = {
    sizeof(kvc_option_desc), KVC_OPT_FLOAT, "kv_ratio", "", NULL, 0.01, 64.0,
    "Budget mode: resident bytes as a fraction of an fp16 full cache; per-head policies (the "
    "candidates, also at r_local and r_frequent x 1/2 and x 1/4) maximize recovered attention "
    "inside it and per-head caps enforce it. Unset: threshold mode. Picks fp16 storage unless "
    "dtype is given or the budget holds fp32 in full."};
static const kvc_option_desc opt_dtype = {
    sizeof(kvc_option_desc), KVC_OPT_ENUM, "dtype", "fp32", "fp32|fp16", 0, 0,
    "Storage type of the kept keys and values: fp32 is exact, fp16 halves the memory."};
static const kvc_option_desc opt_block_tokens = {
    sizeof(kvc_option_desc), KVC_OPT_INT, "block_tokens", "32", NULL, 1, 65536,
    "Tokens per storage block of one KV head: memory is taken and given back a block at a "
    "time."};
static const kvc_option_desc *const fg_options[N_OPTS] = {
    &opt_T,        &opt_r_local, &opt_r_frequent,  &opt_policies,
    &opt_kv_ratio, &opt_dtype,   &opt_block_tokens, &kvcp_qs_opt_k_bits,
    &kvcp_qs_opt_v_bits, &kvcp_qs_opt_group, &kvcp_qs_opt_hadamard};

/* ---- budget arithmetic ------------------------------------------------------ */

/* Run-array bytes per appended token per layer, worst case (a gap at every
 * position, array doubled). */
#define RUN_BYTES_PER_TOKEN (2.0 * sizeof(fg_run))

/* Bytes per slot of a kept token's regions (fastgen.h's block layout). */
typedef struct fg_rows {
    size_t krow, kszb, vrow, vszb;
} fg_rows;

static size_t up8(size_t n)
{
    return (n + 7) & ~(size_t)7;
}

/* A block's regions for B slots: offsets of ksz, v, vsz, pos; returns the
 * block's bytes (64-byte multiple). */
static size_t block_layout(const fg_rows *r, uint32_t B, size_t off[4])
{
    size_t at = up8(B * r->krow);
    off[0] = at;
    at += up8(B * r->kszb);
    off[1] = at;
    at += up8(B * r->vrow);
    off[2] = at;
    at += up8(B * r->vszb);
    off[3] = at;
    at += (size_t)B * (sizeof(int32_t) + sizeof(float) + 1);
    return (at + 63) & ~(size_t)63;
}

static size_t block_bytes_for(const fg_rows *r, uint32_t B)
{
    size_t off[4];
    return block_layout(r, B, off);
}

/* Bytes per appended token per layer that do not depend on the policy:
 * block tables (doubled, one entry per block per head) and runs. */
static double fixed_per_token(const kvcp_geom *g, uint32_t B)
{
    return g->n_kv * 2.0 * sizeof(void *) / B + RUN_BYTES_PER_TOKEN;
}

/* Declared ratio when every head keeps everything. */
static double full_ratio(const kvcp_geom *g, const fg_rows *r, uint32_t B)
{
    double per_head_token = (double)block_bytes_for(r, B) / B;
    return (g->n_kv * per_head_token + fixed_per_token(g, B)) /
           (double)kvcp_fp16_bytes_per_token_layer(g);
}

static fg_rows dense_rows(const kvcp_geom *g, size_t elem)
{
    fg_rows r = {g->head_dim * elem, 0, g->head_dim * elem, 0};
    return r;
}

/* The quantization options, for fastgen: kept tokens are quantized one
 * row at a time after RoPE (eviction moves rows), so of the shared
 * options fastgen lists k_bits, v_bits, group and hadamard; per-token keys
 * after RoPE, no sink, window or outliers (its policies decide which
 * tokens stay) are fixed. *on = 0 when k_bits/v_bits ask for none. */
static kvc_status parse_quant(const kvcp_optval *v, const kvcp_geom *g, uint32_t B,
                              kvcp_qs_opts *o, kvck_qfmt *kf, kvck_qfmt *vf, int *on, char *msg,
                              size_t cap)
{
    kvcp_optval qv[KVCP_QS_N_OPTS];
    memset(qv, 0, sizeof qv);
    qv[KVCP_QS_OPT_K_BITS] = v[OPT_K_BITS];
    qv[KVCP_QS_OPT_V_BITS] = v[OPT_V_BITS];
    qv[KVCP_QS_OPT_GROUP] = v[OPT_GROUP];
    qv[KVCP_QS_OPT_HADAMARD] = v[OPT_HADAMARD];
    qv[KVCP_QS_OPT_K_SCALE].num = 1; /* token */
    qv[KVCP_QS_OPT_K_ROPE].num = 1;  /* post */
    return kvcp_qs_opts_parse(qv, g, B, o, kf, vf, on, msg, cap);
}

size_t fg_seq_fixed_bytes(const kvc_instance *in)
{
    const kvcp_geom *g = &in->g;
    return sizeof(struct kvc_seq) + (size_t)g->n_layers * sizeof(fg_layer) +
           (size_t)g->n_layers * g->n_kv * sizeof(fg_head);
}

/* ---- instance --------------------------------------------------------------- */

static kvc_status fg_create(const kvc_create_info *info, kvc_instance **out, char *msg,
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
                         "fastgen needs no artifact (it profiles each prompt), but one was given");
    kvcp_optval v[N_OPTS];
    st = kvcp_parse_options(fg_options, N_OPTS, info, v, msg, msg_size);
    if (st)
        return st;
    fg_config cfg = {0};
    cfg.T = v[OPT_T].num;
    cfg.r_local = v[OPT_R_LOCAL].num;
    cfg.r_frequent = v[OPT_R_FREQUENT].num;
    cfg.block_tokens = (uint32_t)v[OPT_BLOCK_TOKENS].num;
    cfg.dtype = (int)v[OPT_DTYPE].num;
    st = fg_parse_policies(v[OPT_POLICIES].str, &cfg, msg, msg_size);
    if (st)
        return st;
    if (v[OPT_KV_RATIO].set)
        fg_add_budget_variants(&cfg);
    const uint32_t B = cfg.block_tokens;
    const double fp16 = (double)kvcp_fp16_bytes_per_token_layer(&g);
    kvcp_qs_opts qo;
    kvck_qfmt kf, vf;
    int quant = 0;
    st = parse_quant(v, &g, B, &qo, &kf, &vf, &quant, msg, msg_size);
    if (st)
        return st;
    fg_rows rows;
    if (quant) {
        if (v[OPT_DTYPE].set && cfg.dtype == FG_F32)
            return kvcp_fail(msg, msg_size, KVC_E_INVALID,
                             "dtype=fp32 and k_bits/v_bits: quantized tokens wait in fp16");
        cfg.dtype = FG_F16;
        cfg.k_bits = kf.seg[0].bits;
        cfg.v_bits = vf.seg[0].bits;
        cfg.group = kf.group;
        cfg.k_had = (uint32_t)qo.k_hadamard;
        cfg.v_had = (uint32_t)qo.v_hadamard;
        rows = (fg_rows){kf.row_bytes, (size_t)kf.n_groups * 4, vf.row_bytes,
                         (size_t)vf.n_groups * 4};
    }
    double htpt = g.n_kv;
    if (v[OPT_KV_RATIO].set) {
        cfg.kv_ratio = v[OPT_KV_RATIO].num;
        if (!quant && !v[OPT_DTYPE].set) {
            fg_rows r32 = dense_rows(&g, 4);
            cfg.dtype = cfg.kv_ratio >= full_ratio(&g, &r32, B) ? FG_F32 : FG_F16;
        }
        if (!quant)
            rows = dense_rows(&g, cfg.dtype == FG_F32 ? 4 : 2);
        htpt = (cfg.kv_ratio * fp16 - fixed_per_token(&g, B)) /
               ((double)block_bytes_for(&rows, B) / B);
        if (!(htpt > 0))
            return kvcp_fail(msg, msg_size, KVC_E_INVALID,
                             "kv_ratio %g leaves no room for a single token per head: block "
                             "tables and position runs alone take %.1f of the %.0f bytes an fp16 "
                             "token costs per layer",
                             cfg.kv_ratio, fixed_per_token(&g, B), fp16);
        if (htpt > g.n_kv)
            htpt = g.n_kv;
    }
    if (!quant)
        rows = dense_rows(&g, cfg.dtype == FG_F32 ? 4 : 2);

    kvc_instance *in = NULL;
    st = kvcp_instance_alloc(&host, sizeof *in, offsetof(kvc_instance, seqs), (void **)&in, msg,
                             msg_size);
    if (st)
        return st;
    in->host = host;
    in->g = g;
    in->cfg = cfg;
    in->elem = cfg.dtype == FG_F32 ? 4 : 2;
    in->quant = quant;
    in->krow = rows.krow;
    in->kszb = rows.kszb;
    in->vrow = rows.vrow;
    in->vszb = rows.vszb;
    size_t off[4];
    in->block_bytes = block_layout(&rows, B, off);
    in->off_ksz = off[0];
    in->off_v = off[1];
    in->off_vsz = off[2];
    in->off_pos = off[3];
    if (quant) {
        in->kf = kf;
        in->vf = vf;
        in->k_had = qo.k_hadamard;
        in->v_had = qo.v_hadamard;
        if (in->k_had)
            kvcp_qs_hadamard_signs(qo.seed, 0, in->k_signs, g.head_dim);
        if (in->v_had)
            kvcp_qs_hadamard_signs(qo.seed, 1, in->v_signs, g.head_dim);
    }
    in->tok_bytes = rows.krow + rows.kszb + rows.vrow + rows.vszb + sizeof(int32_t) +
                    sizeof(float) + 1;
    in->head_tokens_per_token = htpt;
    in->kv_ratio = cfg.kv_ratio > 0 ? cfg.kv_ratio : full_ratio(&g, &rows, B);
    /* Per layer and head: one partly filled block, the first table, a cap's
     * "+1" token and the two ceil() roundings; the first run array. */
    in->seq_overhead = fg_seq_fixed_bytes(in) +
                       (uint64_t)g.n_layers *
                           (g.n_kv * (in->block_bytes + 4 * sizeof(void *) +
                                      3 * (in->block_bytes / B + 1)) +
                            2 * sizeof(fg_run));
    *out = in;
    return KVC_OK;
}

static void seq_free(kvc_seq *s)
{
    kvc_instance *in = s->inst;
    fg_seq_clear(s);
    kvcp_free(&in->host, s->heads, (size_t)in->g.n_layers * in->g.n_kv * sizeof(fg_head));
    kvcp_free(&in->host, s->layers, (size_t)in->g.n_layers * sizeof(fg_layer));
    kvcp_free(&in->host, s, sizeof *s);
}

static void seq_free_link(kvcp_link *x)
{
    seq_free((kvc_seq *)x); /* link is the first member */
}

static void fg_destroy(kvc_instance *in)
{
    if (!in)
        return;
    kvcp_seqlist_drain(&in->seqs, seq_free_link, &in->host, FG_ID);
    kvc_host host = in->host;
    kvcp_free(&host, in, sizeof *in);
}

static const char *fg_instance_message(const kvc_instance *in)
{
    return in ? in->msg : "instance is NULL";
}

static kvc_status fg_prepare_layer(kvc_instance *in, uint32_t layer, const kvc_layer_weights *w,
                                   const kvc_calib_chunk *c)
{
    (void)layer, (void)w, (void)c;
    if (!in)
        return KVC_E_INVALID;
    return kvcp_fail(in->msg, sizeof in->msg, KVC_E_UNSUPPORTED,
                     "fastgen needs no preparation: it profiles each sequence's prompt");
}

static kvc_status fg_finalize_layer(kvc_instance *in, uint32_t layer)
{
    if (!in)
        return KVC_E_INVALID;
    if (layer >= in->g.n_layers)
        return kvcp_fail(in->msg, sizeof in->msg, KVC_E_INVALID, "layer %u >= n_layers %u",
                         layer, in->g.n_layers);
    return KVC_OK;
}

static kvc_status fg_finalize(kvc_instance *in)
{
    return in ? KVC_OK : KVC_E_INVALID;
}

static kvc_status fg_save(kvc_instance *in, void *buf, size_t buf_size, size_t *size)
{
    (void)buf, (void)buf_size, (void)size;
    if (!in)
        return KVC_E_INVALID;
    return kvcp_fail(in->msg, sizeof in->msg, KVC_E_UNSUPPORTED,
                     "fastgen has no parameters, so no artifact to save");
}

static const kvc_plugin fg_plugin; /* below: its caps are the instance's */

static kvc_status fg_instance_stats(const kvc_instance *in, kvc_instance_stats *out)
{
    if (!in)
        return KVC_E_INVALID;
    return kvcp_instance_stats_out(out, 0, sizeof *in, in->kv_ratio, in->seq_overhead,
                                   fg_plugin.caps);
}

/* ---- sequences ---------------------------------------------------------------- */

void fg_seq_clear(kvc_seq *s)
{
    const kvc_instance *in = s->inst;
    for (uint32_t l = 0; l < in->g.n_layers; l++)
        fg_layer_release(in, &s->layers[l], &s->bytes);
}

kvc_seq *fg_seq_alloc(kvc_instance *in)
{
    const kvcp_geom *g = &in->g;
    kvc_seq *s = kvcp_alloc(&in->host, sizeof *s, KVC_USAGE_CACHE);
    if (!s)
        return NULL;
    s->layers = kvcp_alloc(&in->host, (size_t)g->n_layers * sizeof(fg_layer), KVC_USAGE_CACHE);
    s->heads = kvcp_alloc(&in->host, (size_t)g->n_layers * g->n_kv * sizeof(fg_head),
                          KVC_USAGE_CACHE);
    if (!s->layers || !s->heads) {
        kvcp_free(&in->host, s->layers, (size_t)g->n_layers * sizeof(fg_layer));
        kvcp_free(&in->host, s->heads, (size_t)g->n_layers * g->n_kv * sizeof(fg_head));
        kvcp_free(&in->host, s, sizeof *s);
        return NULL;
    }
    s->inst = in;
    for (uint32_t l = 0; l < g->n_layers; l++) {
        s->layers[l].heads = s->heads + (size_t)l * g->n_kv;
        fg_layer_release(in, &s->layers[l], &s->bytes); /* sets the empty state */
    }
    return s;
}

void fg_seq_free(kvc_seq *s)
{
    seq_free(s);
}

void fg_seq_swap(kvc_seq *a, kvc_seq *b)
{
    fg_layer *l = a->layers;
    fg_head *h = a->heads;
    fg_bytes c = a->bytes;
    a->layers = b->layers;
    a->heads = b->heads;
    a->bytes = b->bytes;
    b->layers = l;
    b->heads = h;
    b->bytes = c;
}

static kvc_status fg_seq_open(kvc_instance *in, kvc_seq **out)
{
    if (!in || !out)
        return KVC_E_INVALID;
    kvc_seq *s = fg_seq_alloc(in);
    if (!s)
        return KVC_E_NOMEM;
    kvcp_seqlist_add(&in->seqs, &s->link);
    *out = s;
    return KVC_OK;
}

static void fg_seq_close(kvc_seq *s)
{
    if (!s)
        return;
    kvcp_seqlist_remove(&s->inst->seqs, &s->link);
    seq_free(s);
}

static const char *fg_seq_message(const kvc_seq *s)
{
    return s ? s->msg : "sequence is NULL";
}

static kvc_status fg_seq_stats(const kvc_seq *s, kvc_seq_stats *out)
{
    if (!s || !out)
        return KVC_E_INVALID;
    if (out->struct_size < KVCP_V10_SIZE(kvc_seq_stats, bytes_fp16_full))
        return KVC_E_VERSION;
    const kvc_instance *in = s->inst;
    const kvcp_geom *g = &in->g;
    const uint64_t hd_payload = in->krow + in->vrow; /* values, or codes */
    uint64_t tokens = 0, in_blocks = 0, pending = 0, pay = 0, other = 0;
    for (uint32_t l = 0; l < g->n_layers; l++) {
        const fg_layer *L = &s->layers[l];
        tokens += L->n_seen + L->n_pending;
        pending += L->n_pending;
        for (uint32_t h = 0; h < g->n_kv; h++)
            in_blocks += L->heads[h].n;
        fg_pending_split(in, L, &pay, &other);
    }
    kvc_seq_stats st = {0};
    st.tokens_appended = tokens;
    st.head_tokens_resident = in_blocks + pending * g->n_kv; /* pending: every head */
    st.bytes_payload = in_blocks * hd_payload + pay;
    st.bytes_metadata = in_blocks * (in->tok_bytes - hd_payload) + s->bytes.tables + other;
    st.bytes_reserved = s->bytes.blocks - in_blocks * in->tok_bytes;
    st.bytes_fixed = fg_seq_fixed_bytes(in);
    st.bytes_resident = st.bytes_payload + st.bytes_metadata + st.bytes_reserved + st.bytes_fixed;
    st.bytes_fp16_full = tokens * kvcp_fp16_bytes_per_token_layer(g);
    st.bytes_pending = s->bytes.pending;
    kvcp_stats_out(out, &st, sizeof st);
    return KVC_OK;
}

/* ---- describe ------------------------------------------------------------------- */

typedef struct describe_ctx {
    const kvc_instance *in;
    const fg_layer *L;
} describe_ctx;

static void describe_line(const void *ctx, uint32_t h, char *words, size_t cap)
{
    const describe_ctx *c = ctx;
    const fg_head *hd = &c->L->heads[h];
    char scaled[16] = "";
    if (c->L->profiled && hd->scale != 1.0f)
        snprintf(scaled, sizeof scaled, "@%.2f", (double)hd->scale);
    int k = snprintf(words, cap, "policy=%s%s tokens=%u",
                     c->L->profiled ? fg_policy_name(hd->policy) : "unprofiled", scaled,
                     hd->n + c->L->n_pending);
    if (c->L->profiled && k > 0 && (size_t)k < cap) {
        int k2 = snprintf(words + k, cap - (size_t)k, " recovered=%.4f seen=%llu",
                          (double)hd->recovered, (unsigned long long)c->L->n_seen);
        if (hd->share >= 0 && k2 > 0 && (size_t)(k + k2) < cap)
            snprintf(words + k + k2, cap - (size_t)(k + k2), " share=%.4f", (double)hd->share);
    }
}

static kvc_status fg_seq_describe(const kvc_seq *s, uint32_t layer, char *buf, size_t buf_size,
                                  size_t *size)
{
    if (!s)
        return KVC_E_INVALID;
    kvc_seq *w = (kvc_seq *)s; /* the message buffer only */
    if (layer >= s->inst->g.n_layers)
        return kvcp_fail(w->msg, sizeof w->msg, KVC_E_INVALID,
                         "describe: layer %u >= n_layers %u", layer, s->inst->g.n_layers);
    describe_ctx c = {s->inst, &s->layers[layer]};
    return kvcp_describe(s->inst->g.n_kv, describe_line, &c, buf, buf_size, size, w->msg,
                         sizeof w->msg);
}

/* ---- descriptor ------------------------------------------------------------------- */

static const kvc_plugin fg_plugin = {
    .struct_size = sizeof(kvc_plugin),
    .abi_version = KVC_ABI_VERSION,
    .id = FG_ID,
    .name = "FastGen adaptive per-head token eviction",
    .version = "1.0.0",
    .description =
        "FastGen (Ge et al. 2023): the prompt's attention is profiled per KV head (query heads "
        "pooled), each head takes the cheapest of special / +punct / +frequent / +local / full "
        "that recovers T of it (or, with kv_ratio, the mix recovering most inside the budget), "
        "and keeps applying it while generating. Kept tokens are stored exactly (post-RoPE K, V "
        "and positions) in per-head ragged blocks; evicted tokens' memory is given back.",
    .license = "MIT",
    .caps = KVC_CAP_CPU | KVC_CAP_COMPRESS_TOKENS | KVC_CAP_QUANTIZES | KVC_CAP_TOKEN_FLAGS | KVC_CAP_MATERIALIZE |
            KVC_CAP_EXPORT | KVC_CAP_FORK | KVC_CAP_PROMPT_PHASE,
    .n_options = N_OPTS,
    .options = fg_options,
    .create = fg_create,
    .destroy = fg_destroy,
    .instance_message = fg_instance_message,
    .prepare_layer = fg_prepare_layer,
    .finalize_layer = fg_finalize_layer,
    .finalize = fg_finalize,
    .save = fg_save,
    .instance_stats = fg_instance_stats,
    .seq_open = fg_seq_open,
    .seq_close = fg_seq_close,
    .seq_message = fg_seq_message,
    .append = fg_append,
    .attend = fg_attend,
    .attend_batch = fg_attend_batch,
    .materialize = fg_materialize,
    .truncate = fg_truncate,
    .fork = fg_fork,
    .seq_export = fg_export,
    .seq_import = fg_import,
    .seq_stats = fg_seq_stats,
    .seq_describe = fg_seq_describe,
};

KVC_EXPORT const kvc_plugin *kvc_plugin_entry(uint32_t host_abi_version)
{
    if (KVC_VERSION_MAJOR(host_abi_version) != KVC_ABI_VERSION_MAJOR)
        return NULL;
    return &fg_plugin;
}
