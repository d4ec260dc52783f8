/* Framing of serialized blobs: magic, kind, version, checksums, and the
 * geometry record, so foreign or damaged data is refused by name. */
#include <string.h>
#include <zlib.h>

#include "kvcp.h"

static const char blob_magic[4] = {'K', 'V', 'C', '1'};

void kvcp_w_init(kvcp_writer *w, void *buf, size_t cap)
{
    w->buf = buf;
    w->cap = buf ? cap : 0;
    w->pos = 0;
    w->overflow = 0;
}

void kvcp_w_bytes(kvcp_writer *w, const void *p, size_t n)
{
    if (w->buf) {
        if (w->pos > w->cap || n > w->cap - w->pos) {
            w->overflow = 1;
        } else if (n) {
            memcpy(w->buf + w->pos, p, n);
        }
    }
    w->pos += n;
}

void kvcp_w_u32(kvcp_writer *w, uint32_t v)
{
    uint8_t b[4] = {(uint8_t)v, (uint8_t)(v >> 8), (uint8_t)(v >> 16), (uint8_t)(v >> 24)};
    kvcp_w_bytes(w, b, 4);
}

void kvcp_w_i32(kvcp_writer *w, int32_t v) { kvcp_w_u32(w, (uint32_t)v); }

void kvcp_w_u64(kvcp_writer *w, uint64_t v)
{
    kvcp_w_u32(w, (uint32_t)v);
    kvcp_w_u32(w, (uint32_t)(v >> 32));
}

void kvcp_w_f32(kvcp_writer *w, float v)
{
    uint32_t u;
    memcpy(&u, &v, 4);
    kvcp_w_u32(w, u);
}

void kvcp_r_init(kvcp_reader *r, const void *p, size_t size)
{
    r->p = p;
    r->size = size;
    r->pos = 0;
    r->err = 0;
}

const void *kvcp_r_view(kvcp_reader *r, size_t n)
{
    if (r->err || n > r->size - r->pos) {
        r->err = 1;
        return NULL;
    }
    const void *p = r->p + r->pos;
    r->pos += n;
    return p;
}

