/*
 * main.c -- kvc-conform: the command line, the run, the table, JUnit XML
 * and JSON.
 *
 * Check runs every test in its own forked child (forced, whatever CK_FORK
 * says) under a time limit and says pass, failure or error. Check has no
 * notion of skipped or warning, and knows nothing of figures, so the
 * children append those to a side file (common.c) and this file merges the
 * two: see classify() for the mapping to DESIGN §5's five results.
 */
#include <errno.h>
#include <getopt.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#include "conform.h"
#include "run.h"

#ifndef KVC_VERSION
#define KVC_VERSION "dev" /* meson passes the project version */
#endif

enum { R_PASSED, R_FAILED, R_CRASHED, R_SKIPPED, R_WARNING, R_NONE, R_KINDS };
static const char *const kind_word[R_KINDS] = {"passed", "failed", "crashed",
                                              "skipped", "warning", "not run"};

/* What the runner knows of one test: the side file's lines, then Check's
 * verdict folded in by classify(). */
typedef struct result {
    int kind;            /* R_* */
    char *figure;        /* last kc_figure, or NULL */
    char *skip;          /* kc_skip's reason, or NULL */
    char *warn;          /* kc_warn reasons joined by "; ", or NULL */
    char *reason;        /* why it did not pass (or the skip/warning) */
    char *where;         /* "file:line" of the failing or last passed check */
    int ended;           /* the body returned (side "end" line) */
    double child_s;      /* the child's own duration; -1 = none reported */
    double seconds;      /* what is reported: child's, else the parent's, else -1 */
} result;

static result *res;
static SRunner *runner;
static kc_plugin_info info;
static long side_offset;
static int table_width = 160; /* the terminal's when on one */
static int tty;
static int w_group = 5, w_test = 4;
static double limit_scale = 1; /* profile times CK_TIMEOUT_MULTIPLIER, as Check applies it */

/* ---- small utilities ------------------------------------------------------------- */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static char *xstrdup(const char *s)
{
    char *d = strdup(s);
    if (d == NULL) {
        fprintf(stderr, "kvc-conform: out of memory\n");
        exit(2);
    }
    return d;
}

static char *xprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *xprintf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *s = NULL;
    if (vasprintf(&s, fmt, ap) < 0) {
        fprintf(stderr, "kvc-conform: out of memory\n");
        exit(2);
    }
    va_end(ap);
    return s;
}

static const char *base_name(const char *path)
{
    const char *s = strrchr(path, '/');
    return s ? s + 1 : path;
}

/* ---- the side file -------------------------------------------------------------- */

static long find_test(const char *full)
{
    for (size_t i = 0; i < kc_n_tests; i++)
        if (strcmp(kc_tests[i].full, full) == 0)
            return (long)i;
    return -1;
}

static void side_apply(char *line)
{
    char *kind = strchr(line, '\t');
    if (kind == NULL)
        return;
    *kind++ = '\0';
    char *text = strchr(kind, '\t');
    if (text == NULL)
        return;
    *text++ = '\0';
    long i = find_test(line);
    if (i < 0)
        return;
    result *r = &res[i];
    if (strcmp(kind, "figure") == 0) {
        free(r->figure);
        r->figure = xstrdup(text);
    } else if (strcmp(kind, "skip") == 0) {
        free(r->skip);
        r->skip = xstrdup(text);
    } else if (strcmp(kind, "warn") == 0) {
        char *w = r->warn ? xprintf("%s; %s", r->warn, text) : xstrdup(text);
        free(r->warn);
        r->warn = w;
    } else if (strcmp(kind, "end") == 0) {
        r->ended = 1;
    } else if (strcmp(kind, "time") == 0) {
        r->child_s = strtod(text, NULL);
    }
}

/* Reads the lines appended since the last call. Only whole lines count: a
 * line still being written (a straggling grandchild) is read next time. */
static void side_read(void)
{
    FILE *f = fopen(KC.side_path, "r");
    if (f == NULL)
        return;
    if (fseek(f, side_offset, SEEK_SET) != 0) {
        fclose(f);
        return;
    }
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;
    while ((n = getline(&line, &cap, f)) > 0) {
        if (line[n - 1] != '\n')
            break;
        side_offset += n;
        line[n - 1] = '\0';
        side_apply(line);
    }
    free(line);
    fclose(f);
}

/* ---- classification --------------------------------------------------------------- */

