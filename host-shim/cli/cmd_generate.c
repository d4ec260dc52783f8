/*
 * kvc generate: text from a prompt, every layer's attention through a
 * plugin: what a compressor does to output, for people to read. Prints the
 * text as it comes, then prefill and decode speed and the KV cache size.
 */
#include <stdlib.h>
#include <string.h>

#include "cmds.h"
#include "session.h"

static void usage(FILE *f)
{
    fprintf(f,
            "usage: kvc generate (--plugin NAME|PATH [--opt name=value]... [--artifact FILE] |\n"
            "                     --exact) --prompt TEXT [-n N] [--chat] [--system TEXT]\n"
            "                    [--model GGUF] [--temp T] [--top-k K] [--top-p P]\n"
            "                    [--repeat-penalty R] [--seed S] [--special] [--json]\n"
            "  Generates up to N tokens (default 128) after TEXT. --chat wraps TEXT in the\n"
            "  model's chat template (ChatML), with the template's default system message\n"
            "  unless --system is given, and stops at the end-of-turn token. --special parses\n"
            "  control tokens written in a raw TEXT (\"<|im_start|>\").\n"
            "  Sampling: greedy by default (--temp 0); --temp > 0 samples with top-k (40),\n"
            "  top-p (0.95) and --seed (1). --repeat-penalty defaults to 1.1 over the last\n"
            "  64 tokens (1 = off).\n");
}

/* The default system message of a ChatML template: the literal text between
 * "<|im_start|>system\n" and "<|im_end|>", when the template has one. */
static char *template_system(const char *tpl, size_t len)
{
    static const char open[] = "<|im_start|>system\n";
    const char *end = tpl + len;
    for (const char *p = tpl; p + sizeof open - 1 <= end; p++) {
        if (memcmp(p, open, sizeof open - 1))
            continue;
        const char *b = p + sizeof open - 1, *e = b;
        while (e + 10 <= end && memcmp(e, "<|im_end|>", 10))
            e++;
        if (e + 10 > end || memchr(b, '\'', (size_t)(e - b)) || memchr(b, '{', (size_t)(e - b)))
            continue; /* not a literal */
        char *s = malloc((size_t)(e - b) + 1);
        if (s) {
            memcpy(s, b, (size_t)(e - b));
            s[e - b] = '\0';
        }
        return s;
    }
    return NULL;
}

typedef struct printer {
    const kvch_tokenizer *tok;
    int quiet;
    char *text;
    size_t len, cap;
} printer;

static int on_token(void *user, int32_t id)
{
    printer *pr = user;
    char buf[256];
    size_t n = kvch_tok_piece(pr->tok, id, buf, sizeof buf);
    if (n > sizeof buf)
        n = sizeof buf;
    if (!pr->quiet) {
        fwrite(buf, 1, n, stdout);
        fflush(stdout);
    }
    if (pr->len + n + 1 > pr->cap) {
        size_t nc = (pr->cap + n + 1) * 2;
        char *t = realloc(pr->text, nc);
        if (!t)
            return 1;
        pr->text = t;
        pr->cap = nc;
    }
    memcpy(pr->text + pr->len, buf, n);
    pr->len += n;
    pr->text[pr->len] = '\0';
    return 0;
}

