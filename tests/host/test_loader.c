/* test_loader.c -- kvch_load and friends against the fixture plugins, the
 * capability/status words, and the kvc CLI's list and info.
 *
 * FIXTURE_DIR (the build directory holding kvc-fixture-*.so) and KVC_EXE
 * (the kvc binary) come from meson. */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kvch.h"

#ifndef FIXTURE_DIR
#error "FIXTURE_DIR must be defined by the build"
#endif
#ifndef KVC_EXE
#error "KVC_EXE must be defined by the build"
#endif

#define FX(name) FIXTURE_DIR "/kvc-fixture-" name ".so"

/* This host's ABI as the loader and the CLI write it: "1.2". */
#define STR_(x) #x
#define STR(x) STR_(x)
#define HOST_ABI STR(KVC_ABI_VERSION_MAJOR) "." STR(KVC_ABI_VERSION_MINOR)

/* A value *out must still hold after a failed load. */
static kvch_plugin *const SENTINEL = (kvch_plugin *)(uintptr_t)0x5e11;

/* Loads `what`, expects status `want` and, on failure, every word of the
 * NULL-terminated list `words` in the message and *out untouched. */
static void expect_load(const char *what, kvc_status want, const char *const *words)
{
    kvch_plugin *p = SENTINEL;
    char err[2048];
    memset(err, 'x', sizeof err);
    kvc_status st = kvch_load(what, &p, err, sizeof err);
    ck_assert_msg(memchr(err, '\0', sizeof err) != NULL, "message not terminated");
    ck_assert_msg(st == want, "%s: status %d (%s), expected %d; message: %s", what, (int)st,
                  kvch_status_string(st), (int)want, err);
    if (want == KVC_OK) {
        ck_assert_ptr_ne(p, SENTINEL);
        kvch_unload(p);
        return;
    }
    ck_assert_ptr_eq(p, SENTINEL);
    for (; words && *words; words++)
        ck_assert_msg(strstr(err, *words) != NULL, "%s: message lacks \"%s\": %s", what, *words,
                      err);
}

/* ---- loading by path --------------------------------------------------------- */

START_TEST(test_good_by_path)
{
    kvch_plugin *p = NULL;
    char err[512] = "";
    ck_assert_int_eq(kvch_load(FX("good"), &p, err, sizeof err), KVC_OK);
    ck_assert_str_eq(err, "");
    const kvc_plugin *d = kvch_plugin_desc(p);
    ck_assert_ptr_nonnull(d);
    ck_assert_str_eq(d->id, "fixture-good");
    ck_assert_uint_eq(d->abi_version, KVC_ABI_VERSION);
    ck_assert_uint_eq(d->n_options, 2);
    ck_assert_str_eq(d->options[0]->name, "kv_ratio");
    ck_assert_str_eq(d->options[1]->name, "fixture_mode");
    ck_assert_str_eq(kvch_plugin_path(p), FX("good"));
    /* The stubs are callable: the loader handed back the real table. */
    kvc_instance *inst = NULL;
    ck_assert_int_eq(d->create(NULL, &inst, NULL, 0), KVC_E_UNSUPPORTED);
    kvch_unload(p);
    kvch_unload(NULL);
    ck_assert_ptr_null(kvch_plugin_desc(NULL));
    ck_assert_ptr_null(kvch_plugin_path(NULL));
}
END_TEST

START_TEST(test_newer_minor_loads)
{
    kvch_plugin *p = NULL;
    char err[512];
    ck_assert_msg(kvch_load(FX("newer"), &p, err, sizeof err) == KVC_OK, "%s", err);
    const kvc_plugin *d = kvch_plugin_desc(p);
    ck_assert_uint_eq(KVC_VERSION_MINOR(d->abi_version), 7);
    ck_assert_uint_gt(d->struct_size, sizeof(kvc_plugin));
    kvch_unload(p);
}
END_TEST

START_TEST(test_older_minor_loads)
{
    /* A plugin built against ABI 1.0 serves this (newer minor) host. */
    kvch_plugin *p = NULL;
    char err[512];
    ck_assert_msg(kvch_load(FX("abi10"), &p, err, sizeof err) == KVC_OK, "%s", err);
    const kvc_plugin *d = kvch_plugin_desc(p);
    ck_assert_uint_eq(d->abi_version, KVC_MAKE_VERSION(1, 0));
    ck_assert_str_eq(d->id, "fixture-abi10");
    kvch_unload(p);
}
END_TEST

