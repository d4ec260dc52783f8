/* Messages, host allocation and geometry checks shared by all plugins. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "kvcp.h"

kvc_status kvcp_fail(char *msg, size_t cap, kvc_status st, const char *fmt, ...)
{
    if (msg && cap > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, cap, fmt, ap);
        va_end(ap);
    }
    return st;
}

kvc_status kvcp_host_copy(kvc_host *dst, const kvc_host *src, char *msg, size_t cap)
{
    if (!src)
        return kvcp_fail(msg, cap, KVC_E_INVALID, "host services are NULL");
    if (src->struct_size < KVCP_V10_SIZE(kvc_host, cuda_stream))
        return kvcp_fail(msg, cap, KVC_E_VERSION,
                         "kvc_host.struct_size %u is below the ABI 1.0 size %zu",
                         (unsigned)src->struct_size, KVCP_V10_SIZE(kvc_host, cuda_stream));
    if (!src->alloc || !src->free)
        return kvcp_fail(msg, cap, KVC_E_INVALID, "kvc_host.alloc and kvc_host.free are required");
    memset(dst, 0, sizeof *dst);
    /* Copy only what the host's struct has; newer fields stay zero. */
    memcpy(dst, src, src->struct_size < sizeof *dst ? src->struct_size : sizeof *dst);
    dst->struct_size = sizeof *dst;
    return KVC_OK;
}

void *kvcp_alloc(const kvc_host *h, size_t size, int32_t usage)
{
    if (size == 0)
        return NULL;
    void *p = h->alloc(h->user_data, size, 64, KVC_MEM_HOST, usage);
    if (p)
        memset(p, 0, size);
    return p;
}

void kvcp_free(const kvc_host *h, void *p, size_t size)
{
    if (p)
        h->free(h->user_data, p, size, KVC_MEM_HOST);
}

void kvcp_log(const kvc_host *h, int32_t level, const char *fmt, ...)
{
    if (!h || !h->log)
        return;
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    h->log(h->user_data, level, buf);
}

