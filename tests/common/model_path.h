/*
 * model_path.h -- where tests find the SmolLM2 GGUF, and how they skip.
 *
 * $KVC_MODEL (a file), else $KVC_MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf,
 * else ~/.cache/kvc/SmolLM2-135M-Instruct.Q4_1.gguf: the place
 * scripts/fetch-model.sh puts it. A test that needs the model and finds
 * none exits 77, which meson reports as SKIP, after saying why.
 */
#ifndef KVCT_MODEL_PATH_H
#define KVCT_MODEL_PATH_H

#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#define KVCT_MODEL_NAME "SmolLM2-135M-Instruct.Q4_1.gguf"

/* The path to try (static buffer). */
static inline const char *kvct_model_path(void)
{
    static char buf[4096];
    const char *m = getenv("KVC_MODEL");
    if (m && *m)
        return m;
    const char *d = getenv("KVC_MODEL_DIR");
    if (d && *d)
        snprintf(buf, sizeof buf, "%s/%s", d, KVCT_MODEL_NAME);
    else
        snprintf(buf, sizeof buf, "%s/.cache/kvc/%s", getenv("HOME") ? getenv("HOME") : "",
                 KVCT_MODEL_NAME);
    return buf;
}

/* The path when the file is readable; otherwise NULL after printing why. */
static inline const char *kvct_model_or_null(void)
{
    const char *p = kvct_model_path();
    if (access(p, R_OK) == 0)
        return p;
    printf("model absent: %s not readable; run scripts/fetch-model.sh "
           "(or set KVC_MODEL) to run the tests that need it\n", p);
    return NULL;
}

/* For a test program whose every case needs the model: exit 77 (SKIP). */
static inline const char *kvct_model_or_skip(void)
{
    const char *p = kvct_model_or_null();
    if (!p) {
        printf("SKIP: every case of this program needs the model\n");
        exit(77);
    }
    return p;
}

#endif
