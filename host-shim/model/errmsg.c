/* errmsg.c -- see errmsg.h. */
#include <stdarg.h>
#include <stdio.h>

#include "errmsg.h"

kvc_status kvch_fail(char *err, size_t cap, kvc_status st, const char *fmt, ...)
{
    if (err && cap) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, cap, fmt, ap);
        va_end(ap);
    }
    return st;
}
