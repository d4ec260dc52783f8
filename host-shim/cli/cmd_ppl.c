/*
 * kvc ppl: perplexity of the model on a text with its attention going
 * through a plugin, scored as llama.cpp's llama-perplexity scores
 * (non-overlapping chunks of --ctx tokens, a fresh sequence per chunk, the
 * second half of each chunk scored). The first half of a chunk is the
 * prompt (append + attend as prefill); the second half follows as
 * generation, in one batch or token by token (equal by the ABI's rule).
 * --verbose tallies, per layer, what the plugin's seq_describe (ABI 1.2)
 * says of each chunk's sequence: its policy= words and the tokens held.
 * --vs-exact scores the built-in exact path on the same chunks, chunk by
 * chunk beside the plugin; --kld adds llama-perplexity --kl-divergence's
 * statistics of the two next-token distributions (model/kld.h).
 */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cmds.h"
#include "session.h"

#define DEFAULT_TEXT "/usr/share/common-licenses/GPL-3"

static void usage(FILE *f)
{
    fprintf(f,
            "usage: kvc ppl (--plugin NAME|PATH [--opt name=value]... [--artifact FILE] | --exact)\n"
            "               [--model GGUF] [--text FILE] [--ctx N] [--chunks N]\n"
            "               [--token-by-token] [--vs-exact] [--kld] [--verbose] [--json]\n"
            "  Perplexity on FILE (default " DEFAULT_TEXT ") in chunks of N tokens\n"
            "  (default 512; all whole chunks unless --chunks), scoring each chunk's second\n"
            "  half as llama.cpp's llama-perplexity does.\n"
            "  --exact           the built-in exact attention instead of a plugin\n"
            "  --vs-exact        also run the built-in exact path on the same chunks (each\n"
            "                    chunk on both, one after the other) and print the difference\n"
            "  --kld             --vs-exact, and how far the plugin's next-token distributions\n"
            "                    are from the exact path's over the scored tokens, as llama.cpp's\n"
            "                    llama-perplexity --kl-divergence reports it: mean KL(exact ||\n"
            "                    plugin) in nats over the whole vocabulary with its standard\n"
            "                    error, its percentiles (max, 99.9%%, 99%%, 95%%, 90%%, median), the\n"
            "                    share of tokens whose top-1 token is unchanged (\"same top p\"),\n"
            "                    and ln(PPL(plugin)/PPL(exact)); the plugin's perplexity is the\n"
            "                    same as without it\n"
            "  --token-by-token  feed each chunk's second half one token per step (default:\n"
            "                    one batch; the ABI's step rule makes them equal)\n"
            "  --verbose         per layer, the policies the plugin chose per KV head and the\n"
            "                    share of appended tokens it held, over all chunks (from its\n"
            "                    seq_describe, kvc ABI 1.2; read right before each chunk's\n"
            "                    sequence is reset)\n"
            "  --json            print the result as one JSON object on stdout\n"
            "  The model defaults to $KVC_MODEL, else $KVC_MODEL_DIR (default ~/.cache/kvc)/\n"
            "  SmolLM2-135M-Instruct.Q4_1.gguf, fetched by scripts/fetch-model.sh.\n");
}

typedef struct progress_state {
    int tty;
    double t0;
} progress_state;

static void progress(void *user, uint32_t chunk, uint32_t n_chunks, double ppl)
{
    progress_state *ps = user;
    if (!ps->tty)
        return;
    double el = session_now() - ps->t0;
    fprintf(stderr, "\r  chunk %u/%u  ppl %.4f  %.1f s, ~%.0f s left   ", chunk, n_chunks, ppl, el,
            el / chunk * (n_chunks - chunk));
    if (chunk == n_chunks)
        fprintf(stderr, "\r%60s\r", "");
    fflush(stderr);
}

/* ---- --verbose: seq_describe tallied over chunks ------------------------------------ */

#define MAX_POLICIES 16

typedef struct policy_count {
    char name[64];
    uint64_t heads; /* (KV head, chunk) pairs that reported it */
} policy_count;

typedef struct layer_tally {
    policy_count pol[MAX_POLICIES];
    uint32_t n_pol;
    uint64_t other;    /* heads whose policy did not fit in pol[] */
    uint64_t held;     /* tokens= summed over heads and chunks */
    uint64_t possible; /* tokens appended to the layer x heads, summed over chunks */
} layer_tally;

