/*
 * test_autoprep.c -- the host's preparation on demand and artifact cache
 * (host-shim/cli/autoprep.c, linked in with session.c) and the calibration
 * text (model/calib.c).
 *
 * Without arguments: the cache key, the cache's places, the atomic write,
 * the eval-text check; none needs the model. With "smollm2": session_open
 * on the real model through kvc-fixture-prep (a plugin needing weights and
 * calibration that records what it was fed), cache miss, hit, refusal,
 * off, unwritable, no_autoprep, the calibration note of the default files,
 * and `kvc prepare`'s wording. That program exits 77 (SKIP) without the
 * model.
 */
#include <check.h>
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "autoprep.h"
#include "calib.h"
#include "model_path.h"
#include "session.h"

#ifndef FIXTURE_DIR
#error "FIXTURE_DIR must be defined by the build"
#endif
#ifndef KVC_EXE
#error "KVC_EXE must be defined by the build"
#endif
#define PREP_FIXTURE FIXTURE_DIR "/kvc-fixture-prep.so"
#define LIC KVCH_LICENSE_DIR

/* ---- helpers ---------------------------------------------------------------------- */

static char tmp[256];

static void mk_tmp(void)
{
    const char *t = getenv("TMPDIR");
    snprintf(tmp, sizeof tmp, "%s/kvc-autoprep-XXXXXX", t && *t ? t : "/tmp");
    ck_assert_ptr_nonnull(mkdtemp(tmp));
}

static void rm_tmp(void)
{
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp);
    ck_assert_int_eq(system(cmd), 0);
}

static void write_file(const char *path, const void *data, size_t n)
{
    FILE *f = fopen(path, "wb");
    ck_assert_msg(f != NULL, "cannot create %s", path);
    ck_assert_uint_eq(fwrite(data, 1, n, f), n);
    ck_assert_int_eq(fclose(f), 0);
}

static size_t read_all(const char *path, char *buf, size_t cap)
{
    FILE *f = fopen(path, "rb");
    ck_assert_msg(f != NULL, "cannot open %s", path);
    size_t n = fread(buf, 1, cap - 1, f);
    buf[n] = '\0';
    fclose(f);
    return n;
}

/* Entries of dir other than . and ..; the last one's name into last. */
static int count_entries(const char *dir, char *last, size_t cap)
{
    DIR *d = opendir(dir);
    if (!d)
        return -1;
    int n = 0;
    for (struct dirent *e; (e = readdir(d));)
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) {
            n++;
            if (last)
                snprintf(last, cap, "%s", e->d_name);
        }
    closedir(d);
    return n;
}

static void opt(kvch_options *o, const char *kv)
{
    char err[256];
    ck_assert_msg(kvch_options_add(o, kv, err, sizeof err) == 0, "%s", err);
}

/* ---- the key ------------------------------------------------------------------------- */

#define BIG (3u << 20) /* a "model" of 3 MiB: head, middle and tail apart */

static char model[300], model2[300], small[300];
static unsigned char *big;
static const char *const CALIB3[] = {LIC "Apache-2.0", LIC "MPL-2.0", LIC "CC0-1.0"};

static void key_setup(void)
{
    mk_tmp();
    big = malloc(BIG);
    ck_assert_ptr_nonnull(big);
    uint64_t x = 88172645463325252ull;
    for (size_t i = 0; i < BIG; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        big[i] = (unsigned char)x;
    }
    snprintf(model, sizeof model, "%s/model.gguf", tmp);
    snprintf(model2, sizeof model2, "%s/moved.gguf", tmp);
    snprintf(small, sizeof small, "%s/small.gguf", tmp);
    write_file(model, big, BIG);
    write_file(small, big, 100);
}

static void key_teardown(void)
{
    free(big);
    rm_tmp();
}

static autoprep_key_in base_in(const char *m, const kvch_options *o)
{
    return (autoprep_key_in){.model_path = m, .plugin_id = "svdllm", .plugin_version = "1.0.0",
                             .opts = o, .calib = CALIB3, .n_calib = 3, .calib_tokens = 0,
                             .calib_ctx = 512, .max_positions = 8192};
}

static uint64_t key_of(const autoprep_key_in *in)
{
    uint64_t k = 0;
    char err[512];
    ck_assert_msg(autoprep_key(in, &k, err, sizeof err) == 0, "%s", err);
    return k;
}