kvc_status kvcp_geom_from(const kvc_geometry *g, kvcp_geom *out, char *msg, size_t cap)
{
    if (!g)
        return kvcp_fail(msg, cap, KVC_E_INVALID, "geometry is NULL");
    if (g->struct_size < KVCP_V10_SIZE(kvc_geometry, reserved0))
        return kvcp_fail(msg, cap, KVC_E_VERSION,
                         "kvc_geometry.struct_size %u is below the ABI 1.0 size %zu",
                         (unsigned)g->struct_size, KVCP_V10_SIZE(kvc_geometry, reserved0));
    if (g->n_layers == 0 || g->n_heads == 0 || g->n_kv_heads == 0 || g->head_dim == 0 ||
        g->hidden_size == 0 || g->max_positions == 0)
        return kvcp_fail(msg, cap, KVC_E_INVALID,
                         "geometry has a zero count (layers %u, heads %u, kv_heads %u, "
                         "head_dim %u, hidden %u, max_positions %u)",
                         g->n_layers, g->n_heads, g->n_kv_heads, g->head_dim, g->hidden_size,
                         g->max_positions);
    if (g->n_heads % g->n_kv_heads)
        return kvcp_fail(msg, cap, KVC_E_INVALID,
                         "n_heads %u is not a multiple of n_kv_heads %u", g->n_heads,
                         g->n_kv_heads);
    if (g->head_dim > KVCK_MAX_HEAD_DIM)
        return kvcp_fail(msg, cap, KVC_E_INVALID, "head_dim %u exceeds the supported %u",
                         g->head_dim, (unsigned)KVCK_MAX_HEAD_DIM);
    if (g->max_positions > (uint32_t)INT32_MAX)
        return kvcp_fail(msg, cap, KVC_E_INVALID, "max_positions %u exceeds INT32_MAX",
                         g->max_positions);
    uint32_t n_kv = g->kv_head_count ? g->kv_head_count : g->n_kv_heads;
    if (g->kv_head_first >= g->n_kv_heads || n_kv > g->n_kv_heads - g->kv_head_first)
        return kvcp_fail(msg, cap, KVC_E_INVALID,
                         "KV head shard [%u, %u) is outside the model's %u KV heads",
                         g->kv_head_first, g->kv_head_first + n_kv, g->n_kv_heads);
    if (!isfinite(g->attn_scale) || g->attn_scale < 0)
        return kvcp_fail(msg, cap, KVC_E_INVALID, "attn_scale %g is not a finite value >= 0",
                         (double)g->attn_scale);
    if (!isfinite(g->rope_mscale) || g->rope_mscale < 0)
        return kvcp_fail(msg, cap, KVC_E_INVALID, "rope_mscale %g is not a finite value >= 0",
                         (double)g->rope_mscale);
    if (g->rope_style < KVC_ROPE_NONE || g->rope_style > KVC_ROPE_HALVES)
        return kvcp_fail(msg, cap, KVC_E_INVALID, "rope_style %d is not a KVC_ROPE_* value",
                         (int)g->rope_style);
    uint32_t dims = g->rope_dims ? g->rope_dims : g->head_dim;
    if (g->rope_style != KVC_ROPE_NONE) {
        if (dims > g->head_dim || dims % 2)
            return kvcp_fail(msg, cap, KVC_E_INVALID,
                             "rope_dims %u must be even and at most head_dim %u", dims,
                             g->head_dim);
        if (g->rope_inv_freq) {
            for (uint32_t i = 0; i < dims / 2; i++)
                if (!isfinite(g->rope_inv_freq[i]))
                    return kvcp_fail(msg, cap, KVC_E_INVALID, "rope_inv_freq[%u] is not finite",
                                     i);
        } else if (!isfinite(g->rope_theta) || g->rope_theta <= 0) {
            return kvcp_fail(msg, cap, KVC_E_INVALID, "rope_theta %g must be > 0",
                             (double)g->rope_theta);
        }
    }
    memset(out, 0, sizeof *out);
    out->n_layers = g->n_layers;
    out->n_heads = g->n_heads;
    out->n_kv_heads = g->n_kv_heads;
    out->head_dim = g->head_dim;
    out->hidden_size = g->hidden_size;
    out->max_positions = g->max_positions;
    out->window = g->sliding_window;
    out->kv_first = g->kv_head_first;
    out->n_kv = n_kv;
    out->group = g->n_heads / g->n_kv_heads;
    out->n_q = n_kv * out->group;
    out->rope_style = g->rope_style;
    out->rope_dims = g->rope_style == KVC_ROPE_NONE ? 0 : dims;
    out->rope_theta = g->rope_theta;
    out->rope_mscale = g->rope_mscale;
    out->scale = g->attn_scale > 0 ? g->attn_scale : (float)(1.0 / sqrt((double)g->head_dim));
    if (kvck_rope_init(&out->rope, g->rope_style, (int)g->head_dim, (int)out->rope_dims,
                       g->rope_theta, g->rope_inv_freq, g->rope_mscale) != 0)
        return kvcp_fail(msg, cap, KVC_E_INVALID, "RoPE parameters rejected by the kernel");
    return KVC_OK;
}

kvc_status kvcp_create_common(const kvc_create_info *info, int allow_cuda, kvc_host *host,
                              kvcp_geom *geom, char *msg, size_t cap)
{
    if (!info)
        return kvcp_fail(msg, cap, KVC_E_INVALID, "create_info is NULL");
    if (info->struct_size < KVCP_V10_SIZE(kvc_create_info, reserved0))
        return kvcp_fail(msg, cap, KVC_E_VERSION,
                         "kvc_create_info.struct_size %u is below the ABI 1.0 size %zu",
                         (unsigned)info->struct_size, KVCP_V10_SIZE(kvc_create_info, reserved0));
    kvc_status st = kvcp_host_copy(host, info->host, msg, cap);
    if (st)
        return st;
    st = kvcp_geom_from(info->geometry, geom, msg, cap);
    if (st)
        return st;
    if (info->device != KVC_MEM_HOST && !(allow_cuda && info->device == KVC_MEM_CUDA))
        return kvcp_fail(msg, cap, info->device == KVC_MEM_CUDA ? KVC_E_UNSUPPORTED : KVC_E_INVALID,
                         "device %d is not supported by this plugin (host memory only)",
                         (int)info->device);
    if (info->dtype != KVC_DTYPE_F32 && info->device == KVC_MEM_HOST)
        return kvcp_fail(msg, cap,
                         info->dtype == KVC_DTYPE_F16 || info->dtype == KVC_DTYPE_BF16
                             ? KVC_E_UNSUPPORTED
                             : KVC_E_INVALID,
                         "dtype %d: host tensors are float32 (KVC_DTYPE_F32)", (int)info->dtype);
    if (info->n_options && (!info->option_names || !info->option_values))
        return kvcp_fail(msg, cap, KVC_E_INVALID, "%u options given with NULL name/value arrays",
                         info->n_options);
    return KVC_OK;
}

