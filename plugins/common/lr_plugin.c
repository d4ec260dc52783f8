/*
 * The low-rank plugins' lifecycle: create (from options or an artifact),
 * destroy, stats and the declared budget, sequences. The method-specific
 * part of a plugin is its descriptor, option table and lr_method.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "lowrank.h"

/* ---- budget ----------------------------------------------------------------- */

double lr_meta_per_token(const kvc_instance *in)
{
    /* A position per token once positions have gaps, and the block table's
     * share (two entries per block after doubling), as kvc-full counts. */
    return sizeof(int32_t) + 2.0 * sizeof(kvcp_block) / in->cfg.block_tokens;
}

size_t lr_seq_fixed_bytes(const kvc_instance *in)
{
    return sizeof(struct kvc_seq) + (size_t)in->g.n_layers * sizeof(kvcp_pages);
}

void lr_declare_budget(kvc_instance *in)
{
    const kvcp_geom *g = &in->g;
    const double f = (double)kvcp_fp16_bytes_per_token_layer(g);
    const double meta = lr_meta_per_token(in);
    uint64_t fixed = lr_seq_fixed_bytes(in);
    if (!in->ranks_set) {
        /* Before ranks exist nothing can be appended; promise the request. */
        in->kv_ratio = in->cfg.kv_ratio > 0 ? in->cfg.kv_ratio
                                            : (2.0 * in->m * in->n_groups * in->elem + meta) / f;
        in->seq_overhead = fixed;
        return;
    }
    double sum = 0, mx = 0;
    for (uint32_t l = 0; l < g->n_layers; l++) {
        double b = (double)in->layers[l].row_elems * (double)in->elem;
        sum += b;
        mx = b > mx ? b : mx;
    }
    const double avg = sum / g->n_layers;
    in->kv_ratio = (avg + meta) / f;
    /* Per layer: a partly filled block, its position array and the block
     * table's first entries. Progressive ranks give shallow layers more
     * bytes per token than the average promised: a host that runs those
     * layers ahead of the deep ones (up to max_positions tokens) holds at
     * most this much more, so the constant covers it. */
    uint64_t over = fixed;
    for (uint32_t l = 0; l < g->n_layers; l++) {
        double b = (double)in->layers[l].row_elems * (double)in->elem;
        over += (uint64_t)in->cfg.block_tokens * (in->layers[l].row_elems * in->elem +
                                                   sizeof(int32_t)) +
                (KVCP_TABLE_INIT + 2) * sizeof(kvcp_block);
        if (b > avg)
            over += (uint64_t)ceil((b - avg) * g->max_positions);
    }
    in->seq_overhead = over;
}

/* ---- instance memory ----------------------------------------------------------- */

void *lr_ialloc(kvc_instance *in, size_t size, uint64_t *counter)
{
    void *p = kvcp_alloc(&in->host, size, KVC_USAGE_INSTANCE);
    if (p)
        *counter += size;
    return p;
}

void lr_ifree(kvc_instance *in, void *p, size_t size, uint64_t *counter)
{
    if (!p)
        return;
    kvcp_free(&in->host, p, size);
    *counter -= size;
}

/* ---- create / destroy ---------------------------------------------------------- */

static kvc_status check_config(const kvcp_geom *g, const lr_method *meth, lr_config *c,
                               uint32_t *n_groups, uint32_t *m, char *msg, size_t cap)
{
    uint32_t gh = c->group_heads ? c->group_heads : g->n_kv;
    if (g->n_kv % gh)
        return kvcp_fail(msg, cap, KVC_E_INVALID,
                         "group_heads %u does not divide the %u KV heads this instance serves",
                         gh, g->n_kv);
    if (gh > LR_MAX_GROUP)
        return kvcp_fail(msg, cap, KVC_E_INVALID, "group_heads %u is above the %u supported", gh,
                         LR_MAX_GROUP);
    c->group_heads = gh;
    *n_groups = g->n_kv / gh;
    *m = gh * g->head_dim;
    if (c->rank_k > *m || c->rank_v > *m)
        return kvcp_fail(msg, cap, KVC_E_INVALID,
                         "rank_k %u / rank_v %u: a group of %u KV heads of %u has at most rank %u",
                         c->rank_k, c->rank_v, gh, g->head_dim, *m);
    if (c->key_space == LR_POST_ROPE && !meth->needs_calib)
        return kvcp_fail(msg, cap, KVC_E_INVALID,
                         "%s: key_space=post needs calibration keys, which this plugin does not "
                         "take", meth->id);
    if (c->refit && c->key_space == LR_POST_ROPE)
        return kvcp_fail(msg, cap, KVC_E_INVALID,
                         "refit applies to pre-RoPE factors; it cannot be combined with "
                         "key_space=post");
    return KVC_OK;
}