/* Check's words (check_run.c) for the ways a forked test can end other
 * than pass or an assertion: a signal, the time limit, an exit. */
static void classify(size_t i, TestResult *tr)
{
    result *r = &res[i];
    const char *msg = tr_msg(tr) ? tr_msg(tr) : "";
    double limit = kc_tests[i].timeout_s * limit_scale;
    free(r->reason);
    free(r->where);
    r->reason = NULL;
    r->where = tr_lfile(tr) ? xprintf("%s:%d", base_name(tr_lfile(tr)), tr_lno(tr)) : NULL;
    switch (tr_rtype(tr)) {
    case CK_PASS:
        if (r->skip) {
            r->kind = R_SKIPPED;
            r->reason = xstrdup(r->skip);
        } else if (!r->ended) {
            /* Status 0 without the trampoline's "end": exit(0) in the
             * middle of the test, which only a plugin would do. */
            r->kind = R_CRASHED;
            r->reason = xstrdup("the test's process exited with status 0 before the test "
                                "finished (plugins must never call exit())");
        } else if (r->warn) {
            r->kind = R_WARNING;
            r->reason = xstrdup(r->warn);
        } else {
            r->kind = R_PASSED;
        }
        break;
    case CK_FAILURE:
        r->kind = R_FAILED;
        r->reason = xstrdup(msg);
        break;
    default: /* CK_ERROR */
        if (strstr(msg, "timeout") != NULL) {
            r->kind = R_FAILED;
            KC.hangs++;
            r->reason = r->where ? xprintf("hung: no result after %g s (last check passed: %s)",
                                           limit, r->where)
                                 : xprintf("hung: no result after %g s", limit);
        } else {
            /* "Received signal 11 (Segmentation fault)", "Early exit with
             * return value 3": the last passed check says how far it got. */
            r->kind = R_CRASHED;
            r->reason = r->where ? xprintf("%s (last check passed: %s)", msg, r->where)
                                 : xstrdup(msg);
        }
        break;
    }
    r->seconds = r->child_s >= 0 ? r->child_s : kc_tests[i].parent_s;
}

/* ---- the table --------------------------------------------------------------------- */

enum { W_RESULT = 8, W_FIGURE = 28 };

/* Writes s cut to width w (with "..." when cut), padded when pad. Line
 * breaks and tabs (a failure message may hold them) become spaces so a
 * row stays one line. */
static void cell(const char *s, int w, int pad)
{
    char buf[512];
    snprintf(buf, sizeof buf, "%s", s);
    for (char *c = buf; *c; c++)
        if ((unsigned char)*c < 0x20)
            *c = ' ';
    int n = (int)strlen(buf);
    if (n > w && w > 3)
        printf("%.*s...", w - 3, buf);
    else
        printf("%-*.*s", pad ? w : 0, w, buf);
    if (pad)
        printf(" ");
}

static void print_header_row(void)
{
    cell("group", w_group, 1);
    cell("test", w_test, 1);
    cell("result", W_RESULT, 1);
    cell("figure", W_FIGURE, 1);
    printf("reason\n");
    int total = w_group + w_test + W_RESULT + W_FIGURE + 4 + 40;
    if (total > table_width)
        total = table_width;
    for (int i = 0; i < total; i++)
        putchar('-');
    putchar('\n');
}

static void print_row(size_t i)
{
    const result *r = &res[i];
    int w_reason = table_width - (w_group + w_test + W_RESULT + W_FIGURE + 4);
    if (w_reason < 40)
        w_reason = 40;
    cell(kc_tests[i].group, w_group, 1);
    cell(kc_tests[i].name, w_test, 1);
    cell(kind_word[r->kind], W_RESULT, 1);
    /* With no reason to show, the figure may use the rest of the line. */
    int w_fig = r->reason ? W_FIGURE : W_FIGURE + 1 + w_reason;
    cell(r->figure ? r->figure : "", w_fig, r->reason != NULL);
    if (r->reason)
        cell(r->reason, w_reason, 0);
    printf("\n");
    fflush(stdout);
}

/* On a terminal, the test now running, so a long or hung test is not a
 * silent wait; the row overwrites it. */
static void before_test(size_t i)
{
    if (tty) {
        printf("  running %s ...\r", kc_tests[i].full);
        fflush(stdout);
    }
}

