/*
 * errmsg.h -- the model host's error words: printf into the caller's err
 * buffer and return the status, so error paths read
 *     return kvch_fail(err, cap, KVC_E_CORRUPT, "tensor %s is missing", name);
 * Internal to libkvc-host (lib/ and model/).
 */
#ifndef KVCH_ERRMSG_H
#define KVCH_ERRMSG_H

#include <stddef.h>

#include "kvc.h"

/* err may be NULL or cap 0 (nothing written); always NUL-terminated. */
kvc_status kvch_fail(char *err, size_t cap, kvc_status st, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* The same without a status, for paths that return something else. */
void kvch_set_err(char *err, size_t cap, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

#endif