/* Storage type when the host did not choose: fp32 when the request fits
 * full rank in fp32 (exact), else fp16, which buys twice the rank for the
 * same bytes at an error (~3e-4) far below truncation's. */
static int pick_dtype(const kvcp_geom *g, const lr_config *c, uint32_t n_groups, uint32_t m,
                      double meta)
{
    if (c->kv_ratio <= 0)
        return LR_F32;
    double f = (double)kvcp_fp16_bytes_per_token_layer(g);
    double full32 = (2.0 * n_groups * m * 4 + meta) / f;
    return c->kv_ratio >= full32 ? LR_F32 : LR_F16;
}

kvc_status lr_create(const lr_method *meth, const kvc_create_info *info, const lr_config *cfg_in,
                     const uint8_t *cfg_set, kvc_instance **out, char *msg, size_t cap)
{
    kvc_host host;
    kvcp_geom g;
    if (!out)
        return kvcp_fail(msg, cap, KVC_E_INVALID, "out pointer is NULL");
    kvc_status st = kvcp_create_common(info, 0, &host, &g, msg, cap);
    if (st)
        return st;
    lr_config cfg = *cfg_in;
    uint32_t n_groups = 0, m = 0;
    if ((st = check_config(&g, meth, &cfg, &n_groups, &m, msg, cap)))
        return st;

    kvc_instance *in = NULL;
    st = kvcp_instance_alloc(&host, sizeof *in, offsetof(kvc_instance, seqs), (void **)&in, msg,
                             cap);
    if (st)
        return st;
    in->host = host;
    in->g = g;
    in->meth = meth;
    in->cfg = cfg;
    in->n_groups = n_groups;
    in->m = m;
    in->layers = kvcp_alloc(&host, (size_t)g.n_layers * sizeof(lr_layer), KVC_USAGE_INSTANCE);
    if (!in->layers) {
        st = kvcp_fail(msg, cap, KVC_E_NOMEM, "out of memory for %u layers", g.n_layers);
        goto fail;
    }
    if (info->artifact || info->artifact_size) {
        if (!info->artifact || !info->artifact_size) {
            st = kvcp_fail(msg, cap, KVC_E_INVALID, "artifact pointer and size disagree");
            goto fail;
        }
        if ((st = lr_load_artifact(in, info->artifact, info->artifact_size, &cfg, cfg_set, msg,
                                   cap)))
            goto fail;
        in->from_artifact = 1;
        in->ready = 1;
        lr_declare_budget(in);
        *out = in;
        return KVC_OK;
    }
    if (!cfg_set[LR_SET_DTYPE])
        in->cfg.dtype = pick_dtype(&g, &cfg, n_groups, m, lr_meta_per_token(in));
    in->elem = in->cfg.dtype == LR_F16 ? 2 : 4;
    /* Uniform ranks are known now; progressive ones wait for the weights.
     * Either way a request the budget cannot hold is refused here. */
    uint32_t rk, rv;
    if ((st = lr_uniform_ranks(in, &rk, &rv, msg, cap)))
        goto fail;
    if (in->cfg.alloc == LR_UNIFORM || in->cfg.kv_ratio <= 0 || in->cfg.rank_k ||
        in->cfg.rank_v) {
        for (uint32_t l = 0; l < g.n_layers; l++) {
            in->layers[l].rk = rk;
            in->layers[l].rv = rv;
            in->layers[l].row_elems = n_groups * (rk + rv);
        }
        in->ranks_set = 1;
    }
    lr_declare_budget(in);
    *out = in;
    return KVC_OK;
fail:
    lr_destroy(in);
    return st;
}

