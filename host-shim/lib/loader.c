/* loader.c -- finding, dlopen()ing and checking kvc plugins.
 *
 * kvch_load resolves a name through the search directories, dlopens the file
 * with RTLD_NOW | RTLD_LOCAL (so an unresolved symbol fails now, not at the
 * first call, and two plugins never see each other's symbols), asks the entry
 * point for this host's ABI version and checks the descriptor before anyone
 * calls through it. Every failure says in words what is wrong with which
 * file; when the entry refuses this host it is asked about other majors so
 * the message can name the ABI the plugin does speak.
 */
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "errmsg.h"
#include "kvch.h"

#ifndef KVCH_PLUGINDIR
#define KVCH_PLUGINDIR "/usr/local/lib/kvc"
#endif

/* Majors asked about when the entry refuses this host's version. */
#define PROBE_MAJORS 16

/* The v1.0 descriptor ends with its last function pointer, seq_stats. */
#define DESC_V1_0_SIZE (offsetof(kvc_plugin, seq_stats) + sizeof(void (*)(void)))

/* Descriptor of `d` holds seq_describe: a 1.2 plugin (or newer) whose
 * struct_size covers the pointer. Older descriptors end before it. */
static int desc_has_describe(const kvc_plugin *d)
{
    return KVC_VERSION_MINOR(d->abi_version) >= 2 && KVC_HAS_FIELD(d, kvc_plugin, seq_describe);
}

struct kvch_plugin {
    void *handle;
    const kvc_plugin *desc;
    char *path;
};


static char *dup_str(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d != NULL)
        memcpy(d, s, n);
    return d;
}

/* ---- search directories ----------------------------------------------------- */

typedef struct dir_list {
    char **dirs;
    size_t n;
} dir_list;

static void dirs_free(dir_list *l)
{
    for (size_t i = 0; i < l->n; i++)
        free(l->dirs[i]);
    free(l->dirs);
    l->dirs = NULL;
    l->n = 0;
}

static int dirs_push(dir_list *l, const char *s, size_t len)
{
    char **nd = realloc(l->dirs, (l->n + 1) * sizeof *nd);
    if (nd == NULL)
        return -1;
    l->dirs = nd;
    char *d = malloc(len + 1);
    if (d == NULL)
        return -1;
    memcpy(d, s, len);
    d[len] = '\0';
    l->dirs[l->n++] = d;
    return 0;
}

/* $KVC_PLUGIN_PATH's non-empty entries, then the install directory.
 * Returns -1 when out of memory. */
static int dirs_get(dir_list *l)
{
    l->dirs = NULL;
    l->n = 0;
    const char *env = getenv("KVC_PLUGIN_PATH");
    while (env != NULL && *env != '\0') {
        const char *colon = strchr(env, ':');
        size_t len = colon ? (size_t)(colon - env) : strlen(env);
        if (len > 0 && dirs_push(l, env, len) != 0)
            goto oom;
        env = colon ? colon + 1 : NULL;
    }
    if (dirs_push(l, KVCH_PLUGINDIR, strlen(KVCH_PLUGINDIR)) != 0)
        goto oom;
    return 0;
oom:
    dirs_free(l);
    return -1;
}

static char *join_path(const char *dir, const char *name)
{
    size_t a = strlen(dir), b = strlen(name);
    int slash = a > 0 && dir[a - 1] != '/';
    char *p = malloc(a + (size_t)slash + b + 1);
    if (p == NULL)
        return NULL;
    memcpy(p, dir, a);
    if (slash)
        p[a] = '/';
    memcpy(p + a + slash, name, b + 1);
    return p;
}

