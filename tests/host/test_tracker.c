/* test_tracker.c -- the tracking allocator, the logger and the option
 * tables of libkvc-host, used the way a plugin uses them: through the
 * kvc_host that kvch_tracker_host fills. */
#include <check.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvch.h"

static kvch_tracker *t;
static kvc_host host;

static void setup(void)
{
    t = kvch_tracker_new();
    ck_assert_ptr_nonnull(t);
    kvch_tracker_host(t, NULL, &host);
}

static void teardown(void)
{
    kvch_tracker_free(t);
    t = NULL;
}

static void *h_alloc(size_t size, size_t align, int32_t usage)
{
    return host.alloc(host.user_data, size, align, KVC_MEM_HOST, usage);
}

static void h_free(void *p, size_t size)
{
    host.free(host.user_data, p, size, KVC_MEM_HOST);
}

static kvch_tracker_stats stats(void)
{
    kvch_tracker_stats s;
    kvch_tracker_get(t, &s);
    return s;
}

/* ---- the kvc_host it fills -------------------------------------------------------- */

START_TEST(test_host_struct)
{
    ck_assert_uint_eq(host.struct_size, sizeof(kvc_host));
    ck_assert_ptr_nonnull(host.alloc);
    ck_assert_ptr_nonnull(host.free);
    ck_assert_ptr_null(host.log); /* no logger given */
    ck_assert_ptr_nonnull(host.user_data);
    ck_assert_ptr_null(host.cuda_stream);

    kvch_logger lg = {.level = KVC_LOG_INFO, .out = NULL, .prefix = "x"};
    kvc_host h2;
    kvch_tracker_host(t, &lg, &h2);
    ck_assert_ptr_nonnull(h2.log);
    /* Both hosts count into the same tracker. */
    void *a = h2.alloc(h2.user_data, 10, 8, KVC_MEM_HOST, KVC_USAGE_CACHE);
    void *b = h_alloc(20, 8, KVC_USAGE_CACHE);
    ck_assert_uint_eq(stats().current[KVC_MEM_HOST], 30);
    h_free(a, 10); /* freed through the other host: same tracker */
    h2.free(h2.user_data, b, 20, KVC_MEM_HOST);
    ck_assert_uint_eq(stats().n_free, 2);
    ck_assert_uint_eq(stats().n_bad_free, 0);

    /* Filling again with an equal logger does not pile up state. */
    kvc_host h3;
    kvch_tracker_host(t, &lg, &h3);
    ck_assert_ptr_eq(h3.user_data, h2.user_data);
}
END_TEST

/* ---- counting ------------------------------------------------------------------------- */

START_TEST(test_counts)
{
    kvch_tracker_stats s = stats();
    ck_assert_uint_eq(s.n_alloc, 0);
    ck_assert_uint_eq(s.live, 0);

    void *a = h_alloc(100, 8, KVC_USAGE_INSTANCE);
    void *b = h_alloc(200, 64, KVC_USAGE_CACHE);
    void *c = h_alloc(0, 8, KVC_USAGE_SCRATCH); /* a zero-byte block is a block */
    ck_assert_ptr_nonnull(a);
    ck_assert_ptr_nonnull(b);
    ck_assert_ptr_nonnull(c);
    memset(a, 1, 100);
    memset(b, 2, 200);
    s = stats();
    ck_assert_uint_eq(s.n_alloc, 3);
    ck_assert_uint_eq(s.live, 3);
    ck_assert_uint_eq(s.current[KVC_MEM_HOST], 300);
    ck_assert_uint_eq(s.peak[KVC_MEM_HOST], 300);
    ck_assert_uint_eq(s.current[KVC_MEM_CUDA], 0);

    h_free(b, 200);
    s = stats();
    ck_assert_uint_eq(s.current[KVC_MEM_HOST], 100);
    ck_assert_uint_eq(s.peak[KVC_MEM_HOST], 300);
    ck_assert_uint_eq(s.n_free, 1);
    ck_assert_uint_eq(s.live, 2);

    kvch_tracker_reset_peak(t);
    ck_assert_uint_eq(stats().peak[KVC_MEM_HOST], 100);
    void *d = h_alloc(50, 8, KVC_USAGE_CACHE);
    ck_assert_uint_eq(stats().peak[KVC_MEM_HOST], 150);

    h_free(a, 100);
    h_free(c, 0);
    h_free(d, 50);
    h_free(NULL, 0); /* a no-op, not a bad free */
    s = stats();
    ck_assert_uint_eq(s.current[KVC_MEM_HOST], 0);
    ck_assert_uint_eq(s.n_alloc, 4);
    ck_assert_uint_eq(s.n_free, 4);
    ck_assert_uint_eq(s.live, 0);
    ck_assert_uint_eq(s.n_bad_free, 0);
    ck_assert_uint_eq(s.n_overrun, 0);
    ck_assert_uint_eq(s.n_failed, 0);
}
END_TEST