typedef struct describe_tally {
    uint32_t n_layers;
    layer_tally *layers; /* [n_layers] */
    uint32_t chunks;     /* chunks described */
    int any_policy;      /* some line had a policy= word */
    int unsupported;     /* no seq_describe: `why` says so; nothing tallied */
    char why[512];
} describe_tally;

static void tally_policy(layer_tally *L, const char *name, size_t len)
{
    for (uint32_t i = 0; i < L->n_pol; i++)
        if (strlen(L->pol[i].name) == len && !strncmp(L->pol[i].name, name, len)) {
            L->pol[i].heads++;
            return;
        }
    if (L->n_pol == MAX_POLICIES || len >= sizeof L->pol[0].name) {
        L->other++;
        return;
    }
    memcpy(L->pol[L->n_pol].name, name, len);
    L->pol[L->n_pol].name[len] = '\0';
    L->pol[L->n_pol++].heads = 1;
}

/* kvch_ppl_params.chunk_done: describes every layer of the chunk's
 * sequence and adds its lines (one per KV head) to the tally. A store
 * without seq_describe (exact, or a plugin before 1.2) is noted once and
 * the run goes on. */
static kvc_status tally_chunk(void *user, uint32_t chunk, const kvch_kv *kv, char *err,
                              size_t cap)
{
    describe_tally *t = user;
    (void)chunk;
    if (t->unsupported)
        return KVC_OK;
    kvc_seq_stats st;
    kvc_status s = kvch_kv_stats(kv, &st);
    if (s) {
        snprintf(err, cap, "--verbose: seq_stats failed: %s", kvch_status_string(s));
        return s;
    }
    const uint64_t appended = st.tokens_appended / t->n_layers; /* every layer alike */
    for (uint32_t l = 0; l < t->n_layers; l++) {
        char *text = NULL;
        s = kvch_kv_describe(kv, l, &text, err, cap);
        if (s == KVC_E_UNSUPPORTED) {
            t->unsupported = 1;
            snprintf(t->why, sizeof t->why, "%s", err);
            err[0] = '\0';
            return KVC_OK;
        }
        if (s)
            return s;
        layer_tally *L = &t->layers[l];
        for (char *line = text; *line;) {
            char *nl = strchr(line, '\n');
            char *end = nl ? nl : line + strlen(line);
            for (char *w = line; w < end;) {
                char *we = w;
                while (we < end && *we != ' ')
                    we++;
                if (we - w > 7 && !strncmp(w, "policy=", 7)) {
                    tally_policy(L, w + 7, (size_t)(we - w - 7));
                    t->any_policy = 1;
                } else if (we - w > 7 && !strncmp(w, "tokens=", 7)) {
                    L->held += strtoull(w + 7, NULL, 10);
                }
                w = we < end ? we + 1 : we;
            }
            L->possible += appended;
            line = nl ? nl + 1 : end;
        }
        free(text);
    }
    t->chunks++;
    return KVC_OK;
}

/* Policies of a layer, most frequent first (ties in first-seen order). */
static void sort_policies(layer_tally *L)
{
    for (uint32_t i = 1; i < L->n_pol; i++)
        for (uint32_t j = i; j > 0 && L->pol[j].heads > L->pol[j - 1].heads; j--) {
            policy_count x = L->pol[j];
            L->pol[j] = L->pol[j - 1];
            L->pol[j - 1] = x;
        }
}

static double held_share(const layer_tally *L)
{
    return L->possible ? (double)L->held / (double)L->possible : 0.0;
}

/* The tally as text: one line per layer, or one line saying why there is
 * nothing to show. */
static void print_tally(describe_tally *t, const char *plugin_id)
{
    if (t->unsupported) {
        printf("policies    none: %s\n", t->why);
        return;
    }
    uint64_t held = 0, possible = 0;
    for (uint32_t l = 0; l < t->n_layers; l++)
        held += t->layers[l].held, possible += t->layers[l].possible;
    if (!t->any_policy) {
        printf("policies    none reported: %s's seq_describe names no policy= (held %.1f%% of "
               "the tokens appended, %u chunks)\n",
               plugin_id, possible ? 100.0 * (double)held / (double)possible : 0.0, t->chunks);
        return;
    }
    printf("policies    per layer: KV heads x %u chunks per policy; held = tokens kept / "
           "appended (%.1f%% overall)\n",
           t->chunks, possible ? 100.0 * (double)held / (double)possible : 0.0);
    for (uint32_t l = 0; l < t->n_layers; l++) {
        layer_tally *L = &t->layers[l];
        sort_policies(L);
        printf("  layer %2u: ", l);
        for (uint32_t i = 0; i < L->n_pol; i++)
            printf("%s%s %llu", i ? " | " : "", L->pol[i].name,
                   (unsigned long long)L->pol[i].heads);
        if (L->other)
            printf("%sother %llu", L->n_pol ? " | " : "", (unsigned long long)L->other);
        printf("   held %.1f%%\n", 100.0 * held_share(L));
    }
}