static void after_test(size_t i)
{
    side_read();
    int n = srunner_ntests_run(runner);
    TestResult **trs = srunner_results(runner);
    TestResult *tr = NULL;
    /* The newest result is this test's; search in case Check ever adds
     * more than one result per TCase. */
    for (int k = n - 1; k >= 0 && trs; k--)
        if (strcmp(tr_tcname(trs[k]), kc_tests[i].full) == 0) {
            tr = trs[k];
            break;
        }
    if (tr)
        classify(i, tr);
    free(trs);
    if (tty)
        printf("\033[2K"); /* clear the "running" line */
    print_row(i);
}

/* ---- reports --------------------------------------------------------------------------- */

/* Escapes s for XML text or, with attr, for a double-quoted attribute,
 * where a raw line break or tab would be normalised to a space. */
static void xml_esc(FILE *f, const char *s, int attr)
{
    for (const unsigned char *c = (const unsigned char *)s; *c; c++) {
        const char *e = *c == '&' ? "&amp;" : *c == '<' ? "&lt;" : *c == '>' ? "&gt;"
                      : *c == '"' ? "&quot;" : *c == '\'' ? "&apos;" : NULL;
        if (e)
            fputs(e, f);
        else if (*c == '\t' || *c == '\n' || *c == '\r')
            attr ? (void)fprintf(f, "&#%d;", *c) : (void)fputc(*c, f);
        else /* XML 1.0 forbids other control characters even escaped */
            fputc(*c < 0x20 || *c == 0x7f ? '?' : *c, f);
    }
}

static void xml_text(FILE *f, const char *s)
{
    xml_esc(f, s, 0);
}

static void xml_attr(FILE *f, const char *s)
{
    xml_esc(f, s, 1);
}

static void xml_prop(FILE *f, const char *name, const char *value)
{
    fprintf(f, "      <property name=\"%s\" value=\"", name);
    xml_attr(f, value ? value : "");
    fputs("\"/>\n", f);
}

static void opts_string(char *buf, size_t cap)
{
    size_t len = 0;
    buf[0] = '\0';
    for (uint32_t i = 0; i < KC.opts.n && len < cap; i++)
        len += (size_t)snprintf(buf + len, cap - len, "%s%s=%s", i ? " " : "", KC.opts.names[i],
                                KC.opts.values[i]);
}

typedef struct summary {
    int count[R_KINDS];
    double seconds;
} summary;

static void write_junit(FILE *f, const summary *s, const char *stamp, const char *host)
{
    int n = (int)kc_n_tests, fail = s->count[R_FAILED], err = s->count[R_CRASHED],
        skip = s->count[R_SKIPPED] + s->count[R_NONE];
    char opts[2048], seed[32];
    opts_string(opts, sizeof opts);
    snprintf(seed, sizeof seed, "%llu", (unsigned long long)KC.seed);
    fputs("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n", f);
    fprintf(f, "<testsuites name=\"kvc-conform\" tests=\"%d\" failures=\"%d\" errors=\"%d\" "
               "skipped=\"%d\" time=\"%.3f\">\n", n, fail, err, skip, s->seconds);
    fputs("  <testsuite name=\"kvc-conform: ", f);
    xml_attr(f, info.loaded ? info.id : KC.plugin);
    fprintf(f, "\" tests=\"%d\" failures=\"%d\" errors=\"%d\" skipped=\"%d\" time=\"%.3f\" "
               "timestamp=\"%s\" hostname=\"", n, fail, err, skip, s->seconds, stamp);
    xml_attr(f, host);
    fputs("\">\n    <properties>\n", f);
    xml_prop(f, "plugin.id", info.loaded ? info.id : "");
    xml_prop(f, "plugin.version", info.loaded ? info.version : "");
    xml_prop(f, "plugin.path", info.loaded ? info.path : KC.plugin);
    xml_prop(f, "plugin.load_error", info.loaded ? "" : info.error);
    xml_prop(f, "options", opts);
    xml_prop(f, "profile", KC.profile == KC_FULL ? "full" : "quick");
    xml_prop(f, "device", KC.device == KVC_MEM_CUDA ? "cuda" : "cpu");
    xml_prop(f, "seed", seed);
    xml_prop(f, "model", KC.model ? KC.model : "");
    xml_prop(f, "text", KC.text);
    fputs("    </properties>\n", f);
    for (size_t i = 0; i < kc_n_tests; i++) {
        const result *r = &res[i];
        fputs("    <testcase classname=\"", f);
        xml_attr(f, kc_tests[i].group);
        fputs("\" name=\"", f);
        xml_attr(f, kc_tests[i].name);
        fprintf(f, "\" time=\"%.3f\">\n", r->seconds > 0 ? r->seconds : 0.0);
        const char *el = r->kind == R_FAILED ? "failure" : r->kind == R_CRASHED ? "error" : NULL;
        if (el) {
            fprintf(f, "      <%s message=\"", el);
            xml_attr(f, r->reason ? r->reason : "");
            fprintf(f, "\" type=\"%s\">", kind_word[r->kind]);
            /* The body says where it failed, unless the reason (crash,
             * hang) already names the last check that passed. */
            if (r->where && r->reason && !strstr(r->reason, "(last check passed")) {
                xml_text(f, r->where);
                fputs(": ", f);
            }
            xml_text(f, r->reason ? r->reason : "");
            fprintf(f, "</%s>\n", el);
        } else if (r->kind == R_SKIPPED || r->kind == R_NONE) {
            fputs("      <skipped message=\"", f);
            xml_attr(f, r->kind == R_NONE ? "not run" : r->reason ? r->reason : "");
            fputs("\"/>\n", f);
        }
        if (r->figure) {
            fputs("      <system-out>", f);
            xml_text(f, r->figure);
            fputs("</system-out>\n", f);
        }
        /* JUnit has no "warning" result: a passing case whose system-err
         * says why. */
        if (r->kind == R_WARNING) {
            fputs("      <system-err>warning: ", f);
            xml_text(f, r->reason);
            fputs("</system-err>\n", f);
        }
        fputs("    </testcase>\n", f);
    }
    fputs("  </testsuite>\n</testsuites>\n", f);
}