START_TEST(test_many_live)
{
    /* Enough records to grow the table several times, freed in a scrambled
     * order to exercise deletion within probe runs. */
    enum { N = 5000 };
    static void *p[N];
    for (int i = 0; i < N; i++) {
        p[i] = h_alloc((size_t)i + 1, 8, KVC_USAGE_CACHE);
        ck_assert_ptr_nonnull(p[i]);
    }
    ck_assert_uint_eq(stats().live, N);
    ck_assert_uint_eq(stats().current[KVC_MEM_HOST], (uint64_t)N * (N + 1) / 2);
    for (int k = 0; k < N; k++) {
        int i = (int)(((uint64_t)k * 7919u) % N);
        h_free(p[i], (size_t)i + 1);
    }
    kvch_tracker_stats s = stats();
    ck_assert_uint_eq(s.live, 0);
    ck_assert_uint_eq(s.n_free, N);
    ck_assert_uint_eq(s.n_bad_free, 0);
    ck_assert_uint_eq(s.current[KVC_MEM_HOST], 0);
}
END_TEST

START_TEST(test_alignment)
{
    for (size_t align = 8; align <= 8192; align *= 2) {
        for (size_t size = 1; size <= 3000; size += 997) {
            unsigned char *p = h_alloc(size, align, KVC_USAGE_CACHE);
            ck_assert_ptr_nonnull(p);
            ck_assert_msg(((uintptr_t)p & (align - 1)) == 0, "%p not aligned to %zu",
                          (void *)p, align);
            memset(p, 0xee, size); /* the whole block is usable */
            h_free(p, size);
        }
    }
    kvch_tracker_stats s = stats();
    ck_assert_uint_eq(s.n_overrun, 0);
    ck_assert_uint_eq(s.live, 0);

    /* An alignment the ABI does not allow is refused, not rounded. */
    ck_assert_ptr_null(h_alloc(16, 12, KVC_USAGE_CACHE));
    ck_assert_ptr_null(h_alloc(16, 4, KVC_USAGE_CACHE));
    ck_assert_ptr_null(host.alloc(host.user_data, 16, 8, 7, KVC_USAGE_CACHE)); /* bad kind */
    ck_assert_uint_eq(stats().n_failed, 3);
}
END_TEST

START_TEST(test_cuda_kind)
{
    void *p = host.alloc(host.user_data, 256, 256, KVC_MEM_CUDA, KVC_USAGE_CACHE);
    kvch_tracker_stats s = stats();
    if (p == NULL) { /* built without CUDA, or no device */
        ck_assert_uint_eq(s.n_failed, 1);
        ck_assert_uint_eq(s.current[KVC_MEM_CUDA], 0);
        return;
    }
    ck_assert_uint_eq(s.current[KVC_MEM_CUDA], 256);
    ck_assert_uint_eq(s.current[KVC_MEM_HOST], 0);
    host.free(host.user_data, p, 256, KVC_MEM_CUDA);
    ck_assert_uint_eq(stats().current[KVC_MEM_CUDA], 0);
}
END_TEST

/* ---- failure injection --------------------------------------------------------------- */