START_TEST(test_abi11_loads_without_describe)
{
    /* A 1.1 descriptor ends at seq_stats: it loads, and the host helper
     * says seq_describe is not there instead of reading past it. */
    kvch_plugin *p = NULL;
    char err[512];
    ck_assert_msg(kvch_load(FX("abi11"), &p, err, sizeof err) == KVC_OK, "%s", err);
    const kvc_plugin *d = kvch_plugin_desc(p);
    ck_assert_uint_eq(d->abi_version, KVC_MAKE_VERSION(1, 1));
    ck_assert(!KVC_HAS_FIELD(d, kvc_plugin, seq_describe));
    int dummy = 0;
    char *text = (char *)SENTINEL;
    ck_assert_int_eq(kvch_seq_describe(d, (const kvc_seq *)(void *)&dummy, 0, &text, err,
                                       sizeof err),
                     KVC_E_UNSUPPORTED);
    ck_assert_ptr_eq(text, (char *)SENTINEL);
    ck_assert_msg(strstr(err, "1.2") && strstr(err, "1.1"), "%s", err);
    kvch_unload(p);

    /* A 1.0 one too, whose static descriptor has the pointer set past its
     * struct_size: never called. */
    ck_assert_msg(kvch_load(FX("abi10"), &p, err, sizeof err) == KVC_OK, "%s", err);
    ck_assert_int_eq(kvch_seq_describe(kvch_plugin_desc(p), (const kvc_seq *)(void *)&dummy, 0,
                                       &text, err, sizeof err),
                     KVC_E_UNSUPPORTED);
    ck_assert_ptr_eq(text, (char *)SENTINEL);
    kvch_unload(p);
}
END_TEST

START_TEST(test_seq_describe_helper)
{
    /* The good fixture's seq_describe ignores the sequence: any non-NULL
     * handle does. The helper sizes, allocates and copies. */
    kvch_plugin *p = NULL;
    char err[512];
    ck_assert_msg(kvch_load(FX("good"), &p, err, sizeof err) == KVC_OK, "%s", err);
    const kvc_plugin *d = kvch_plugin_desc(p);
    int dummy = 0;
    const kvc_seq *s = (const kvc_seq *)(void *)&dummy;
    char *text = NULL;
    ck_assert_msg(kvch_seq_describe(d, s, 0, &text, err, sizeof err) == KVC_OK, "%s", err);
    ck_assert_str_eq(text, "head 0 policy=fixture tokens=0\n");
    free(text);

    /* The plugin's refusal comes back with its status; nothing allocated. */
    text = (char *)SENTINEL;
    ck_assert_int_eq(kvch_seq_describe(d, s, 1, &text, err, sizeof err), KVC_E_INVALID);
    ck_assert_ptr_eq(text, (char *)SENTINEL);
    ck_assert_msg(strstr(err, "seq_describe(layer 1)"), "%s", err);
    ck_assert_int_eq(kvch_seq_describe(NULL, s, 0, &text, err, sizeof err), KVC_E_INVALID);
    ck_assert_int_eq(kvch_seq_describe(d, NULL, 0, &text, err, sizeof err), KVC_E_INVALID);
    ck_assert_int_eq(kvch_seq_describe(d, s, 0, NULL, NULL, 0), KVC_E_INVALID);
    ck_assert_ptr_eq(text, (char *)SENTINEL);
    kvch_unload(p);
}
END_TEST

START_TEST(test_missing_file)
{
    const char *w[] = {"/nonexistent-dir/kvc-x.so", "no such file", NULL};
    expect_load("/nonexistent-dir/kvc-x.so", KVC_E_INVALID, w);
    const char *w2[] = {"kvc-not-here.so", "no such file", NULL};
    expect_load("kvc-not-here.so", KVC_E_INVALID, w2); /* ends in .so: a path */
}
END_TEST