uint64_t kvcp_fp16_bytes_per_token_layer(const kvcp_geom *g)
{
    return 2ull * g->n_kv * g->head_dim * 2ull;
}

kvc_status kvcp_check_positions(const kvcp_geom *g, const int32_t *positions, uint32_t n,
                                int64_t after, char *msg, size_t cap)
{
    int64_t prev = after;
    for (uint32_t i = 0; i < n; i++) {
        int64_t p = positions[i];
        if (p < 0 || p >= (int64_t)g->max_positions)
            return kvcp_fail(msg, cap, KVC_E_INVALID,
                             "position %lld (token %u) is outside [0, %u)", (long long)p, i,
                             g->max_positions);
        if (p <= prev)
            return kvcp_fail(msg, cap, KVC_E_INVALID,
                             "position %lld (token %u) does not follow %lld: positions must "
                             "strictly increase",
                             (long long)p, i, (long long)prev);
        prev = p;
    }
    return KVC_OK;
}

void kvcp_stats_out(void *out, const void *full, size_t full_size)
{
    uint32_t keep;
    memcpy(&keep, out, sizeof keep); /* every stats struct starts with struct_size */
    memcpy(out, full, keep < full_size ? keep : full_size);
    memcpy(out, &keep, sizeof keep);
}

kvc_status kvcp_check_attend(const kvcp_geom *g, uint32_t layer, uint32_t n_q,
                             const int32_t *positions, const void *q_pre, const void *out,
                             char *msg, size_t cap)
{
    if (layer >= g->n_layers)
        return kvcp_fail(msg, cap, KVC_E_INVALID, "attend: layer %u >= n_layers %u", layer,
                         g->n_layers);
    if (n_q == 0 || n_q > g->max_positions)
        return kvcp_fail(msg, cap, KVC_E_INVALID,
                         "attend: query count %u is not in [1, max_positions %u]", n_q,
                         g->max_positions);
    if (!positions || !q_pre || !out)
        return kvcp_fail(msg, cap, KVC_E_INVALID,
                         "attend: positions, q_pre and out must not be NULL");
    for (uint32_t i = 0; i < n_q; i++)
        if (positions[i] < 0 || (uint32_t)positions[i] >= g->max_positions)
            return kvcp_fail(msg, cap, KVC_E_INVALID,
                             "attend: query position %d (query %u) is outside [0, %u)",
                             (int)positions[i], i, g->max_positions);
    if (!kvck_all_finite(q_pre, (size_t)n_q * g->n_q * g->head_dim))
        return kvcp_fail(msg, cap, KVC_E_INVALID, "attend: q_pre holds NaN or Inf (layer %u)",
                         layer);
    return KVC_OK;
}

int kvcp_seqlist_init(kvcp_seqlist *l)
{
    l->head = NULL;
    return pthread_mutex_init(&l->lock, NULL) ? -1 : 0;
}

void kvcp_seqlist_destroy(kvcp_seqlist *l)
{
    pthread_mutex_destroy(&l->lock);
}

void kvcp_seqlist_add(kvcp_seqlist *l, kvcp_link *x)
{
    pthread_mutex_lock(&l->lock);
    x->prev = NULL;
    x->next = l->head;
    if (l->head)
        l->head->prev = x;
    l->head = x;
    pthread_mutex_unlock(&l->lock);
}

void kvcp_seqlist_remove(kvcp_seqlist *l, kvcp_link *x)
{
    pthread_mutex_lock(&l->lock);
    if (x->prev)
        x->prev->next = x->next;
    else
        l->head = x->next;
    if (x->next)
        x->next->prev = x->prev;
    pthread_mutex_unlock(&l->lock);
}

kvcp_link *kvcp_seqlist_pop(kvcp_seqlist *l)
{
    kvcp_link *x = l->head;
    if (x) {
        l->head = x->next;
        if (l->head)
            l->head->prev = NULL;
    }
    return x;
}