START_TEST(test_fail_nth)
{
    void *p[6];
    kvch_tracker_fail_nth(t, 3);
    for (int i = 0; i < 6; i++)
        p[i] = h_alloc(16, 8, KVC_USAGE_CACHE);
    for (int i = 0; i < 6; i++)
        ck_assert_msg((p[i] == NULL) == (i == 2), "allocation %d", i + 1);
    kvch_tracker_stats s = stats();
    ck_assert_uint_eq(s.n_failed, 1);
    ck_assert_uint_eq(s.n_alloc, 5);
    ck_assert_uint_eq(s.live, 5);

    /* Counting starts at the call that sets it. */
    kvch_tracker_fail_nth(t, 1);
    ck_assert_ptr_null(h_alloc(16, 8, KVC_USAGE_CACHE));
    void *q = h_alloc(16, 8, KVC_USAGE_CACHE);
    ck_assert_ptr_nonnull(q);

    /* 0 disables. */
    kvch_tracker_fail_nth(t, 1);
    kvch_tracker_fail_nth(t, 0);
    void *r = h_alloc(16, 8, KVC_USAGE_CACHE);
    ck_assert_ptr_nonnull(r);

    for (int i = 0; i < 6; i++)
        h_free(p[i], 16); /* p[2] is NULL: a no-op */
    h_free(q, 16);
    h_free(r, 16);
    s = stats();
    ck_assert_uint_eq(s.n_failed, 2);
    ck_assert_uint_eq(s.live, 0);
    ck_assert_uint_eq(s.n_bad_free, 0);
}
END_TEST

START_TEST(test_fail_from)
{
    void *a = h_alloc(8, 8, KVC_USAGE_CACHE); /* before: does not count */
    kvch_tracker_fail_from(t, 2);
    void *b = h_alloc(8, 8, KVC_USAGE_CACHE);
    ck_assert_ptr_nonnull(b);
    for (int i = 0; i < 10; i++)
        ck_assert_ptr_null(h_alloc(8, 8, KVC_USAGE_CACHE));
    ck_assert_uint_eq(stats().n_failed, 10);
    kvch_tracker_fail_from(t, 0);
    void *c = h_alloc(8, 8, KVC_USAGE_CACHE);
    ck_assert_ptr_nonnull(c);

    kvch_tracker_fail_from(t, 1); /* everything from the next one */
    ck_assert_ptr_null(h_alloc(8, 8, KVC_USAGE_CACHE));
    kvch_tracker_fail_from(t, 0);

    h_free(a, 8);
    h_free(b, 8);
    h_free(c, 8);
    kvch_tracker_stats s = stats();
    ck_assert_uint_eq(s.n_failed, 11);
    ck_assert_uint_eq(s.n_alloc, 3);
    ck_assert_uint_eq(s.live, 0);
}
END_TEST

/* ---- misuse ------------------------------------------------------------------------------ */

START_TEST(test_guard_overrun)
{
    unsigned char *p = h_alloc(32, 8, KVC_USAGE_CACHE);
    p[31] = 0x11; /* the last byte of the block: fine */
    h_free(p, 32);
    ck_assert_uint_eq(stats().n_overrun, 0);

    p = h_alloc(32, 8, KVC_USAGE_CACHE);
    p[32] ^= 0xff; /* one past the end */
    h_free(p, 32);
    ck_assert_uint_eq(stats().n_overrun, 1);

    p = h_alloc(100, 64, KVC_USAGE_CACHE);
    p[100 + 63] ^= 0x01; /* the last guard byte */
    h_free(p, 100);
    kvch_tracker_stats s = stats();
    ck_assert_uint_eq(s.n_overrun, 2);
    ck_assert_uint_eq(s.live, 0);
    ck_assert_uint_eq(s.n_bad_free, 0);
}
END_TEST

