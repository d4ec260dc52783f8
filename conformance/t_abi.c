/*
 * t_abi.c -- group "abi": what a host sees before it runs anything.
 *
 *   entry_point          the .so opens, names its entry, the entry is stable
 *   only_export          the dynamic symbol table exports kvc_plugin_entry alone
 *   version_negotiation  other majors refused, every minor of 1 served
 *   descriptor           names, version, caps, function table, caps vs functions
 *   option_table         every option well formed, defaults valid, kv_ratio present
 *   struct_sizes         v1.0 sizes accepted, larger ones with a zero tail too,
 *                        smaller ones refused; stats written only up to struct_size
 *   describe             seq_describe (1.2): size-then-copy, one line per KV head
 *                        "head <h> key=value...", tokens= against what was
 *                        appended and what materialize counts (KVC-REQ-21)
 *
 * The plugin may be broken on purpose: every value read from it is checked
 * before it is used (string lengths bounded, counts capped), and the ELF
 * file is parsed with every offset bounds-checked.
 */
#include <ctype.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "conform.h"

/* Size of a v1.0 struct: up to the end of its last 1.0 field. The current
 * header IS 1.0, but this stays right after fields are appended. */
#define V10(type, last) (offsetof(type, last) + sizeof(((type *)0)->last))

/* Longest string a descriptor may hold before we call it unterminated. */
#define MAX_STR 4096

/* ---- small helpers --------------------------------------------------------------- */

/* Length of s, or -1 when NULL or longer than MAX_STR (likely garbage). */
static long bounded_len(const char *s)
{
    if (s == NULL)
        return -1;
    size_t n = strnlen(s, MAX_STR + 1);
    return n > MAX_STR ? -1 : (long)n;
}

/* 1 when s is non-empty and every byte is in `set` or alnum (per flags). */
static int chars_in(const char *s, const char *set, int lower_only)
{
    if (*s == '\0')
        return 0;
    for (const unsigned char *c = (const unsigned char *)s; *c; c++) {
        int ok = lower_only ? (islower(*c) || isdigit(*c)) : isalnum(*c);
        if (!ok && strchr(set, *c) == NULL)
            return 0;
    }
    return 1;
}

/* "N.N.N" optionally followed by a pre-release or build suffix. */
static int looks_semver(const char *s)
{
    for (int part = 0; part < 3; part++) {
        if (!isdigit((unsigned char)*s))
            return 0;
        while (isdigit((unsigned char)*s))
            s++;
        if (part < 2 && *s++ != '.')
            return 0;
    }
    return *s == '\0' || *s == '-' || *s == '+';
}

/* create() with exactly the given options (not KC.opts): for checks of the
 * option table, whose defaults must stand on their own. */
static kvc_status create_with(kc_env *e, const kvc_geometry *g, uint32_t n, const char **names,
                              const char **values, kvc_instance **out, char *msg, size_t cap)
{
    kvc_create_info ci;
    memset(&ci, 0, sizeof ci);
    ci.struct_size = sizeof ci;
    ci.host = &e->host;
    ci.geometry = g;
    ci.n_options = n;
    ci.option_names = names;
    ci.option_values = values;
    ci.device = KC.device;
    ci.dtype = KVC_DTYPE_F32;
    msg[0] = '\0';
    return e->p->create(&ci, out, msg, cap);
}

/* Index of the first byte where a and b differ in [from, to), or `to`. A
 * loop of ck_assert would be slow: each passing check is reported to the
 * runner through a pipe. */
static size_t first_diff(const unsigned char *a, const unsigned char *b, size_t from, size_t to)
{
    while (from < to && a[from] == b[from])
        from++;
    return from;
}

/* Tests that feed tensors pass host pointers. */
static int host_data(void)
{
    return KC.device == KVC_MEM_HOST;
}

/* ---- entry_point -------------------------------------------------------------------- */

/* Our own handle on the plugin's file (*h, for dlclose) and its entry,
 * found by name the way any host finds it, not through libkvc-host. */
static kvc_plugin_entry_fn own_entry(const kc_env *e, void **h)
{
    const char *path = kvch_plugin_path(e->lib);
    ck_assert_msg(path != NULL && *path, "the loader reports no path for the plugin");
    dlerror();
    *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    ck_assert_msg(*h != NULL, "dlopen(%s) failed: %s", path, dlerror());
    void *sym = dlsym(*h, KVC_PLUGIN_ENTRY_SYMBOL);
    ck_assert_msg(sym != NULL, "%s has no symbol %s (KVC-REQ-2)", path, KVC_PLUGIN_ENTRY_SYMBOL);
    kvc_plugin_entry_fn entry;
    memcpy(&entry, &sym, sizeof entry); /* object-to-function pointer without a cast warning */
    return entry;
}

START_TEST(entry_point)
{
    kc_env e;
    kc_load(&e);
    void *h;
    kvc_plugin_entry_fn entry = own_entry(&e, &h);
    const kvc_plugin *a = entry(KVC_ABI_VERSION);
    ck_assert_msg(a != NULL, "%s(0x%08x) returned NULL for this host's own ABI version",
                  KVC_PLUGIN_ENTRY_SYMBOL, (unsigned)KVC_ABI_VERSION);
    for (int i = 0; i < 100; i++) {
        const kvc_plugin *b = entry(KVC_ABI_VERSION);
        if (b != a)
            ck_abort_msg("call %d of the entry returned %p, the first returned %p: the "
                         "descriptor must be one constant object", i + 2, (const void *)b,
                         (const void *)a);
    }
    ck_assert_msg(a == e.p, "dlsym's entry returned %p, the loader's %p, for the same file",
                  (const void *)a, (const void *)e.p);

    /* The descriptor is constant for the life of the object: snapshot it,
     * drive an instance, compare. A plugin keeping state in it fails. */
    size_t n = a->struct_size < sizeof *a ? a->struct_size : sizeof *a;
    kvc_plugin snap;
    memset(&snap, 0, sizeof snap);
    memcpy(&snap, a, n);
    if (host_data()) {
        kvc_geometry g = kc_geometry_small();
        kvc_instance *inst = kc_create_ready(&e, &g, NULL);
        kvc_seq *s = NULL;
        kvc_status st = e.p->seq_open(inst, &s);
        ck_assert_msg(st == KVC_OK && s != NULL, "seq_open: %s", kvch_status_string(st));
        kc_rng r;
        kc_rng_init(&r, 0xab1);
        kc_tokens t;
        kc_tokens_make(&t, &g, 8, 0, &r);
        st = e.p->append(s, 0, t.n, t.pos, t.k, t.v, t.flags);
        ck_assert_msg(st == KVC_OK, "append of 8 tokens: %s: %s", kvch_status_string(st),
                      e.p->seq_message(s));
        kc_tokens_free(&t);
        e.p->seq_close(s);
        e.p->destroy(inst);
    }
    ck_assert_msg(memcmp(&snap, a, n) == 0,
                  "the descriptor changed while an instance was used: it must be constant");
    dlclose(h);
    kc_figure("101 calls, one constant descriptor");
    kc_unload(&e);
}
END_TEST