START_TEST(test_fnv1a_vectors)
{
    /* Published FNV-1a 64 test vectors. */
    ck_assert_uint_eq(autoprep_fnv1a(AUTOPREP_FNV_OFFSET, "", 0), 0xcbf29ce484222325ull);
    ck_assert_uint_eq(autoprep_fnv1a(AUTOPREP_FNV_OFFSET, "a", 1), 0xaf63dc4c8601ec8cull);
    ck_assert_uint_eq(autoprep_fnv1a(AUTOPREP_FNV_OFFSET, "foobar", 6), 0x85944171f73967e8ull);
}
END_TEST

START_TEST(test_key_same_inputs)
{
    kvch_options o = {0};
    opt(&o, "kv_ratio=0.5");
    autoprep_key_in in = base_in(model, &o);
    uint64_t k = key_of(&in);
    ck_assert_uint_eq(key_of(&in), k);
    /* A copy elsewhere (a moved model) keys the same. */
    write_file(model2, big, BIG);
    in.model_path = model2;
    ck_assert_uint_eq(key_of(&in), k);
    kvch_options_clear(&o);
}
END_TEST

START_TEST(test_key_options)
{
    kvch_options a = {0}, b = {0}, c = {0};
    opt(&a, "kv_ratio=0.5");
    opt(&a, "rank=16");
    opt(&b, "rank=16");
    opt(&b, "kv_ratio=0.5");
    autoprep_key_in in = base_in(model, &a);
    const uint64_t k = key_of(&in);
    in.opts = &b; /* order given is irrelevant */
    ck_assert_uint_eq(key_of(&in), k);
    opt(&b, "calib_note=anything"); /* calib_note is left out */
    ck_assert_uint_eq(key_of(&in), k);
    opt(&b, "calib_note=something else");
    ck_assert_uint_eq(key_of(&in), k);
    opt(&b, "kv_ratio=0.25"); /* a value */
    ck_assert_uint_ne(key_of(&in), k);
    opt(&b, "kv_ratio=0.5");
    ck_assert_uint_eq(key_of(&in), k);
    opt(&b, "refit=1"); /* one more option */
    ck_assert_uint_ne(key_of(&in), k);

    opt(&c, "kv_ratio=0.5"); /* one fewer */
    in.opts = &c;
    ck_assert_uint_ne(key_of(&in), k);
    in.opts = NULL; /* none */
    const uint64_t none = key_of(&in);
    ck_assert_uint_ne(none, k);
    kvch_options_clear(&c);
    in.opts = &c;
    ck_assert_uint_eq(key_of(&in), none);

    /* Values swapped between names, and a boundary moved within a pair. */
    kvch_options d = {0}, e = {0}, f = {0}, g = {0};
    opt(&d, "kv_ratio=16");
    opt(&d, "rank=0.5");
    in.opts = &d;
    ck_assert_uint_ne(key_of(&in), k);
    opt(&f, "ab=c");
    opt(&g, "a=bc");
    in.opts = &f;
    const uint64_t kf = key_of(&in);
    in.opts = &g;
    ck_assert_uint_ne(key_of(&in), kf);
    (void)e;
    kvch_options_clear(&a);
    kvch_options_clear(&b);
    kvch_options_clear(&d);
    kvch_options_clear(&f);
    kvch_options_clear(&g);
}
END_TEST

/* Changes byte `at` of a copy of the big model and returns its key. */
static uint64_t key_flipped(size_t at, size_t size)
{
    big[at] ^= 0x5a;
    write_file(model2, big, size);
    big[at] ^= 0x5a;
    autoprep_key_in in = base_in(model2, NULL);
    return key_of(&in);
}