START_TEST(test_bad_free)
{
    int on_stack = 0;
    static char in_data[32];
    h_free(&on_stack, sizeof on_stack); /* never ours */
    h_free(in_data, sizeof in_data);
    ck_assert_uint_eq(stats().n_bad_free, 2);

    void *p = h_alloc(64, 8, KVC_USAGE_CACHE);
    h_free(p, 64);
    h_free(p, 64); /* double free */
    ck_assert_uint_eq(stats().n_bad_free, 3);
    ck_assert_uint_eq(stats().n_free, 1);

    p = h_alloc(64, 8, KVC_USAGE_CACHE);
    h_free(p, 65); /* wrong size: counted, and the block is released */
    kvch_tracker_stats s = stats();
    ck_assert_uint_eq(s.n_bad_free, 4);
    ck_assert_uint_eq(s.live, 0);
    ck_assert_uint_eq(s.current[KVC_MEM_HOST], 0);

    p = h_alloc(64, 8, KVC_USAGE_CACHE);
    host.free(host.user_data, p, 64, KVC_MEM_CUDA); /* wrong kind */
    s = stats();
    ck_assert_uint_eq(s.n_bad_free, 5);
    ck_assert_uint_eq(s.live, 0);
    ck_assert_uint_eq(s.current[KVC_MEM_HOST], 0);
    ck_assert_uint_eq(s.current[KVC_MEM_CUDA], 0);
    ck_assert_uint_eq(s.n_alloc, s.n_free + s.live);

    /* A user_data that is not the tracker's: refused, nothing touched. */
    int junk[8] = {0};
    ck_assert_ptr_null(host.alloc(junk, 8, 8, KVC_MEM_HOST, KVC_USAGE_CACHE));
    host.free(junk, &on_stack, 8, KVC_MEM_HOST);
}
END_TEST

START_TEST(test_leak_report)
{
    void *a = h_alloc(111, 8, KVC_USAGE_INSTANCE);
    void *b = h_alloc(222, 8, KVC_USAGE_CACHE);
    void *c = h_alloc(333, 8, KVC_USAGE_SCRATCH);
    void *d = host.alloc(host.user_data, 44, 8, KVC_MEM_HOST, 9); /* unknown usage */
    h_free(b, 222);

    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    ck_assert_ptr_nonnull(f);
    ck_assert_uint_eq(kvch_tracker_leak_report(t, f), 3);
    fclose(f);
    ck_assert_msg(strstr(buf, "111 bytes host usage=instance"), "%s", buf);
    ck_assert_msg(strstr(buf, "333 bytes host usage=scratch"), "%s", buf);
    ck_assert_msg(strstr(buf, "44 bytes host usage=9"), "%s", buf);
    ck_assert_msg(!strstr(buf, "222 bytes"), "%s", buf);
    ck_assert_msg(strstr(buf, "3 live allocations, 488 bytes host"), "%s", buf);
    /* Oldest first. */
    ck_assert(strstr(buf, "111 bytes") < strstr(buf, "333 bytes"));
    free(buf);

    ck_assert_uint_eq(kvch_tracker_leak_report(t, NULL), 3); /* count only */
    h_free(a, 111);
    h_free(c, 333);
    host.free(host.user_data, d, 44, KVC_MEM_HOST);
    f = open_memstream(&buf, &len);
    ck_assert_uint_eq(kvch_tracker_leak_report(t, f), 0);
    fclose(f);
    ck_assert_msg(strstr(buf, "0 live allocations"), "%s", buf);
    free(buf);
}
END_TEST

START_TEST(test_null_tracker)
{
    kvch_tracker_free(NULL);
    kvch_tracker_fail_nth(NULL, 1);
    kvch_tracker_fail_from(NULL, 1);
    kvch_tracker_reset_peak(NULL);
    ck_assert_uint_eq(kvch_tracker_leak_report(NULL, stderr), 0);
    kvch_tracker_stats s;
    memset(&s, 0xff, sizeof s);
    kvch_tracker_get(NULL, &s);
    ck_assert_uint_eq(s.n_alloc, 0);
}
END_TEST

/* ---- threads -------------------------------------------------------------------------------- */

enum { N_THREADS = 4, N_ROUNDS = 20000, KEEP = 64 };