/* ---- version_negotiation -------------------------------------------------------------- */

START_TEST(version_negotiation)
{
    kc_env e;
    kc_load(&e);
    void *h;
    kvc_plugin_entry_fn entry = own_entry(&e, &h);
    const uint32_t major = KVC_ABI_VERSION_MAJOR;
    /* Another major: NULL, or a descriptor for that other major which the
     * loader then refuses. A descriptor claiming our major would make a
     * host of another major call functions with the wrong layout. */
    const uint32_t others[] = {major + 1, major - 1, major + 2, 0xffffu};
    for (size_t i = 0; i < sizeof others / sizeof others[0]; i++) {
        uint32_t maj = others[i];
        for (uint32_t minor = 0; minor <= 1; minor++) {
            uint32_t v = KVC_MAKE_VERSION(maj, minor);
            const kvc_plugin *d = entry(v);
            if (d == NULL)
                continue;
            ck_assert_msg(KVC_VERSION_MAJOR(d->abi_version) != major,
                          "asked for ABI %u.%u, the entry returned a descriptor of ABI %u.%u: "
                          "a plugin of major %u must return NULL to a host of another major "
                          "(KVC-REQ-3)",
                          maj, minor, KVC_VERSION_MAJOR(d->abi_version),
                          KVC_VERSION_MINOR(d->abi_version), major);
        }
    }
    /* The same major is compatible whatever the minor: an older host (lower
     * minor) and a newer one (higher minor) are both served. */
    const uint32_t minors[] = {0, 1, 2, KVC_ABI_VERSION_MINOR, 7, 0xffffu};
    for (size_t i = 0; i < sizeof minors / sizeof minors[0]; i++) {
        uint32_t v = KVC_MAKE_VERSION(major, minors[i]);
        const kvc_plugin *d = entry(v);
        ck_assert_msg(d != NULL, "a host of ABI %u.%u (same major) got NULL: the same major is "
                      "compatible (KVC-REQ-3)", major, minors[i]);
        ck_assert_msg(KVC_VERSION_MAJOR(d->abi_version) == major,
                      "a host of ABI %u.%u got a descriptor of ABI %u.%u (KVC-REQ-3)", major,
                      minors[i], KVC_VERSION_MAJOR(d->abi_version),
                      KVC_VERSION_MINOR(d->abi_version));
    }
    /* The loader, asked the same, agrees: it loaded this plugin. */
    ck_assert_msg(e.p != NULL && KVC_VERSION_MAJOR(e.p->abi_version) == major,
                  "the loader's descriptor has ABI major %u", KVC_VERSION_MAJOR(e.p->abi_version));
    kc_figure("%u.0-%u.65535 served, 4 other majors refused", major, major);
    dlclose(h);
    kc_unload(&e);
}
END_TEST

/* ---- descriptor ------------------------------------------------------------------- */

/* Every function pointer of ABI 1.0, by name and offset. */
#define FN(name) {#name, offsetof(kvc_plugin, name)}
static const struct {
    const char *name;
    size_t off;
} v10_functions[] = {
    FN(create),       FN(destroy),     FN(instance_message), FN(prepare_layer),
    FN(finalize_layer), FN(finalize),  FN(save),             FN(instance_stats),
    FN(seq_open),     FN(seq_close),   FN(seq_message),      FN(append),
    FN(attend),       FN(attend_batch), FN(materialize),     FN(truncate),
    FN(fork),         FN(seq_export),  FN(seq_import),       FN(seq_stats),
};
#undef FN

#define KNOWN_CAPS_10 ((UINT64_C(1) << 14) - 1) /* KVC_CAP_CPU .. KVC_CAP_TOKEN_FLAGS */
#define KNOWN_CAPS_12 (KNOWN_CAPS_10 | KVC_CAP_PROMPT_PHASE)

/* The descriptor holds seq_describe: built against 1.2 or newer, with a
 * struct_size that covers the pointer (an older one ends before it). */
static int has_describe(const kvc_plugin *p)
{
    return KVC_VERSION_MINOR(p->abi_version) >= 2 && KVC_HAS_FIELD(p, kvc_plugin, seq_describe);
}

/* Status of an operation the caps say is absent: UNSUPPORTED (KVC-REQ-17). */
static void expect_unsupported(kvc_status st, const char *op, const char *cap)
{
    ck_assert_msg(st == KVC_E_UNSUPPORTED,
                  "%s without %s in caps returned %d (%s), expected KVC_E_UNSUPPORTED "
                  "(KVC-REQ-17)", op, cap, (int)st, kvch_status_string(st));
}

