/*
 * kvc-kvquant.so artifacts and sequence blobs. Artifact payload (format 1,
 * little-endian):
 *   geometry record (kvcp_geom_write)
 *   u32 block_tokens, u32 group (what the statistics were gathered with)
 *   u32 note length, note bytes
 *   per layer: u64 rows, u64 blocks, then float32 q_energy [n_kv*d],
 *     k_range2 [n_kv*d], k_min [n_kv*d], k_max [n_kv*d], k_hist [512],
 *     v_hist [512]
 * It holds statistics, not formats, so one artifact serves every k_bits,
 * v_bits, alloc, levels and raw_keys setting. Sequence export payload:
 * geometry record, then the store's (kvcp_qss_write).
 */
#include <math.h>
#include <string.h>

#include "kvquant.h"

static void w_floats(kvcp_writer *w, const float *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        kvcp_w_f32(w, p[i]);
}

static int r_floats(kvcp_reader *r, float *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        p[i] = kvcp_r_f32(r);
        if (!isfinite(p[i]))
            return -1;
    }
    return r->err ? -1 : 0;
}

static void write_artifact(void *ctx, kvcp_writer *w)
{
    const kvc_instance *in = ctx;
    const kvcp_geom *g = &in->g;
    const size_t hd = (size_t)g->n_kv * g->head_dim;
    kvcp_geom_write(w, g);
    kvcp_w_u32(w, in->cfg.block);
    kvcp_w_u32(w, in->cfg.group);
    const uint32_t nl = (uint32_t)strlen(in->cfg.note);
    kvcp_w_u32(w, nl);
    kvcp_w_bytes(w, in->cfg.note, nl);
    for (uint32_t l = 0; l < g->n_layers; l++) {
        const kq_stats *s = &in->stats[l];
        kvcp_w_u64(w, s->rows);
        kvcp_w_u64(w, s->blocks);
        w_floats(w, s->q_energy, hd);
        w_floats(w, s->k_range2, hd);
        w_floats(w, s->k_min, hd);
        w_floats(w, s->k_max, hd);
        w_floats(w, s->k_hist, KQ_HIST);
        w_floats(w, s->v_hist, KQ_HIST);
    }
}

kvc_status kq_save(kvc_instance *in, void *buf, size_t buf_size, size_t *size)
{
    if (!size)
        return kvcp_fail(in->msg, sizeof in->msg, KVC_E_INVALID, "save: size pointer is NULL");
    for (uint32_t l = 0; l < in->g.n_layers; l++)
        if (!in->finalized[l])
            return kvcp_fail(in->msg, sizeof in->msg, KVC_E_STATE,
                             "save: layer %u is not finalized (prepare and finalize first)", l);
    return kvcp_blob_write(write_artifact, in, KVCP_BLOB_ARTIFACT, KQ_ARTIFACT_VERSION, KQ_ID, buf,
                           buf_size, size, "save", in->msg, sizeof in->msg);
}

kvc_status kq_load(kvc_instance *in, const void *blob, size_t size, char *msg, size_t cap)
{
    kvcp_reader r;
    uint32_t version;
    kvc_status st = kvcp_blob_open(blob, size, KVCP_BLOB_ARTIFACT, KQ_ARTIFACT_VERSION, KQ_ID,
                                   &r, &version, msg, cap);
    if (st)
        return st;
    if ((st = kvcp_geom_read_check(&r, &in->g, msg, cap)))
        return st;
    const kvcp_geom *g = &in->g;
    const size_t hd = (size_t)g->n_kv * g->head_dim;
    const uint32_t block = kvcp_r_u32(&r), group = kvcp_r_u32(&r), nl = kvcp_r_u32(&r);
    const char *note = nl < KQ_NOTE_MAX ? kvcp_r_view(&r, nl) : NULL;
    if (r.err || !note || block < 2 || block > 256 || group == 0)
        return kvcp_fail(msg, cap, KVC_E_CORRUPT,
                         "artifact ends inside or damages its header (block %u, group %u, note %u "
                         "bytes)",
                         block, group, nl);
    memcpy(in->cfg.note, note, nl);
    in->cfg.note[nl] = 0;
    for (uint32_t l = 0; l < g->n_layers; l++) {
        kq_stats *s = &in->stats[l];
        s->rows = kvcp_r_u64(&r);
        s->blocks = kvcp_r_u64(&r);
        if (r.err || !s->rows || !s->blocks ||
            r_floats(&r, s->q_energy, hd) || r_floats(&r, s->k_range2, hd) ||
            r_floats(&r, s->k_min, hd) || r_floats(&r, s->k_max, hd) ||
            r_floats(&r, s->k_hist, KQ_HIST) || r_floats(&r, s->v_hist, KQ_HIST))
            return kvcp_fail(msg, cap, KVC_E_CORRUPT,
                             "artifact layer %u: statistics cut short or not finite", l);
        for (size_t i = 0; i < hd; i++)
            if (s->q_energy[i] < 0 || s->k_range2[i] < 0 || s->k_min[i] > s->k_max[i])
                return kvcp_fail(msg, cap, KVC_E_CORRUPT,
                                 "artifact layer %u: channel %zu statistics are impossible", l, i);
        in->finalized[l] = 1;
    }
    if (r.pos != r.size)
        return kvcp_fail(msg, cap, KVC_E_CORRUPT, "artifact has %zu unexpected trailing bytes",
                         r.size - r.pos);
    in->from_artifact = 1;
    return KVC_OK;
}

/* ---- sequence blobs ---------------------------------------------------------------- */

static void write_payload(void *ctx, kvcp_writer *w)
{
    const kvc_seq *s = ctx;
    const kvc_instance *in = s->inst;
    kvcp_geom_write(w, &in->g);
    kvcp_qss_write(&in->qs, &s->q, w);
}

kvc_status kq_export(kvc_seq *s, void *buf, size_t buf_size, size_t *size)
{
    if (!s)
        return KVC_E_INVALID;
    if (!s->inst->ready || !s->q.layers)
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_STATE,
                         "export: the sequence holds nothing yet (kvquant is not prepared, or "
                         "nothing was appended since it was)");
    return kvcp_blob_write(write_payload, s, KVCP_BLOB_SEQUENCE, KQ_EXPORT_VERSION, KQ_ID, buf,
                           buf_size, size, "export", s->msg, sizeof s->msg);
}

kvc_status kq_import(kvc_seq *s, const void *blob, size_t size)
{
    if (!s)
        return KVC_E_INVALID;
    kvc_instance *in = s->inst;
    if (!in->ready)
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_STATE,
                         "import: kvquant is not prepared (finalize, or create from an artifact)");
    kvcp_reader r;
    uint32_t version;
    kvc_status st = kvcp_blob_open(blob, size, KVCP_BLOB_SEQUENCE, KQ_EXPORT_VERSION, KQ_ID, &r,
                                   &version, s->msg, sizeof s->msg);
    if (st)
        return st;
    if ((st = kvcp_geom_read_check(&r, &in->g, s->msg, sizeof s->msg)))
        return st;
    if (!s->q.layers && kvcp_qss_init(&in->qs, &s->q))
        return kvcp_fail(s->msg, sizeof s->msg, KVC_E_NOMEM, "import: out of memory");
    return kvcp_qss_read(&in->qs, &s->q, &r, s->msg);
}