START_TEST(test_key_model_bytes)
{
    autoprep_key_in in = base_in(model, NULL);
    const uint64_t k = key_of(&in);
    const size_t M = AUTOPREP_MODEL_ENDS;
    ck_assert_uint_ne(key_flipped(0, BIG), k);
    ck_assert_uint_ne(key_flipped(M - 1, BIG), k);       /* last byte of the head */
    ck_assert_uint_ne(key_flipped(BIG - M, BIG), k);     /* first byte of the tail */
    ck_assert_uint_ne(key_flipped(BIG - 1, BIG), k);
    /* The middle is not read: a documented blind spot (size and both ends
     * change with any real re-quantization or re-export). */
    ck_assert_uint_eq(key_flipped(BIG / 2, BIG), k);
    /* Size: one byte shorter. */
    write_file(model2, big, BIG - 1);
    in.model_path = model2;
    ck_assert_uint_ne(key_of(&in), k);

    /* A file smaller than the ends: every byte counts. */
    in.model_path = small;
    const uint64_t ks = key_of(&in);
    for (size_t at = 0; at < 100; at += 33) {
        big[at] ^= 1;
        write_file(model2, big, 100);
        big[at] ^= 1;
        in.model_path = model2;
        ck_assert_uint_ne(key_of(&in), ks);
    }

    /* No model file: an error naming it. */
    char missing[400], err[512] = "";
    uint64_t key;
    snprintf(missing, sizeof missing, "%s/absent.gguf", tmp);
    in.model_path = missing;
    ck_assert_int_eq(autoprep_key(&in, &key, err, sizeof err), -1);
    ck_assert_msg(strstr(err, missing) != NULL, "%s", err);
}
END_TEST

START_TEST(test_key_other_fields)
{
    autoprep_key_in in = base_in(model, NULL);
    const uint64_t k = key_of(&in);
    autoprep_key_in v = in;
    v.plugin_id = "lorc";
    ck_assert_uint_ne(key_of(&v), k);
    v = in;
    v.plugin_version = "1.0.1";
    ck_assert_uint_ne(key_of(&v), k);
    /* The plugin's file: hashed whole, so a rebuild misses, a copy hits. */
    v = in;
    v.plugin_path = small;
    const uint64_t kp = key_of(&v);
    ck_assert_uint_ne(kp, k);
    v.plugin_path = model; /* another file */
    ck_assert_uint_ne(key_of(&v), kp);
    write_file(model2, big, 100); /* a copy of small */
    v.plugin_path = model2;
    ck_assert_uint_eq(key_of(&v), kp);
    big[50] ^= 1; /* one byte in the middle */
    write_file(model2, big, 100);
    big[50] ^= 1;
    ck_assert_uint_ne(key_of(&v), kp);
    char err[512];
    uint64_t key;
    v.plugin_path = "/nonexistent/kvc-x.so";
    ck_assert_int_eq(autoprep_key(&v, &key, err, sizeof err), -1);
    ck_assert_msg(strstr(err, "/nonexistent/kvc-x.so") != NULL, "%s", err);
    v = in;
    v.n_calib = 2; /* one file fewer */
    ck_assert_uint_ne(key_of(&v), k);
    v = in;
    const char *const reordered[] = {CALIB3[1], CALIB3[0], CALIB3[2]};
    v.calib = reordered;
    ck_assert_uint_ne(key_of(&v), k);
    v = in;
    v.n_calib = 0; /* a weights-only plugin */
    ck_assert_uint_ne(key_of(&v), k);
    v = in;
    v.calib_tokens = 4096;
    ck_assert_uint_ne(key_of(&v), k);
    v = in;
    v.calib_ctx = 256;
    ck_assert_uint_ne(key_of(&v), k);
    v = in;
    v.max_positions = 16384;
    ck_assert_uint_ne(key_of(&v), k);
}
END_TEST

/* ---- places and the atomic write ------------------------------------------------------ */

static void tmp_setup(void)
{
    mk_tmp();
}

START_TEST(test_cache_dir)
{
    char buf[512];
    setenv("HOME", "/home/someone", 1);
    unsetenv("XDG_CACHE_HOME");
    unsetenv("KVC_ARTIFACT_CACHE");
    ck_assert_int_eq(autoprep_cache_dir(buf, sizeof buf), 1);
    ck_assert_str_eq(buf, "/home/someone/.cache/kvc/artifacts");
    setenv("XDG_CACHE_HOME", "/xdg", 1);
    ck_assert_int_eq(autoprep_cache_dir(buf, sizeof buf), 1);
    ck_assert_str_eq(buf, "/xdg/kvc/artifacts");
    setenv("KVC_ARTIFACT_CACHE", "/mine", 1);
    ck_assert_int_eq(autoprep_cache_dir(buf, sizeof buf), 1);
    ck_assert_str_eq(buf, "/mine");
    setenv("KVC_ARTIFACT_CACHE", "off", 1);
    ck_assert_int_eq(autoprep_cache_dir(buf, sizeof buf), 0);
    setenv("KVC_ARTIFACT_CACHE", "", 1); /* empty = unset */
    ck_assert_int_eq(autoprep_cache_dir(buf, sizeof buf), 1);
    ck_assert_str_eq(buf, "/xdg/kvc/artifacts");
    unsetenv("XDG_CACHE_HOME");
    unsetenv("HOME");
    ck_assert_int_eq(autoprep_cache_dir(buf, sizeof buf), -1);
    setenv("HOME", "/home/someone", 1);
    ck_assert_int_eq(autoprep_cache_dir(buf, 10), -1); /* does not fit */
}
END_TEST