static void json_str(FILE *f, const char *s)
{
    if (s == NULL) {
        fputs("null", f);
        return;
    }
    fputc('"', f);
    for (const unsigned char *c = (const unsigned char *)s; *c; c++) {
        if (*c == '"' || *c == '\\')
            fprintf(f, "\\%c", *c);
        else if (*c < 0x20 || *c == 0x7f)
            fprintf(f, "\\u%04x", *c);
        else
            fputc(*c, f);
    }
    fputc('"', f);
}

/* Writes `pre` (punctuation, layout), then "key": value (null for NULL). */
static void json_kv(FILE *f, const char *pre, const char *key, const char *value)
{
    fprintf(f, "%s\"%s\": ", pre, key);
    json_str(f, value);
}

static void write_json(FILE *f, const summary *s)
{
    const char *on = info.loaded ? "" : NULL; /* NULL: the field is null */
    json_kv(f, "{\n  ", "tool", "kvc-conform");
    json_kv(f, ",\n  ", "version", KVC_VERSION);
    json_kv(f, ",\n  \"plugin\": {", "id", on ? info.id : NULL);
    json_kv(f, ", ", "name", on ? info.name : NULL);
    json_kv(f, ", ", "version", on ? info.version : NULL);
    json_kv(f, ", ", "path", on ? info.path : KC.plugin);
    json_kv(f, ", ", "abi", on ? info.abi : NULL);
    json_kv(f, ", ", "load_error", on ? NULL : info.error);
    fputs(",\n    \"caps\": [", f);
    /* kvch_caps_string gives words separated by spaces. */
    char caps[sizeof info.caps];
    snprintf(caps, sizeof caps, "%s", info.caps);
    const char *sep = "";
    for (char *save = NULL, *w = strtok_r(caps, " ", &save); w; w = strtok_r(NULL, " ", &save)) {
        fputs(sep, f);
        json_str(f, w);
        sep = ", ";
    }
    fputs("],\n    \"options\": {", f);
    for (uint32_t i = 0; i < KC.opts.n; i++)
        json_kv(f, i ? ", " : "", KC.opts.names[i], KC.opts.values[i]);
    json_kv(f, "}},\n  ", "profile", KC.profile == KC_FULL ? "full" : "quick");
    json_kv(f, ",\n  ", "device", KC.device == KVC_MEM_CUDA ? "cuda" : "cpu");
    fprintf(f, ",\n  \"seed\": %llu", (unsigned long long)KC.seed);
    json_kv(f, ",\n  ", "model", KC.model);
    json_kv(f, ",\n  ", "text", KC.text);
    fputs(",\n  \"results\": [", f);
    for (size_t i = 0; i < kc_n_tests; i++) {
        const result *r = &res[i];
        json_kv(f, i ? ",\n    {" : "\n    {", "group", kc_tests[i].group);
        json_kv(f, ", ", "test", kc_tests[i].name);
        json_kv(f, ", ", "result", kind_word[r->kind]);
        json_kv(f, ", ", "figure", r->figure);
        json_kv(f, ", ", "reason", r->reason);
        json_kv(f, ", ", "where", r->kind == R_FAILED || r->kind == R_CRASHED ? r->where : NULL);
        if (r->seconds < 0)
            fputs(", \"seconds\": null}", f);
        else
            fprintf(f, ", \"seconds\": %.6f}", r->seconds);
    }
    fprintf(f, "\n  ],\n  \"summary\": {\"tests\": %zu, \"passed\": %d, \"failed\": %d, "
               "\"crashed\": %d, \"skipped\": %d, \"warning\": %d, \"seconds\": %.3f}\n}\n",
            kc_n_tests, s->count[R_PASSED], s->count[R_FAILED], s->count[R_CRASHED],
            s->count[R_SKIPPED] + s->count[R_NONE], s->count[R_WARNING], s->seconds);
}