static void seq_free(kvc_seq *s)
{
    kvc_instance *in = s->inst;
    lr_layers_release(in, s->layers, &s->bytes);
    kvcp_free(&in->host, s->layers, (size_t)in->g.n_layers * sizeof(kvcp_pages));
    kvcp_free(&in->host, s, sizeof *s);
}

static void seq_free_link(kvcp_link *x)
{
    seq_free((kvc_seq *)x); /* link is the first member */
}

void lr_destroy(kvc_instance *in)
{
    if (!in)
        return;
    kvcp_seqlist_drain(&in->seqs, seq_free_link, &in->host, in->meth->id);
    if (in->layers) {
        for (uint32_t l = 0; l < in->g.n_layers; l++) {
            lr_prep_free(in, &in->layers[l]);
            lr_factors_free(in, &in->layers[l]);
        }
        kvcp_free(&in->host, in->layers, (size_t)in->g.n_layers * sizeof(lr_layer));
    }
    kvc_host host = in->host;
    kvcp_free(&host, in, sizeof *in);
}

const char *lr_instance_message(const kvc_instance *in)
{
    return in ? in->msg : "instance is NULL";
}

kvc_status lr_instance_stats(const kvc_instance *in, kvc_instance_stats *out)
{
    if (!in)
        return KVC_E_INVALID;
    uint64_t caps = LR_CAPS | (in->meth->needs_calib ? KVC_CAP_NEEDS_CALIBRATION : 0);
    if (!(in->cfg.dtype == LR_F32 && in->cfg.kv_ratio == 0 && !in->cfg.rank_k && !in->cfg.rank_v))
        caps &= ~KVC_CAP_EXACT; /* lossless only at full rank in fp32 */
    return kvcp_instance_stats_out(
        out, in->bytes_params, sizeof *in + (size_t)in->g.n_layers * sizeof(lr_layer) + in->bytes_prep,
        in->kv_ratio, in->seq_overhead, caps);
}

/* ---- sequences ------------------------------------------------------------------ */

kvc_status lr_seq_open(kvc_instance *in, kvc_seq **out)
{
    if (!in || !out)
        return KVC_E_INVALID;
    kvc_seq *s = kvcp_alloc(&in->host, sizeof *s, KVC_USAGE_CACHE);
    if (!s)
        return KVC_E_NOMEM;
    s->layers = kvcp_alloc(&in->host, (size_t)in->g.n_layers * sizeof(kvcp_pages),
                           KVC_USAGE_CACHE);
    if (!s->layers) {
        kvcp_free(&in->host, s, sizeof *s);
        return KVC_E_NOMEM;
    }
    for (uint32_t l = 0; l < in->g.n_layers; l++)
        s->layers[l].last_pos = -1;
    s->inst = in;
    kvcp_seqlist_add(&in->seqs, &s->link);
    *out = s;
    return KVC_OK;
}

void lr_seq_close(kvc_seq *s)
{
    if (!s)
        return;
    kvc_instance *in = s->inst;
    kvcp_seqlist_remove(&in->seqs, &s->link);
    seq_free(s);
}

const char *lr_seq_message(const kvc_seq *s)
{
    return s ? s->msg : "sequence is NULL";
}

