/*
 * Serialized forms of the low-rank plugins (little-endian, kvcp framing:
 * magic, kind, version, CRC-32s, plugin id).
 *
 * Artifact payload, format 1:
 *   geometry record (kvcp_geom_write)
 *   u32 factor method (0 plain SVD, 1 whitened), dtype, alloc, key_space,
 *       refit, group_heads, rank_k, rank_v
 *   u64 bits of f64 kv_ratio, u64 bits of f64 spread
 *   u64 calibration rows per layer, u64 of them with x_ref
 *   u32 note length, note bytes (which texts, how many tokens)
 *   per layer: u32 rk, u32 rv, u64 bits of f64 Cholesky shift;
 *              per group: K then V: f32 sigma[m], down[r][m], up[m][r]
 * Sequence export payload, format 1:
 *   geometry record; u32 dtype; u32 factor fingerprint;
 *   per layer: u32 row_elems, u32 n, i32 positions[n], rows [n][row_elems]
 *   in the storage type (exactly as held: export -> import is lossless).
 */
#include <string.h>

#include "lowrank.h"

/* ---- fingerprint ---------------------------------------------------------------- */

static uint32_t fnv1a(uint32_t h, const void *p, size_t n)
{
    const uint8_t *b = p;
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * 16777619u;
    return h;
}

void lr_fingerprint(kvc_instance *in)
{
    uint32_t h = 2166136261u;
    const size_t m = in->m;
    for (uint32_t l = 0; l < in->g.n_layers; l++) {
        const lr_layer *L = &in->layers[l];
        h = fnv1a(h, &L->rk, sizeof L->rk);
        h = fnv1a(h, &L->rv, sizeof L->rv);
        for (uint32_t g = 0; g < in->n_groups && L->k; g++) {
            h = fnv1a(h, L->k[g].down, (size_t)L->rk * m * sizeof(float));
            h = fnv1a(h, L->v[g].down, (size_t)L->rv * m * sizeof(float));
            h = fnv1a(h, L->k[g].up, (size_t)L->rk * m * sizeof(float));
            h = fnv1a(h, L->v[g].up, (size_t)L->rv * m * sizeof(float));
        }
    }
    h = fnv1a(h, &in->cfg.key_space, sizeof in->cfg.key_space);
    in->fingerprint = h;
}

static void w_f64(kvcp_writer *w, double v)
{
    uint64_t u;
    memcpy(&u, &v, 8);
    kvcp_w_u64(w, u);
}

static double r_f64(kvcp_reader *r)
{
    uint64_t u = kvcp_r_u64(r);
    double v;
    memcpy(&v, &u, 8);
    return v;
}

static void w_floats(kvcp_writer *w, const float *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        kvcp_w_f32(w, p[i]);
}

/* ---- artifact ----------------------------------------------------------------------- */

static void write_artifact(void *ctx, kvcp_writer *w)
{
    const kvc_instance *in = ctx;
    const lr_config *c = &in->cfg;
    const size_t m = in->m;
    kvcp_geom_write(w, &in->g);
    kvcp_w_u32(w, (uint32_t)in->meth->factor);
    kvcp_w_u32(w, (uint32_t)c->dtype);
    kvcp_w_u32(w, (uint32_t)c->alloc);
    kvcp_w_u32(w, (uint32_t)c->key_space);
    kvcp_w_u32(w, (uint32_t)c->refit);
    kvcp_w_u32(w, c->group_heads);
    kvcp_w_u32(w, c->rank_k);
    kvcp_w_u32(w, c->rank_v);
    w_f64(w, c->kv_ratio);
    w_f64(w, c->spread);
    kvcp_w_u64(w, in->calib_rows);
    kvcp_w_u64(w, in->ref_rows);
    size_t nl = strnlen(c->note, sizeof c->note);
    kvcp_w_u32(w, (uint32_t)nl);
    kvcp_w_bytes(w, c->note, nl);
    for (uint32_t l = 0; l < in->g.n_layers; l++) {
        const lr_layer *L = &in->layers[l];
        kvcp_w_u32(w, L->rk);
        kvcp_w_u32(w, L->rv);
        w_f64(w, L->shift_k);
        for (uint32_t g = 0; g < in->n_groups; g++)
            for (int kv = 0; kv < 2; kv++) {
                const lr_factor *f = kv ? &L->v[g] : &L->k[g];
                w_floats(w, f->sigma, m);
                w_floats(w, f->down, (size_t)f->r * m);
                w_floats(w, f->up, (size_t)f->r * m);
            }
    }
}