static int is_file(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* Resolves a plugin name to the first dir/kvc-NAME.so that exists. On
 * failure writes the reason and returns NULL with *st set. */
static char *resolve_name(const char *name, kvc_status *st, char *err, size_t err_size)
{
    size_t nlen = strlen(name);
    char *file = malloc(nlen + 8);
    dir_list l;
    if (file == NULL || dirs_get(&l) != 0) {
        free(file);
        *st = KVC_E_NOMEM;
        kvch_set_err(err, err_size, "out of memory looking up plugin \"%s\"", name);
        return NULL;
    }
    snprintf(file, nlen + 8, "kvc-%s.so", name);
    char *found = NULL;
    for (size_t i = 0; i < l.n && found == NULL; i++) {
        char *p = join_path(l.dirs[i], file);
        if (p != NULL && is_file(p))
            found = p;
        else
            free(p);
    }
    if (found == NULL) {
        *st = KVC_E_INVALID;
        int n = snprintf(err, err ? err_size : 0,
                         "plugin \"%s\" not found: no %s in", name, file);
        for (size_t i = 0; i < l.n && err != NULL && n >= 0 && (size_t)n < err_size; i++) {
            int m = snprintf(err + n, err_size - (size_t)n, "%s %s", i ? "," : "", l.dirs[i]);
            if (m < 0)
                break;
            n += m;
        }
        if (err != NULL && n >= 0 && (size_t)n < err_size && l.n > 1)
            snprintf(err + n, err_size - (size_t)n, " ($KVC_PLUGIN_PATH, then the install directory)");
    }
    free(file);
    dirs_free(&l);
    return found;
}

/* ---- descriptor checks ---------------------------------------------------------- */

typedef void (*any_fn)(void);

/* Every function pointer of ABI 1.0, for the NULL check. */
#define FN(f) { #f, offsetof(kvc_plugin, f) }
static const struct {
    const char *name;
    size_t offset;
} v1_functions[] = {
    FN(create), FN(destroy), FN(instance_message), FN(prepare_layer),
    FN(finalize_layer), FN(finalize), FN(save), FN(instance_stats),
    FN(seq_open), FN(seq_close), FN(seq_message), FN(append), FN(attend),
    FN(attend_batch), FN(materialize), FN(truncate), FN(fork), FN(seq_export),
    FN(seq_import), FN(seq_stats),
};
#undef FN

static int id_ok(const char *id)
{
    if (*id == '\0')
        return 0;
    for (const char *c = id; *c; c++)
        if (!((*c >= 'a' && *c <= 'z') || (*c >= '0' && *c <= '9') || *c == '_' || *c == '-'))
            return 0;
    return 1;
}

/* Checks what a 1.0 host relies on. Returns KVC_OK or writes the reason. */
static kvc_status check_desc(const kvc_plugin *d, const char *path, char *err, size_t err_size)
{
    if (d->struct_size < offsetof(kvc_plugin, abi_version) + sizeof d->abi_version) {
        kvch_set_err(err, err_size, "%s: descriptor struct_size %u is too small to hold an ABI version",
                path, (unsigned)d->struct_size);
        return KVC_E_VERSION;
    }
    if (KVC_VERSION_MAJOR(d->abi_version) != KVC_ABI_VERSION_MAJOR) {
        kvch_set_err(err, err_size, "%s: descriptor says kvc ABI %u.%u; this host speaks %d.%d",
                path, (unsigned)KVC_VERSION_MAJOR(d->abi_version),
                (unsigned)KVC_VERSION_MINOR(d->abi_version),
                KVC_ABI_VERSION_MAJOR, KVC_ABI_VERSION_MINOR);
        return KVC_E_VERSION;
    }
    if (d->struct_size < DESC_V1_0_SIZE) {
        kvch_set_err(err, err_size, "%s: descriptor struct_size %u is smaller than a kvc ABI 1.0 "
                "descriptor (%zu bytes)", path, (unsigned)d->struct_size, DESC_V1_0_SIZE);
        return KVC_E_VERSION;
    }
    const char *missing = d->id == NULL ? "id" : d->name == NULL ? "name"
                        : d->version == NULL ? "version" : NULL;
    if (missing != NULL) {
        kvch_set_err(err, err_size, "%s: descriptor field %s is NULL", path, missing);
        return KVC_E_INVALID;
    }
    if (!id_ok(d->id)) {
        kvch_set_err(err, err_size, "%s: descriptor id \"%s\" is not of [a-z0-9_-]+", path, d->id);
        return KVC_E_INVALID;
    }
    for (size_t i = 0; i < sizeof v1_functions / sizeof v1_functions[0]; i++) {
        any_fn f;
        memcpy(&f, (const char *)d + v1_functions[i].offset, sizeof f);
        if (f == NULL) {
            kvch_set_err(err, err_size, "%s: plugin \"%s\": function pointer %s is NULL",
                    path, d->id, v1_functions[i].name);
            return KVC_E_INVALID;
        }
    }
    /* ABI 1.2 appended seq_describe: required of a 1.2 descriptor that holds
     * it; a 1.0/1.1 descriptor ends before it and loads without. */
    if (desc_has_describe(d) && d->seq_describe == NULL) {
        kvch_set_err(err, err_size, "%s: plugin \"%s\": function pointer seq_describe is NULL "
                "(required of a kvc ABI %u.%u descriptor, appended in 1.2)", path, d->id,
                (unsigned)KVC_VERSION_MAJOR(d->abi_version),
                (unsigned)KVC_VERSION_MINOR(d->abi_version));
        return KVC_E_INVALID;
    }
    if (d->n_options > 0 && d->options == NULL) {
        kvch_set_err(err, err_size, "%s: plugin \"%s\": n_options is %u but the option table is NULL",
                path, d->id, (unsigned)d->n_options);
        return KVC_E_INVALID;
    }
    for (uint32_t i = 0; i < d->n_options; i++) {
        const kvc_option_desc *o = d->options[i];
        if (o == NULL) {
            kvch_set_err(err, err_size, "%s: plugin \"%s\": option %u of %u is NULL",
                    path, d->id, (unsigned)i, (unsigned)d->n_options);
            return KVC_E_INVALID;
        }
        if (o->struct_size < sizeof(kvc_option_desc)) {
            kvch_set_err(err, err_size, "%s: plugin \"%s\": option %u has struct_size %u, smaller "
                    "than a kvc ABI 1.0 option (%zu bytes)", path, d->id, (unsigned)i,
                    (unsigned)o->struct_size, sizeof(kvc_option_desc));
            return KVC_E_VERSION;
        }
        if (o->name == NULL) {
            kvch_set_err(err, err_size, "%s: plugin \"%s\": option %u has a NULL name",
                    path, d->id, (unsigned)i);
            return KVC_E_INVALID;
        }
        if (o->type == KVC_OPT_ENUM && o->choices == NULL) {
            kvch_set_err(err, err_size, "%s: plugin \"%s\": enum option %s has no choices",
                    path, d->id, o->name);
            return KVC_E_INVALID;
        }
    }
    return KVC_OK;
}

/* The entry refused this host: asks it about other versions to say why. */
static void explain_refusal(kvc_plugin_entry_fn entry, const char *path, char *err, size_t err_size)
{
    char majors[PROBE_MAJORS * 8] = "";
    size_t len = 0;
    int newer_minor = 0;
    for (unsigned m = 0; m < PROBE_MAJORS; m++) {
        /* A plugin of major m serves hosts m.0 and up; ask for m.0 and for
         * the newest possible minor. */
        const kvc_plugin *d = entry(KVC_MAKE_VERSION(m, 0));
        if (d == NULL)
            d = entry(KVC_MAKE_VERSION(m, 0xffff));
        if (d == NULL)
            continue;
        if (m == KVC_ABI_VERSION_MAJOR) {
            newer_minor = 1;
            continue;
        }
        int n = snprintf(majors + len, sizeof majors - len, "%s%u.x", len ? ", " : "", m);
        if (n > 0 && (size_t)n < sizeof majors - len)
            len += (size_t)n;
    }
    if (len > 0)
        kvch_set_err(err, err_size, "%s: plugin speaks kvc ABI %s; this host speaks %d.%d", path,
                majors, KVC_ABI_VERSION_MAJOR, KVC_ABI_VERSION_MINOR);
    else if (newer_minor)
        kvch_set_err(err, err_size, "%s: plugin refuses kvc ABI %d.%d but accepts a newer %d.x; it "
                "needs a newer host than this one (%d.%d)", path, KVC_ABI_VERSION_MAJOR,
                KVC_ABI_VERSION_MINOR, KVC_ABI_VERSION_MAJOR, KVC_ABI_VERSION_MAJOR,
                KVC_ABI_VERSION_MINOR);
    else
        kvch_set_err(err, err_size, "%s: plugin refused every kvc ABI version asked (majors 0 to %d); "
                "this host speaks %d.%d", path, PROBE_MAJORS - 1, KVC_ABI_VERSION_MAJOR,
                KVC_ABI_VERSION_MINOR);
}

/* ---- public ---------------------------------------------------------------------- */

static int is_path(const char *what)
{
    size_t n = strlen(what);
    return strchr(what, '/') != NULL || (n >= 3 && strcmp(what + n - 3, ".so") == 0);
}

kvc_status kvch_load(const char *what, kvch_plugin **out, char *err, size_t err_size)
{
    if (err != NULL && err_size > 0)
        err[0] = '\0';
    if (what == NULL || what[0] == '\0' || out == NULL) {
        kvch_set_err(err, err_size, "kvch_load: %s", out == NULL ? "out is NULL" : "no plugin named");
        return KVC_E_INVALID;
    }

    kvc_status st = KVC_OK;
    char *path;
    if (is_path(what)) {
        struct stat sb;
        if (stat(what, &sb) != 0) {
            int e = errno;
            kvch_set_err(err, err_size, "%s: %s", what, e == ENOENT ? "no such file" : strerror(e));
            return KVC_E_INVALID;
        }
        if (S_ISDIR(sb.st_mode)) {
            kvch_set_err(err, err_size, "%s: is a directory, not a plugin file", what);
            return KVC_E_INVALID;
        }
        /* dlopen searches the library path for a name without '/'. */
        path = strchr(what, '/') ? dup_str(what) : join_path(".", what);
        if (path == NULL) {
            kvch_set_err(err, err_size, "%s: out of memory", what);
            return KVC_E_NOMEM;
        }
    } else {
        path = resolve_name(what, &st, err, err_size);
        if (path == NULL)
            return st;
    }

    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (h == NULL) {
        const char *why = dlerror();
        kvch_set_err(err, err_size, "%s: dlopen failed: %s", path, why ? why : "unknown reason");
        free(path);
        return KVC_E_INVALID;
    }

    (void)dlerror();
    void *sym = dlsym(h, KVC_PLUGIN_ENTRY_SYMBOL);
    if (sym == NULL) {
        kvch_set_err(err, err_size, "%s: not a kvc plugin: no symbol %s", path, KVC_PLUGIN_ENTRY_SYMBOL);
        st = KVC_E_INVALID;
        goto fail;
    }
    kvc_plugin_entry_fn entry;
    memcpy(&entry, &sym, sizeof entry); /* object to function pointer, as POSIX allows */

    const kvc_plugin *d = entry(KVC_ABI_VERSION);
    if (d == NULL) {
        explain_refusal(entry, path, err, err_size);
        st = KVC_E_VERSION;
        goto fail;
    }
    st = check_desc(d, path, err, err_size);
    if (st != KVC_OK)
        goto fail;

    kvch_plugin *p = malloc(sizeof *p);
    if (p == NULL) {
        kvch_set_err(err, err_size, "%s: out of memory", path);
        st = KVC_E_NOMEM;
        goto fail;
    }
    p->handle = h;
    p->desc = d;
    p->path = path;
    *out = p;
    return KVC_OK;

fail:
    dlclose(h);
    free(path);
    return st;
}

void kvch_unload(kvch_plugin *p)
{
    if (p == NULL)
        return;
    dlclose(p->handle);
    free(p->path);
    free(p);
}

const kvc_plugin *kvch_plugin_desc(const kvch_plugin *p)
{
    return p ? p->desc : NULL;
}

const char *kvch_plugin_path(const kvch_plugin *p)
{
    return p ? p->path : NULL;
}

kvc_status kvch_seq_describe(const kvc_plugin *p, const kvc_seq *s, uint32_t layer,
                             char **text_out, char *err, size_t err_size)
{
    if (err != NULL && err_size > 0)
        err[0] = '\0';
    if (p == NULL || s == NULL || text_out == NULL) {
        kvch_set_err(err, err_size, "kvch_seq_describe: %s is NULL",
                     p == NULL ? "plugin" : s == NULL ? "sequence" : "text_out");
        return KVC_E_INVALID;
    }
    if (!desc_has_describe(p) || p->seq_describe == NULL) {
        kvch_set_err(err, err_size, "%s: seq_describe needs a kvc ABI 1.2 plugin; this one was "
                     "built against %u.%u", p->id, (unsigned)KVC_VERSION_MAJOR(p->abi_version),
                     (unsigned)KVC_VERSION_MINOR(p->abi_version));
        return KVC_E_UNSUPPORTED;
    }
    /* Size, then copy; the text cannot change between the calls (the
     * caller owns the sequence), but a plugin that says BUFFER again is
     * asked once more with the size it gave, a few times at most. */
    size_t need = 0;
    kvc_status st = p->seq_describe(s, layer, NULL, 0, &need);
    for (int tries = 0; st == KVC_OK && tries < 4; tries++) {
        if (need == 0) {
            kvch_set_err(err, err_size, "%s: seq_describe(layer %u) asked for 0 bytes (the "
                         "text has at least its NUL)", p->id, (unsigned)layer);
            return KVC_E_INTERNAL;
        }
        char *buf = malloc(need);
        if (buf == NULL) {
            kvch_set_err(err, err_size, "%s: out of memory for %zu bytes of seq_describe",
                         p->id, need);
            return KVC_E_NOMEM;
        }
        size_t got = need;
        st = p->seq_describe(s, layer, buf, need, &got);
        if (st == KVC_OK) {
            if (got == 0 || got > need || buf[got - 1] != '\0' || memchr(buf, '\0', got) !=
                                                                      buf + got - 1) {
                free(buf);
                kvch_set_err(err, err_size, "%s: seq_describe(layer %u) returned %zu bytes "
                             "that are not one NUL-terminated text", p->id, (unsigned)layer,
                             got);
                return KVC_E_INTERNAL;
            }
            *text_out = buf;
            return KVC_OK;
        }
        free(buf);
        if (st != KVC_E_BUFFER)
            break;
        need = got;
        st = KVC_OK;
    }
    kvch_set_err(err, err_size, "%s: seq_describe(layer %u): %s: %s", p->id, (unsigned)layer,
                 kvch_status_string(st == KVC_OK ? KVC_E_BUFFER : st),
                 p->seq_message(s));
    return st == KVC_OK ? KVC_E_BUFFER : st;
}

const char *kvch_install_dir(void)
{
    return KVCH_PLUGINDIR;
}

static int is_plugin_name(const char *n)
{
    size_t len = strlen(n);
    return len > 7 && strncmp(n, "kvc-", 4) == 0 && strcmp(n + len - 3, ".so") == 0;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Growable list of owned strings. */
typedef struct str_list {
    char **v;
    size_t n, cap;
} str_list;

static int list_push(str_list *l, char *s)
{
    if (l->n == l->cap) {
        size_t nc = l->cap ? l->cap * 2 : 16;
        char **nv = realloc(l->v, nc * sizeof *nv);
        if (nv == NULL)
            return -1;
        l->v = nv;
        l->cap = nc;
    }
    l->v[l->n++] = s;
    return 0;
}

static int list_has(const str_list *l, const char *s)
{
    for (size_t i = 0; i < l->n; i++)
        if (strcmp(l->v[i], s) == 0)
            return 1;
    return 0;
}

static void list_free(str_list *l)
{
    for (size_t i = 0; i < l->n; i++)
        free(l->v[i]);
    free(l->v);
}

int kvch_find_plugins(void (*fn)(void *user, const char *path), void *user)
{
    dir_list dirs;
    if (dirs_get(&dirs) != 0)
        return 0;
    str_list seen = {0};
    int reported = 0;
    for (size_t i = 0; i < dirs.n; i++) {
        DIR *dir = opendir(dirs.dirs[i]);
        if (dir == NULL)
            continue; /* a missing directory in the path is normal */
        str_list names = {0};
        for (struct dirent *e; (e = readdir(dir)) != NULL;) {
            if (!is_plugin_name(e->d_name) || list_has(&seen, e->d_name))
                continue;
            char *copy = dup_str(e->d_name);
            if (copy == NULL || list_push(&names, copy) != 0)
                free(copy);
        }
        closedir(dir);
        if (names.n > 0)
            qsort(names.v, names.n, sizeof *names.v, cmp_str);
        for (size_t k = 0; k < names.n; k++) {
            char *path = join_path(dirs.dirs[i], names.v[k]);
            if (path == NULL || !is_file(path)) {
                free(path);
                continue;
            }
            if (fn != NULL)
                fn(user, path);
            reported++;
            free(path);
            /* Shadowing: a name seen here hides the same name further on. */
            if (list_push(&seen, names.v[k]) == 0)
                names.v[k] = NULL;
        }
        list_free(&names);
    }
    list_free(&seen);
    dirs_free(&dirs);
    return reported;
}
