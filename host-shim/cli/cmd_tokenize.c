/* kvc tokenize: the model tokenizer's ids for a text (llama.cpp's ids). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cmds.h"
#include "run.h"

static void usage(FILE *f)
{
    fprintf(f, "usage: kvc tokenize [--model GGUF] [--special] [--pieces] TEXT\n"
               "  Prints the token ids of TEXT (no BOS added). --special parses control tokens\n"
               "  written in TEXT (\"<|im_start|>\"); --pieces prints id and piece per line.\n");
}

int kvc_cmd_tokenize(int argc, char **argv)
{
    const char *model = NULL, *text = NULL;
    int special = 0, pieces = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(argv[i], "--model") && i + 1 < argc) {
            model = argv[++i];
        } else if (!strcmp(argv[i], "--special")) {
            special = 1;
        } else if (!strcmp(argv[i], "--pieces")) {
            pieces = 1;
        } else if (!text && (argv[i][0] != '-' || !strcmp(argv[i], "-") || argv[i][1] == '\0')) {
            text = argv[i];
        } else {
            fprintf(stderr, "kvc tokenize: unexpected argument \"%s\"\n", argv[i]);
            usage(stderr);
            return 2;
        }
    }
    if (!text) {
        usage(stderr);
        return 2;
    }
    /* Only the tokenizer is needed: no weights are dequantized. */
    char path[4096], err[1024];
    if (!model)
        model = kvch_default_model(path, sizeof path);
    kvch_gguf *g = NULL;
    kvch_tokenizer *tok = NULL;
    if (kvch_gguf_open(model, &g, err, sizeof err) ||
        kvch_tok_from_gguf(g, &tok, err, sizeof err)) {
        fprintf(stderr, "kvc tokenize: %s%s\n", err,
                g ? "" : "; run scripts/fetch-model.sh for the default model");
        kvch_gguf_close(g);
        return 1;
    }
    int32_t *ids = NULL;
    size_t n = 0;
    int rc = 0;
    if (kvch_tok_encode(tok, text, strlen(text), special, &ids, &n)) {
        fprintf(stderr, "kvc tokenize: out of memory\n");
        rc = 1;
    } else if (pieces) {
        for (size_t i = 0; i < n; i++) {
            char buf[256];
            size_t len = kvch_tok_piece(tok, ids[i], buf, sizeof buf);
            printf("%6d  '%.*s'\n", (int)ids[i], (int)(len < sizeof buf ? len : sizeof buf), buf);
        }
    } else {
        printf("[");
        for (size_t i = 0; i < n; i++)
            printf("%s%d", i ? ", " : "", (int)ids[i]);
        printf("]\n");
    }
    free(ids);
    kvch_tok_free(tok);
    kvch_gguf_close(g);
    return rc;
}