START_TEST(test_path)
{
    char buf[256];
    ck_assert_int_eq(autoprep_path(buf, sizeof buf, "/c", "svdllm", 0x0123456789abcdefull), 0);
    ck_assert_str_eq(buf, "/c/svdllm-0123456789abcdef.kvca");
    ck_assert_int_eq(autoprep_path(buf, sizeof buf, "/c", "a/../b", 1), 0);
    ck_assert_str_eq(buf, "/c/a_.._b-0000000000000001.kvca");
    ck_assert_int_eq(autoprep_path(buf, sizeof buf, "/c", ".hidden", 2), 0);
    ck_assert_str_eq(buf, "/c/_hidden-0000000000000002.kvca");
    ck_assert_int_eq(autoprep_path(buf, 20, "/c", "svdllm", 1), -1);
}
END_TEST

START_TEST(test_mkdirs)
{
    char dir[400], file[400], err[512];
    snprintf(dir, sizeof dir, "%s/a/b/c", tmp);
    ck_assert_msg(autoprep_mkdirs(dir, err, sizeof err) == 0, "%s", err);
    struct stat st;
    ck_assert_int_eq(stat(dir, &st), 0);
    ck_assert(S_ISDIR(st.st_mode));
    ck_assert_msg(autoprep_mkdirs(dir, err, sizeof err) == 0, "again: %s", err);
    snprintf(file, sizeof file, "%s/a/f", tmp);
    write_file(file, "x", 1);
    snprintf(dir, sizeof dir, "%s/a/f/sub", tmp);
    ck_assert_int_eq(autoprep_mkdirs(dir, err, sizeof err), -1);
    ck_assert_msg(strstr(err, "/a/f") != NULL, "%s", err);
    ck_assert_int_eq(autoprep_mkdirs(file, err, sizeof err), -1); /* a file, not a dir */
}
END_TEST

START_TEST(test_write_atomic)
{
    char path[400], err[512], buf[256], name[256];
    snprintf(path, sizeof path, "%s/x.kvca", tmp);
    ck_assert_msg(autoprep_write_atomic(path, "first version", 13, err, sizeof err) == 0, "%s",
                  err);
    ck_assert_uint_eq(read_all(path, buf, sizeof buf), 13);
    ck_assert_str_eq(buf, "first version");
    ck_assert_msg(autoprep_write_atomic(path, "second", 6, err, sizeof err) == 0, "%s", err);
    ck_assert_uint_eq(read_all(path, buf, sizeof buf), 6); /* replaced, not overwritten */
    ck_assert_str_eq(buf, "second");
    ck_assert_int_eq(count_entries(tmp, name, sizeof name), 1); /* no temporary left */
    ck_assert_str_eq(name, "x.kvca");
    ck_assert_int_eq(autoprep_write_atomic(path, "", 0, err, sizeof err), 0);
    ck_assert_uint_eq(read_all(path, buf, sizeof buf), 0);

    /* Into a directory that does not exist: an error, nothing left. */
    snprintf(path, sizeof path, "%s/none/x.kvca", tmp);
    ck_assert_int_eq(autoprep_write_atomic(path, "x", 1, err, sizeof err), -1);
    ck_assert_msg(strstr(err, "cannot create") != NULL, "%s", err);
    /* Onto a directory: the rename fails and the temporary is removed. */
    snprintf(path, sizeof path, "%s/d", tmp);
    ck_assert_int_eq(mkdir(path, 0777), 0);
    ck_assert_int_eq(autoprep_write_atomic(path, "x", 1, err, sizeof err), -1);
    ck_assert_msg(strstr(err, "rename") != NULL, "%s", err);
    ck_assert_int_eq(count_entries(tmp, NULL, 0), 2); /* x.kvca and d */
}
END_TEST

