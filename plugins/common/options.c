/* Parsing of name=value option strings against a plugin's option table. */
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvcp.h"

/* Index of `word` in a '|'-separated list, or -1. */
static int choice_index(const char *choices, const char *word)
{
    size_t wl = strlen(word);
    int idx = 0;
    for (const char *p = choices; p && *p; idx++) {
        const char *bar = strchr(p, '|');
        size_t len = bar ? (size_t)(bar - p) : strlen(p);
        if (len == wl && strncmp(p, word, wl) == 0)
            return idx;
        if (!bar)
            break;
        p = bar + 1;
    }
    return -1;
}

static kvc_status parse_value(const kvc_option_desc *d, const char *text, kvcp_optval *v,
                              char *msg, size_t cap)
{
    char *end = NULL;
    v->str = text;
    switch (d->type) {
    case KVC_OPT_BOOL:
        if (!strcmp(text, "true") || !strcmp(text, "1") || !strcmp(text, "yes") ||
            !strcmp(text, "on"))
            v->num = 1;
        else if (!strcmp(text, "false") || !strcmp(text, "0") || !strcmp(text, "no") ||
                 !strcmp(text, "off"))
            v->num = 0;
        else
            return kvcp_fail(msg, cap, KVC_E_INVALID,
                             "option %s: '%s' is not a boolean (true/false)", d->name, text);
        return KVC_OK;
    case KVC_OPT_INT: {
        errno = 0;
        long long x = strtoll(text, &end, 10);
        if (!*text || isspace((unsigned char)*text) || *end || errno)
            return kvcp_fail(msg, cap, KVC_E_INVALID, "option %s: '%s' is not an integer",
                             d->name, text);
        if ((double)x < d->min || (double)x > d->max)
            return kvcp_fail(msg, cap, KVC_E_INVALID, "option %s: %lld is outside [%g, %g]",
                             d->name, x, d->min, d->max);
        v->num = (double)x;
        return KVC_OK;
    }
    case KVC_OPT_FLOAT: {
        errno = 0;
        double x = strtod(text, &end);
        if (!*text || isspace((unsigned char)*text) || *end || errno || !isfinite(x))
            return kvcp_fail(msg, cap, KVC_E_INVALID, "option %s: '%s' is not a finite number",
                             d->name, text);
        if (x < d->min || x > d->max)
            return kvcp_fail(msg, cap, KVC_E_INVALID, "option %s: %g is outside [%g, %g]",
                             d->name, x, d->min, d->max);
        v->num = x;
        return KVC_OK;
    }
    case KVC_OPT_ENUM: {
        int i = choice_index(d->choices, text);
        if (i < 0)
            return kvcp_fail(msg, cap, KVC_E_INVALID, "option %s: '%s' is not one of %s",
                             d->name, text, d->choices ? d->choices : "(none)");
        v->num = i;
        return KVC_OK;
    }
    case KVC_OPT_STRING:
        return KVC_OK;
    default:
        return kvcp_fail(msg, cap, KVC_E_INTERNAL, "option %s has unknown type %d", d->name,
                         (int)d->type);
    }
}

kvc_status kvcp_parse_options(const kvc_option_desc *const *table, uint32_t n,
                              const kvc_create_info *info, kvcp_optval *vals, char *msg,
                              size_t cap)
{
    for (uint32_t j = 0; j < n; j++) {
        memset(&vals[j], 0, sizeof vals[j]);
        vals[j].str = table[j]->default_value ? table[j]->default_value : "";
        if (*vals[j].str) {
            kvc_status st = parse_value(table[j], vals[j].str, &vals[j], msg, cap);
            if (st)
                return kvcp_fail(msg, cap, KVC_E_INTERNAL, "default of option %s is invalid",
                                 table[j]->name);
        }
    }
    for (uint32_t i = 0; i < info->n_options; i++) {
        const char *name = info->option_names[i];
        const char *value = info->option_values[i];
        if (!name || !value)
            return kvcp_fail(msg, cap, KVC_E_INVALID, "option %u has a NULL name or value", i);
        uint32_t j = 0;
        while (j < n && strcmp(table[j]->name, name))
            j++;
        if (j == n) {
            char known[160] = "";
            size_t used = 0;
            for (uint32_t k = 0; k < n && used + 1 < sizeof known; k++)
                used += (size_t)snprintf(known + used, sizeof known - used, "%s%s",
                                         k ? ", " : "", table[k]->name);
            return kvcp_fail(msg, cap, KVC_E_INVALID, "unknown option '%s' (known: %s)", name,
                             known);
        }
        if (vals[j].set)
            return kvcp_fail(msg, cap, KVC_E_INVALID, "option %s is given twice", name);
        kvc_status st = parse_value(table[j], value, &vals[j], msg, cap);
        if (st)
            return st;
        vals[j].set = 1;
    }
    return KVC_OK;
}
