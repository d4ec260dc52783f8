/* strings.c -- kvc_status and capability bits in words. */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "kvch.h"

const char *kvch_status_string(kvc_status s)
{
    switch (s) {
    case KVC_OK: return "ok";
    case KVC_E_INVALID: return "invalid argument";
    case KVC_E_UNSUPPORTED: return "unsupported";
    case KVC_E_NOMEM: return "out of memory";
    case KVC_E_CORRUPT: return "corrupt data";
    case KVC_E_STATE: return "call out of order";
    case KVC_E_VERSION: return "version or struct size mismatch";
    case KVC_E_BUFFER: return "buffer too small";
    case KVC_E_INTERNAL: return "internal error";
    default: return "unknown status";
    }
}

/* One word per KVC_CAP_* bit, in bit order; hyphens so that the whole list
 * stays split on spaces. */
static const char *const cap_words[] = {
    "cpu",               /* KVC_CAP_CPU */
    "cuda",              /* KVC_CAP_CUDA */
    "needs-weights",     /* KVC_CAP_NEEDS_WEIGHTS */
    "needs-calibration", /* KVC_CAP_NEEDS_CALIBRATION */
    "compress-features", /* KVC_CAP_COMPRESS_FEATURES */
    "compress-tokens",   /* KVC_CAP_COMPRESS_TOKENS */
    "quantizes",         /* KVC_CAP_QUANTIZES */
    "materialize",       /* KVC_CAP_MATERIALIZE */
    "export",            /* KVC_CAP_EXPORT */
    "artifact",          /* KVC_CAP_ARTIFACT */
    "truncate",          /* KVC_CAP_TRUNCATE */
    "fork",              /* KVC_CAP_FORK */
    "exact",             /* KVC_CAP_EXACT */
    "token-flags",       /* KVC_CAP_TOKEN_FLAGS */
    "prompt-phase",      /* KVC_CAP_PROMPT_PHASE (1.2) */
};
#define N_CAP_WORDS (sizeof cap_words / sizeof cap_words[0])

/* Appends `word` (space-separated) to buf; truncates, always terminates. */
static void append_word(char *buf, size_t buf_size, size_t *len, const char *word)
{
    if (*len >= buf_size)
        return;
    int n = snprintf(buf + *len, buf_size - *len, "%s%s", *len ? " " : "", word);
    if (n < 0)
        return;
    *len += (size_t)n;
    if (*len >= buf_size)
        *len = buf_size; /* truncated: snprintf already terminated */
}

void kvch_caps_string(uint64_t caps, char *buf, size_t buf_size)
{
    if (buf == NULL || buf_size == 0)
        return;
    buf[0] = '\0';
    if (caps == 0) {
        snprintf(buf, buf_size, "none");
        return;
    }
    size_t len = 0;
    for (unsigned bit = 0; bit < 64; bit++) {
        if (!(caps & (UINT64_C(1) << bit)))
            continue;
        if (bit < N_CAP_WORDS) {
            append_word(buf, buf_size, &len, cap_words[bit]);
        } else {
            /* A bit from a newer minor version: name it by number. */
            char word[16];
            snprintf(word, sizeof word, "bit%u", bit);
            append_word(buf, buf_size, &len, word);
        }
    }
}
