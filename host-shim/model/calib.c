/*
 * calib.c -- the default calibration files, their tokens and the note that
 * names them.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "calib.h"
#include "errmsg.h"
#include "run.h"

static const char *const DEFAULT_CALIB[] = {
    KVCH_LICENSE_DIR "Apache-2.0", KVCH_LICENSE_DIR "MPL-2.0", KVCH_LICENSE_DIR "GFDL-1.3",
    KVCH_LICENSE_DIR "CC0-1.0", KVCH_LICENSE_DIR "Artistic",
};

const char *const *kvch_calib_defaults(size_t *n)
{
    *n = sizeof DEFAULT_CALIB / sizeof DEFAULT_CALIB[0];
    return DEFAULT_CALIB;
}

/* Appends printf output at note[*at], never past cap; *at keeps counting
 * so that a full buffer stays full. */
__attribute__((format(printf, 4, 5))) static void note_add(char *note, size_t cap, size_t *at,
                                                           const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int k = vsnprintf(*at < cap ? note + *at : NULL, *at < cap ? cap - *at : 0, fmt, ap);
    va_end(ap);
    if (k > 0)
        *at += (size_t)k;
}

kvc_status kvch_calib_load(const kvch_tokenizer *tok, const char *const *files, size_t n_files,
                           uint64_t max_tokens, int32_t **ids, size_t *n, char *note,
                           size_t note_cap, char *err, size_t err_cap)
{
    if (note && note_cap)
        note[0] = '\0';
    if (!tok || !ids || !n || (n_files && !files))
        return kvch_fail(err, err_cap, KVC_E_INVALID, "calibration: NULL argument");
    if (!n_files)
        return kvch_fail(err, err_cap, KVC_E_INVALID, "calibration: no files given");
    int32_t *all = malloc(sizeof *all);
    size_t n_all = 0, at = 0;
    if (!all)
        return kvch_fail(err, err_cap, KVC_E_NOMEM, "calibration: out of memory");
    for (size_t f = 0; f < n_files && (!max_tokens || n_all < max_tokens); f++) {
        char *text = NULL;
        size_t len = 0, nf = 0;
        int32_t *fid = NULL;
        kvc_status st = kvch_read_file(files[f], &text, &len, err, err_cap);
        if (st) {
            free(all);
            return st;
        }
        st = kvch_tok_encode(tok, text, len, 0, &fid, &nf);
        free(text);
        if (st) {
            free(all);
            return kvch_fail(err, err_cap, st, "%s: could not be tokenized (%s)", files[f],
                             st == KVC_E_NOMEM ? "out of memory" : "invalid");
        }
        size_t take = max_tokens && nf > max_tokens - n_all ? (size_t)(max_tokens - n_all) : nf;
        int32_t *grown = realloc(all, (n_all + take + 1) * sizeof *all);
        if (!grown) {
            free(fid);
            free(all);
            return kvch_fail(err, err_cap, KVC_E_NOMEM, "%s: out of memory", files[f]);
        }
        all = grown;
        memcpy(all + n_all, fid, take * sizeof *fid);
        n_all += take;
        free(fid);
        if (note && take) {
            const char *base = strrchr(files[f], '/');
            note_add(note, note_cap, &at, "%s%s:%zu", at ? " " : "", base ? base + 1 : files[f],
                     take);
        }
    }
    if (!n_all) {
        free(all);
        return kvch_fail(err, err_cap, KVC_E_INVALID, "calibration: the files hold no tokens");
    }
    if (note)
        note_add(note, note_cap, &at, " (%zu tokens)", n_all);
    *ids = all;
    *n = n_all;
    return KVC_OK;
}

void kvch_calib_note_window(char *note, size_t note_cap, uint32_t n_ctx)
{
    size_t len = note ? strnlen(note, note_cap) : 0;
    if (!len || len == note_cap || note[len - 1] != ')')
        return;
    snprintf(note + len - 1, note_cap - (len - 1), ", windows of %u)", n_ctx);
}

int kvch_calib_is_eval_text(const char *path)
{
    struct stat a, b;
    return path && stat(path, &a) == 0 && stat(KVCH_EVAL_TEXT, &b) == 0 && a.st_dev == b.st_dev &&
           a.st_ino == b.st_ino;
}