kvc_status lr_seq_stats(const kvc_seq *s, kvc_seq_stats *out)
{
    if (!s || !out)
        return KVC_E_INVALID;
    if (out->struct_size < KVCP_V10_SIZE(kvc_seq_stats, bytes_fp16_full))
        return KVC_E_VERSION;
    const kvc_instance *in = s->inst;
    kvc_seq_stats st = {0};
    uint64_t tokens = 0, payload = 0;
    for (uint32_t l = 0; l < in->g.n_layers; l++) {
        tokens += s->layers[l].n;
        payload += (uint64_t)s->layers[l].n * in->layers[l].row_elems * in->elem;
    }
    st.tokens_appended = tokens;
    st.head_tokens_resident = tokens * in->g.n_kv;
    st.bytes_payload = payload;
    st.bytes_reserved = s->bytes.blocks - payload;
    st.bytes_metadata = s->bytes.pos + s->bytes.table;
    st.bytes_fixed = lr_seq_fixed_bytes(in);
    st.bytes_resident = st.bytes_payload + st.bytes_reserved + st.bytes_metadata + st.bytes_fixed;
    st.bytes_fp16_full = tokens * kvcp_fp16_bytes_per_token_layer(&in->g);
    kvcp_stats_out(out, &st, sizeof st);
    return KVC_OK;
}

/* One seq_describe line: every head holds every token of the layer; the
 * ranks are those of the head's group (0 until the layer's ranks exist). */
typedef struct lr_describe_ctx {
    const kvc_instance *in;
    const lr_layer *L;
    uint32_t tokens;
} lr_describe_ctx;

static void lr_describe_line(const void *ctx, uint32_t h, char *words, size_t cap)
{
    const lr_describe_ctx *c = ctx;
    uint32_t gh = c->in->cfg.group_heads ? c->in->cfg.group_heads : 1, g = h / gh;
    uint32_t rk = c->L->k && g < c->in->n_groups ? c->L->k[g].r : c->L->rk;
    uint32_t rv = c->L->v && g < c->in->n_groups ? c->L->v[g].r : c->L->rv;
    snprintf(words, cap, "tokens=%u rank_k=%u rank_v=%u", c->tokens, rk, rv);
}

kvc_status lr_seq_describe(const kvc_seq *s, uint32_t layer, char *buf, size_t buf_size,
                           size_t *size)
{
    if (!s)
        return KVC_E_INVALID;
    char *msg = ((kvc_seq *)s)->msg; /* the sequence's message, as for any call on it */
    const kvc_instance *in = s->inst;
    if (layer >= in->g.n_layers)
        return kvcp_fail(msg, KVCP_MSG_SIZE, KVC_E_INVALID,
                         "describe: layer %u out of range (%u layers)", layer, in->g.n_layers);
    lr_describe_ctx c = {in, &in->layers[layer], s->layers[layer].n};
    return kvcp_describe(in->g.n_kv, lr_describe_line, &c, buf, buf_size, size, msg,
                         KVCP_MSG_SIZE);
}

/* ---- options ----------------------------------------------------------------------- */

/* Index of an ENUM value's word in a '|'-list, by name: plugins list the
 * words in their own order (their default first). */
static int enum_is(const kvcp_optval *v, const char *word)
{
    return strcmp(v->str, word) == 0;
}