kvc_status lr_save(kvc_instance *in, void *buf, size_t buf_size, size_t *size)
{
    if (!in)
        return KVC_E_INVALID;
    if (!in->ready)
        return kvcp_fail(in->msg, sizeof in->msg, KVC_E_STATE,
                         "save: not ready (feed every layer and finalize first)");
    return kvcp_blob_write(write_artifact, in, KVCP_BLOB_ARTIFACT, LR_ARTIFACT_VERSION,
                           in->meth->id, buf, buf_size, size, "save", in->msg, sizeof in->msg);
}

static const char *const SET_NAMES[LR_SET_N] = {"dtype", "alloc", "key_space", "refit",
                                                "kv_ratio", "rank_k", "rank_v", "spread"};

/* Reads floats into dst, refusing non-finite values. */
static int r_floats(kvcp_reader *r, float *dst, size_t n)
{
    for (size_t i = 0; i < n; i++)
        dst[i] = kvcp_r_f32(r);
    return !r->err && kvck_all_finite(dst, n);
}

kvc_status lr_load_artifact(kvc_instance *in, const void *blob, size_t size,
                            const lr_config *asked, const uint8_t *cfg_set, char *msg, size_t cap)
{
    kvcp_reader r;
    uint32_t version;
    kvc_status st = kvcp_blob_open(blob, size, KVCP_BLOB_ARTIFACT, LR_ARTIFACT_VERSION,
                                   in->meth->id, &r, &version, msg, cap);
    if (st)
        return st;
    if ((st = kvcp_geom_read_check(&r, &in->g, msg, cap)))
        return st;
    lr_config c = *asked;
    uint32_t factor = kvcp_r_u32(&r);
    c.dtype = (int)kvcp_r_u32(&r);
    c.alloc = (int)kvcp_r_u32(&r);
    c.key_space = (int)kvcp_r_u32(&r);
    c.refit = (int)kvcp_r_u32(&r);
    c.group_heads = kvcp_r_u32(&r);
    c.rank_k = kvcp_r_u32(&r);
    c.rank_v = kvcp_r_u32(&r);
    c.kv_ratio = r_f64(&r);
    c.spread = r_f64(&r);
    uint64_t rows = kvcp_r_u64(&r), ref_rows = kvcp_r_u64(&r);
    uint32_t nl = kvcp_r_u32(&r);
    const char *note = nl < LR_NOTE_MAX ? kvcp_r_view(&r, nl) : NULL;
    if (r.err || !note)
        return kvcp_fail(msg, cap, KVC_E_CORRUPT, "artifact ends inside its configuration");
    if (factor != (uint32_t)in->meth->factor || c.dtype > LR_F16 || c.alloc > LR_PROGRESSIVE ||
        c.key_space > LR_POST_ROPE || c.refit > 1 || c.group_heads != asked->group_heads)
        return kvcp_fail(msg, cap, KVC_E_CORRUPT,
                         "artifact configuration is not one this plugin writes (method %u, "
                         "dtype %d, alloc %d, keys %d, refit %d, group_heads %u)",
                         factor, c.dtype, c.alloc, c.key_space, c.refit, c.group_heads);
    /* Options the host set must agree with what the factors were made for. */
    const double a_num[LR_SET_N] = {asked->dtype, asked->alloc, asked->key_space, asked->refit,
                                    asked->kv_ratio, asked->rank_k, asked->rank_v, asked->spread};
    const double c_num[LR_SET_N] = {c.dtype, c.alloc, c.key_space, c.refit,
                                    c.kv_ratio, c.rank_k, c.rank_v, c.spread};
    for (int i = 0; i < LR_SET_N; i++)
        if (cfg_set[i] && a_num[i] != c_num[i])
            return kvcp_fail(msg, cap, KVC_E_INVALID,
                             "the artifact was prepared with %s=%g, this create asks %s=%g: "
                             "prepare an artifact for these options (or drop the option)",
                             SET_NAMES[i], c_num[i], SET_NAMES[i], a_num[i]);
    memcpy(c.note, note, nl);
    c.note[nl] = 0;
    in->cfg = c;
    in->elem = c.dtype == LR_F16 ? 2 : 4;
    in->calib_rows = rows;
    in->ref_rows = ref_rows;
    const size_t m = in->m;
    for (uint32_t l = 0; l < in->g.n_layers; l++) {
        lr_layer *L = &in->layers[l];
        uint32_t rk = kvcp_r_u32(&r), rv = kvcp_r_u32(&r);
        double shift = r_f64(&r);
        if (r.err)
            return kvcp_fail(msg, cap, KVC_E_CORRUPT, "artifact ends at layer %u", l);
        if (rk < 1 || rk > m || rv < 1 || rv > m)
            return kvcp_fail(msg, cap, KVC_E_CORRUPT,
                             "artifact layer %u has ranks %u/%u outside [1, %zu]", l, rk, rv, m);
        size_t need = (size_t)in->n_groups * (2 * m + 2 * ((size_t)rk + rv) * m) * 4;
        if (need > r.size - r.pos)
            return kvcp_fail(msg, cap, KVC_E_CORRUPT,
                             "artifact ends inside layer %u's factors", l);
        if ((st = lr_factors_alloc(in, L, rk, rv)))
            return kvcp_fail(msg, cap, st, "out of memory for layer %u's factors", l);
        L->rk = rk;
        L->rv = rv;
        L->row_elems = in->n_groups * (rk + rv);
        L->shift_k = shift;
        for (uint32_t g = 0; g < in->n_groups; g++)
            for (int kv = 0; kv < 2; kv++) {
                lr_factor *f = kv ? &L->v[g] : &L->k[g];
                if (!r_floats(&r, f->sigma, m) || !r_floats(&r, f->down, (size_t)f->r * m) ||
                    !r_floats(&r, f->up, (size_t)f->r * m))
                    return kvcp_fail(msg, cap, KVC_E_CORRUPT,
                                     "artifact layer %u group %u: %c factors are cut short or "
                                     "not finite", l, g, kv ? 'V' : 'K');
            }
        L->finalized = 1;
    }
    if (r.pos != r.size)
        return kvcp_fail(msg, cap, KVC_E_CORRUPT, "artifact has %zu unexpected trailing bytes",
                         r.size - r.pos);
    in->ranks_set = 1;
    lr_fingerprint(in);
    return KVC_OK;
}