START_TEST(test_eval_text)
{
    if (access(KVCH_EVAL_TEXT, R_OK) != 0) {
        printf("no %s here: the eval-text check is not tested\n", KVCH_EVAL_TEXT);
        return;
    }
    char link[400];
    snprintf(link, sizeof link, "%s/evaluation", tmp);
    ck_assert_int_eq(symlink(KVCH_EVAL_TEXT, link), 0);
    ck_assert_int_eq(kvch_calib_is_eval_text(KVCH_EVAL_TEXT), 1);
    ck_assert_int_eq(kvch_calib_is_eval_text(link), 1);
    ck_assert_int_eq(kvch_calib_is_eval_text(LIC "Apache-2.0"), 0);
    ck_assert_int_eq(kvch_calib_is_eval_text(LIC "no-such-license"), 0);
    size_t n;
    const char *const *d = kvch_calib_defaults(&n);
    ck_assert_uint_eq(n, 5);
    for (size_t i = 0; i < n; i++)
        ck_assert_msg(!kvch_calib_is_eval_text(d[i]), "%s is the evaluation text", d[i]);
}
END_TEST

START_TEST(test_note_window)
{
    char note[64] = "Apache-2.0:64 (64 tokens)";
    kvch_calib_note_window(note, sizeof note, 32);
    ck_assert_str_eq(note, "Apache-2.0:64 (64 tokens, windows of 32)");
    char shortn[30] = "Apache-2.0:64 (64 tokens)";
    kvch_calib_note_window(shortn, sizeof shortn, 512); /* truncated, still terminated */
    ck_assert_uint_lt(strlen(shortn), sizeof shortn);
    char none[16] = "no parenthesis";
    kvch_calib_note_window(none, sizeof none, 512);
    ck_assert_str_eq(none, "no parenthesis");
}
END_TEST

/* ---- on the model, through kvc-fixture-prep ------------------------------------------- */

static const char *model_path;
static char cache[300];
static const char *const CALIB1[] = {LIC "Apache-2.0"};
#define NOTE1 "Apache-2.0:64 (64 tokens, windows of 32)"
#define ROWS1 (64u * 30u) /* SmolLM2-135M: 30 layers */

static void e2e_setup(void)
{
    mk_tmp();
    snprintf(cache, sizeof cache, "%s/cache/artifacts", tmp);
    setenv("KVC_ARTIFACT_CACHE", cache, 1);
}

static kvc_session_args e2e_args(kvch_options *o)
{
    return (kvc_session_args){.model = model_path, .plugin = PREP_FIXTURE, .opts = *o,
                              .calib = CALIB1, .n_calib = 1, .calib_tokens = 64,
                              .calib_ctx = 32};
}

/* stderr into a file while session_open runs. */
static int saved_fd = -1;
static char cap_path[400];

static void capture_begin(void)
{
    fflush(stderr);
    snprintf(cap_path, sizeof cap_path, "%s/stderr.txt", tmp);
    int fd = open(cap_path, O_WRONLY | O_CREAT | O_TRUNC, 0666);
    ck_assert_int_ge(fd, 0);
    saved_fd = dup(2);
    dup2(fd, 2);
    close(fd);
}

static char captured[1 << 16];

static const char *capture_end(void)
{
    fflush(stderr);
    dup2(saved_fd, 2);
    close(saved_fd);
    read_all(cap_path, captured, sizeof captured);
    fputs(captured, stdout); /* in the test log */
    return captured;
}

static int open_captured(kvc_session *s, const kvc_session_args *a)
{
    capture_begin();
    int rc = session_open(s, "test", a, 512);
    capture_end();
    return rc;
}

static kvc_instance_stats stats(const kvc_session *s)
{
    kvc_instance_stats is = {.struct_size = sizeof is};
    ck_assert_int_eq(s->p->instance_stats(s->inst, &is), KVC_OK);
    return is;
}

static void close_clean(kvc_session *s)
{
    ck_assert_uint_eq(session_close(s), 0);
}