static int run_generate(kvc_session_args *a, int argc, char **argv)
{
    const char *prompt = NULL, *system = NULL;
    long n_predict = 128;
    int chat = 0, json = 0, special = 0, rc = 1;
    kvch_gen_params gp = {.temperature = 0.0f, .top_k = 40, .top_p = 0.95f,
                          .repeat_penalty = 1.1f, .repeat_last = 64, .seed = 1};
    for (int i = 1; i < argc; i++) {
        int r = session_arg("generate", a, argc, argv, &i);
        if (r < 0)
            return 2;
        if (r)
            continue;
        const char *o = argv[i];
        if (!strcmp(o, "-h") || !strcmp(o, "--help")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(o, "--chat")) {
            chat = 1;
        } else if (!strcmp(o, "--json")) {
            json = 1;
        } else if (!strcmp(o, "--special")) {
            special = 1;
        } else if (i + 1 < argc && (!strcmp(o, "--prompt") || !strcmp(o, "--system"))) {
            *(!strcmp(o, "--prompt") ? &prompt : &system) = argv[++i];
        } else if (i + 1 < argc && (!strcmp(o, "-n") || !strcmp(o, "--top-k") ||
                                    !strcmp(o, "--seed") || !strcmp(o, "--temp") ||
                                    !strcmp(o, "--top-p") || !strcmp(o, "--repeat-penalty"))) {
            const char *v = argv[++i];
            char *end;
            double x = strtod(v, &end);
            if (*end || !(x >= 0) || x > 1e9) {
                fprintf(stderr, "kvc generate: %s %s is not a number in [0, 1e9]\n", o, v);
                return 2;
            }
            if (!strcmp(o, "-n"))
                n_predict = (long)x;
            else if (!strcmp(o, "--top-k"))
                gp.top_k = (uint32_t)x;
            else if (!strcmp(o, "--seed"))
                gp.seed = (uint64_t)x;
            else if (!strcmp(o, "--temp"))
                gp.temperature = (float)x;
            else if (!strcmp(o, "--top-p"))
                gp.top_p = (float)x;
            else
                gp.repeat_penalty = (float)x;
        } else {
            fprintf(stderr, "kvc generate: unknown or incomplete argument \"%s\"\n", o);
            usage(stderr);
            return 2;
        }
    }
    if (!prompt) {
        fprintf(stderr, "kvc generate: give --prompt TEXT\n");
        return 2;
    }
    if (n_predict < 1 || n_predict > 1 << 20) {
        fprintf(stderr, "kvc generate: -n must be in [1, 1048576]\n");
        return 2;
    }

    kvc_session s;
    char *full = NULL, *def_system = NULL;
    int32_t *ids = NULL, *out_ids = NULL;
    size_t n_ids = 0;
    printer pr = {0};
    if (session_open(&s, "generate", a, 0))
        goto done;
    const kvch_tokenizer *tok = s.model.tok;
    int32_t stop[2];
    gp.n_stop = 0;
    if (kvch_tok_eos(tok) >= 0)
        stop[gp.n_stop++] = kvch_tok_eos(tok);
    if (chat) {
        size_t tl = 0;
        const char *tpl = kvch_gguf_get_str(s.model.gguf, "tokenizer.chat_template", &tl);
        int32_t im_end = kvch_tok_find(tok, "<|im_end|>");
        if (!tpl || !memmem(tpl, tl, "<|im_start|>", 12) || im_end < 0 ||
            kvch_tok_find(tok, "<|im_start|>") < 0) {
            fprintf(stderr, "kvc generate: --chat supports ChatML templates (<|im_start|>...); "
                            "this model's tokenizer.chat_template is %s\n",
                    tpl ? "another kind" : "absent");
            goto done;
        }
        stop[gp.n_stop++] = im_end;
        if (!system)
            system = def_system = template_system(tpl, tl);
        size_t cap = strlen(prompt) + (system ? strlen(system) : 0) + 128;
        if (!(full = malloc(cap)))
            goto oom;
        size_t n = 0;
        if (system)
            n += (size_t)snprintf(full + n, cap - n, "<|im_start|>system\n%s<|im_end|>\n", system);
        snprintf(full + n, cap - n, "<|im_start|>user\n%s<|im_end|>\n<|im_start|>assistant\n",
                 prompt);
    }
    gp.stop = stop;
    const char *text = chat ? full : prompt;
    if (kvch_tok_encode(tok, text, strlen(text), chat || special, &ids, &n_ids) || n_ids == 0) {
        fprintf(stderr, "kvc generate: the prompt gives no tokens\n");
        goto done;
    }
    int add_bos = 0;
    kvch_gguf_get_bool(s.model.gguf, "tokenizer.ggml.add_bos_token", &add_bos);
    if (add_bos && kvch_tok_bos(tok) >= 0) {
        int32_t *t = realloc(ids, (n_ids + 1) * sizeof *t);
        if (!t)
            goto oom;
        ids = t;
        memmove(ids + 1, ids, n_ids * sizeof *ids);
        ids[0] = kvch_tok_bos(tok);
        n_ids++;
    }
    uint32_t max_pos = (uint32_t)(n_ids + (size_t)n_predict);
    if (max_pos > s.geo.max_positions) {
        fprintf(stderr, "kvc generate: %zu prompt tokens + %ld exceed the context of %u\n", n_ids,
                n_predict, s.geo.max_positions);
        goto done;
    }
    if (session_kv(&s, "generate", n_ids < 512 ? (uint32_t)n_ids : 512))
        goto done;
    if (!(out_ids = malloc((size_t)n_predict * sizeof *out_ids)))
        goto oom;
    gp.n_predict = (uint32_t)n_predict;
    pr.tok = tok;
    pr.quiet = json;
    gp.on_token = on_token;
    gp.user = &pr;
    if (!json) {
        fwrite(chat ? prompt : text, 1, strlen(chat ? prompt : text), stdout);
        printf(chat ? "\n\n" : "");
        fflush(stdout);
    }
    kvch_gen_result r;
    char err[1024];
    if (kvch_generate(s.ctx, s.kv, &s.model, ids, (uint32_t)n_ids, &gp, out_ids, &r, err,
                      sizeof err)) {
        fprintf(stderr, "\nkvc generate: %s\n", err);
        goto done;
    }
    double toks = (double)r.kv.tokens_appended / s.model.llama->hp.n_layer;
    double kvb = toks > 0 ? (double)r.kv.bytes_resident / toks : 0;
    double fpb = toks > 0 ? (double)r.kv.bytes_fp16_full / toks : 0;
    char label[512];
    session_label(&s, a, label, sizeof label);
    if (json) {
        printf("{\"plugin\": ");
        json_str(stdout, label);
        printf(", \"prompt_tokens\": %u, \"generated_tokens\": %u, \"stopped\": %s, \"text\": ",
               r.n_prompt, r.n_generated, r.stopped ? "true" : "false");
        json_str(stdout, pr.text ? pr.text : "");
        printf(", \"prefill_tokens_per_s\": %.2f, \"decode_tokens_per_s\": %.2f",
               r.n_prompt / r.prefill_s, r.n_generated > 1 ? (r.n_generated - 1) / r.decode_s : 0);
        printf(", \"kv_bytes_per_token\": %.1f, \"fp16_full_bytes_per_token\": %.1f}\n", kvb, fpb);
    } else {
        printf("\n\n-- %s: prompt %u tokens, prefill %.1f tokens/s; %u tokens generated, decode "
               "%.1f tokens/s%s\n-- KV cache %.1f bytes/token (%.3f of fp16 full)\n",
               label, r.n_prompt, r.n_prompt / r.prefill_s, r.n_generated,
               r.n_generated > 1 ? (r.n_generated - 1) / r.decode_s : 0.0,
               r.stopped ? ", stopped at end of turn" : "", kvb, fpb > 0 ? kvb / fpb : 0.0);
    }
    rc = 0;
    goto done;
oom:
    fprintf(stderr, "kvc generate: out of memory\n");
done:
    free(pr.text);
    free(out_ids);
    free(ids);
    free(full);
    free(def_system);
    if (session_close(&s))
        rc = 1;
    return rc;
}

int kvc_cmd_generate(int argc, char **argv)
{
    return session_main(run_generate, argc, argv);
}