/* ---- command line ----------------------------------------------------------------------- */

static void usage(FILE *f)
{
    fputs("usage: kvc-conform PLUGIN [options]\n"
          "Runs a kvc plugin (a path to a .so, or a name found on KVC_PLUGIN_PATH or in the\n"
          "install directory) through the ABI contract, bad input, memory and accuracy\n"
          "tests, each in its own process with a time limit.\n\n"
          "  --opt NAME=VALUE     plugin option of the configuration under test (repeatable)\n"
          "  --model GGUF         model for the real-model tests (default: the cached\n"
          "                       SmolLM2 when present; else those tests skip)\n"
          "  --text FILE          evaluation text (default /usr/share/common-licenses/GPL-3)\n"
          "  --device cpu|cuda    where tensors live (default cpu)\n"
          "  --profile quick|full thresholds, sizes and time limits (full: 4x the time)\n"
          "  --seed N             replay the random inputs of an earlier run\n"
          "  --junit FILE         write JUnit XML\n"
          "  --json FILE          write JSON\n"
          "  --only GROUP[/TEST][,...]  run these groups or tests only\n"
          "  --max-hangs N        after N hung tests skip the rest, saying why (default 2;\n"
          "                       0 = run everything whatever it costs)\n"
          "  --list               list the tests and exit\n"
          "  --help, --version\n\n"
          "Exit status: 0 nothing failed or crashed, 1 something did, 2 usage error.\n", f);
}

static int usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int usage_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("kvc-conform: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputs("\n(kvc-conform --help for usage)\n", stderr);
    va_end(ap);
    return 2;
}

static FILE *open_report(const char *path)
{
    FILE *f = fopen(path, "w");
    if (f == NULL)
        fprintf(stderr, "kvc-conform: cannot write %s: %s\n", path, strerror(errno));
    return f;
}

static uint64_t seed_from_time(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t z = (uint64_t)ts.tv_sec * UINT64_C(1000000007) ^ (uint64_t)ts.tv_nsec ^
                 ((uint64_t)getpid() << 32);
    z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
    /* Short enough to type back in. */
    return (z ^ (z >> 31)) % UINT64_C(1000000000);
}

