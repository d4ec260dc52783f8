/* cmd_list.c -- `kvc list` and `kvc info PLUGIN`. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cmds.h"
#include "kvch.h"

/* ---- a small aligned table ------------------------------------------------------ */

#define MAX_COLS 6

typedef struct table {
    int n_cols;
    size_t n_rows, cap;
    char **cells; /* [n_rows][n_cols], owned */
} table;

static char *dup_str(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d != NULL)
        memcpy(d, s, n);
    return d;
}

/* Adds a row of n_cols strings (copied; NULL shows as "-"). -1 when out of memory. */
static int table_add(table *t, const char *const *cols)
{
    if (t->n_rows == t->cap) {
        size_t nc = t->cap ? t->cap * 2 : 16;
        char **ncells = realloc(t->cells, nc * (size_t)t->n_cols * sizeof *ncells);
        if (ncells == NULL)
            return -1;
        t->cells = ncells;
        t->cap = nc;
    }
    char **row = t->cells + t->n_rows * (size_t)t->n_cols;
    for (int c = 0; c < t->n_cols; c++) {
        row[c] = dup_str(cols[c] ? cols[c] : "-");
        if (row[c] == NULL) {
            while (c-- > 0)
                free(row[c]);
            return -1;
        }
    }
    t->n_rows++;
    return 0;
}

/* Prints every row with columns padded to their widest cell; the last column
 * is not padded. */
static void table_print(const table *t, FILE *f, const char *indent)
{
    size_t w[MAX_COLS] = {0};
    for (size_t r = 0; r < t->n_rows; r++)
        for (int c = 0; c < t->n_cols; c++) {
            size_t n = strlen(t->cells[r * (size_t)t->n_cols + (size_t)c]);
            if (n > w[c])
                w[c] = n;
        }
    for (size_t r = 0; r < t->n_rows; r++) {
        fputs(indent, f);
        for (int c = 0; c < t->n_cols; c++) {
            const char *s = t->cells[r * (size_t)t->n_cols + (size_t)c];
            if (c + 1 < t->n_cols)
                fprintf(f, "%-*s  ", (int)w[c], s);
            else
                fprintf(f, "%s\n", s);
        }
    }
}

static void table_free(table *t)
{
    for (size_t i = 0; i < t->n_rows * (size_t)t->n_cols; i++)
        free(t->cells[i]);
    free(t->cells);
}

/* ---- kvc list ----------------------------------------------------------------------- */

typedef struct list_ctx {
    table t;
    int n_failed;
    int oom;
} list_ctx;

static void list_one(void *user, const char *path)
{
    list_ctx *ctx = user;
    kvch_plugin *p = NULL;
    char err[1024];
    kvc_status st = kvch_load(path, &p, err, sizeof err);
    if (st != KVC_OK) {
        /* The loader's reason starts with the path already. */
        char cell[1200];
        size_t pl = strlen(path);
        if (strncmp(err, path, pl) == 0 && err[pl] == ':')
            snprintf(cell, sizeof cell, "%s", err);
        else
            snprintf(cell, sizeof cell, "%s: %s", path, err);
        const char *row[] = {"-", "-", "-", "(failed to load)", cell};
        if (table_add(&ctx->t, row) != 0)
            ctx->oom = 1;
        ctx->n_failed++;
        return;
    }
    const kvc_plugin *d = kvch_plugin_desc(p);
    char abi[32], caps[512];
    snprintf(abi, sizeof abi, "%u.%u", (unsigned)KVC_VERSION_MAJOR(d->abi_version),
             (unsigned)KVC_VERSION_MINOR(d->abi_version));
    kvch_caps_string(d->caps, caps, sizeof caps);
    const char *row[] = {d->id, d->version, abi, caps, kvch_plugin_path(p)};
    if (table_add(&ctx->t, row) != 0)
        ctx->oom = 1;
    kvch_unload(p);
}

static void list_usage(FILE *f)
{
    fprintf(f, "usage: kvc list\n"
               "Lists every kvc-*.so in $KVC_PLUGIN_PATH, then in %s\n"
               "(a name found earlier hides the same name later), loading each one;\n"
               "files that fail to load are listed with the reason.\n",
            kvch_install_dir());
}

int kvc_cmd_list(int argc, char **argv)
{
    if (argc > 1) {
        if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
            list_usage(stdout);
            return 0;
        }
        fprintf(stderr, "kvc list: unexpected argument \"%s\"\n", argv[1]);
        list_usage(stderr);
        return 2;
    }
    list_ctx ctx = {.t = {.n_cols = 5}};
    const char *head[] = {"ID", "VERSION", "ABI", "CAPABILITIES", "PATH"};
    if (table_add(&ctx.t, head) != 0)
        ctx.oom = 1;
    int n = kvch_find_plugins(list_one, &ctx);
    if (ctx.oom) {
        fprintf(stderr, "kvc list: out of memory\n");
        table_free(&ctx.t);
        return 1;
    }
    if (n == 0) {
        const char *env = getenv("KVC_PLUGIN_PATH");
        fprintf(stderr, "kvc list: no kvc-*.so found in %s%s%s\n",
                env && *env ? env : "", env && *env ? ", then " : "", kvch_install_dir());
        table_free(&ctx.t);
        return 0;
    }
    table_print(&ctx.t, stdout, "");
    if (ctx.n_failed > 0)
        fprintf(stderr, "kvc list: %d of %d file%s failed to load\n", ctx.n_failed, n,
                n == 1 ? "" : "s");
    table_free(&ctx.t);
    return 0;
}