/* The tally as a JSON member: "policies": [{"layer": 0, "counts": {...},
 * "held": 0.41}, ...], or null with "policies_note" saying why. */
static void json_tally(describe_tally *t)
{
    if (t->unsupported) {
        printf(", \"policies\": null, \"policies_note\": ");
        json_str(stdout, t->why);
        return;
    }
    printf(", \"policies\": [");
    for (uint32_t l = 0; l < t->n_layers; l++) {
        layer_tally *L = &t->layers[l];
        sort_policies(L);
        printf("%s{\"layer\": %u, \"counts\": {", l ? ", " : "", l);
        for (uint32_t i = 0; i < L->n_pol; i++) {
            printf("%s", i ? ", " : "");
            json_str(stdout, L->pol[i].name);
            printf(": %llu", (unsigned long long)L->pol[i].heads);
        }
        if (L->other)
            printf("%s\"other\": %llu", L->n_pol ? ", " : "", (unsigned long long)L->other);
        printf("}, \"held\": %.6f}", held_share(L));
    }
    printf("]");
}

/* ---- --kld ------------------------------------------------------------------------ */

/* Under the perplexity lines: the KLD's mean, error and percentiles (%g:
 * a lossless store's are 1e-6 and less), the top-1 agreement, ln PPL ratio. */
static void print_kld(const kvch_kld_stats *k)
{
    printf("KLD         %.6g ± %.3g (mean), 99%%: %.4g, 99.9%%: %.4g, 95%%: %.4g, 90%%: %.4g, "
           "median: %.4g, max: %.4g\n",
           k->mean, k->err, k->p99, k->p999, k->p95, k->p90, k->median, k->max);
    printf("same top    %.2f ± %.2f %% of tokens (top-1 token as the exact path's)\n",
           100.0 * k->same_top, 100.0 * k->same_top_err);
    printf("ln ratio    %+.6f ± %.6f (mean ln(PPL/PPL exact), per token)\n", k->ln_ppl_ratio,
           k->ln_ppl_ratio_err);
}

static void json_kld(const kvch_kld_stats *k)
{
    printf(", \"kld_mean\": %.6e, \"kld_err\": %.6e, \"kld_median\": %.6e, \"kld_p90\": %.6e"
           ", \"kld_p95\": %.6e, \"kld_p99\": %.6e, \"kld_p999\": %.6e, \"kld_max\": %.6e"
           ", \"kld_min\": %.6e",
           k->mean, k->err, k->median, k->p90, k->p95, k->p99, k->p999, k->max, k->min);
    printf(", \"same_top\": %.6f, \"same_top_err\": %.6f", k->same_top, k->same_top_err);
    printf(", \"ln_ppl_ratio\": %.6e, \"ln_ppl_ratio_err\": %.6e", k->ln_ppl_ratio,
           k->ln_ppl_ratio_err);
}