kvc_status lr_create_with_options(const lr_method *meth, const kvc_option_desc *const *table,
                                  uint32_t n, const kvc_create_info *info, kvc_instance **out,
                                  char *msg, size_t cap)
{
    if (!info)
        return kvcp_fail(msg, cap, KVC_E_INVALID, "create_info is NULL");
    if (info->struct_size < KVCP_V10_SIZE(kvc_create_info, reserved0))
        return kvcp_fail(msg, cap, KVC_E_VERSION,
                         "kvc_create_info.struct_size %u is below the ABI 1.0 size",
                         (unsigned)info->struct_size);
    if (info->n_options && (!info->option_names || !info->option_values))
        return kvcp_fail(msg, cap, KVC_E_INVALID, "%u options given with NULL name/value arrays",
                         info->n_options);
    kvcp_optval v[LR_MAX_OPTIONS];
    if (n > LR_MAX_OPTIONS)
        return kvcp_fail(msg, cap, KVC_E_INTERNAL, "option table too large");
    kvc_status st = kvcp_parse_options(table, n, info, v, msg, cap);
    if (st)
        return st;
    lr_config c;
    memset(&c, 0, sizeof c);
    uint8_t set[LR_SET_N] = {0};
    c.block_tokens = 64;
    for (uint32_t i = 0; i < n; i++) {
        const char *name = table[i]->name;
        const kvcp_optval *o = &v[i];
        if (!strcmp(name, "kv_ratio")) {
            c.kv_ratio = o->set ? o->num : 0;
            set[LR_SET_RATIO] = (uint8_t)o->set;
        } else if (!strcmp(name, "rank_k")) {
            c.rank_k = (uint32_t)o->num;
            set[LR_SET_RANK_K] = (uint8_t)o->set;
        } else if (!strcmp(name, "rank_v")) {
            c.rank_v = (uint32_t)o->num;
            set[LR_SET_RANK_V] = (uint8_t)o->set;
        } else if (!strcmp(name, "dtype")) {
            c.dtype = enum_is(o, "fp16") ? LR_F16 : LR_F32;
            set[LR_SET_DTYPE] = (uint8_t)(o->set && *o->str);
        } else if (!strcmp(name, "alloc")) {
            c.alloc = enum_is(o, "progressive") ? LR_PROGRESSIVE : LR_UNIFORM;
            set[LR_SET_ALLOC] = (uint8_t)o->set;
        } else if (!strcmp(name, "key_space")) {
            c.key_space = enum_is(o, "post") ? LR_POST_ROPE : LR_PRE_ROPE;
            set[LR_SET_KEYS] = (uint8_t)o->set;
        } else if (!strcmp(name, "refit")) {
            c.refit = o->num != 0;
            set[LR_SET_REFIT] = (uint8_t)o->set;
        } else if (!strcmp(name, "spread")) {
            c.spread = o->num;
            set[LR_SET_SPREAD] = (uint8_t)o->set;
        } else if (!strcmp(name, "block_tokens")) {
            c.block_tokens = (uint32_t)o->num;
        } else if (!strcmp(name, "calib_note")) {
            snprintf(c.note, sizeof c.note, "%s", o->str);
        }
    }
    return lr_create(meth, info, &c, set, out, msg, cap);
}

/* ---- the options both plugins list ------------------------------------------------ */

const kvc_option_desc lr_opt_kv_ratio = {
    sizeof(kvc_option_desc), KVC_OPT_FLOAT, "kv_ratio", "", NULL, 0.01, 64.0,
    "Memory budget: resident bytes per token as a fraction of an fp16 full cache (positions "
    "and block tables counted); picks the ranks and, unless dtype is given, fp16 latents. "
    "Unset: full rank in fp32, which is exact."};
const kvc_option_desc lr_opt_rank_k = {
    sizeof(kvc_option_desc), KVC_OPT_INT, "rank_k", "0", NULL, 0, 65536,
    "Latent rank of the keys of every layer and group; 0 = from kv_ratio. Overrides the "
    "allocation."};
const kvc_option_desc lr_opt_rank_v = {
    sizeof(kvc_option_desc), KVC_OPT_INT, "rank_v", "0", NULL, 0, 65536,
    "Latent rank of the values of every layer and group; 0 = from kv_ratio. Overrides the "
    "allocation."};
const kvc_option_desc lr_opt_dtype = {
    sizeof(kvc_option_desc), KVC_OPT_ENUM, "dtype", "", "fp32|fp16", 0, 0,
    "Storage type of the latents; default fp32 without kv_ratio, fp16 with one (twice the "
    "rank for the same bytes)."};
const kvc_option_desc lr_opt_block_tokens = {
    sizeof(kvc_option_desc), KVC_OPT_INT, "block_tokens", "64", NULL, 1, 65536,
    "Tokens per storage block: memory grows one block per layer at a time."};
const kvc_option_desc lr_opt_calib_note = {
    sizeof(kvc_option_desc), KVC_OPT_STRING, "calib_note", "", NULL, 0, 0,
    "Free text kept in the artifact: which calibration texts and how many tokens (kvc "
    "prepare fills it)."};
const kvc_option_desc lr_opt_spread = {
    sizeof(kvc_option_desc), KVC_OPT_FLOAT, "spread", "0.5", NULL, 0.0, 1.0,
    "Progressive allocation: how much larger a fraction of its dimensions the shallowest "
    "layer keeps than the deepest (0 = uniform)."};
