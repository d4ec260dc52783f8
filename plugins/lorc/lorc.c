/*
 * kvc-lorc.so: LoRC (Zhang et al., arXiv 2410.03111), low-rank compression
 * of the KV cache from the K/V projection weights alone.
 *
 * Per layer, plain SVD of the shard's W_k and W_v (one group = all the
 * layer's KV heads): W = U S V^T, the cache holds h = U_r^T k (r numbers per
 * token), attention reconstructs k^ = U_r h before RoPE and attends values
 * in latent space (plugins/common/lowrank.h). Needs weights only, so an
 * artifact is made from the model file alone.
 *
 * Progressive ranks (default; alloc=uniform to compare): the rule as read
 * from the paper, with kappa_j = s_max/s_min of layer j's W (K and V
 * separately) and the cumulative log condition number
 *   c_l = sum_{j=l}^{L-1} log kappa_j,   s_l = (c_l - min c)/(max c - min c),
 *   r_l = clamp(round(m (a + spread s_l)), 1, m),
 * `a` the largest offset whose ranks fit the budget (sum of the uniform
 * ranks kv_ratio gives), leftovers to the shallowest layers. Shallow
 * layers, whose errors every later layer amplifies, keep more rank.
 */
#include "lowrank.h"

static const kvc_option_desc opt_alloc = {
    sizeof(kvc_option_desc), KVC_OPT_ENUM, "alloc", "progressive", "progressive|uniform", 0, 0,
    "Rank per layer: progressive (LoRC: from cumulative condition numbers, shallow layers keep "
    "more) or uniform."};

static const kvc_option_desc *const lorc_options[] = {
    &lr_opt_kv_ratio, &lr_opt_rank_k, &lr_opt_rank_v, &opt_alloc,         &lr_opt_spread,
    &lr_opt_dtype,    &lr_opt_block_tokens, &lr_opt_calib_note};
#define N_OPTS (uint32_t)(sizeof lorc_options / sizeof lorc_options[0])

static const lr_method lorc_method = {"lorc", LR_PLAIN, 0};

static kvc_status lorc_create(const kvc_create_info *info, kvc_instance **out, char *msg,
                              size_t msg_size)
{
    return lr_create_with_options(&lorc_method, lorc_options, N_OPTS, info, out, msg, msg_size);
}

static const kvc_plugin lorc_plugin = {
    .struct_size = sizeof(kvc_plugin),
    .abi_version = KVC_ABI_VERSION,
    .id = "lorc",
    .name = "LoRC: low-rank KV cache from the K/V weights",
    .version = "1.0.0",
    .description =
        "Caches a rank-r latent of each layer's keys and values from a truncated SVD of W_k and "
        "W_v (no calibration); per-layer ranks from cumulative condition numbers (progressive) "
        "or uniform, fit to kv_ratio. Keys are reconstructed block by block before RoPE; values "
        "are attended in latent space. Exact at full rank (the default).",
    .license = "MIT",
    .caps = LR_CAPS,
    .n_options = N_OPTS,
    .options = lorc_options,
    .create = lorc_create,
    LR_PLUGIN_OPS,
};

KVC_EXPORT const kvc_plugin *kvc_plugin_entry(uint32_t host_abi_version)
{
    if (KVC_VERSION_MAJOR(host_abi_version) != KVC_ABI_VERSION_MAJOR)
        return NULL;
    return &lorc_plugin;
}