static void *churn(void *arg)
{
    unsigned seed = (unsigned)(uintptr_t)arg * 2654435761u + 1;
    void *held[KEEP] = {0};
    size_t sizes[KEEP] = {0};
    for (int i = 0; i < N_ROUNDS; i++) {
        seed = seed * 1103515245u + 12345u;
        int k = (int)((seed >> 16) % KEEP);
        if (held[k] != NULL)
            h_free(held[k], sizes[k]);
        sizes[k] = 1 + (seed >> 8) % 512;
        size_t align = (size_t)8 << ((seed >> 4) % 4);
        held[k] = h_alloc(sizes[k], align, KVC_USAGE_CACHE);
        if (held[k] == NULL || ((uintptr_t)held[k] & (align - 1)) != 0)
            return (void *)1;
        memset(held[k], k, sizes[k]);
    }
    for (int k = 0; k < KEEP; k++)
        h_free(held[k], sizes[k]);
    return NULL;
}

START_TEST(test_threads)
{
    pthread_t th[N_THREADS];
    for (int i = 0; i < N_THREADS; i++)
        ck_assert_int_eq(pthread_create(&th[i], NULL, churn, (void *)(uintptr_t)(i + 1)), 0);
    for (int i = 0; i < N_THREADS; i++) {
        void *r = NULL;
        pthread_join(th[i], &r);
        ck_assert_ptr_null(r);
    }
    kvch_tracker_stats s = stats();
    ck_assert_uint_eq(s.n_alloc, (uint64_t)N_THREADS * N_ROUNDS);
    ck_assert_uint_eq(s.n_free, (uint64_t)N_THREADS * N_ROUNDS);
    ck_assert_uint_eq(s.live, 0);
    ck_assert_uint_eq(s.current[KVC_MEM_HOST], 0);
    ck_assert_uint_eq(s.n_bad_free, 0);
    ck_assert_uint_eq(s.n_overrun, 0);
    ck_assert_uint_eq(s.n_failed, 0);
    ck_assert_uint_ge(s.peak[KVC_MEM_HOST], 1);
    ck_assert_uint_le(s.peak[KVC_MEM_HOST], (uint64_t)N_THREADS * KEEP * 512);
}
END_TEST

/* ---- logger ---------------------------------------------------------------------------------- */

START_TEST(test_logger)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    kvch_logger lg = {.level = KVC_LOG_INFO, .out = f, .prefix = "fixture"};
    kvch_log_cb(&lg, KVC_LOG_ERROR, "broken");
    kvch_log_cb(&lg, KVC_LOG_INFO, "ready");
    kvch_log_cb(&lg, KVC_LOG_DEBUG, "hidden");
    lg.prefix = NULL;
    kvch_log_cb(&lg, KVC_LOG_WARN, "no prefix");
    kvch_log_cb(&lg, KVC_LOG_WARN, NULL);
    lg.level = 10;
    kvch_log_cb(&lg, 7, "odd level");
    kvch_log_cb(NULL, KVC_LOG_ERROR, "nowhere"); /* no logger: nothing, no crash */
    fclose(f);
    ck_assert_str_eq(buf, "kvc[fixture] error: broken\n"
                          "kvc[fixture] info: ready\n"
                          "kvc warn: no prefix\n"
                          "kvc warn: (null)\n"
                          "kvc level 7: odd level\n");
    free(buf);
}
END_TEST

START_TEST(test_logger_through_host)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    kvch_logger lg = {.level = KVC_LOG_WARN, .out = f, .prefix = "p"};
    kvc_host h;
    kvch_tracker_host(t, &lg, &h);
    lg.prefix = "changed later"; /* the host keeps its own copy */
    h.log(h.user_data, KVC_LOG_WARN, "from the plugin");
    h.log(h.user_data, KVC_LOG_INFO, "too verbose");
    int x;
    h.free(h.user_data, &x, sizeof x, KVC_MEM_HOST); /* the tracker says what went wrong */
    fclose(f);
    ck_assert_msg(strstr(buf, "kvc[p] warn: from the plugin\n") == buf, "%s", buf);
    ck_assert_msg(!strstr(buf, "too verbose"), "%s", buf);
    ck_assert_msg(strstr(buf, "kvc[p] error: free of"), "%s", buf);
    ck_assert_msg(strstr(buf, "not a live allocation"), "%s", buf);
    free(buf);
}
END_TEST

