/*
 * kvc-svdllm.so: SVD-LLM (Wang et al., arXiv 2403.07378) applied to the KV
 * cache: truncation-aware whitening of the K/V projections.
 *
 * From calibration rows X (the attention inputs, fed by the host):
 * X^T X = S S^T (accumulated in fp32, Cholesky in fp64; when it fails the
 * diagonal is shifted by minus the smallest eigenvalue plus a small
 * epsilon), SVD of W S = U S' V^T, and the cache holds h = U_r^T k. On the
 * calibration distribution the output error of truncating is exactly the
 * dropped singular values of W S, which is what makes its per-layer error
 * never worse than plain SVD's. Uniform ranks by default (the paper's
 * setting).
 *
 * refit=true: SVD-LLM's parameter update in closed form. The host then
 * calibrates layer by layer through the already-compressed layers (ABI
 * 1.1's x_ref carries the exact model's rows) and each layer's
 * up-projection is refitted by least squares,
 *   up = argmin_B sum_t |W x_ref,t - B U_r^T W x'_t|^2,
 * so it also corrects the drift of the layers before it.
 *
 * key_space=post (beyond the papers): factors of the keys AFTER RoPE, from
 * the eigenvectors of the calibration keys' rotated covariance. The query
 * is then projected into latent space once and scores are taken on the
 * latents directly, with no reconstruction; RoPE's position dependence is
 * what the factors must absorb, at some accuracy cost.
 */
#include "lowrank.h"

static const kvc_option_desc opt_alloc = {
    sizeof(kvc_option_desc), KVC_OPT_ENUM, "alloc", "uniform", "uniform|progressive", 0, 0,
    "Rank per layer: uniform (SVD-LLM) or progressive (LoRC's rule from the raw weights' "
    "condition numbers)."};
static const kvc_option_desc opt_refit = {
    sizeof(kvc_option_desc), KVC_OPT_BOOL, "refit", "false", NULL, 0, 0,
    "Least-squares refit of each up-projection on calibration that runs through the "
    "already-compressed layers (the host then calibrates sequentially)."};
static const kvc_option_desc opt_keys = {
    sizeof(kvc_option_desc), KVC_OPT_ENUM, "key_space", "pre", "pre|post", 0, 0,
    "Keys' latent before RoPE (the papers) or after it (queries projected into latent space, "
    "no key reconstruction)."};

static const kvc_option_desc *const svdllm_options[] = {
    &lr_opt_kv_ratio, &lr_opt_rank_k, &lr_opt_rank_v,       &opt_alloc,        &lr_opt_spread,
    &opt_refit,       &opt_keys,      &lr_opt_dtype,        &lr_opt_block_tokens,
    &lr_opt_calib_note};
#define N_OPTS (uint32_t)(sizeof svdllm_options / sizeof svdllm_options[0])

static const lr_method svdllm_method = {"svdllm", LR_WHITEN, 1};

static kvc_status svdllm_create(const kvc_create_info *info, kvc_instance **out, char *msg,
                                size_t msg_size)
{
    return lr_create_with_options(&svdllm_method, svdllm_options, N_OPTS, info, out, msg,
                                  msg_size);
}

static const kvc_plugin svdllm_plugin = {
    .struct_size = sizeof(kvc_plugin),
    .abi_version = KVC_ABI_VERSION,
    .id = "svdllm",
    .name = "SVD-LLM: whitened low-rank KV cache",
    .version = "1.0.0",
    .description =
        "Caches a rank-r latent of each layer's keys and values from the SVD of W_k S and W_v S, "
        "S the Cholesky factor of the calibration activations' Gram matrix (truncation-aware "
        "whitening); uniform ranks fit to kv_ratio; optional least-squares refit through the "
        "compressed layers and post-RoPE key latents. Exact at full rank (the default).",
    .license = "MIT",
    .caps = LR_CAPS | KVC_CAP_NEEDS_CALIBRATION,
    .n_options = N_OPTS,
    .options = svdllm_options,
    .create = svdllm_create,
    LR_PLUGIN_OPS,
};

KVC_EXPORT const kvc_plugin *kvc_plugin_entry(uint32_t host_abi_version)
{
    if (KVC_VERSION_MAJOR(host_abi_version) != KVC_ABI_VERSION_MAJOR)
        return NULL;
    return &svdllm_plugin;
}