/* Capability bits against what the functions do on a live instance. */
static void caps_vs_functions(kc_env *e, char *done, size_t cap)
{
    const kvc_plugin *p = e->p;
    kvc_geometry g = kc_geometry_small();
    kvc_instance *inst = kc_create_ready(e, &g, NULL);
    kvc_seq *a = NULL, *b = NULL;
    kvc_status st = p->seq_open(inst, &a);
    ck_assert_msg(st == KVC_OK && a, "seq_open: %s", kvch_status_string(st));
    st = p->seq_open(inst, &b);
    ck_assert_msg(st == KVC_OK && b, "seq_open: %s", kvch_status_string(st));
    kc_rng r;
    kc_rng_init(&r, 0xde5c);
    kc_tokens t;
    kc_tokens_make(&t, &g, 8, 0, &r);
    st = p->append(a, 0, t.n, t.pos, t.k, t.v, t.flags);
    ck_assert_msg(st == KVC_OK, "append: %s: %s", kvch_status_string(st), p->seq_message(a));

    size_t sz = 0;
    st = p->save(inst, NULL, 0, &sz);
    if (p->caps & KVC_CAP_ARTIFACT)
        ck_assert_msg(st == KVC_OK && sz > 0, "KVC_CAP_ARTIFACT but save(NULL) returned %s, "
                      "size %zu: %s", kvch_status_string(st), sz, p->instance_message(inst));
    else
        expect_unsupported(st, "save", "KVC_CAP_ARTIFACT");

    sz = 0;
    st = p->seq_export(a, NULL, 0, &sz);
    if (p->caps & KVC_CAP_EXPORT) {
        ck_assert_msg(st == KVC_OK && sz > 0, "KVC_CAP_EXPORT but seq_export(NULL) returned %s, "
                      "size %zu: %s", kvch_status_string(st), sz, p->seq_message(a));
    } else {
        expect_unsupported(st, "seq_export", "KVC_CAP_EXPORT");
        static const unsigned char junk[64] = {'K', 'V', 'C', '1'};
        expect_unsupported(p->seq_import(b, junk, sizeof junk), "seq_import", "KVC_CAP_EXPORT");
    }

    st = p->fork(a, b);
    if (p->caps & KVC_CAP_FORK)
        ck_assert_msg(st == KVC_OK, "KVC_CAP_FORK but fork returned %s: %s",
                      kvch_status_string(st), p->seq_message(b));
    else
        expect_unsupported(st, "fork", "KVC_CAP_FORK");

    uint32_t counts[64];
    kvc_materialized m;
    memset(&m, 0, sizeof m);
    m.struct_size = sizeof m;
    m.n_tokens = counts;
    st = p->materialize(a, 0, &m);
    if (p->caps & KVC_CAP_MATERIALIZE) {
        ck_assert_msg(st == KVC_OK, "KVC_CAP_MATERIALIZE but counting materialize returned %s: "
                      "%s", kvch_status_string(st), p->seq_message(a));
        for (uint32_t h = 0; h < g.n_kv_heads; h++)
            ck_assert_msg(counts[h] <= t.n, "materialize counts %u tokens on head %u after %u "
                          "were appended", counts[h], h, t.n);
    } else {
        expect_unsupported(st, "materialize", "KVC_CAP_MATERIALIZE");
    }

    /* Without preparation needs, the instance is ready at create and
     * finalize() says so (kvc.h, finalize). */
    if (!(p->caps & (KVC_CAP_NEEDS_WEIGHTS | KVC_CAP_NEEDS_CALIBRATION))) {
        kvc_instance *raw = NULL;
        char msg[512];
        st = kc_create(e, &g, NULL, &raw, msg, sizeof msg);
        ck_assert_msg(st == KVC_OK && raw, "create: %s: %s", kvch_status_string(st), msg);
        st = p->finalize(raw);
        ck_assert_msg(st == KVC_OK, "no preparation needed (caps), but finalize right after "
                      "create returned %s: %s", kvch_status_string(st),
                      p->instance_message(raw));
        p->destroy(raw);
    }
    kc_tokens_free(&t);
    p->seq_close(a);
    p->seq_close(b);
    p->destroy(inst);
    snprintf(done, cap, "caps match the functions");
}

START_TEST(descriptor)
{
    kc_env e;
    kc_load(&e);
    const kvc_plugin *p = e.p;
    const size_t v10 = V10(kvc_plugin, seq_stats);
    ck_assert_msg(p->struct_size >= v10, "descriptor struct_size %u is below the ABI 1.0 size "
                  "%zu (KVC-REQ-4)", (unsigned)p->struct_size, v10);
    ck_assert_msg(KVC_VERSION_MAJOR(p->abi_version) == KVC_ABI_VERSION_MAJOR,
                  "descriptor abi_version %u.%u, host major %u", KVC_VERSION_MAJOR(p->abi_version),
                  KVC_VERSION_MINOR(p->abi_version), KVC_ABI_VERSION_MAJOR);

    const struct {
        const char *field, *value;
    } strs[] = {{"id", p->id}, {"name", p->name}, {"version", p->version},
                {"description", p->description}, {"license", p->license}};
    for (size_t i = 0; i < sizeof strs / sizeof strs[0]; i++) {
        long n = bounded_len(strs[i].value);
        ck_assert_msg(n > 0, "descriptor %s is %s", strs[i].field,
                      strs[i].value == NULL ? "NULL" : n == 0 ? "empty" : "over 4096 bytes");
    }
    ck_assert_msg(chars_in(p->id, "_-", 1), "descriptor id '%s' is not [a-z0-9_-]+", p->id);
    ck_assert_msg(looks_semver(p->version), "descriptor version '%s' is not N.N.N", p->version);
    ck_assert_msg(chars_in(p->license, ".+-() ", 0) && p->license[0] != ' ',
                  "descriptor license '%s' is not an SPDX expression", p->license);

    /* Unknown bits are legal only from a newer minor, which may add some;
     * 1.2 added KVC_CAP_PROMPT_PHASE (bit 14), and 1.1 added none. */
    const uint32_t minor = KVC_VERSION_MINOR(p->abi_version);
    uint64_t unknown = p->caps & ~(minor >= 2 ? KNOWN_CAPS_12 : KNOWN_CAPS_10);
    ck_assert_msg(unknown == 0 || minor > 2,
                  "caps has bits 0x%llx unknown to ABI 1.%u, and the plugin says it is 1.%u",
                  (unsigned long long)unknown, minor, minor);
    ck_assert_msg(p->caps & (KVC_CAP_CPU | KVC_CAP_CUDA),
                  "caps 0x%llx has neither KVC_CAP_CPU nor KVC_CAP_CUDA: it runs nowhere",
                  (unsigned long long)p->caps);

    for (size_t i = 0; i < sizeof v10_functions / sizeof v10_functions[0]; i++) {
        void (*fp)(void);
        memcpy(&fp, (const char *)p + v10_functions[i].off, sizeof fp);
        ck_assert_msg(fp != NULL, "function %s is NULL: every 1.0 function must be set "
                      "(KVC-REQ-17)", v10_functions[i].name);
    }
    /* 1.2 appended seq_describe: set whenever the descriptor holds it. A
     * 1.2 descriptor that ends before it is as short as a 1.1 one. */
    if (minor >= 2)
        ck_assert_msg(KVC_HAS_FIELD(p, kvc_plugin, seq_describe),
                      "descriptor says ABI 1.%u but its struct_size %u ends before seq_describe "
                      "(the 1.2 size is %zu)", minor, (unsigned)p->struct_size,
                      V10(kvc_plugin, seq_describe));
    if (has_describe(p))
        ck_assert_msg(p->seq_describe != NULL, "function seq_describe is NULL: every 1.2 "
                      "function must be set (KVC-REQ-17, KVC-REQ-21)");

    char caps[256];
    kvch_caps_string(p->caps, caps, sizeof caps);
    char consistency[96] = "caps vs functions not run (not on host)";
    if (host_data())
        caps_vs_functions(&e, consistency, sizeof consistency);
    kc_figure("%s %s; %s (%s)", p->id, p->version, consistency, caps);
    kc_unload(&e);
}
END_TEST