#define HAS(text) ck_assert_msg(strstr(captured, text) != NULL, "stderr lacks \"%s\"", text)
#define LACKS(text) ck_assert_msg(strstr(captured, text) == NULL, "stderr has \"%s\"", text)

START_TEST(test_miss_hit_refuse)
{
    kvch_options o = {0};
    opt(&o, "kv_ratio=0.5");
    opt(&o, "refit=no");
    kvc_session_args a = e2e_args(&o);
    kvc_session s;

    /* Miss: prepared on weights + the note's tokens, cached. */
    ck_assert_int_eq(open_captured(&s, &a), 0);
    HAS("kvc test: preparing fixture-prep (kv_ratio=0.5, refit=no) on the model's weights and "
        NOTE1 " ...");
    HAS("kvc test: prepared in ");
    HAS(", cached at ");
    ck_assert_str_eq(s.calib_note, NOTE1);
    ck_assert_uint_eq(s.n_calib, 64);
    ck_assert_uint_eq(stats(&s).bytes_params, ROWS1);
    ck_assert_uint_eq(stats(&s).bytes_fixed, 0); /* not from an artifact */
    close_clean(&s);
    char name[256], file[700], buf[4096];
    ck_assert_int_eq(count_entries(cache, name, sizeof name), 1);
    ck_assert_msg(!strncmp(name, "fixture-prep-", 13) && strlen(name) == 13 + 16 + 5 &&
                      !strcmp(name + 29, ".kvca"),
                  "%s", name);
    snprintf(file, sizeof file, "%s/%s", cache, name);
    size_t n = read_all(file, buf, sizeof buf);
    ck_assert_uint_gt(n, 28);
    ck_assert_msg(strstr(buf + 28, "calib_note=" NOTE1 "\n"), "%s", buf + 28);
    ck_assert_uint_eq((unsigned char)buf[8], 30); /* every layer's weights */

    /* Hit, with the options in another order and a calib_note given. */
    kvch_options o2 = {0};
    opt(&o2, "refit=no");
    opt(&o2, "calib_note=mine");
    opt(&o2, "kv_ratio=0.5");
    a.opts = o2;
    ck_assert_int_eq(open_captured(&s, &a), 0);
    char want[800];
    snprintf(want, sizeof want, "kvc test: using cached fixture-prep artifact %s\n", file);
    HAS(want);
    LACKS("preparing");
    ck_assert_uint_eq(stats(&s).bytes_params, ROWS1);
    ck_assert_uint_eq(stats(&s).bytes_fixed, 1); /* loaded once */
    ck_assert_str_eq(s.calib_note, "");          /* no calibration text read */
    close_clean(&s);

    /* Another option value: a miss, a second file. */
    kvch_options o3 = {0};
    opt(&o3, "kv_ratio=0.25");
    opt(&o3, "refit=no");
    a.opts = o3;
    ck_assert_int_eq(open_captured(&s, &a), 0);
    HAS("preparing fixture-prep (kv_ratio=0.25, refit=no)");
    close_clean(&s);
    ck_assert_int_eq(count_entries(cache, NULL, 0), 2);

    /* A damaged cache file: refused, removed, prepared and cached again. */
    write_file(file, "garbage", 7);
    a.opts = o;
    ck_assert_int_eq(open_captured(&s, &a), 0);
    snprintf(want, sizeof want,
             "kvc test: warning: fixture-prep refuses its cached artifact %s (corrupt data: ",
             file);
    HAS(want);
    HAS("preparing fixture-prep");
    HAS(", cached at ");
    ck_assert_uint_eq(stats(&s).bytes_fixed, 0);
    close_clean(&s);
    n = read_all(file, buf, sizeof buf);
    ck_assert_msg(n > 28 && !memcmp(buf, "KVCFXPRP", 8), "not rewritten");
    ck_assert_int_eq(count_entries(cache, NULL, 0), 2);

    /* And a hit again. */
    ck_assert_int_eq(open_captured(&s, &a), 0);
    HAS("using cached fixture-prep artifact");
    close_clean(&s);

    kvch_options_clear(&o);
    kvch_options_clear(&o2);
    kvch_options_clear(&o3);
}
END_TEST

