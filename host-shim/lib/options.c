/* options.c -- "name=value" tables for kvc_create_info.
 *
 * A kvch_options starts zeroed ({0}). Each entry owns one heap copy of its
 * "name=value" text with the '=' replaced by NUL: names[i] points at the
 * copy, values[i] just past the NUL. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "errmsg.h"
#include "kvch.h"


int kvch_options_add(kvch_options *o, const char *kv, char *err, size_t err_size)
{
    if (o == NULL || kv == NULL) {
        kvch_set_err(err, err_size, "no option given");
        return -1;
    }
    const char *eq = strchr(kv, '=');
    if (eq == NULL) {
        kvch_set_err(err, err_size, "option \"%s\" has no '=' (expected name=value)", kv);
        return -1;
    }
    size_t name_len = (size_t)(eq - kv);
    if (name_len == 0) {
        kvch_set_err(err, err_size, "option \"%s\" has an empty name (expected name=value)", kv);
        return -1;
    }
    uint32_t slot = o->n;
    for (uint32_t i = 0; i < o->n; i++) {
        if (strlen(o->names[i]) == name_len && memcmp(o->names[i], kv, name_len) == 0) {
            slot = i;
            break;
        }
    }
    if (slot == o->n && o->n >= KVCH_MAX_OPTIONS) {
        kvch_set_err(err, err_size, "too many options (at most %d): cannot add \"%s\"",
                KVCH_MAX_OPTIONS, kv);
        return -1;
    }
    size_t len = strlen(kv);
    char *copy = malloc(len + 1);
    if (copy == NULL) {
        kvch_set_err(err, err_size, "out of memory adding option \"%.*s\"", (int)name_len, kv);
        return -1;
    }
    memcpy(copy, kv, len + 1);
    copy[name_len] = '\0';
    if (slot < o->n)
        free(o->storage[slot]); /* a later name replaces an earlier one */
    else
        o->n++;
    o->storage[slot] = copy;
    o->names[slot] = copy;
    o->values[slot] = copy + name_len + 1;
    return 0;
}

void kvch_options_clear(kvch_options *o)
{
    if (o == NULL)
        return;
    for (uint32_t i = 0; i < o->n && i < KVCH_MAX_OPTIONS; i++)
        free(o->storage[i]);
    memset(o, 0, sizeof *o);
}

void kvch_options_apply(const kvch_options *o, kvc_create_info *info)
{
    if (o == NULL || info == NULL)
        return;
    /* The arrays stay inside *o: it must outlive the create() call. */
    info->n_options = o->n;
    info->option_names = o->n ? o->names : NULL;
    info->option_values = o->n ? o->values : NULL;
}