/* ---- option_table ---------------------------------------------------------------- */

/* 1 when text is an acceptable value of option d; *why says otherwise. */
static int value_ok(const kvc_option_desc *d, const char *text, const char **why)
{
    char *end = NULL;
    errno = 0;
    switch (d->type) {
    case KVC_OPT_BOOL:
        if (strcmp(text, "true") && strcmp(text, "false") && strcmp(text, "1") &&
            strcmp(text, "0"))
            return *why = "not true/false/1/0", 0;
        return 1;
    case KVC_OPT_INT: {
        long long x = strtoll(text, &end, 10);
        if (!*text || isspace((unsigned char)*text) || *end || errno)
            return *why = "not a decimal integer", 0;
        if ((double)x < d->min || (double)x > d->max)
            return *why = "outside [min, max]", 0;
        return 1;
    }
    case KVC_OPT_FLOAT: {
        double x = strtod(text, &end);
        if (!*text || isspace((unsigned char)*text) || *end || errno || !isfinite(x))
            return *why = "not a finite decimal number", 0;
        if (x < d->min || x > d->max)
            return *why = "outside [min, max]", 0;
        return 1;
    }
    case KVC_OPT_ENUM: {
        size_t wl = strlen(text);
        for (const char *c = d->choices; c && *c;) {
            const char *bar = strchr(c, '|');
            size_t len = bar ? (size_t)(bar - c) : strlen(c);
            if (len == wl && strncmp(c, text, wl) == 0)
                return 1;
            if (!bar)
                break;
            c = bar + 1;
        }
        return *why = "not one of the choices", 0;
    }
    default:
        return 1;
    }
}

START_TEST(option_table)
{
    kc_env e;
    kc_load(&e);
    const kvc_plugin *p = e.p;
    ck_assert_msg(p->n_options <= 256, "n_options %u: implausibly many", p->n_options);
    ck_assert_msg(p->n_options == 0 || p->options != NULL, "n_options %u but options is NULL",
                  p->n_options);
    int have_ratio = 0;
    unsigned n_created = 0;
    kvc_geometry g = kc_geometry_small();
    for (uint32_t i = 0; i < p->n_options; i++) {
        const kvc_option_desc *d = p->options[i];
        ck_assert_msg(d != NULL, "options[%u] is NULL", i);
        ck_assert_msg(d->struct_size >= V10(kvc_option_desc, help),
                      "options[%u].struct_size %u is below the ABI 1.0 size %zu", i,
                      (unsigned)d->struct_size, V10(kvc_option_desc, help));
        long nl = bounded_len(d->name);
        ck_assert_msg(nl > 0 && chars_in(d->name, "_", 1), "options[%u].name %s%s%s is not "
                      "[a-z0-9_]+", i, d->name ? "'" : "", d->name ? d->name : "NULL",
                      d->name ? "'" : "");
        for (uint32_t j = 0; j < i; j++)
            ck_assert_msg(strcmp(p->options[j]->name, d->name) != 0,
                          "option '%s' appears twice (entries %u and %u)", d->name, j, i);
        ck_assert_msg(d->type >= KVC_OPT_BOOL && d->type <= KVC_OPT_STRING,
                      "option %s has unknown type %d", d->name, (int)d->type);
        long hl = bounded_len(d->help);
        ck_assert_msg(hl > 0, "option %s has %s help", d->name, d->help ? "empty" : "NULL");
        ck_assert_msg(bounded_len(d->default_value) >= 0,
                      "option %s's default_value is NULL (\"\" means unset)", d->name);
        if (d->type == KVC_OPT_INT || d->type == KVC_OPT_FLOAT)
            ck_assert_msg(!isnan(d->min) && !isnan(d->max) && d->min <= d->max,
                          "option %s has range [%g, %g]", d->name, d->min, d->max);
        if (d->type == KVC_OPT_ENUM) {
            long cl = bounded_len(d->choices);
            ck_assert_msg(cl > 0, "enum option %s has %s choices", d->name,
                          d->choices ? "empty" : "NULL");
            ck_assert_msg(d->choices[0] != '|' && d->choices[cl - 1] != '|' &&
                          strstr(d->choices, "||") == NULL,
                          "enum option %s's choices '%s' hold an empty word", d->name, d->choices);
        }
        const char *why = NULL;
        if (*d->default_value)
            ck_assert_msg(value_ok(d, d->default_value, &why),
                          "option %s's default '%s' is %s (range [%g, %g], choices %s)", d->name,
                          d->default_value, why, d->min, d->max,
                          d->choices ? d->choices : "none");
        if (strcmp(d->name, "kv_ratio") == 0) {
            have_ratio = 1;
            ck_assert_msg(d->type == KVC_OPT_FLOAT, "kv_ratio has type %d, not KVC_OPT_FLOAT",
                          (int)d->type);
        }

        /* The default, given explicitly, must be accepted on its own. */
        if (*d->default_value) {
            const char *names[1] = {d->name}, *values[1] = {d->default_value};
            kvc_instance *inst = NULL;
            char msg[512];
            kvc_status st = create_with(&e, &g, 1, names, values, &inst, msg, sizeof msg);
            ck_assert_msg(st == KVC_OK && inst, "create with %s=%s (its default) failed: %s: %s",
                          d->name, d->default_value, kvch_status_string(st), msg);
            p->destroy(inst);
            n_created++;
        }
    }
    ck_assert_msg(have_ratio, "no option kv_ratio: every plugin accepts it (KVC-REQ-9)");
    kvc_instance *inst = NULL;
    char msg[512];
    kvc_status st = create_with(&e, &g, 0, NULL, NULL, &inst, msg, sizeof msg);
    ck_assert_msg(st == KVC_OK && inst, "create with no options (all defaults) failed: %s: %s",
                  kvch_status_string(st), msg);
    p->destroy(inst);
    kc_figure("%u options, %u explicit defaults created", p->n_options, n_created);
    kc_unload(&e);
}
END_TEST