/* ---- options --------------------------------------------------------------------------------- */

START_TEST(test_options)
{
    kvch_options o = {0};
    char err[256];
    ck_assert_int_eq(kvch_options_add(&o, "kv_ratio=0.25", err, sizeof err), 0);
    ck_assert_int_eq(kvch_options_add(&o, "mode=a=b", err, sizeof err), 0);
    ck_assert_int_eq(kvch_options_add(&o, "empty=", err, sizeof err), 0);
    ck_assert_uint_eq(o.n, 3);
    ck_assert_str_eq(o.names[1], "mode");
    ck_assert_str_eq(o.values[1], "a=b"); /* split at the first '=' */
    ck_assert_str_eq(o.values[2], "");

    ck_assert_int_eq(kvch_options_add(&o, "kv_ratio=0.5", err, sizeof err), 0);
    ck_assert_uint_eq(o.n, 3); /* replaced, not added */
    ck_assert_str_eq(o.names[0], "kv_ratio");
    ck_assert_str_eq(o.values[0], "0.5");

    ck_assert_int_eq(kvch_options_add(&o, "noequals", err, sizeof err), -1);
    ck_assert_ptr_nonnull(strstr(err, "'='"));
    ck_assert_int_eq(kvch_options_add(&o, "=1", err, sizeof err), -1);
    ck_assert_ptr_nonnull(strstr(err, "empty name"));
    ck_assert_int_eq(kvch_options_add(&o, NULL, NULL, 0), -1);
    ck_assert_uint_eq(o.n, 3);

    kvc_create_info info = {.struct_size = sizeof info};
    kvch_options_apply(&o, &info);
    ck_assert_uint_eq(info.n_options, 3);
    ck_assert_str_eq(info.option_names[2], "empty");
    ck_assert_str_eq(info.option_values[0], "0.5");

    kvch_options_clear(&o);
    ck_assert_uint_eq(o.n, 0);
    kvch_options_apply(&o, &info);
    ck_assert_uint_eq(info.n_options, 0);
    kvch_options_clear(&o); /* twice is fine */
}
END_TEST

START_TEST(test_options_full)
{
    kvch_options o = {0};
    char kv[32], err[256];
    for (int i = 0; i < KVCH_MAX_OPTIONS; i++) {
        snprintf(kv, sizeof kv, "opt%d=%d", i, i);
        ck_assert_int_eq(kvch_options_add(&o, kv, err, sizeof err), 0);
    }
    ck_assert_int_eq(kvch_options_add(&o, "one_more=1", err, sizeof err), -1);
    ck_assert_ptr_nonnull(strstr(err, "too many options"));
    ck_assert_int_eq(kvch_options_add(&o, "opt7=replaced", err, sizeof err), 0); /* still fits */
    ck_assert_str_eq(o.values[7], "replaced");
    kvch_options_clear(&o);
}
END_TEST

static Suite *tracker_suite(void)
{
    Suite *s = suite_create("tracker");
    TCase *tc = tcase_create("alloc");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_host_struct);
    tcase_add_test(tc, test_counts);
    tcase_add_test(tc, test_many_live);
    tcase_add_test(tc, test_alignment);
    tcase_add_test(tc, test_cuda_kind);
    tcase_add_test(tc, test_fail_nth);
    tcase_add_test(tc, test_fail_from);
    tcase_add_test(tc, test_guard_overrun);
    tcase_add_test(tc, test_bad_free);
    tcase_add_test(tc, test_leak_report);
    tcase_add_test(tc, test_null_tracker);
    tcase_add_test(tc, test_threads);
    tcase_add_test(tc, test_logger_through_host);
    suite_add_tcase(s, tc);

    tc = tcase_create("logger");
    tcase_add_test(tc, test_logger);
    suite_add_tcase(s, tc);

    tc = tcase_create("options");
    tcase_add_test(tc, test_options);
    tcase_add_test(tc, test_options_full);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(tracker_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
