/* errmsg.c -- see errmsg.h. */
#include <stdarg.h>
#include <stdio.h>

#include "errmsg.h"

static void vset(char *err, size_t cap, const char *fmt, va_list ap)
{
    if (err && cap)
        vsnprintf(err, cap, fmt, ap);
}

kvc_status kvch_fail(char *err, size_t cap, kvc_status st, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vset(err, cap, fmt, ap);
    va_end(ap);
    return st;
}

void kvch_set_err(char *err, size_t cap, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vset(err, cap, fmt, ap);
    va_end(ap);
}