START_TEST(test_text_file)
{
    char dir[] = "/tmp/kvch-test-XXXXXX";
    ck_assert_ptr_nonnull(mkdtemp(dir));
    char path[256];
    snprintf(path, sizeof path, "%s/kvc-text.so", dir);
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    fputs("this is not an ELF file, only text renamed to .so\n", f);
    fclose(f);
    const char *w[] = {path, "dlopen failed", NULL};
    expect_load(path, KVC_E_INVALID, w);
    unlink(path);
    rmdir(dir);
}
END_TEST

START_TEST(test_directory)
{
    const char *w[] = {FIXTURE_DIR, "directory", NULL};
    expect_load(FIXTURE_DIR "/", KVC_E_INVALID, w);
}
END_TEST

/* One row per broken fixture: the status and the words its message needs. */
static const struct {
    const char *fixture;
    kvc_status status;
    const char *words[4];
} bad[] = {
    {"noentry", KVC_E_INVALID, {"not a kvc plugin", "no symbol kvc_plugin_entry"}},
    {"undef", KVC_E_INVALID, {"dlopen failed", "kvc_fixture_missing_function"}},
    {"major2", KVC_E_VERSION, {"plugin speaks kvc ABI 2.x", "this host speaks " HOST_ABI}},
    {"nullfn", KVC_E_INVALID, {"function pointer seq_export is NULL"}},
    {"refuse", KVC_E_VERSION, {"refused every kvc ABI version", "this host speaks " HOST_ABI}},
    {"newhost", KVC_E_VERSION, {"refuses kvc ABI " HOST_ABI, "newer host"}},
    {"small", KVC_E_VERSION, {"struct_size", "smaller than a kvc ABI 1.0 descriptor"}},
    {"wrongmajor", KVC_E_VERSION, {"descriptor says kvc ABI 3.0", "this host speaks " HOST_ABI}},
    {"nullname", KVC_E_INVALID, {"descriptor field name is NULL"}},
    {"badid", KVC_E_INVALID, {"\"Fixture Defect\"", "[a-z0-9_-]+"}},
    {"nullopt", KVC_E_INVALID, {"option 1 of 2 is NULL"}},
    {"smallopt", KVC_E_VERSION, {"option 1 has struct_size 8", "smaller"}},
    {"nodescribe", KVC_E_INVALID, {"function pointer seq_describe is NULL", "appended in 1.2"}},
};

START_TEST(test_bad_fixture)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/kvc-fixture-%s.so", FIXTURE_DIR, bad[_i].fixture);
    const char *words[6] = {path};
    for (int k = 0; k < 4 && bad[_i].words[k]; k++)
        words[k + 1] = bad[_i].words[k];
    expect_load(path, bad[_i].status, words);
}
END_TEST

START_TEST(test_messages_distinct)
{
    /* Every failure reads differently once the path is taken out. */
    char msgs[sizeof bad / sizeof bad[0]][2048];
    size_t n = sizeof bad / sizeof bad[0];
    for (size_t i = 0; i < n; i++) {
        char path[1024];
        snprintf(path, sizeof path, "%s/kvc-fixture-%s.so", FIXTURE_DIR, bad[i].fixture);
        kvch_plugin *p = NULL;
        char err[2048];
        ck_assert_int_ne(kvch_load(path, &p, err, sizeof err), KVC_OK);
        ck_assert(strncmp(err, path, strlen(path)) == 0);
        snprintf(msgs[i], sizeof msgs[i], "%s", err + strlen(path));
        for (size_t j = 0; j < i; j++)
            ck_assert_msg(strcmp(msgs[i], msgs[j]) != 0, "same message for %s and %s: %s",
                          bad[i].fixture, bad[j].fixture, msgs[i]);
    }
}
END_TEST

START_TEST(test_bad_arguments)
{
    kvch_plugin *p = SENTINEL;
    char err[256];
    ck_assert_int_eq(kvch_load(NULL, &p, err, sizeof err), KVC_E_INVALID);
    ck_assert_int_eq(kvch_load("", &p, err, sizeof err), KVC_E_INVALID);
    ck_assert_int_eq(kvch_load(FX("good"), NULL, err, sizeof err), KVC_E_INVALID);
    ck_assert_ptr_eq(p, SENTINEL);
    /* err may be NULL, and a short buffer is still terminated. */
    ck_assert_int_eq(kvch_load(FX("noentry"), &p, NULL, 0), KVC_E_INVALID);
    char tiny[8];
    memset(tiny, 'x', sizeof tiny);
    ck_assert_int_eq(kvch_load(FX("noentry"), &p, tiny, sizeof tiny), KVC_E_INVALID);
    ck_assert_uint_eq(strlen(tiny), sizeof tiny - 1);
    ck_assert_ptr_eq(p, SENTINEL);
}
END_TEST