/* ---- sequence export / import --------------------------------------------------------- */

static void write_payload(void *ctx, kvcp_writer *w)
{
    const kvc_seq *s = ctx;
    const kvc_instance *in = s->inst;
    kvcp_geom_write(w, &in->g);
    kvcp_w_u32(w, (uint32_t)in->cfg.dtype);
    kvcp_w_u32(w, in->fingerprint);
    const uint32_t B = in->cfg.block_tokens;
    for (uint32_t l = 0; l < in->g.n_layers; l++) {
        const kvcp_pages *L = &s->layers[l];
        const size_t row_bytes = (size_t)in->layers[l].row_elems * in->elem;
        kvcp_w_u32(w, in->layers[l].row_elems);
        kvcp_w_u32(w, L->n);
        for (uint32_t t = 0; t < L->n; t++)
            kvcp_w_i32(w, kvcp_block_pos(&L->blocks[t / B], t % B));
        for (uint32_t t = 0; t < L->n; t++)
            kvcp_w_bytes(w, (const char *)L->blocks[t / B].data + (size_t)(t % B) * row_bytes,
                         row_bytes);
    }
}

kvc_status lr_export(kvc_seq *s, void *buf, size_t buf_size, size_t *size)
{
    if (!s)
        return KVC_E_INVALID;
    return kvcp_blob_write(write_payload, s, KVCP_BLOB_SEQUENCE, LR_EXPORT_VERSION,
                           s->inst->meth->id, buf, buf_size, size, "export", s->msg,
                           sizeof s->msg);
}

