/*
 * test_abi_layout.c -- freezes ABI 1.0, 1.1, 1.2 and 1.3: the size of every
 * boundary struct and the offset of every field, on LP64 targets. A layout
 * change breaks the build here; the only legal change in a minor version is
 * a new field at the end. A struct that grew keeps its older size asserted
 * as KVC_V10_SIZE (offset + size of its last field of that version: what an
 * older side puts in struct_size), then its new size and the new fields'
 * offsets.
 */
#include <check.h>
#include <stddef.h>
#include <stdlib.h>

#include "kvc.h"

/* The struct_size a 1.0 side writes: up to the end of the last 1.0 field. */
#define KVC_V10_SIZE(T, last) (offsetof(T, last) + sizeof(((T *)0)->last))

#if UINTPTR_MAX == 0xffffffffffffffffu

#define KVC_SIZE(T, n) _Static_assert(sizeof(T) == (n), "ABI size of " #T " changed")
#define KVC_LAYOUT(T, f, n) _Static_assert(offsetof(T, f) == (n), "ABI offset of " #T "." #f " changed")
#define KVC_SIZE_V10(T, last, n) \
    _Static_assert(KVC_V10_SIZE(T, last) == (n), "ABI 1.0 size of " #T " changed")

KVC_SIZE(kvc_host, 48);
KVC_LAYOUT(kvc_host, struct_size, 0);
KVC_LAYOUT(kvc_host, reserved0, 4);
KVC_LAYOUT(kvc_host, user_data, 8);
KVC_LAYOUT(kvc_host, alloc, 16);
KVC_LAYOUT(kvc_host, free, 24);
KVC_LAYOUT(kvc_host, log, 32);
KVC_LAYOUT(kvc_host, cuda_stream, 40);
KVC_SIZE(kvc_geometry, 72);
KVC_LAYOUT(kvc_geometry, struct_size, 0);
KVC_LAYOUT(kvc_geometry, n_layers, 4);
KVC_LAYOUT(kvc_geometry, n_heads, 8);
KVC_LAYOUT(kvc_geometry, n_kv_heads, 12);
KVC_LAYOUT(kvc_geometry, head_dim, 16);
KVC_LAYOUT(kvc_geometry, hidden_size, 20);
KVC_LAYOUT(kvc_geometry, max_positions, 24);
KVC_LAYOUT(kvc_geometry, rope_style, 28);
KVC_LAYOUT(kvc_geometry, rope_dims, 32);
KVC_LAYOUT(kvc_geometry, rope_theta, 36);
KVC_LAYOUT(kvc_geometry, rope_mscale, 40);
KVC_LAYOUT(kvc_geometry, attn_scale, 44);
KVC_LAYOUT(kvc_geometry, rope_inv_freq, 48);
KVC_LAYOUT(kvc_geometry, sliding_window, 56);
KVC_LAYOUT(kvc_geometry, kv_head_first, 60);
KVC_LAYOUT(kvc_geometry, kv_head_count, 64);
KVC_LAYOUT(kvc_geometry, reserved0, 68);
KVC_SIZE(kvc_option_desc, 56);
KVC_LAYOUT(kvc_option_desc, struct_size, 0);
KVC_LAYOUT(kvc_option_desc, type, 4);
KVC_LAYOUT(kvc_option_desc, name, 8);
KVC_LAYOUT(kvc_option_desc, default_value, 16);
KVC_LAYOUT(kvc_option_desc, choices, 24);
KVC_LAYOUT(kvc_option_desc, min, 32);
KVC_LAYOUT(kvc_option_desc, max, 40);
KVC_LAYOUT(kvc_option_desc, help, 48);
KVC_SIZE(kvc_create_info, 72);
KVC_LAYOUT(kvc_create_info, struct_size, 0);
KVC_LAYOUT(kvc_create_info, n_options, 4);
KVC_LAYOUT(kvc_create_info, host, 8);
KVC_LAYOUT(kvc_create_info, geometry, 16);
KVC_LAYOUT(kvc_create_info, option_names, 24);
KVC_LAYOUT(kvc_create_info, option_values, 32);
KVC_LAYOUT(kvc_create_info, artifact, 40);
KVC_LAYOUT(kvc_create_info, artifact_size, 48);
KVC_LAYOUT(kvc_create_info, device, 56);
KVC_LAYOUT(kvc_create_info, device_ordinal, 60);
KVC_LAYOUT(kvc_create_info, dtype, 64);
KVC_LAYOUT(kvc_create_info, reserved0, 68);
KVC_SIZE(kvc_layer_weights, 64);
KVC_LAYOUT(kvc_layer_weights, struct_size, 0);
KVC_LAYOUT(kvc_layer_weights, reserved0, 4);
KVC_LAYOUT(kvc_layer_weights, w_q, 8);
KVC_LAYOUT(kvc_layer_weights, w_k, 16);
KVC_LAYOUT(kvc_layer_weights, w_v, 24);
KVC_LAYOUT(kvc_layer_weights, w_o, 32);
KVC_LAYOUT(kvc_layer_weights, b_q, 40);
KVC_LAYOUT(kvc_layer_weights, b_k, 48);
KVC_LAYOUT(kvc_layer_weights, b_v, 56);
KVC_SIZE_V10(kvc_calib_chunk, positions, 24); /* 1.0 */
KVC_LAYOUT(kvc_calib_chunk, struct_size, 0);
KVC_LAYOUT(kvc_calib_chunk, n_rows, 4);
KVC_LAYOUT(kvc_calib_chunk, x, 8);
KVC_LAYOUT(kvc_calib_chunk, positions, 16);
KVC_SIZE(kvc_calib_chunk, 32); /* 1.1 */
KVC_LAYOUT(kvc_calib_chunk, x_ref, 24);
KVC_SIZE_V10(kvc_seq_stats, bytes_fp16_full, 72); /* 1.0 and 1.1 */
KVC_LAYOUT(kvc_seq_stats, struct_size, 0);
KVC_LAYOUT(kvc_seq_stats, reserved0, 4);
KVC_LAYOUT(kvc_seq_stats, tokens_appended, 8);
KVC_LAYOUT(kvc_seq_stats, head_tokens_resident, 16);
KVC_LAYOUT(kvc_seq_stats, bytes_payload, 24);
KVC_LAYOUT(kvc_seq_stats, bytes_metadata, 32);
KVC_LAYOUT(kvc_seq_stats, bytes_reserved, 40);
KVC_LAYOUT(kvc_seq_stats, bytes_fixed, 48);
KVC_LAYOUT(kvc_seq_stats, bytes_resident, 56);
KVC_LAYOUT(kvc_seq_stats, bytes_fp16_full, 64);
KVC_SIZE(kvc_seq_stats, 80); /* 1.2 */
KVC_LAYOUT(kvc_seq_stats, bytes_pending, 72);
KVC_SIZE_V10(kvc_instance_stats, seq_overhead_bytes, 40); /* 1.0 .. 1.2 */
KVC_LAYOUT(kvc_instance_stats, struct_size, 0);
KVC_LAYOUT(kvc_instance_stats, reserved0, 4);
KVC_LAYOUT(kvc_instance_stats, bytes_params, 8);
KVC_LAYOUT(kvc_instance_stats, bytes_fixed, 16);
KVC_LAYOUT(kvc_instance_stats, kv_ratio, 24);
KVC_LAYOUT(kvc_instance_stats, seq_overhead_bytes, 32);
KVC_SIZE(kvc_instance_stats, 48); /* 1.3 */
KVC_LAYOUT(kvc_instance_stats, caps, 40);
KVC_SIZE(kvc_materialized, 40);
KVC_LAYOUT(kvc_materialized, struct_size, 0);
KVC_LAYOUT(kvc_materialized, capacity, 4);
KVC_LAYOUT(kvc_materialized, n_tokens, 8);
KVC_LAYOUT(kvc_materialized, positions, 16);
KVC_LAYOUT(kvc_materialized, k, 24);
KVC_LAYOUT(kvc_materialized, v, 32);
KVC_SIZE(kvc_attend_item, 40);
KVC_LAYOUT(kvc_attend_item, struct_size, 0);
KVC_LAYOUT(kvc_attend_item, n_q, 4);
KVC_LAYOUT(kvc_attend_item, seq, 8);
KVC_LAYOUT(kvc_attend_item, positions, 16);
KVC_LAYOUT(kvc_attend_item, q_pre, 24);
KVC_LAYOUT(kvc_attend_item, out, 32);
KVC_SIZE_V10(kvc_plugin, seq_stats, 232); /* 1.0 and 1.1 */
KVC_LAYOUT(kvc_plugin, struct_size, 0);
KVC_LAYOUT(kvc_plugin, abi_version, 4);
KVC_LAYOUT(kvc_plugin, id, 8);
KVC_LAYOUT(kvc_plugin, name, 16);
KVC_LAYOUT(kvc_plugin, version, 24);
KVC_LAYOUT(kvc_plugin, description, 32);
KVC_LAYOUT(kvc_plugin, license, 40);
KVC_LAYOUT(kvc_plugin, caps, 48);
KVC_LAYOUT(kvc_plugin, n_options, 56);
KVC_LAYOUT(kvc_plugin, reserved0, 60);
KVC_LAYOUT(kvc_plugin, options, 64);
KVC_LAYOUT(kvc_plugin, create, 72);
KVC_LAYOUT(kvc_plugin, destroy, 80);
KVC_LAYOUT(kvc_plugin, instance_message, 88);
KVC_LAYOUT(kvc_plugin, prepare_layer, 96);
KVC_LAYOUT(kvc_plugin, finalize_layer, 104);
KVC_LAYOUT(kvc_plugin, finalize, 112);
KVC_LAYOUT(kvc_plugin, save, 120);
KVC_LAYOUT(kvc_plugin, instance_stats, 128);
KVC_LAYOUT(kvc_plugin, seq_open, 136);
KVC_LAYOUT(kvc_plugin, seq_close, 144);
KVC_LAYOUT(kvc_plugin, seq_message, 152);
KVC_LAYOUT(kvc_plugin, append, 160);
KVC_LAYOUT(kvc_plugin, attend, 168);
KVC_LAYOUT(kvc_plugin, attend_batch, 176);
KVC_LAYOUT(kvc_plugin, materialize, 184);
KVC_LAYOUT(kvc_plugin, truncate, 192);
KVC_LAYOUT(kvc_plugin, fork, 200);
KVC_LAYOUT(kvc_plugin, seq_export, 208);
KVC_LAYOUT(kvc_plugin, seq_import, 216);
KVC_LAYOUT(kvc_plugin, seq_stats, 224);
KVC_SIZE(kvc_plugin, 240); /* 1.2 */
KVC_LAYOUT(kvc_plugin, seq_describe, 232);

/* Enum values are frozen too. */
_Static_assert(KVC_OK == 0 && KVC_E_INVALID == 1 && KVC_E_UNSUPPORTED == 2 && KVC_E_NOMEM == 3 &&
                   KVC_E_CORRUPT == 4 && KVC_E_STATE == 5 && KVC_E_VERSION == 6 &&
                   KVC_E_BUFFER == 7 && KVC_E_INTERNAL == 8,
               "status codes changed");
_Static_assert(KVC_ROPE_NONE == 0 && KVC_ROPE_ADJACENT == 1 && KVC_ROPE_HALVES == 2,
               "rope styles changed");
_Static_assert(KVC_OPT_BOOL == 0 && KVC_OPT_INT == 1 && KVC_OPT_FLOAT == 2 && KVC_OPT_ENUM == 3 &&
                   KVC_OPT_STRING == 4,
               "option types changed");
_Static_assert(KVC_DTYPE_F32 == 0 && KVC_DTYPE_F16 == 1 && KVC_DTYPE_BF16 == 2, "dtypes changed");
_Static_assert(KVC_MEM_HOST == 0 && KVC_MEM_CUDA == 1, "memory kinds changed");
_Static_assert(KVC_USAGE_INSTANCE == 0 && KVC_USAGE_CACHE == 1 && KVC_USAGE_SCRATCH == 2,
               "usages changed");
_Static_assert(KVC_CAP_CPU == 1 && KVC_CAP_TOKEN_FLAGS == (UINT64_C(1) << 13), "caps changed");
_Static_assert(KVC_CAP_PROMPT_PHASE == (UINT64_C(1) << 14), "1.2 cap changed");
_Static_assert(KVC_TOKEN_SPECIAL == 1 && KVC_TOKEN_PUNCT == 2, "token flags changed");
#endif

START_TEST(version_macros)
{
    ck_assert_uint_eq(KVC_ABI_VERSION, 0x00010003u);
    ck_assert_uint_eq(KVC_VERSION_MINOR(KVC_ABI_VERSION), 3);
    ck_assert_uint_eq(KVC_VERSION_MAJOR(KVC_MAKE_VERSION(3, 7)), 3);
    ck_assert_uint_eq(KVC_VERSION_MINOR(KVC_MAKE_VERSION(3, 7)), 7);
}
END_TEST

START_TEST(has_field_reads_struct_size)
{
    kvc_geometry g = {0};
    g.struct_size = (uint32_t)offsetof(kvc_geometry, rope_inv_freq);
    ck_assert(KVC_HAS_FIELD(&g, kvc_geometry, attn_scale));
    ck_assert(!KVC_HAS_FIELD(&g, kvc_geometry, rope_inv_freq));
    g.struct_size = sizeof g;
    ck_assert(KVC_HAS_FIELD(&g, kvc_geometry, reserved0));
}
END_TEST

START_TEST(calib_chunk_of_a_1_0_host)
{
    /* A 1.0 host's chunk stops before x_ref: a 1.1 plugin must not read it. */
    kvc_calib_chunk c = {0};
    c.struct_size = (uint32_t)KVC_V10_SIZE(kvc_calib_chunk, positions);
    ck_assert(KVC_HAS_FIELD(&c, kvc_calib_chunk, positions));
    ck_assert(!KVC_HAS_FIELD(&c, kvc_calib_chunk, x_ref));
    c.struct_size = sizeof c;
    ck_assert(KVC_HAS_FIELD(&c, kvc_calib_chunk, x_ref));
}
END_TEST

START_TEST(seq_stats_of_a_1_1_plugin)
{
    /* A 1.0/1.1 side's seq_stats stops before bytes_pending: a 1.2 reader
     * must not read it (and a 1.2 plugin fills up to the caller's size). */
    kvc_seq_stats st = {0};
    st.struct_size = (uint32_t)KVC_V10_SIZE(kvc_seq_stats, bytes_fp16_full);
    ck_assert(KVC_HAS_FIELD(&st, kvc_seq_stats, bytes_fp16_full));
    ck_assert(!KVC_HAS_FIELD(&st, kvc_seq_stats, bytes_pending));
    st.struct_size = sizeof st;
    ck_assert(KVC_HAS_FIELD(&st, kvc_seq_stats, bytes_pending));
}
END_TEST

START_TEST(descriptor_of_a_1_1_plugin)
{
    /* A 1.0/1.1 descriptor ends at seq_stats: no seq_describe to call. */
    kvc_plugin d = {0};
    d.struct_size = (uint32_t)KVC_V10_SIZE(kvc_plugin, seq_stats);
    ck_assert(KVC_HAS_FIELD(&d, kvc_plugin, seq_stats));
    ck_assert(!KVC_HAS_FIELD(&d, kvc_plugin, seq_describe));
    d.struct_size = sizeof d;
    ck_assert(KVC_HAS_FIELD(&d, kvc_plugin, seq_describe));
}
END_TEST

START_TEST(instance_stats_of_a_1_2_plugin)
{
    /* A 1.0..1.2 side's instance_stats stops before caps: a 1.3 host must
     * not take the zero it left there for "no capabilities" (it reads caps
     * only from a 1.3 plugin). */
    kvc_instance_stats st = {0};
    st.struct_size = (uint32_t)KVC_V10_SIZE(kvc_instance_stats, seq_overhead_bytes);
    ck_assert(KVC_HAS_FIELD(&st, kvc_instance_stats, seq_overhead_bytes));
    ck_assert(!KVC_HAS_FIELD(&st, kvc_instance_stats, caps));
    st.struct_size = sizeof st;
    ck_assert(KVC_HAS_FIELD(&st, kvc_instance_stats, caps));
}
END_TEST

int main(void)
{
    Suite *s = suite_create("abi");
    TCase *tc = tcase_create("layout");
    tcase_add_test(tc, version_macros);
    tcase_add_test(tc, has_field_reads_struct_size);
    tcase_add_test(tc, calib_chunk_of_a_1_0_host);
    tcase_add_test(tc, seq_stats_of_a_1_1_plugin);
    tcase_add_test(tc, descriptor_of_a_1_1_plugin);
    tcase_add_test(tc, instance_stats_of_a_1_2_plugin);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