int main(int argc, char **argv)
{
    static const struct option longs[] = {
        {"opt", required_argument, 0, 'o'},     {"model", required_argument, 0, 'm'},
        {"text", required_argument, 0, 't'},    {"device", required_argument, 0, 'd'},
        {"profile", required_argument, 0, 'p'}, {"seed", required_argument, 0, 's'},
        {"junit", required_argument, 0, 'j'},   {"json", required_argument, 0, 'J'},
        {"only", required_argument, 0, 'O'},    {"list", no_argument, 0, 'l'},
        {"help", no_argument, 0, 'h'},          {"version", no_argument, 0, 'V'},
        {"max-hangs", required_argument, 0, 'H'},
        {0, 0, 0, 0},
    };
    const char *junit = NULL, *json = NULL;
    int list = 0, seeded = 0, c;
    char err[256], model_buf[4096];
    KC.text = "/usr/share/common-licenses/GPL-3";
    KC.device = KVC_MEM_HOST;
    KC.profile = KC_QUICK;
    KC.max_hangs = 2;
    opterr = 0;
    while ((c = getopt_long(argc, argv, ":h", longs, NULL)) != -1) {
        switch (c) {
        case 'o':
            if (kvch_options_add(&KC.opts, optarg, err, sizeof err) != 0)
                return usage_error("--opt %s: %s", optarg, err);
            break;
        case 'm': KC.model = optarg; break;
        case 't': KC.text = optarg; break;
        case 'd':
            if (strcmp(optarg, "cpu") == 0)
                KC.device = KVC_MEM_HOST;
            else if (strcmp(optarg, "cuda") == 0)
                KC.device = KVC_MEM_CUDA;
            else
                return usage_error("--device must be cpu or cuda, not '%s'", optarg);
            break;
        case 'p':
            if (strcmp(optarg, "quick") == 0)
                KC.profile = KC_QUICK;
            else if (strcmp(optarg, "full") == 0)
                KC.profile = KC_FULL;
            else
                return usage_error("--profile must be quick or full, not '%s'", optarg);
            break;
        case 's': {
            char *end;
            errno = 0;
            unsigned long long v = strtoull(optarg, &end, 10);
            if (errno || end == optarg || *end || optarg[0] == '-')
                return usage_error("--seed wants a non-negative integer, not '%s'", optarg);
            KC.seed = v;
            seeded = 1;
            break;
        }
        case 'H': {
            char *end;
            long v = strtol(optarg, &end, 10);
            if (end == optarg || *end || v < 0 || v > 1000)
                return usage_error("--max-hangs wants a count in [0, 1000], not '%s'", optarg);
            KC.max_hangs = (int)v;
            break;
        }
        case 'j': junit = optarg; break;
        case 'J': json = optarg; break;
        case 'O': kc_filter = optarg; break;
        case 'l': list = 1; break;
        case 'h': usage(stdout); return 0;
        case 'V': printf("kvc-conform %s (kvc ABI %d.%d)\n", KVC_VERSION,
                         KVC_ABI_VERSION_MAJOR, KVC_ABI_VERSION_MINOR); return 0;
        case ':': return usage_error("%s needs a value", argv[optind - 1]);
        default: return usage_error("unknown option '%s'", argv[optind - 1]);
        }
    }
    if (optind != argc - 1)
        return usage_error(optind == argc ? "give the plugin (a path or a name)"
                                          : "one plugin at a time ('%s' is extra)",
                           argv[optind + 1 < argc ? optind + 1 : optind]);
    KC.plugin = argv[optind];
    if (!seeded)
        KC.seed = seed_from_time();
    if (KC.model && access(KC.model, R_OK) != 0)
        return usage_error("cannot read the model %s: %s", KC.model, strerror(errno));
    if (KC.model == NULL) {
        const char *def = kvch_default_model(model_buf, sizeof model_buf);
        if (access(def, R_OK) == 0)
            KC.model = def;
    }

    /* The environment must not narrow or change what --only and the
     * forced fork mode decide. */
    unsetenv("CK_RUN_SUITE");
    unsetenv("CK_RUN_CASE");
    unsetenv("CK_INCLUDE_TAGS");
    unsetenv("CK_EXCLUDE_TAGS");
    /* tcase_set_timeout multiplies by CK_TIMEOUT_MULTIPLIER (slow machines,
     * valgrind); the "hung after N s" words must say the real limit. */
    const char *mult = getenv("CK_TIMEOUT_MULTIPLIER");
    limit_scale = KC.profile == KC_FULL ? 4.0 : 1.0;
    if (mult && strtod(mult, NULL) > 0)
        limit_scale *= strtod(mult, NULL);
    Suite *suite = suite_create("kvc-conform");
    kc_group_abi(suite);
    kc_group_lifecycle(suite);
    kc_group_badinput(suite);
    kc_group_semantics(suite);
    kc_group_memory(suite);
    kc_group_accuracy(suite);
    if (kc_filter && kc_n_tests == 0) {
        srunner_free(srunner_create(suite)); /* frees the suite too */
        return usage_error("--only %s matches no group or test (--list shows them)", kc_filter);
    }
    if (list) {
        for (size_t i = 0; i < kc_n_tests; i++)
            printf("%s\n", kc_tests[i].full);
        srunner_free(srunner_create(suite)); /* frees the suite too */
        return 0;
    }

    FILE *fj = junit ? open_report(junit) : NULL, *fs = json ? open_report(json) : NULL;
    if ((junit && !fj) || (json && !fs))
        return 2;
    const char *tmp = getenv("TMPDIR");
    char side_buf[4096];
    snprintf(side_buf, sizeof side_buf, "%s/kvc-conform-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    int sfd = mkstemp(side_buf);
    if (sfd < 0) {
        fprintf(stderr, "kvc-conform: cannot make a temporary file %s: %s\n", side_buf,
                strerror(errno));
        return 2;
    }
    close(sfd);
    KC.side_path = side_buf;

    res = calloc(kc_n_tests ? kc_n_tests : 1, sizeof *res);
    if (res == NULL) {
        fprintf(stderr, "kvc-conform: out of memory\n");
        return 2;
    }
    for (size_t i = 0; i < kc_n_tests; i++) {
        res[i].kind = R_NONE;
        res[i].child_s = res[i].seconds = -1;
        int g = (int)strlen(kc_tests[i].group), t = (int)strlen(kc_tests[i].name);
        w_group = g > w_group ? g : w_group;
        w_test = t > w_test ? t : w_test;
    }
    w_test = w_test > 40 ? 40 : w_test;
    tty = isatty(STDOUT_FILENO);
    struct winsize ws;
    if (tty && ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0)
        table_width = ws.ws_col;

    kc_probe(KC.plugin, &info);
    char opts[2048];
    opts_string(opts, sizeof opts);
    if (info.loaded)
        printf("kvc-conform %s: %s %s (%s, ABI %s)\n  %s\n  caps: %s\n", KVC_VERSION, info.id,
               info.version, info.name, info.abi, info.path, info.caps);
    else
        printf("kvc-conform %s: %s DOES NOT LOAD: %s\n", KVC_VERSION, KC.plugin, info.error);
    printf("  options: %s | device %s | profile %s\n  model: %s\n  text: %s\n",
           *opts ? opts : "(defaults)", KC.device == KVC_MEM_CUDA ? "cuda" : "cpu",
           KC.profile == KC_FULL ? "full" : "quick",
           KC.model ? KC.model : "none (model tests skip: give --model or run "
                                 "scripts/fetch-model.sh)",
           KC.text);
    printf("seed %llu (replay with --seed %llu)\n\n", (unsigned long long)KC.seed,
           (unsigned long long)KC.seed);
    print_header_row();

    runner = srunner_create(suite);
    srunner_set_fork_status(runner, CK_FORK);
    kc_before_test = before_test;
    kc_after_test = after_test;
    double t0 = now_s();
    /* Children inherit unflushed stdio buffers and flush them at exit. */
    fflush(NULL);
    srunner_run_all(runner, CK_SILENT);
    summary sum = {.seconds = now_s() - t0};
    side_read();
    for (size_t i = 0; i < kc_n_tests; i++)
        sum.count[res[i].kind]++;

    printf("\n%zu test%s: %d passed, %d failed, %d crashed, %d skipped, %d warning", kc_n_tests,
           kc_n_tests == 1 ? "" : "s",
           sum.count[R_PASSED], sum.count[R_FAILED], sum.count[R_CRASHED],
           sum.count[R_SKIPPED], sum.count[R_WARNING]);
    if (sum.count[R_NONE])
        printf(", %d not run", sum.count[R_NONE]);
    printf(" in %.1f s\nseed %llu (replay with --seed %llu)\n", sum.seconds,
           (unsigned long long)KC.seed, (unsigned long long)KC.seed);

    int rc = (sum.count[R_FAILED] || sum.count[R_CRASHED] || sum.count[R_NONE]) ? 1 : 0;
    if (fj) {
        char stamp[32], host[256] = "localhost";
        time_t now = time(NULL);
        struct tm tmv;
        strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%S", localtime_r(&now, &tmv));
        gethostname(host, sizeof host - 1);
        write_junit(fj, &sum, stamp, host);
        if (fclose(fj) != 0)
            rc = 2;
    }
    if (fs) {
        write_json(fs, &sum);
        if (fclose(fs) != 0)
            rc = 2;
    }
    /* The registry and results stay reachable until exit; only what
     * would outlive the process is cleaned. */
    unlink(KC.side_path);
    srunner_free(runner);
    kvch_options_clear(&KC.opts);
    return rc;
}