/* ---- loading by name ------------------------------------------------------------- */

START_TEST(test_by_name)
{
    setenv("KVC_PLUGIN_PATH", "/nonexistent-dir::" FIXTURE_DIR, 1);
    kvch_plugin *p = NULL;
    char err[1024];
    ck_assert_msg(kvch_load("fixture-good", &p, err, sizeof err) == KVC_OK, "%s", err);
    ck_assert_str_eq(kvch_plugin_path(p), FX("good"));
    ck_assert_str_eq(kvch_plugin_desc(p)->id, "fixture-good");
    kvch_unload(p);

    /* A name resolves to a file that then fails: that file's reason. */
    const char *w[] = {FX("noentry"), "no symbol kvc_plugin_entry", NULL};
    expect_load("fixture-noentry", KVC_E_INVALID, w);
}
END_TEST

START_TEST(test_name_not_found)
{
    setenv("KVC_PLUGIN_PATH", "/nonexistent-dir:" FIXTURE_DIR, 1);
    const char *w[] = {"\"no-such-plugin\"", "not found", "kvc-no-such-plugin.so",
                       "/nonexistent-dir", FIXTURE_DIR, kvch_install_dir(), NULL};
    expect_load("no-such-plugin", KVC_E_INVALID, w);
    unsetenv("KVC_PLUGIN_PATH");
    const char *w2[] = {"not found", kvch_install_dir(), NULL};
    expect_load("no-such-plugin", KVC_E_INVALID, w2);
}
END_TEST

START_TEST(test_install_dir)
{
    const char *d = kvch_install_dir();
    ck_assert_ptr_nonnull(d);
    ck_assert(d[0] == '/');
    ck_assert_ptr_nonnull(strstr(d, "kvc"));
}
END_TEST

typedef struct found {
    int n;
    char paths[256][1024];
} found;

static void collect(void *user, const char *path)
{
    found *f = user;
    if (f->n < 256)
        snprintf(f->paths[f->n++], sizeof f->paths[0], "%s", path);
}

static int found_index(const found *f, const char *path)
{
    for (int i = 0; i < f->n; i++)
        if (strcmp(f->paths[i], path) == 0)
            return i;
    return -1;
}

START_TEST(test_find_plugins)
{
    setenv("KVC_PLUGIN_PATH", FIXTURE_DIR, 1);
    static found f;
    f.n = 0;
    int n = kvch_find_plugins(collect, &f);
    ck_assert_int_eq(n, f.n);
    ck_assert_int_ge(n, 5);
    int good = found_index(&f, FX("good"));
    int major2 = found_index(&f, FX("major2"));
    ck_assert_int_ge(good, 0);
    ck_assert_int_ge(major2, 0);
    ck_assert_int_lt(good, major2); /* sorted by name within a directory */
    /* Only kvc-*.so files: the test executables are not reported. */
    for (int i = 0; i < f.n; i++)
        ck_assert_msg(strstr(f.paths[i], "/kvc-") && strstr(f.paths[i], ".so"), "%s",
                      f.paths[i]);
    ck_assert_int_eq(kvch_find_plugins(NULL, NULL), n);
}
END_TEST

START_TEST(test_find_plugins_shadowing)
{
    char dir[] = "/tmp/kvch-test-XXXXXX";
    ck_assert_ptr_nonnull(mkdtemp(dir));
    char link[256], other[256];
    snprintf(link, sizeof link, "%s/kvc-fixture-good.so", dir);
    snprintf(other, sizeof other, "%s/kvc-aaa.so", dir);
    ck_assert_int_eq(symlink(FX("good"), link), 0);
    ck_assert_int_eq(symlink(FX("good"), other), 0);

    char env[2048];
    snprintf(env, sizeof env, "%s:%s", dir, FIXTURE_DIR);
    setenv("KVC_PLUGIN_PATH", env, 1);
    static found f;
    f.n = 0;
    kvch_find_plugins(collect, &f);
    ck_assert_int_ge(f.n, 3);
    ck_assert_str_eq(f.paths[0], other); /* first directory first, sorted */
    ck_assert_str_eq(f.paths[1], link);
    ck_assert_int_eq(found_index(&f, FX("good")), -1); /* hidden by the first */
    ck_assert_int_ge(found_index(&f, FX("major2")), 2);

    /* Loading by name takes the first directory's file too. */
    kvch_plugin *p = NULL;
    char err[1024];
    ck_assert_msg(kvch_load("fixture-good", &p, err, sizeof err) == KVC_OK, "%s", err);
    ck_assert_str_eq(kvch_plugin_path(p), link);
    kvch_unload(p);

    unlink(link);
    unlink(other);
    rmdir(dir);
}
END_TEST