START_TEST(test_cache_off_and_unwritable)
{
    kvch_options o = {0};
    opt(&o, "kv_ratio=0.5");
    kvc_session_args a = e2e_args(&o);
    kvc_session s;

    setenv("KVC_ARTIFACT_CACHE", "off", 1);
    ck_assert_int_eq(open_captured(&s, &a), 0);
    HAS("preparing fixture-prep (kv_ratio=0.5)");
    HAS("kvc test: prepared in ");
    HAS(" s, not cached\n");
    LACKS("warning");
    ck_assert_uint_eq(stats(&s).bytes_params, ROWS1);
    close_clean(&s);
    ck_assert_int_eq(count_entries(tmp, NULL, 0), 1); /* only stderr.txt */

    /* A cache under a regular file: a warning, the prepared instance used. */
    char file[400], dir[500];
    snprintf(file, sizeof file, "%s/plain-file", tmp);
    write_file(file, "x", 1);
    snprintf(dir, sizeof dir, "%s/sub", file);
    setenv("KVC_ARTIFACT_CACHE", dir, 1);
    ck_assert_int_eq(open_captured(&s, &a), 0);
    HAS("warning: not cached: cannot create ");
    ck_assert_uint_eq(stats(&s).bytes_params, ROWS1);
    close_clean(&s);
    kvch_options_clear(&o);
}
END_TEST

START_TEST(test_no_autoprep)
{
    kvch_options o = {0};
    opt(&o, "kv_ratio=0.5");
    kvc_session_args a = e2e_args(&o);
    a.no_autoprep = 1;
    kvc_session s;
    ck_assert_int_eq(open_captured(&s, &a), 0);
    ck_assert_str_eq(captured, ""); /* says nothing */
    ck_assert_uint_eq(stats(&s).bytes_params, 0); /* unprepared */
    ck_assert_uint_eq(s.n_calib, 64);
    ck_assert_str_eq(s.calib_note, NOTE1);
    int found = 0;
    for (uint32_t i = 0; i < s.opts.n; i++)
        if (!strcmp(s.opts.names[i], "calib_note")) {
            ck_assert_str_eq(s.opts.values[i], NOTE1);
            found = 1;
        }
    ck_assert(found);
    close_clean(&s);
    ck_assert_int_eq(count_entries(cache, NULL, 0), -1); /* not even created */

    /* A calib_note the user gives is kept. */
    opt(&o, "calib_note=my own words");
    a.opts = o;
    ck_assert_int_eq(open_captured(&s, &a), 0);
    for (uint32_t i = 0; i < s.opts.n; i++)
        if (!strcmp(s.opts.names[i], "calib_note"))
            ck_assert_str_eq(s.opts.values[i], "my own words");
    close_clean(&s);
    kvch_options_clear(&o);
}
END_TEST

START_TEST(test_default_calibration_note)
{
    kvch_model m;
    char err[1024], note[512];
    ck_assert_msg(kvch_model_open(model_path, &m, err, sizeof err) == KVC_OK, "%s", err);
    size_t nf, n = 0;
    const char *const *files = kvch_calib_defaults(&nf);
    int32_t *ids = NULL;
    ck_assert_msg(kvch_calib_load(m.tok, files, nf, 0, &ids, &n, note, sizeof note, err,
                                  sizeof err) == KVC_OK,
                  "%s", err);
    printf("default calibration: %s\n", note);
    /* "Apache-2.0:A MPL-2.0:B GFDL-1.3:C CC0-1.0:D Artistic:E (T tokens)", T = sum */
    unsigned long c[5], total;
    ck_assert_int_eq(sscanf(note, "Apache-2.0:%lu MPL-2.0:%lu GFDL-1.3:%lu CC0-1.0:%lu "
                                  "Artistic:%lu (%lu tokens)",
                            &c[0], &c[1], &c[2], &c[3], &c[4], &total),
                     6);
    ck_assert_uint_eq(c[0] + c[1] + c[2] + c[3] + c[4], total);
    ck_assert_uint_eq(total, n);
    free(ids);

    /* A cap inside the second file: the first whole, ten of the second, no more. */
    ck_assert_int_eq(kvch_calib_load(m.tok, files, nf, c[0] + 10, &ids, &n, note, sizeof note,
                                     err, sizeof err),
                     KVC_OK);
    char want[128];
    snprintf(want, sizeof want, "Apache-2.0:%lu MPL-2.0:10 (%lu tokens)", c[0], c[0] + 10);
    ck_assert_str_eq(note, want);
    ck_assert_uint_eq(n, c[0] + 10);
    free(ids);

    /* A file that cannot be read is an error naming it. */
    const char *const bad[] = {LIC "Apache-2.0", "/nonexistent/calibration.txt"};
    ids = NULL;
    ck_assert_int_eq(kvch_calib_load(m.tok, bad, 2, 0, &ids, &n, note, sizeof note, err,
                                     sizeof err),
                     KVC_E_INVALID);
    ck_assert_msg(strstr(err, "/nonexistent/calibration.txt") != NULL, "%s", err);
    ck_assert_ptr_null(ids);
    kvch_model_close(&m);
}
END_TEST