static kvc_status import_layer(kvc_seq *s, kvcp_reader *r, uint32_t l, kvcp_pages *L,
                               kvcp_page_bytes *cnt)
{
    const kvc_instance *in = s->inst;
    const kvcp_geom *g = &in->g;
    uint32_t e = kvcp_r_u32(r), n = kvcp_r_u32(r);
    if (r->err)
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_CORRUPT, "import: blob ends at layer %u", l);
    if (e != in->layers[l].row_elems)
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_CORRUPT,
                         "import: layer %u rows hold %u latents, this instance %u", l, e,
                         in->layers[l].row_elems);
    if (n == 0)
        return KVC_OK;
    if (n > g->max_positions)
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_CORRUPT,
                         "import: layer %u claims %u tokens, above max_positions %u", l, n,
                         g->max_positions);
    const size_t row_bytes = (size_t)e * in->elem;
    const uint8_t *pos_raw = kvcp_r_view(r, (size_t)n * 4);
    const uint8_t *raw = kvcp_r_view(r, (size_t)n * row_bytes);
    if (r->err)
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_CORRUPT,
                         "import: blob ends inside layer %u's %u tokens", l, n);
    size_t bytes = (size_t)n * sizeof(int32_t) + (size_t)n * e * sizeof(float);
    char *tmp = kvcp_alloc(&in->host, bytes, KVC_USAGE_SCRATCH);
    if (!tmp)
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_NOMEM, "import: out of memory (layer %u)", l);
    int32_t *pos = (int32_t *)tmp;
    float *rows = (float *)(tmp + (size_t)n * sizeof(int32_t)); /* [n][e] */
    kvc_status st = KVC_OK;
    if ((st = kvcp_import_positions(g, pos_raw, n, l, pos, s->msg, sizeof s->msg)))
        goto out;
    if (in->cfg.dtype == LR_F32) {
        memcpy(rows, raw, (size_t)n * row_bytes);
    } else {
        for (size_t i = 0; i < (size_t)n * e; i++) {
            uint16_t h;
            memcpy(&h, raw + 2 * i, 2);
            rows[i] = kvck_f16_to_f32(h);
        }
    }
    if (!kvck_all_finite(rows, (size_t)n * e)) {
        st = kvcp_fail(s->msg, sizeof s->msg, KVC_E_CORRUPT,
                       "import: layer %u holds NaN or Inf latents", l);
        goto out;
    }
    st = lr_store_rows(in, l, L, cnt, n, pos, rows);
    if (st)
        kvcp_fail(s->msg, sizeof s->msg, st, "import: out of memory (layer %u)", l);
out:
    kvcp_free(&in->host, tmp, bytes);
    return st;
}

kvc_status lr_import(kvc_seq *s, const void *blob, size_t size)
{
    if (!s)
        return KVC_E_INVALID;
    const kvc_instance *in = s->inst;
    if (!in->ready)
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_STATE, "import: the instance is not ready");
    kvcp_reader r;
    uint32_t version;
    kvc_status st = kvcp_blob_open(blob, size, KVCP_BLOB_SEQUENCE, LR_EXPORT_VERSION,
                                   in->meth->id, &r, &version, s->msg, sizeof s->msg);
    if (st)
        return st;
    if ((st = kvcp_geom_read_check(&r, &in->g, s->msg, sizeof s->msg)))
        return st;
    uint32_t dtype = kvcp_r_u32(&r), fp = kvcp_r_u32(&r);
    if (r.err)
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_CORRUPT, "import: blob ends before dtype");
    if (dtype != (uint32_t)in->cfg.dtype || fp != in->fingerprint)
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_INVALID,
                         "import: the blob was made with other factors or storage (dtype %u, "
                         "factors %08x; this instance %d, %08x)",
                         dtype, fp, in->cfg.dtype, in->fingerprint);
    const size_t layers_bytes = (size_t)in->g.n_layers * sizeof(kvcp_pages);
    kvcp_pages *fresh = kvcp_alloc(&in->host, layers_bytes, KVC_USAGE_CACHE);
    if (!fresh)
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_NOMEM, "import: out of memory");
    kvcp_page_bytes cnt = {0, 0, 0};
    for (uint32_t l = 0; l < in->g.n_layers; l++)
        fresh[l].last_pos = -1;
    for (uint32_t l = 0; l < in->g.n_layers && !st; l++)
        st = import_layer(s, &r, l, &fresh[l], &cnt);
    if (!st && r.pos != r.size)
        st = kvcp_fail(s->msg, sizeof s->msg, KVC_E_CORRUPT,
                       "import: %zu unexpected bytes after the last layer", r.size - r.pos);
    if (st) {
        lr_layers_release(in, fresh, &cnt);
        kvcp_free(&in->host, fresh, layers_bytes);
        return st;
    }
    lr_layers_release(in, s->layers, &s->bytes);
    kvcp_free(&in->host, s->layers, layers_bytes);
    s->layers = fresh;
    s->bytes = cnt;
    return KVC_OK;
}