/* ---- words ------------------------------------------------------------------------- */

START_TEST(test_caps_string)
{
    char buf[512];
    kvch_caps_string(0, buf, sizeof buf);
    ck_assert_str_eq(buf, "none");
    kvch_caps_string(KVC_CAP_CPU | KVC_CAP_EXPORT, buf, sizeof buf);
    ck_assert_str_eq(buf, "cpu export");
    kvch_caps_string(KVC_CAP_CUDA | KVC_CAP_TOKEN_FLAGS | (UINT64_C(1) << 40), buf, sizeof buf);
    ck_assert_str_eq(buf, "cuda token-flags bit40");
    kvch_caps_string(KVC_CAP_PROMPT_PHASE, buf, sizeof buf);
    ck_assert_str_eq(buf, "prompt-phase");
    kvch_caps_string(~UINT64_C(0), buf, sizeof buf);
    ck_assert_ptr_nonnull(strstr(buf, "needs-calibration"));
    ck_assert_ptr_nonnull(strstr(buf, "bit63"));
    char small[10];
    memset(small, 'x', sizeof small);
    kvch_caps_string(KVC_CAP_CPU | KVC_CAP_MATERIALIZE, small, sizeof small);
    ck_assert_uint_lt(strlen(small), sizeof small);
    ck_assert(strncmp(small, "cpu mat", 7) == 0);
    kvch_caps_string(KVC_CAP_CPU, NULL, 0); /* no crash */
}
END_TEST

START_TEST(test_status_string)
{
    ck_assert_str_eq(kvch_status_string(KVC_OK), "ok");
    ck_assert_str_eq(kvch_status_string(KVC_E_INVALID), "invalid argument");
    ck_assert_str_eq(kvch_status_string(KVC_E_NOMEM), "out of memory");
    ck_assert_str_eq(kvch_status_string(999), "unknown status");
    ck_assert_str_eq(kvch_status_string(-1), "unknown status");
    for (kvc_status a = KVC_OK; a <= KVC_E_INTERNAL; a++)
        for (kvc_status b = KVC_OK; b < a; b++)
            ck_assert_str_ne(kvch_status_string(a), kvch_status_string(b));
}
END_TEST

/* ---- the CLI ------------------------------------------------------------------------ */

/* Runs a shell command, returns its exit status and its output (stdout and
 * stderr together) in buf. */
static int run(const char *cmd, char *buf, size_t size)
{
    char full[4096];
    snprintf(full, sizeof full, "%s 2>&1", cmd);
    FILE *p = popen(full, "r");
    ck_assert_ptr_nonnull(p);
    size_t n = fread(buf, 1, size - 1, p);
    buf[n] = '\0';
    int st = pclose(p);
    ck_assert(WIFEXITED(st));
    return WEXITSTATUS(st);
}

static char out[1 << 16];

START_TEST(test_cli_info)
{
    int rc = run("'" KVC_EXE "' info '" FX("good") "'", out, sizeof out);
    ck_assert_msg(rc == 0, "rc %d: %s", rc, out);
    const char *want[] = {"fixture-good", "kvc loader test fixture", "0.0.1", HOST_ABI, "MIT",
                          "cpu export", "KVC_E_UNSUPPORTED", "kv_ratio", "float", "[0, 1]",
                          "fixture_mode", "enum", "plain|fancy", "How the fixture pretends",
                          NULL};
    for (const char *const *w = want; *w; w++)
        ck_assert_msg(strstr(out, *w) != NULL, "kvc info output lacks \"%s\":\n%s", *w, out);
}
END_TEST

