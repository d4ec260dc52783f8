/*
 * calib.h -- calibration text for preparing compressors: the default files
 * (license texts every Debian machine has, never GPL-3, which is what
 * perplexity is evaluated on), their tokens, and a note naming the files
 * and token counts used, for an artifact to record.
 *
 * Prefix kvch_. Any thread.
 */
#ifndef KVCH_CALIB_H
#define KVCH_CALIB_H

#include <stddef.h>
#include <stdint.h>

#include "kvc.h"
#include "tokenizer.h"

#define KVCH_LICENSE_DIR "/usr/share/common-licenses/"
/* The evaluation text (kvc ppl's default); never calibrated on by default. */
#define KVCH_EVAL_TEXT KVCH_LICENSE_DIR "GPL-3"

/* The default calibration files, in the order they are used: Apache-2.0,
 * MPL-2.0, GFDL-1.3, CC0-1.0, Artistic under KVCH_LICENSE_DIR. Static;
 * *n gets their count. */
const char *const *kvch_calib_defaults(size_t *n);

/* Tokenizes files [n_files] in order (no BOS, no special tokens) and
 * concatenates their tokens into *ids (malloc'd, caller frees, non-NULL on
 * success) and *n, stopping at max_tokens (0 = all; files after the cap is
 * reached are not read). note [note_cap] (may be NULL with 0) gets
 * "Apache-2.0:2215 MPL-2.0:3669 (5884 tokens)": each file used, by its
 * base name, with the tokens taken from it. Errors: INVALID (a file that
 * cannot be read, no files, no tokens at all), NOMEM; err names the file. */
kvc_status kvch_calib_load(const kvch_tokenizer *tok, const char *const *files, size_t n_files,
                           uint64_t max_tokens, int32_t **ids, size_t *n, char *note,
                           size_t note_cap, char *err, size_t err_cap);

/* Turns a note of kvch_calib_load ending in "(N tokens)" into one ending
 * in "(N tokens, windows of n_ctx)", as far as cap allows. */
void kvch_calib_note_window(char *note, size_t note_cap, uint32_t n_ctx);

/* 1 when path is the evaluation text KVCH_EVAL_TEXT (the same file: device
 * and inode, so links and other spellings count), else 0. */
int kvch_calib_is_eval_text(const char *path);

#endif /* KVCH_CALIB_H */
