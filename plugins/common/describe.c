/* seq_describe's text, size-then-copy: "head <h> key=value ...\n" per KV
 * head, the words of each line from the plugin's callback. */
#include <stdio.h>
#include <string.h>

#include "kvcp.h"

/* Writes the whole text into out[cap] (truncating, snprintf-style) and
 * returns its length without the NUL. */
static size_t render(uint32_t n_heads, kvcp_describe_line line, const void *ctx, char *out,
                     size_t cap)
{
    size_t len = 0;
    char words[KVCP_MSG_SIZE];
    for (uint32_t h = 0; h < n_heads; h++) {
        words[0] = '\0';
        line(ctx, h, words, sizeof words);
        int k = snprintf(len < cap ? out + len : NULL, len < cap ? cap - len : 0,
                         "head %u %s\n", h, words);
        if (k > 0)
            len += (size_t)k;
    }
    return len;
}

kvc_status kvcp_describe(uint32_t n_heads, kvcp_describe_line line, const void *ctx, char *buf,
                         size_t buf_size, size_t *size, char *msg, size_t cap)
{
    if (!size)
        return kvcp_fail(msg, cap, KVC_E_INVALID, "describe: size pointer is NULL");
    size_t need = render(n_heads, line, ctx, NULL, 0) + 1;
    if (!buf) {
        *size = need;
        return KVC_OK;
    }
    if (buf_size < need) {
        *size = need;
        return kvcp_fail(msg, cap, KVC_E_BUFFER, "describe: buffer of %zu bytes, %zu needed",
                         buf_size, need);
    }
    render(n_heads, line, ctx, buf, buf_size);
    *size = need;
    return KVC_OK;
}