/* ---- struct_sizes ---------------------------------------------------------------- */

#define TAIL 64

/* One create with the three input structs at the given struct_sizes; each
 * struct sits in a buffer with TAIL zero bytes after it, so a size larger
 * than the plugin knows has a zero tail as a newer host would send. */
static kvc_status create_sized(kc_env *e, uint32_t ci_size, uint32_t g_size, uint32_t h_size,
                               kvc_instance **out, char *msg, size_t cap)
{
    struct {
        kvc_create_info ci;
        unsigned char tail[TAIL];
    } ci;
    struct {
        kvc_geometry g;
        unsigned char tail[TAIL];
    } g;
    struct {
        kvc_host h;
        unsigned char tail[TAIL];
    } h;
    memset(&ci, 0, sizeof ci);
    memset(&g, 0, sizeof g);
    memset(&h, 0, sizeof h);
    g.g = kc_geometry_small();
    g.g.struct_size = g_size;
    h.h = e->host;
    h.h.struct_size = h_size;
    ci.ci.struct_size = ci_size;
    ci.ci.host = &h.h;
    ci.ci.geometry = &g.g;
    kvch_options_apply(&KC.opts, &ci.ci);
    ci.ci.device = KC.device;
    ci.ci.dtype = KVC_DTYPE_F32;
    memset(msg, 0, cap);
    return e->p->create(&ci.ci, out, msg, cap);
}

/* Fills a stats struct in a sentinel-filled buffer with struct_size `size`
 * and checks that nothing past `size` (everything, on error) was written. */
static void stats_sized(kc_env *e, kvc_instance *inst, kvc_seq *s, int is_seq, uint32_t size,
                        size_t v10)
{
    unsigned char buf[256], orig[256];
    memset(buf, 0xa5, sizeof buf);
    memcpy(buf, &size, sizeof size);
    memcpy(orig, buf, sizeof buf);
    kvc_status st = is_seq ? e->p->seq_stats(s, (kvc_seq_stats *)(void *)buf)
                           : e->p->instance_stats(inst, (kvc_instance_stats *)(void *)buf);
    const char *what = is_seq ? "seq_stats" : "instance_stats";
    if (size < v10) {
        /* OK may fill up to struct_size; an error leaves it all untouched. */
        size_t i = first_diff(buf, orig, st == KVC_OK ? size : 0, sizeof buf);
        ck_assert_msg(i == sizeof buf, "%s with struct_size %u (below 1.0's %zu) returned %s and "
                      "wrote byte %zu", what, size, v10, kvch_status_string(st), i);
        ck_assert_msg(st == KVC_OK || st == KVC_E_VERSION || st == KVC_E_INVALID,
                      "%s with struct_size %u returned %s: expected OK (partial) or "
                      "KVC_E_VERSION", what, size, kvch_status_string(st));
        return;
    }
    ck_assert_msg(st == KVC_OK, "%s with struct_size %u (1.0 is %zu) returned %s", what, size,
                  v10, kvch_status_string(st));
    uint32_t after;
    memcpy(&after, buf, sizeof after);
    ck_assert_msg(after == size || (after >= v10 && after <= size),
                  "%s changed struct_size from %u to %u", what, size, after);
    /* A 1.0 plugin knows nothing past the 1.0 size and must not write it. */
    size_t end = size < sizeof buf ? size : sizeof buf, i = first_diff(buf, orig, v10, end);
    ck_assert_msg(KVC_VERSION_MINOR(e->p->abi_version) > 0 || i == end,
                  "%s with struct_size %u wrote byte %zu, past the ABI 1.0 size %zu it knows",
                  what, size, i, v10);
    /* Nobody writes past struct_size: a 1.2 plugin asked with a 1.1-sized
     * seq_stats leaves bytes_pending's place alone. */
    i = first_diff(buf, orig, end, sizeof buf);
    ck_assert_msg(i == sizeof buf, "%s with struct_size %u wrote byte %zu, past struct_size",
                  what, size, i);
}