uint32_t kvcp_r_u32(kvcp_reader *r)
{
    const uint8_t *b = kvcp_r_view(r, 4);
    if (!b)
        return 0;
    return (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
}

int32_t kvcp_r_i32(kvcp_reader *r) { return (int32_t)kvcp_r_u32(r); }

uint64_t kvcp_r_u64(kvcp_reader *r)
{
    uint64_t lo = kvcp_r_u32(r);
    uint64_t hi = kvcp_r_u32(r);
    return lo | hi << 32;
}

float kvcp_r_f32(kvcp_reader *r)
{
    uint32_t u = kvcp_r_u32(r);
    float v;
    memcpy(&v, &u, 4);
    return v;
}

/* zlib's crc32 takes uInt lengths; feed large buffers in pieces. */
static uint32_t crc32_of(const uint8_t *p, uint64_t n)
{
    uLong c = crc32(0L, Z_NULL, 0);
    while (n) {
        uInt piece = n > (1u << 30) ? (1u << 30) : (uInt)n;
        c = crc32(c, p, piece);
        p += piece;
        n -= piece;
    }
    return (uint32_t)c;
}

void kvcp_blob_seal(void *blob, uint32_t kind, uint32_t version, const char *plugin_id,
                    uint64_t payload_size)
{
    uint8_t *b = blob;
    kvcp_writer w;
    kvcp_w_init(&w, b, KVCP_BLOB_HEADER);
    kvcp_w_bytes(&w, blob_magic, 4);
    kvcp_w_u32(&w, kind);
    kvcp_w_u32(&w, version);
    kvcp_w_u32(&w, crc32_of(b + KVCP_BLOB_HEADER, payload_size));
    kvcp_w_u64(&w, payload_size);
    char id[16] = {0};
    strncpy(id, plugin_id, sizeof id - 1);
    kvcp_w_bytes(&w, id, sizeof id);
    kvcp_w_u32(&w, 0);
    kvcp_w_u32(&w, crc32_of(b, 44));
}

static const char *kind_name(uint32_t kind)
{
    return kind == KVCP_BLOB_ARTIFACT ? "an artifact"
           : kind == KVCP_BLOB_SEQUENCE ? "a sequence export"
                                        : "an unknown kind of blob";
}

kvc_status kvcp_blob_open(const void *blob, size_t size, uint32_t kind, uint32_t max_version,
                          const char *plugin_id, kvcp_reader *payload, uint32_t *version,
                          char *msg, size_t cap)
{
    if (!blob)
        return kvcp_fail(msg, cap, KVC_E_INVALID, "blob pointer is NULL");
    const uint8_t *b = blob;
    if (size < KVCP_BLOB_HEADER)
        return kvcp_fail(msg, cap, KVC_E_CORRUPT,
                         "blob of %zu bytes is shorter than its %u-byte header", size,
                         KVCP_BLOB_HEADER);
    if (memcmp(b, blob_magic, 4))
        return kvcp_fail(msg, cap, KVC_E_CORRUPT, "not a kvc blob (bad magic)");
    kvcp_reader r;
    kvcp_r_init(&r, b, KVCP_BLOB_HEADER);
    kvcp_r_view(&r, 4);
    uint32_t got_kind = kvcp_r_u32(&r);
    uint32_t got_version = kvcp_r_u32(&r);
    uint32_t payload_crc = kvcp_r_u32(&r);
    uint64_t payload_size = kvcp_r_u64(&r);
    char id[17] = {0};
    memcpy(id, kvcp_r_view(&r, 16), 16);
    kvcp_r_u32(&r);
    uint32_t header_crc = kvcp_r_u32(&r);
    if (header_crc != crc32_of(b, 44))
        return kvcp_fail(msg, cap, KVC_E_CORRUPT, "blob header checksum mismatch (damaged)");
    if (got_kind != kind)
        return kvcp_fail(msg, cap, KVC_E_INVALID, "blob is %s, expected %s",
                         kind_name(got_kind), kind_name(kind));
    if (strncmp(id, plugin_id, 16))
        return kvcp_fail(msg, cap, KVC_E_INVALID, "blob was made by plugin '%s', not '%s'", id,
                         plugin_id);
    if (got_version == 0 || got_version > max_version)
        return kvcp_fail(msg, cap, KVC_E_VERSION,
                         "blob format version %u; this plugin reads versions 1 to %u",
                         got_version, max_version);
    if (payload_size != size - KVCP_BLOB_HEADER)
        return kvcp_fail(msg, cap, KVC_E_CORRUPT,
                         "blob is truncated or padded: header says %llu payload bytes, got %zu",
                         (unsigned long long)payload_size, size - KVCP_BLOB_HEADER);
    if (crc32_of(b + KVCP_BLOB_HEADER, payload_size) != payload_crc)
        return kvcp_fail(msg, cap, KVC_E_CORRUPT, "blob payload checksum mismatch (damaged)");
    kvcp_r_init(payload, b + KVCP_BLOB_HEADER, (size_t)payload_size);
    *version = got_version;
    return KVC_OK;
}

void kvcp_geom_write(kvcp_writer *w, const kvcp_geom *g)
{
    kvcp_w_u32(w, g->n_layers);
    kvcp_w_u32(w, g->n_heads);
    kvcp_w_u32(w, g->n_kv_heads);
    kvcp_w_u32(w, g->head_dim);
    kvcp_w_u32(w, g->hidden_size);
    kvcp_w_u32(w, g->kv_first);
    kvcp_w_u32(w, g->n_kv);
    kvcp_w_i32(w, g->rope_style);
    kvcp_w_u32(w, g->rope_dims);
    for (int i = 0; i < (int)g->rope_dims / 2; i++)
        kvcp_w_f32(w, g->rope.inv_freq[i]);
    kvcp_w_f32(w, g->rope.mscale);
}

kvc_status kvcp_geom_read_check(kvcp_reader *r, const kvcp_geom *g, char *msg, size_t cap)
{
    uint32_t v[7];
    for (int i = 0; i < 7; i++)
        v[i] = kvcp_r_u32(r);
    int32_t style = kvcp_r_i32(r);
    uint32_t dims = kvcp_r_u32(r);
    if (r->err)
        return kvcp_fail(msg, cap, KVC_E_CORRUPT, "blob ends inside its geometry record");
    if (v[0] != g->n_layers || v[1] != g->n_heads || v[2] != g->n_kv_heads ||
        v[3] != g->head_dim || v[4] != g->hidden_size || v[5] != g->kv_first ||
        v[6] != g->n_kv)
        return kvcp_fail(msg, cap, KVC_E_INVALID,
                         "blob was made for layers %u, heads %u/%u, head_dim %u, hidden %u, "
                         "shard %u+%u; this instance has %u, %u/%u, %u, %u, %u+%u",
                         v[0], v[1], v[2], v[3], v[4], v[5], v[6], g->n_layers, g->n_heads,
                         g->n_kv_heads, g->head_dim, g->hidden_size, g->kv_first, g->n_kv);
    if (style != g->rope_style || dims != g->rope_dims)
        return kvcp_fail(msg, cap, KVC_E_INVALID,
                         "blob was made for RoPE style %d over %u dims; this instance has %d "
                         "over %u",
                         (int)style, dims, (int)g->rope_style, g->rope_dims);
    for (uint32_t i = 0; i < dims / 2; i++) {
        float f = kvcp_r_f32(r);
        if (!r->err && memcmp(&f, &g->rope.inv_freq[i], sizeof f))
            return kvcp_fail(msg, cap, KVC_E_INVALID,
                             "blob was made for other RoPE frequencies (pair %u)", i);
    }
    float ms = kvcp_r_f32(r);
    if (r->err)
        return kvcp_fail(msg, cap, KVC_E_CORRUPT, "blob ends inside its geometry record");
    if (memcmp(&ms, &g->rope.mscale, sizeof ms))
        return kvcp_fail(msg, cap, KVC_E_INVALID, "blob was made for another RoPE mscale");
    return KVC_OK;
}

kvc_status kvcp_blob_write(void (*payload)(void *ctx, kvcp_writer *w), void *ctx, uint32_t kind,
                           uint32_t version, const char *plugin_id, void *buf, size_t buf_size,
                           size_t *size, const char *what, char *msg, size_t cap)
{
    if (!size)
        return kvcp_fail(msg, cap, KVC_E_INVALID, "%s: size pointer is NULL", what);
    kvcp_writer w;
    kvcp_w_init(&w, NULL, 0);
    payload(ctx, &w);
    size_t total = KVCP_BLOB_HEADER + w.pos;
    if (!buf) {
        *size = total;
        return KVC_OK;
    }
    if (buf_size < total) {
        *size = total;
        return kvcp_fail(msg, cap, KVC_E_BUFFER, "%s: buffer of %zu bytes, %zu needed", what,
                         buf_size, total);
    }
    kvcp_w_init(&w, (uint8_t *)buf + KVCP_BLOB_HEADER, buf_size - KVCP_BLOB_HEADER);
    payload(ctx, &w);
    if (w.overflow)
        return kvcp_fail(msg, cap, KVC_E_INTERNAL, "%s: size changed while writing", what);
    kvcp_blob_seal(buf, kind, version, plugin_id, w.pos);
    *size = total;
    return KVC_OK;
}

kvc_status kvcp_import_positions(const kvcp_geom *g, const uint8_t *raw, uint32_t n,
                                 uint32_t layer, int32_t *pos, char *msg, size_t cap)
{
    for (uint32_t t = 0; t < n; t++) {
        kvcp_reader pr;
        kvcp_r_init(&pr, raw + (size_t)t * 4, 4);
        pos[t] = kvcp_r_i32(&pr);
    }
    char why[KVCP_MSG_SIZE];
    if (kvcp_check_positions(g, pos, n, -1, why, sizeof why))
        return kvcp_fail(msg, cap, KVC_E_CORRUPT, "import: layer %u: %s", layer, why);
    return KVC_OK;
}