/* ---- kvc info ----------------------------------------------------------------------- */

static const char *type_word(int32_t type)
{
    switch (type) {
    case KVC_OPT_BOOL: return "bool";
    case KVC_OPT_INT: return "int";
    case KVC_OPT_FLOAT: return "float";
    case KVC_OPT_ENUM: return "enum";
    case KVC_OPT_STRING: return "string";
    default: return NULL;
    }
}

static void fmt_num(char *buf, size_t n, double v, int integer)
{
    if (integer && v > -9.0e15 && v < 9.0e15 && v == (double)(long long)v)
        snprintf(buf, n, "%lld", (long long)v);
    else
        snprintf(buf, n, "%g", v);
}

/* The "range or choices" cell of one option. */
static void option_range(const kvc_option_desc *o, char *buf, size_t n)
{
    char a[64], b[64];
    switch (o->type) {
    case KVC_OPT_INT:
    case KVC_OPT_FLOAT:
        fmt_num(a, sizeof a, o->min, o->type == KVC_OPT_INT);
        fmt_num(b, sizeof b, o->max, o->type == KVC_OPT_INT);
        snprintf(buf, n, "[%s, %s]", a, b);
        break;
    case KVC_OPT_ENUM: snprintf(buf, n, "%s", o->choices ? o->choices : "-"); break;
    case KVC_OPT_BOOL: snprintf(buf, n, "true|false"); break;
    default: snprintf(buf, n, "-"); break;
    }
}

/* Prints "label  text" with text wrapped at 78 columns under itself. */
static void print_field(const char *label, const char *text)
{
    const int indent = 14, width = 78;
    printf("%-*s", indent, label);
    if (text == NULL || *text == '\0') {
        printf("-\n");
        return;
    }
    int col = indent;
    const char *s = text;
    while (*s) {
        while (*s == ' ')
            s++;
        if (*s == '\0')
            break;
        size_t w = strcspn(s, " ");
        if (col > indent && col + 1 + (int)w > width) {
            printf("\n%*s", indent, "");
            col = indent;
        }
        if (col > indent) {
            putchar(' ');
            col++;
        }
        printf("%.*s", (int)w, s);
        col += (int)w;
        s += w;
    }
    putchar('\n');
}

static void info_usage(FILE *f)
{
    fprintf(f, "usage: kvc info PLUGIN\n"
               "Shows a plugin's descriptor and option table. PLUGIN is a path to a .so,\n"
               "or a name looked up as kvc-NAME.so in $KVC_PLUGIN_PATH, then in %s.\n",
            kvch_install_dir());
}

int kvc_cmd_info(int argc, char **argv)
{
    if (argc == 2 && (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0)) {
        info_usage(stdout);
        return 0;
    }
    if (argc != 2) {
        fprintf(stderr, argc < 2 ? "kvc info: no plugin named\n"
                                 : "kvc info: one plugin at a time\n");
        info_usage(stderr);
        return 2;
    }
    kvch_plugin *p = NULL;
    char err[1024];
    kvc_status st = kvch_load(argv[1], &p, err, sizeof err);
    if (st != KVC_OK) {
        fprintf(stderr, "kvc info: %s\n", err);
        return 1;
    }
    const kvc_plugin *d = kvch_plugin_desc(p);
    char buf[640], caps[512];

    print_field("id", d->id);
    print_field("name", d->name);
    print_field("version", d->version);
    snprintf(buf, sizeof buf, "%u.%u", (unsigned)KVC_VERSION_MAJOR(d->abi_version),
             (unsigned)KVC_VERSION_MINOR(d->abi_version));
    print_field("abi", buf);
    print_field("license", d->license);
    print_field("path", kvch_plugin_path(p));
    kvch_caps_string(d->caps, caps, sizeof caps);
    snprintf(buf, sizeof buf, "%s (0x%llx)", caps, (unsigned long long)d->caps);
    print_field("capabilities", buf);
    print_field("description", d->description);

    printf("\noptions (%u):\n", (unsigned)d->n_options);
    table t = {.n_cols = 5};
    const char *head[] = {"NAME", "TYPE", "DEFAULT", "RANGE/CHOICES", "HELP"};
    int oom = table_add(&t, head) != 0;
    for (uint32_t i = 0; i < d->n_options && !oom; i++) {
        const kvc_option_desc *o = d->options[i];
        char type[24], range[512];
        const char *tw = type_word(o->type);
        if (tw == NULL) {
            snprintf(type, sizeof type, "type %d", (int)o->type);
            tw = type;
        }
        option_range(o, range, sizeof range);
        const char *def = o->default_value && *o->default_value ? o->default_value : "(unset)";
        const char *row[] = {o->name, tw, def, range, o->help};
        oom = table_add(&t, row) != 0;
    }
    if (oom)
        fprintf(stderr, "kvc info: out of memory\n");
    else if (d->n_options > 0)
        table_print(&t, stdout, "  ");
    table_free(&t);
    kvch_unload(p);
    return oom ? 1 : 0;
}
