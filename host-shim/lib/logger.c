/* logger.c -- kvc_host.log onto a FILE*. */
#include <stdio.h>

#include "kvch.h"

static const char *level_word(int32_t level)
{
    switch (level) {
    case KVC_LOG_ERROR: return "error";
    case KVC_LOG_WARN: return "warn";
    case KVC_LOG_INFO: return "info";
    case KVC_LOG_DEBUG: return "debug";
    default: return NULL;
    }
}

void kvch_log_cb(void *user_data, int32_t level, const char *msg)
{
    const kvch_logger *lg = user_data;
    /* No logger, nothing to write to: the callback must never fail. */
    if (lg == NULL || level > lg->level)
        return;
    FILE *out = lg->out ? lg->out : stderr;
    const char *word = level_word(level);
    char other[24];
    if (word == NULL) {
        snprintf(other, sizeof other, "level %d", (int)level);
        word = other;
    }
    if (msg == NULL)
        msg = "(null)";
    /* One fprintf per message: stdio locks the stream for the call, so lines
     * from concurrent threads do not interleave. */
    if (lg->prefix != NULL && lg->prefix[0] != '\0')
        fprintf(out, "kvc[%s] %s: %s\n", lg->prefix, word, msg);
    else
        fprintf(out, "kvc %s: %s\n", word, msg);
}