START_TEST(test_cli_prepare)
{
    char cmd[2048], out[1 << 14], art[400];
    snprintf(art, sizeof art, "%s/out.kvca", tmp);
    snprintf(cmd, sizeof cmd,
             "'%s' prepare --plugin '%s' --model '%s' --calib %sApache-2.0 --calib-tokens 64 "
             "--ctx 32 --opt kv_ratio=0.5 -o '%s' 2>&1",
             KVC_EXE, PREP_FIXTURE, model_path, LIC, art);
    FILE *p = popen(cmd, "r");
    ck_assert_ptr_nonnull(p);
    size_t n = fread(out, 1, sizeof out - 1, p);
    out[n] = '\0';
    int st = pclose(p);
    printf("%s", out);
    ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "%s", out);
    ck_assert_msg(strstr(out, "calibration  " NOTE1 " (the artifact's calib_note)\n"), "%s", out);
    ck_assert_msg(strstr(out, "prepared     fixture-prep: weights of every layer, 64 calibration "
                              "tokens in 2 windows"),
                  "%s", out);
    ck_assert_msg(!strstr(out, "cached"), "kvc prepare used the cache: %s", out);
    char buf[4096];
    n = read_all(art, buf, sizeof buf);
    ck_assert_msg(n > 28 && strstr(buf + 28, "calib_note=" NOTE1 "\n"), "%s", buf + 28);
    ck_assert_int_eq(count_entries(cache, NULL, 0), -1); /* the cache untouched */

    /* The artifact kvc prepare wrote loads through --artifact. */
    kvch_options o = {0};
    kvc_session_args a = e2e_args(&o);
    a.artifact = art;
    kvc_session s;
    ck_assert_int_eq(open_captured(&s, &a), 0);
    ck_assert_str_eq(captured, "");
    ck_assert_uint_eq(stats(&s).bytes_fixed, 1);
    ck_assert_uint_eq(stats(&s).bytes_params, ROWS1);
    close_clean(&s);
}
END_TEST

int main(int argc, char **argv)
{
    Suite *su = suite_create("autoprep");
    if (argc > 1 && !strcmp(argv[1], "smollm2")) {
        model_path = kvct_model_or_skip();
        TCase *t = tcase_create("on-model");
        tcase_add_checked_fixture(t, e2e_setup, rm_tmp);
        tcase_set_timeout(t, 600);
        tcase_add_test(t, test_miss_hit_refuse);
        tcase_add_test(t, test_cache_off_and_unwritable);
        tcase_add_test(t, test_no_autoprep);
        tcase_add_test(t, test_default_calibration_note);
        tcase_add_test(t, test_cli_prepare);
        suite_add_tcase(su, t);
    } else {
        TCase *k = tcase_create("key");
        tcase_add_checked_fixture(k, key_setup, key_teardown);
        tcase_add_test(k, test_fnv1a_vectors);
        tcase_add_test(k, test_key_same_inputs);
        tcase_add_test(k, test_key_options);
        tcase_add_test(k, test_key_model_bytes);
        tcase_add_test(k, test_key_other_fields);
        suite_add_tcase(su, k);
        TCase *f = tcase_create("files");
        tcase_add_checked_fixture(f, tmp_setup, rm_tmp);
        tcase_add_test(f, test_cache_dir);
        tcase_add_test(f, test_path);
        tcase_add_test(f, test_mkdirs);
        tcase_add_test(f, test_write_atomic);
        tcase_add_test(f, test_eval_text);
        tcase_add_test(f, test_note_window);
        suite_add_tcase(su, f);
    }
    SRunner *sr = srunner_create(su);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