START_TEST(struct_sizes)
{
    kc_env e;
    kc_load(&e);
    const uint32_t ci10 = V10(kvc_create_info, reserved0), g10 = V10(kvc_geometry, reserved0),
                   h10 = V10(kvc_host, cuda_stream);
    const struct {
        const char *what;
        uint32_t ci, g, h;
        int ok;
    } cases[] = {
        {"all three at the 1.0 size", ci10, g10, h10, 1},
        {"kvc_create_info larger, zero tail", ci10 + TAIL, g10, h10, 1},
        {"kvc_geometry larger, zero tail", ci10, g10 + TAIL, h10, 1},
        {"kvc_host larger, zero tail", ci10, g10, h10 + TAIL, 1},
        {"kvc_create_info 4 bytes short of 1.0", ci10 - 4, g10, h10, 0},
        {"kvc_geometry 4 bytes short of 1.0", ci10, g10 - 4, h10, 0},
        {"kvc_host 8 bytes short of 1.0", ci10, g10, h10 - 8, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        kvc_instance *sentinel = (kvc_instance *)(uintptr_t)0x5a5a50, *inst = sentinel;
        char msg[512];
        kvc_status st = create_sized(&e, cases[i].ci, cases[i].g, cases[i].h, &inst, msg,
                                     sizeof msg);
        if (cases[i].ok) {
            ck_assert_msg(st == KVC_OK && inst != sentinel && inst != NULL,
                          "create with %s was refused: %s: %s", cases[i].what,
                          kvch_status_string(st), msg);
            e.p->destroy(inst);
            continue;
        }
        if (st == KVC_OK && inst != sentinel)
            e.p->destroy(inst);
        ck_assert_msg(st == KVC_E_VERSION || st == KVC_E_INVALID,
                      "create with %s returned %s, expected KVC_E_VERSION (KVC-REQ-4)",
                      cases[i].what, kvch_status_string(st));
        ck_assert_msg(inst == sentinel, "create with %s failed but wrote *out", cases[i].what);
        ck_assert_msg(msg[0] != '\0', "create with %s failed without a message", cases[i].what);
    }

    if (!host_data()) {
        kc_figure("create sizes checked; stats sizes need host data");
        kc_unload(&e);
        return;
    }
    kvc_geometry g = kc_geometry_small();
    kvc_instance *inst = kc_create_ready(&e, &g, NULL);
    kvc_seq *s = NULL;
    kvc_status st = e.p->seq_open(inst, &s);
    ck_assert_msg(st == KVC_OK && s, "seq_open: %s", kvch_status_string(st));
    kc_rng r;
    kc_rng_init(&r, 0x512e);
    kc_tokens t;
    kc_tokens_make(&t, &g, 16, 0, &r);
    st = e.p->append(s, 1, t.n, t.pos, t.k, t.v, t.flags);
    ck_assert_msg(st == KVC_OK, "append: %s: %s", kvch_status_string(st), e.p->seq_message(s));

    const size_t sv10 = V10(kvc_seq_stats, bytes_fp16_full);
    const size_t iv10 = V10(kvc_instance_stats, seq_overhead_bytes);
    const uint32_t seq_sizes[] = {8, offsetof(kvc_seq_stats, bytes_payload),
                                  (uint32_t)sv10 - 8, (uint32_t)sv10, (uint32_t)sv10 + 32,
                                  (uint32_t)sizeof(kvc_seq_stats)};
    for (size_t i = 0; i < sizeof seq_sizes / sizeof seq_sizes[0]; i++)
        stats_sized(&e, inst, s, 1, seq_sizes[i], sv10);
    const uint32_t inst_sizes[] = {8, offsetof(kvc_instance_stats, kv_ratio),
                                   (uint32_t)iv10 - 8, (uint32_t)iv10, (uint32_t)iv10 + 32};
    for (size_t i = 0; i < sizeof inst_sizes / sizeof inst_sizes[0]; i++)
        stats_sized(&e, inst, s, 0, inst_sizes[i], iv10);

    /* attend_batch items may come from a newer host too: a larger item
     * with a zero tail gives what attend gives. */
    uint32_t nh = g.n_heads;
    size_t n_out = (size_t)4 * nh * g.head_dim;
    float *o1 = kc_guarded(n_out), *o2 = kc_guarded(n_out);
    /* A prompt-phase plugin's first attend of the layer is its prompt (it
     * may compress there); compare the answers after it. */
    for (int pass = (e.p->caps & KVC_CAP_PROMPT_PHASE) ? 0 : 1; pass < 2; pass++) {
        st = e.p->attend(s, 1, 4, t.pos + 12, t.q + (size_t)12 * nh * g.head_dim, o1);
        ck_assert_msg(st == KVC_OK, "attend: %s: %s", kvch_status_string(st),
                      e.p->seq_message(s));
    }
    struct {
        kvc_attend_item it;
        unsigned char tail[TAIL];
    } big;
    memset(&big, 0, sizeof big);
    big.it.struct_size = sizeof big;
    big.it.n_q = 4;
    big.it.seq = s;
    big.it.positions = t.pos + 12;
    big.it.q_pre = t.q + (size_t)12 * nh * g.head_dim;
    big.it.out = o2;
    const kvc_attend_item *items[1] = {&big.it};
    st = e.p->attend_batch(inst, 1, 1, items);
    ck_assert_msg(st == KVC_OK, "attend_batch with an item of struct_size %zu (1.0 is %zu) "
                  "returned %s: %s", sizeof big, V10(kvc_attend_item, out),
                  kvch_status_string(st), e.p->seq_message(s));
    kc_guard_check(o1, n_out, "attend output");
    kc_guard_check(o2, n_out, "attend_batch output");
    ck_assert_msg(memcmp(o1, o2, n_out * sizeof(float)) == 0,
                  "attend_batch with a larger item differs from attend");
    kc_guard_free(o1);
    kc_guard_free(o2);

    kc_tokens_free(&t);
    e.p->seq_close(s);
    e.p->destroy(inst);
    kc_figure("7 create sizes, 11 stats sizes, 1 item size");
    kc_unload(&e);
}
END_TEST

/* ---- describe ------------------------------------------------------------------------ */

/* 1 when w is "key=value" with key of [a-z0-9_]+ (value anything but a
 * space; may be empty). */
static int kv_word(const char *w, size_t len)
{
    size_t k = 0;
    while (k < len && (islower((unsigned char)w[k]) || isdigit((unsigned char)w[k]) ||
                       w[k] == '_'))
        k++;
    return k > 0 && k < len && w[k] == '=';
}

/* One layer's text, checked: the protocol (size query, KVC_E_BUFFER on 1
 * byte and on need - 1 bytes with nothing written past the buffer, the
 * copy NUL-terminated at its size), then the lines: exactly n_kv of them,
 * "head <h> " in order, every further word key=value, one tokens=<n> per
 * line with n <= appended. Writes the per-head counts to held [n_kv];
 * returns the sum. `text` receives a copy of the text for the figure. */
#define DESC_GUARD 32
static uint64_t describe_layer(const kc_env *e, const kvc_seq *s, uint32_t layer, uint32_t n_kv,
                               uint32_t appended, uint32_t *held, char *text, size_t text_cap)
{
    const kvc_plugin *p = e->p;
    size_t need = 0;
    kvc_status st = p->seq_describe(s, layer, NULL, 0, &need);
    ck_assert_msg(st == KVC_OK, "seq_describe(layer %u, NULL buffer) returned %s (%d): %s",
                  layer, kvch_status_string(st), st, p->seq_message(s));
    ck_assert_msg(need >= 2 && need < (1u << 24),
                  "seq_describe(layer %u) size query says %zu bytes for %u heads' lines", layer,
                  need, n_kv);
    unsigned char *raw = malloc(need + 2 * DESC_GUARD);
    ck_assert_ptr_nonnull(raw);
    char *buf = (char *)raw + DESC_GUARD;
    const size_t small[2] = {1, need - 1};
    for (int k = 0; k < 2; k++) {
        memset(raw, 0xA5, need + 2 * DESC_GUARD);
        size_t got = 0;
        st = p->seq_describe(s, layer, buf, small[k], &got);
        ck_assert_msg(st == KVC_E_BUFFER, "seq_describe(layer %u) into %zu bytes (%zu needed) "
                      "returned %s (%d), expected KVC_E_BUFFER", layer, small[k], need,
                      kvch_status_string(st), st);
        ck_assert_msg(got == need, "seq_describe(layer %u) into %zu bytes: KVC_E_BUFFER with "
                      "size %zu, but the size query said %zu", layer, small[k], got, need);
        for (size_t i = 0; i < need + 2 * DESC_GUARD; i++) {
            size_t at = i; /* offset in raw; the buffer is [DESC_GUARD, +small[k]) */
            if (at >= DESC_GUARD && at < DESC_GUARD + small[k])
                continue;
            ck_assert_msg(raw[at] == 0xA5, "seq_describe(layer %u) into %zu bytes returned "
                          "KVC_E_BUFFER but wrote byte %ld relative to the buffer", layer,
                          small[k], (long)at - DESC_GUARD);
        }
        ck_assert_msg(p->seq_message(s)[0] != '\0', "seq_describe KVC_E_BUFFER without a "
                      "message (KVC-REQ-5)");
    }
    memset(raw, 0xA5, need + 2 * DESC_GUARD);
    size_t got = 0;
    st = p->seq_describe(s, layer, buf, need, &got);
    ck_assert_msg(st == KVC_OK, "seq_describe(layer %u) into %zu bytes (as asked) returned %s "
                  "(%d): %s", layer, need, kvch_status_string(st), st, p->seq_message(s));
    ck_assert_msg(got == need, "seq_describe(layer %u) wrote size %zu, the query said %zu",
                  layer, got, need);
    for (size_t i = 0; i < DESC_GUARD; i++)
        ck_assert_msg(raw[i] == 0xA5 && raw[DESC_GUARD + need + i] == 0xA5,
                      "seq_describe(layer %u) wrote outside its %zu-byte buffer", layer, need);
    ck_assert_msg(buf[need - 1] == '\0' && strlen(buf) == need - 1,
                  "seq_describe(layer %u): the %zu bytes are not one text NUL-terminated at "
                  "its size (strlen %zu)", layer, need, strnlen(buf, need));
    snprintf(text, text_cap, "%s", buf);

    uint64_t sum = 0;
    const char *line = buf;
    for (uint32_t h = 0; h < n_kv; h++) {
        const char *nl = strchr(line, '\n');
        ck_assert_msg(nl != NULL, "seq_describe(layer %u) has %u lines, %u KV heads: \"%s\"",
                      layer, h, n_kv, buf);
        char head[32];
        int hl = snprintf(head, sizeof head, "head %u ", h);
        ck_assert_msg(strncmp(line, head, (size_t)hl) == 0,
                      "seq_describe(layer %u) line %u does not start \"%s\": \"%.*s\"", layer, h,
                      head, (int)(nl - line), line);
        int n_tok = 0;
        long tok = -1;
        for (const char *w = line + hl; w < nl;) {
            const char *end = w;
            while (end < nl && *end != ' ')
                end++;
            ck_assert_msg(kv_word(w, (size_t)(end - w)),
                          "seq_describe(layer %u) line %u: word \"%.*s\" is not key=value", layer,
                          h, (int)(end - w), w);
            if (strncmp(w, "tokens=", 7) == 0) {
                char *stop = NULL;
                tok = strtol(w + 7, &stop, 10);
                ck_assert_msg(stop == end && tok >= 0,
                              "seq_describe(layer %u) line %u: \"%.*s\" is not a count", layer, h,
                              (int)(end - w), w);
                n_tok++;
            }
            w = end < nl ? end + 1 : end;
        }
        ck_assert_msg(n_tok == 1, "seq_describe(layer %u) line %u has %d tokens= words (one "
                      "wanted, KVC-REQ-21): \"%.*s\"", layer, h, n_tok, (int)(nl - line), line);
        ck_assert_msg(tok <= (long)appended, "seq_describe(layer %u) head %u holds tokens=%ld, "
                      "but %u were appended", layer, h, tok, appended);
        held[h] = (uint32_t)tok;
        sum += (uint64_t)tok;
        line = nl + 1;
    }
    ck_assert_msg(*line == '\0', "seq_describe(layer %u) has more lines than its %u KV heads: "
                  "\"%s\"", layer, n_kv, buf);
    free(raw);
    return sum;
}

START_TEST(describe)
{
    kc_env e;
    kc_load(&e);
    const kvc_plugin *p = e.p;
    if (!has_describe(p)) {
        uint32_t maj = KVC_VERSION_MAJOR(p->abi_version), min = KVC_VERSION_MINOR(p->abi_version);
        kc_unload(&e);
        kc_skip("plugin built against ABI %u.%u: seq_describe came in 1.2", maj, min);
    }
    ck_assert_msg(p->seq_describe != NULL, "seq_describe is NULL in a 1.2 descriptor");
    if (!host_data()) {
        kc_unload(&e);
        kc_skip("tensors on the device: describe feeds host tokens");
    }
    kvc_geometry g = kc_geometry_small();
    const uint32_t L = g.n_layers, n_kv = g.n_kv_heads;
    kvc_instance *inst = kc_create_ready(&e, &g, NULL);
    kvc_seq *s = NULL;
    kvc_status st = p->seq_open(inst, &s);
    ck_assert_msg(st == KVC_OK && s, "seq_open: %s", kvch_status_string(st));

    /* Layer 0: a prompt, then decode steps, each attended; layer 1 a batch
     * appended and not attended (pending); the other layers nothing. */
    kc_rng r;
    kc_rng_init(&r, 0xde5c2);
    kc_tokens t;
    const uint32_t prompt = 37, steps = 6, pend = 20;
    kc_tokens_make(&t, &g, prompt + steps, 0, &r);
    const size_t qrow = (size_t)g.n_heads * g.head_dim, krow = (size_t)n_kv * g.head_dim;
    float *out = kc_guarded((size_t)prompt * qrow);
    st = p->append(s, 0, prompt, t.pos, t.k, t.v, t.flags);
    ck_assert_msg(st == KVC_OK, "append: %s: %s", kvch_status_string(st), p->seq_message(s));
    st = p->attend(s, 0, prompt, t.pos, t.q, out);
    ck_assert_msg(st == KVC_OK, "attend: %s: %s", kvch_status_string(st), p->seq_message(s));
    for (uint32_t i = prompt; i < prompt + steps; i++) {
        st = p->append(s, 0, 1, t.pos + i, t.k + i * krow, t.v + i * krow, t.flags + i);
        ck_assert_msg(st == KVC_OK, "append: %s: %s", kvch_status_string(st), p->seq_message(s));
        st = p->attend(s, 0, 1, t.pos + i, t.q + i * qrow, out);
        ck_assert_msg(st == KVC_OK, "attend: %s: %s", kvch_status_string(st), p->seq_message(s));
    }
    st = p->append(s, 1, pend, t.pos, t.k, t.v, t.flags);
    ck_assert_msg(st == KVC_OK, "append: %s: %s", kvch_status_string(st), p->seq_message(s));
    kc_guard_check(out, (size_t)prompt * qrow, "attend output");
    kc_guard_free(out);

    uint32_t appended[64] = {0};
    appended[0] = prompt + steps;
    appended[1] = pend;
    char first[512] = "", text[512];
    uint32_t held[64], counts[64];
    for (uint32_t l = 0; l < L && l < 64; l++) {
        uint64_t sum = describe_layer(&e, s, l, n_kv, appended[l], held, text, sizeof text);
        if (l == 0)
            snprintf(first, sizeof first, "%s", text);
        if (!(p->caps & KVC_CAP_COMPRESS_TOKENS))
            for (uint32_t h = 0; h < n_kv; h++)
                ck_assert_msg(held[h] == appended[l], "layer %u head %u: tokens=%u, but a "
                              "plugin that drops no tokens holds all %u appended", l, h, held[h],
                              appended[l]);
        if (p->caps & KVC_CAP_MATERIALIZE) {
            kvc_materialized m;
            memset(&m, 0, sizeof m);
            m.struct_size = sizeof m;
            m.n_tokens = counts;
            st = p->materialize(s, l, &m);
            ck_assert_msg(st == KVC_OK, "materialize (counting, layer %u): %s: %s", l,
                          kvch_status_string(st), p->seq_message(s));
            uint64_t msum = 0;
            for (uint32_t h = 0; h < n_kv; h++) {
                msum += counts[h];
                ck_assert_msg(counts[h] == held[h], "layer %u head %u: seq_describe says "
                              "tokens=%u, materialize counts %u", l, h, held[h], counts[h]);
            }
            ck_assert_msg(msum == sum, "layer %u: seq_describe's tokens sum to %llu, "
                          "materialize's counts to %llu", l, (unsigned long long)sum,
                          (unsigned long long)msum);
        }
    }

    /* Bad input: a layer out of range and a NULL size are INVALID, the
     * first with a message; nothing is written. */
    size_t sz = 12345;
    st = p->seq_describe(s, L, NULL, 0, &sz);
    ck_assert_msg(st == KVC_E_INVALID, "seq_describe(layer %u of %u) returned %s (%d), "
                  "expected KVC_E_INVALID", L, L, kvch_status_string(st), st);
    ck_assert_msg(sz == 12345, "seq_describe(layer out of range) wrote *size");
    ck_assert_msg(p->seq_message(s)[0] != '\0', "seq_describe(layer out of range) failed "
                  "without a message (KVC-REQ-5)");
    st = p->seq_describe(s, UINT32_MAX, NULL, 0, &sz);
    ck_assert_msg(st == KVC_E_INVALID, "seq_describe(layer UINT32_MAX) returned %s (%d)",
                  kvch_status_string(st), st);
    char little[8];
    st = p->seq_describe(s, 0, NULL, 0, NULL);
    ck_assert_msg(st == KVC_E_INVALID, "seq_describe(size NULL, buffer NULL) returned %s (%d)",
                  kvch_status_string(st), st);
    st = p->seq_describe(s, 0, little, sizeof little, NULL);
    ck_assert_msg(st == KVC_E_INVALID, "seq_describe(size NULL) returned %s (%d)",
                  kvch_status_string(st), st);
    /* Still usable afterwards. */
    (void)describe_layer(&e, s, 0, n_kv, appended[0], held, text, sizeof text);

    kc_tokens_free(&t);
    p->seq_close(s);
    p->destroy(inst);
    char *nl = strchr(first, '\n');
    if (nl)
        *nl = '\0';
    kc_figure("%u layers x %u heads described; layer 0 head 0: \"%s\"", L, n_kv, first);
    kc_unload(&e);
}
END_TEST

void kc_group_abi(Suite *s)
{
    kc_add(s, "abi", "entry_point", entry_point, 20);
    kc_abi_exports(s); /* abi/only_export, in t_exports.c */
    kc_add(s, "abi", "version_negotiation", version_negotiation, 20);
    kc_add(s, "abi", "descriptor", descriptor, 30);
    kc_add(s, "abi", "option_table", option_table, 30);
    kc_add(s, "abi", "struct_sizes", struct_sizes, 30);
    kc_add(s, "abi", "describe", describe, 30);
}