START_TEST(test_cli_info_by_name_and_errors)
{
    setenv("KVC_PLUGIN_PATH", FIXTURE_DIR, 1);
    int rc = run("'" KVC_EXE "' info fixture-good", out, sizeof out);
    ck_assert_msg(rc == 0 && strstr(out, "fixture_mode"), "rc %d: %s", rc, out);

    rc = run("'" KVC_EXE "' info fixture-major2", out, sizeof out);
    ck_assert_int_eq(rc, 1);
    ck_assert_msg(strstr(out, "plugin speaks kvc ABI 2.x"), "%s", out);

    rc = run("'" KVC_EXE "' info no-such-plugin", out, sizeof out);
    ck_assert_int_eq(rc, 1);
    ck_assert_msg(strstr(out, "not found"), "%s", out);

    rc = run("'" KVC_EXE "' info", out, sizeof out);
    ck_assert_int_eq(rc, 2);
}
END_TEST

START_TEST(test_cli_list)
{
    setenv("KVC_PLUGIN_PATH", FIXTURE_DIR, 1);
    int rc = run("'" KVC_EXE "' list", out, sizeof out);
    ck_assert_msg(rc == 0, "rc %d: %s", rc, out);
    const char *want[] = {"ID", "CAPABILITIES", "fixture-good", "fixture-newer", "1.7",
                          FX("good"), "cpu export", "(failed to load)",
                          "no symbol kvc_plugin_entry", "plugin speaks kvc ABI 2.x", NULL};
    for (const char *const *w = want; *w; w++)
        ck_assert_msg(strstr(out, *w) != NULL, "kvc list output lacks \"%s\":\n%s", *w, out);
}
END_TEST

START_TEST(test_cli_dispatch)
{
    ck_assert_int_eq(run("'" KVC_EXE "' no-such-command", out, sizeof out), 2);
    ck_assert_ptr_nonnull(strstr(out, "usage: kvc"));
    ck_assert_int_eq(run("'" KVC_EXE "'", out, sizeof out), 2);
    ck_assert_int_eq(run("'" KVC_EXE "' --help", out, sizeof out), 0);
    ck_assert_ptr_nonnull(strstr(out, "info PLUGIN"));
    ck_assert_int_eq(run("'" KVC_EXE "' help", out, sizeof out), 0);
    ck_assert_int_eq(run("'" KVC_EXE "' --version", out, sizeof out), 0);
    ck_assert_ptr_nonnull(strstr(out, "ABI " HOST_ABI));
    ck_assert_int_eq(run("'" KVC_EXE "' list extra-arg", out, sizeof out), 2);
}
END_TEST

static Suite *loader_suite(void)
{
    Suite *s = suite_create("loader");
    TCase *tc = tcase_create("path");
    tcase_add_test(tc, test_good_by_path);
    tcase_add_test(tc, test_newer_minor_loads);
    tcase_add_test(tc, test_older_minor_loads);
    tcase_add_test(tc, test_abi11_loads_without_describe);
    tcase_add_test(tc, test_seq_describe_helper);
    tcase_add_test(tc, test_missing_file);
    tcase_add_test(tc, test_text_file);
    tcase_add_test(tc, test_directory);
    tcase_add_loop_test(tc, test_bad_fixture, 0, (int)(sizeof bad / sizeof bad[0]));
    tcase_add_test(tc, test_messages_distinct);
    tcase_add_test(tc, test_bad_arguments);
    suite_add_tcase(s, tc);

    tc = tcase_create("name");
    tcase_add_test(tc, test_by_name);
    tcase_add_test(tc, test_name_not_found);
    tcase_add_test(tc, test_install_dir);
    tcase_add_test(tc, test_find_plugins);
    tcase_add_test(tc, test_find_plugins_shadowing);
    suite_add_tcase(s, tc);

    tc = tcase_create("words");
    tcase_add_test(tc, test_caps_string);
    tcase_add_test(tc, test_status_string);
    suite_add_tcase(s, tc);

    tc = tcase_create("cli");
    tcase_add_test(tc, test_cli_info);
    tcase_add_test(tc, test_cli_info_by_name_and_errors);
    tcase_add_test(tc, test_cli_list);
    tcase_add_test(tc, test_cli_dispatch);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(loader_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