kvc_status kvcp_batch_check(const kvc_instance *in, uint32_t layer, uint32_t n_items,
                            const kvc_attend_item *const *items, const kvcp_batch_ops *ops,
                            uint32_t *max_q)
{
    if (!in || (n_items && !items))
        return KVC_E_INVALID;
    uint32_t mq = 0;
    for (uint32_t i = 0; i < n_items; i++) {
        const kvc_attend_item *it = items[i];
        if (!it || it->struct_size < KVCP_V10_SIZE(kvc_attend_item, out) || !it->seq)
            return KVC_E_INVALID; /* no sequence to carry a message */
        kvc_seq *s = it->seq;
        if (ops->inst(s) != in)
            return kvcp_fail(ops->msg(s), KVCP_MSG_SIZE, KVC_E_INVALID,
                             "attend_batch: item %u's sequence belongs to another instance", i);
        for (uint32_t j = 0; j < i; j++)
            if (items[j]->seq == s)
                return kvcp_fail(ops->msg(s), KVCP_MSG_SIZE, KVC_E_INVALID,
                                 "attend_batch: items %u and %u name the same sequence", j, i);
        kvc_status st = ops->check(s, layer, it->n_q, it->positions, it->q_pre, it->out);
        if (st)
            return st;
        mq = it->n_q > mq ? it->n_q : mq;
    }
    *max_q = mq;
    return KVC_OK;
}

kvc_status kvcp_check_append(const kvcp_geom *g, uint32_t layer, uint32_t n,
                             const int32_t *positions, const void *k_pre, const void *v,
                             int64_t last_pos, char *msg, size_t cap)
{
    if (layer >= g->n_layers)
        return kvcp_fail(msg, cap, KVC_E_INVALID, "append: layer %u >= n_layers %u", layer,
                         g->n_layers);
    if (n == 0 || n > g->max_positions)
        return kvcp_fail(msg, cap, KVC_E_INVALID,
                         "append: token count %u is not in [1, max_positions %u]", n,
                         g->max_positions);
    if (!positions || !k_pre || !v)
        return kvcp_fail(msg, cap, KVC_E_INVALID,
                         "append: positions, k_pre and v must not be NULL");
    kvc_status st = kvcp_check_positions(g, positions, n, last_pos, msg, cap);
    if (st)
        return st;
    size_t count = (size_t)n * g->n_kv * g->head_dim;
    if (!kvck_all_finite(k_pre, count) || !kvck_all_finite(v, count))
        return kvcp_fail(msg, cap, KVC_E_INVALID,
                         "append: k_pre or v holds NaN or Inf (layer %u)", layer);
    return KVC_OK;
}

void kvcp_seqlist_drain(kvcp_seqlist *l, void (*free_seq)(kvcp_link *), const kvc_host *h,
                        const char *plugin_id)
{
    unsigned left = 0;
    for (kvcp_link *x; (x = kvcp_seqlist_pop(l)); left++)
        free_seq(x);
    if (left)
        kvcp_log(h, KVC_LOG_WARN, "%s: destroy freed %u sequence(s) left open", plugin_id, left);
    kvcp_seqlist_destroy(l);
}

kvc_status kvcp_instance_stats_out(kvc_instance_stats *out, uint64_t bytes_params,
                                   uint64_t bytes_fixed, double kv_ratio, uint64_t overhead,
                                   uint64_t caps)
{
    if (!out)
        return KVC_E_INVALID;
    if (out->struct_size < KVCP_V10_SIZE(kvc_instance_stats, seq_overhead_bytes))
        return KVC_E_VERSION;
    kvc_instance_stats st = {0};
    st.bytes_params = bytes_params;
    st.bytes_fixed = bytes_fixed;
    st.kv_ratio = kv_ratio;
    st.seq_overhead_bytes = overhead;
    st.caps = caps;
    kvcp_stats_out(out, &st, sizeof st);
    return KVC_OK;
}

kvc_status kvcp_check_materialize(const kvcp_geom *g, uint32_t layer, const kvc_materialized *out,
                                  char *msg, size_t cap)
{
    if (!out || out->struct_size < KVCP_V10_SIZE(kvc_materialized, v) || !out->n_tokens)
        return kvcp_fail(msg, cap, KVC_E_INVALID,
                         "materialize: out is NULL, too small, or has no n_tokens array");
    if (layer >= g->n_layers)
        return kvcp_fail(msg, cap, KVC_E_INVALID, "materialize: layer %u >= n_layers %u", layer,
                         g->n_layers);
    return KVC_OK;
}

kvc_status kvcp_instance_alloc(const kvc_host *h, size_t size, size_t seqs_offset, void **out,
                               char *msg, size_t cap)
{
    char *in = kvcp_alloc(h, size, KVC_USAGE_INSTANCE);
    if (!in)
        return kvcp_fail(msg, cap, KVC_E_NOMEM, "out of memory for the instance");
    if (kvcp_seqlist_init((kvcp_seqlist *)(in + seqs_offset))) {
        kvcp_free(h, in, size);
        return kvcp_fail(msg, cap, KVC_E_INTERNAL, "pthread_mutex_init failed");
    }
    *out = in;
    return KVC_OK;
}