static int run_ppl(kvc_session_args *a, int argc, char **argv)
{
    const char *text_path = DEFAULT_TEXT;
    long n_ctx = 512, n_chunks = 0;
    int token_by_token = 0, vs_exact = 0, kld = 0, json = 0, verbose = 0, rc = 1;
    for (int i = 1; i < argc; i++) {
        int r = session_arg("ppl", a, argc, argv, &i);
        if (r < 0)
            return 2;
        if (r)
            continue;
        const char *o = argv[i];
        if (!strcmp(o, "-h") || !strcmp(o, "--help")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(o, "--token-by-token")) {
            token_by_token = 1;
        } else if (!strcmp(o, "--vs-exact")) {
            vs_exact = 1;
        } else if (!strcmp(o, "--kld")) {
            kld = vs_exact = 1;
        } else if (!strcmp(o, "--json")) {
            json = 1;
        } else if (!strcmp(o, "--verbose") || !strcmp(o, "-v")) {
            verbose = 1;
        } else if ((!strcmp(o, "--text") || !strcmp(o, "--ctx") || !strcmp(o, "--chunks")) &&
                   i + 1 < argc) {
            const char *v = argv[++i];
            char *end;
            if (!strcmp(o, "--text")) {
                text_path = v;
                continue;
            }
            long x = strtol(v, &end, 10);
            if (*end || x < 0 || x > 1 << 20) {
                fprintf(stderr, "kvc ppl: %s %s is not a number in [0, 1048576]\n", o, v);
                return 2;
            }
            *(!strcmp(o, "--ctx") ? &n_ctx : &n_chunks) = x;
        } else {
            fprintf(stderr, "kvc ppl: unknown or incomplete argument \"%s\"\n", o);
            usage(stderr);
            return 2;
        }
    }
    if (n_ctx < 4 || n_ctx % 2) {
        fprintf(stderr, "kvc ppl: --ctx %ld must be even and at least 4\n", n_ctx);
        return 2;
    }

    double wall0 = session_now();
    kvc_session s;
    char *text = NULL, err[1024];
    int32_t *ids = NULL;
    uint8_t *flags = NULL;
    size_t text_len = 0, n_ids = 0;
    kvch_kv *exact = NULL;
    kvch_kld acc = {0};
    kvch_kld_stats ks = {0};
    describe_tally tally = {0};
    if (session_open(&s, "ppl", a, (uint32_t)n_ctx) || session_kv(&s, "ppl", (uint32_t)n_ctx))
        goto done;
    if (kvch_read_file(text_path, &text, &text_len, err, sizeof err) ||
        kvch_tok_encode(s.model.tok, text, text_len, 0, &ids, &n_ids)) {
        fprintf(stderr, "kvc ppl: --text %s\n", text ? "could not be tokenized" : err);
        goto done;
    }
    if (!(flags = malloc(n_ids ? n_ids : 1))) {
        fprintf(stderr, "kvc ppl: out of memory\n");
        goto done;
    }
    int add_bos = 0;
    kvch_gguf_get_bool(s.model.gguf, "tokenizer.ggml.add_bos_token", &add_bos);
    /* As llama-perplexity: with a BOS-adding tokenizer, each chunk starts with BOS. */
    if (add_bos && kvch_tok_bos(s.model.tok) >= 0)
        for (size_t c = 0; c + (size_t)n_ctx <= n_ids; c += (size_t)n_ctx)
            ids[c] = kvch_tok_bos(s.model.tok);
    for (size_t i = 0; i < n_ids; i++)
        flags[i] = kvch_tok_flags(s.model.tok, ids[i]);

    const kvch_llama_hparams *hp = &s.model.llama->hp;
    char label[512];
    session_label(&s, a, label, sizeof label);
    if (!json) {
        printf("model   %s (%s, %u layers, %u query / %u KV heads of %u), %.1f s to load\n",
               hp->name[0] ? hp->name : "?", hp->arch, hp->n_layer, hp->n_head, hp->n_head_kv,
               hp->head_dim, s.model.load_s);
        printf("text    %s: %zu bytes, %zu tokens\n", text_path, text_len, n_ids);
        printf("kv      %s%s%s\n", label, s.lib ? ", " : "", s.lib ? kvch_plugin_path(s.lib) : "");
        fflush(stdout);
    }
    progress_state ps = {isatty(2), session_now()};
    kvch_ppl_params pp = {.n_ctx = (uint32_t)n_ctx, .n_chunks = (uint32_t)n_chunks,
                          .token_by_token = token_by_token, .progress = progress, .user = &ps};
    if (verbose) {
        tally.n_layers = hp->n_layer;
        if (!(tally.layers = calloc(hp->n_layer ? hp->n_layer : 1, sizeof *tally.layers))) {
            fprintf(stderr, "kvc ppl: out of memory\n");
            goto done;
        }
        pp.chunk_done = tally_chunk;
        pp.chunk_user = &tally;
    }
    kvch_ppl_result r, rx = {0};
    if (vs_exact && kvch_kv_exact(&s.geo, &exact, err, sizeof err)) {
        fprintf(stderr, "kvc ppl: exact path: %s\n", err);
        goto done;
    }
    /* With an exact store, each chunk runs on it and then on the plugin's
     * (the plugin's calls are those of a run without it; not tallied). */
    if (kvch_perplexity_vs(s.ctx, s.kv, exact, s.model.llama, ids, flags, n_ids, &pp, &r, &rx,
                           kld ? &acc : NULL, err, sizeof err) ||
        (kld && kvch_kld_summary(&acc, &ks, err, sizeof err))) {
        fprintf(stderr, "kvc ppl: %s\n", err);
        goto done;
    }
    kvch_tracker_stats ts = {0};
    if (s.tracker)
        kvch_tracker_get(s.tracker, &ts);
    double wall = session_now() - wall0;
    const char *gen_mode = token_by_token ? "token-by-token" : "batched";
    if (json) {
        printf("{\"model\": ");
        json_str(stdout, hp->name);
        printf(", \"text\": ");
        json_str(stdout, text_path);
        printf(", \"text_tokens\": %zu, \"n_ctx\": %ld, \"chunks\": %u, \"tokens_scored\": %llu",
               n_ids, n_ctx, r.n_chunks, (unsigned long long)r.n_scored);
        printf(", \"plugin\": ");
        json_str(stdout, s.p ? s.p->id : "exact");
        printf(", \"options\": {");
        for (uint32_t i = 0; i < a->opts.n; i++) {
            printf("%s", i ? ", " : "");
            json_str(stdout, a->opts.names[i]);
            printf(": ");
            json_str(stdout, a->opts.values[i]);
        }
        printf("}, \"ppl\": %.6f, \"ppl_err\": %.6f", r.ppl, r.ppl_err);
        printf(", \"kv_bytes_per_token\": %.1f, \"fp16_full_bytes_per_token\": %.1f",
               r.kv_bytes_per_token, r.fp16_bytes_per_token);
        printf(", \"plugin_peak_bytes\": %llu", (unsigned long long)ts.peak[KVC_MEM_HOST]);
        printf(", \"prefill_tokens_per_s\": %.2f, \"generation_tokens_per_s\": %.2f",
               r.prefill_tokens / r.prefill_s, r.gen_tokens / r.gen_s);
        printf(", \"generation\": \"%s\"", gen_mode);
        if (verbose)
            json_tally(&tally);
        if (vs_exact)
            printf(", \"exact_ppl\": %.6f, \"ppl_rel_diff\": %.3e", rx.ppl,
                   (r.ppl - rx.ppl) / rx.ppl);
        if (kld)
            json_kld(&ks);
        printf(", \"wall_s\": %.2f}\n", wall);
    } else {
        printf("chunks  %u of %ld tokens; %llu tokens scored (the second half of each chunk)\n",
               r.n_chunks, n_ctx, (unsigned long long)r.n_scored);
        printf("\nperplexity  %.4f ± %.4f\n", r.ppl, r.ppl_err);
        if (vs_exact)
            printf("exact       %.4f ± %.4f (built-in exact attention, same chunks)\n"
                   "difference  %+.3e relative\n",
                   rx.ppl, rx.ppl_err, (r.ppl - rx.ppl) / rx.ppl);
        if (kld)
            print_kld(&ks);
        printf("KV cache    %.1f bytes/token resident (%.3f of fp16 full, %.0f bytes/token)\n",
               r.kv_bytes_per_token, r.kv_bytes_per_token / r.fp16_bytes_per_token,
               r.fp16_bytes_per_token);
        if (s.tracker)
            printf("            plugin peak at the allocator: %.2f MiB\n",
                   ts.peak[KVC_MEM_HOST] / 1048576.0);
        printf("speed       prefill %.1f tokens/s (%llu tokens), generation %.1f tokens/s "
               "(%llu tokens, %s)\n",
               r.prefill_tokens / r.prefill_s, (unsigned long long)r.prefill_tokens,
               r.gen_tokens / r.gen_s, (unsigned long long)r.gen_tokens, gen_mode);
        if (verbose)
            print_tally(&tally, s.p ? s.p->id : "exact");
        printf("wall time   %.1f s\n", wall);
    }
    rc = 0;
done:
    kvch_kv_free(exact);
    kvch_kld_free(&acc);
    free(tally.layers);
    free(flags);
    free(ids);
    free(text);
    if (session_close(&s))
        rc = 1;
    return rc;
}

int kvc_cmd_ppl(int argc, char **argv)
{
    return session_main(run_ppl, argc, argv);
}
