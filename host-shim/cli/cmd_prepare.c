/*
 * kvc prepare: runs a compressor's preparation on the model (weights and/or
 * calibration activations, as its capabilities ask), finalizes it, and
 * saves its artifact for servers to load at create. Calibration text is
 * never the evaluation text: the default calibration files exclude GPL-3,
 * which kvc ppl evaluates on.
 */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "calib.h"
#include "cmds.h"
#include "session.h"

#define LIC KVCH_LICENSE_DIR
#define MAX_CALIB 64

static void usage(FILE *f)
{
    fprintf(f,
            "usage: kvc prepare --plugin NAME|PATH [--opt name=value]... -o ARTIFACT\n"
            "                   [--calib FILE]... [--calib-tokens N] [--ctx N] [--model GGUF]\n"
            "  Feeds the plugin each layer's W_q/W_k/W_v/W_o (when it needs weights) and the\n"
            "  attention-input activations of exact forward passes over the calibration text\n"
            "  (when it needs calibration), in windows of --ctx tokens (default 512), then\n"
            "  finalizes it and writes its artifact to ARTIFACT.\n"
            "  Calibration defaults to Apache-2.0, MPL-2.0, GFDL-1.3, CC0-1.0 and Artistic\n"
            "  from " LIC " (never GPL-3, the evaluation text); --calib-tokens caps\n"
            "  the tokens used (default: all). When the plugin has a calib_note option and\n"
            "  none is given, it is set to the files and token counts used, which the plugin\n"
            "  records in the artifact.\n"
            "  kvc ppl and kvc generate prepare such a plugin themselves when given no\n"
            "  --artifact, and cache the artifact (see KVC_ARTIFACT_CACHE); kvc prepare\n"
            "  always prepares and never reads or writes that cache.\n");
}

static void progress(void *user, const char *stage, uint64_t done, uint64_t total)
{
    if (!*(int *)user)
        return;
    fprintf(stderr, "\r  %s %llu/%llu   ", stage, (unsigned long long)done,
            (unsigned long long)total);
    if (done == total)
        fprintf(stderr, "\n");
    fflush(stderr);
}

static int run_prepare(kvc_session_args *a, int argc, char **argv)
{
    const char *out_path = NULL, *calib[MAX_CALIB];
    int n_calib = 0, rc = 1;
    long n_ctx = 512, max_tokens = 0;
    for (int i = 1; i < argc; i++) {
        int r = session_arg("prepare", a, argc, argv, &i);
        if (r < 0)
            return 2;
        if (r)
            continue;
        const char *o = argv[i];
        if (!strcmp(o, "-h") || !strcmp(o, "--help")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(o, "-o") && i + 1 < argc) {
            out_path = argv[++i];
        } else if (!strcmp(o, "--calib") && i + 1 < argc) {
            if (n_calib == MAX_CALIB) {
                fprintf(stderr, "kvc prepare: at most %d --calib files\n", MAX_CALIB);
                return 2;
            }
            calib[n_calib++] = argv[++i];
        } else if ((!strcmp(o, "--ctx") || !strcmp(o, "--calib-tokens")) && i + 1 < argc) {
            char *end;
            long x = strtol(argv[++i], &end, 10);
            if (*end || x < 0 || x > 1L << 30) {
                fprintf(stderr, "kvc prepare: %s %s is not a count\n", o, argv[i]);
                return 2;
            }
            *(!strcmp(o, "--ctx") ? &n_ctx : &max_tokens) = x;
        } else {
            fprintf(stderr, "kvc prepare: unknown or incomplete argument \"%s\"\n", o);
            usage(stderr);
            return 2;
        }
    }
    if (a->exact || !a->plugin || !out_path) {
        fprintf(stderr, "kvc prepare: give --plugin and -o ARTIFACT\n");
        return 2;
    }
    if (n_ctx < 1) {
        fprintf(stderr, "kvc prepare: --ctx must be positive\n");
        return 2;
    }
    if (a->artifact) {
        fprintf(stderr, "kvc prepare: --artifact is for loading (kvc ppl, kvc generate); kvc "
                        "prepare always prepares from the model\n");
        return 2;
    }
    for (int i = 0; i < n_calib; i++)
        if (kvch_calib_is_eval_text(calib[i]))
            fprintf(stderr, "kvc prepare: warning: calibrating on %s, the text kvc ppl evaluates "
                            "on by default; its perplexity is then not a held-out figure\n",
                    calib[i]);
    a->no_autoprep = 1;
    a->calib = n_calib ? calib : NULL;
    a->n_calib = (size_t)n_calib;
    a->calib_tokens = (uint64_t)max_tokens;
    a->calib_ctx = (uint32_t)n_ctx;

    kvc_session s;
    void *blob = NULL;
    char err[1024];
    /* Tokenizes the calibration text into s.calib (and sets calib_note) when
     * the plugin needs calibration. */
    if (session_open(&s, "prepare", a, (uint32_t)n_ctx))
        goto done;
    const uint64_t caps = s.p->caps;
    if (!(caps & (KVC_CAP_NEEDS_WEIGHTS | KVC_CAP_NEEDS_CALIBRATION))) {
        printf("kvc prepare: %s needs no preparation (neither weights nor calibration); nothing "
               "to do\n", s.p->id);
        rc = 0;
        goto done;
    }
    if (!(caps & KVC_CAP_ARTIFACT)) {
        fprintf(stderr, "kvc prepare: %s cannot save an artifact (no artifact capability)\n",
                s.p->id);
        goto done;
    }
    if (caps & KVC_CAP_NEEDS_CALIBRATION) {
        int noted = session_has_option(s.p, "calib_note");
        for (uint32_t i = 0; i < a->opts.n; i++)
            noted &= !!strcmp(a->opts.names[i], "calib_note");
        printf("calibration  %s%s\n", s.calib_note, noted ? " (the artifact's calib_note)" : "");
    }
    int tty = isatty(2);
    kvch_prepare_params pp = {.n_ctx = (uint32_t)n_ctx, .progress = progress, .user = &tty,
                              .sequential = session_sequential(&s, a)};
    if (pp.sequential && (caps & KVC_CAP_NEEDS_CALIBRATION))
        printf("calibration  sequential (refit): layer by layer through the finalized layers\n");
    kvch_prepare_result r;
    if (kvch_prepare(s.p, s.inst, s.model.llama, s.calib, s.n_calib, &pp, &r, err, sizeof err)) {
        fprintf(stderr, "kvc prepare: %s\n", err);
        goto done;
    }
    size_t size = 0;
    if (s.p->save(s.inst, NULL, 0, &size) || !(blob = malloc(size ? size : 1)) ||
        s.p->save(s.inst, blob, size, &size)) {
        fprintf(stderr, "kvc prepare: %s: save: %s\n", s.p->id, s.p->instance_message(s.inst));
        goto done;
    }
    FILE *f = fopen(out_path, "wb");
    int bad = !f || fwrite(blob, 1, size, f) != size;
    if ((f && fclose(f)) || bad) {
        fprintf(stderr, "kvc prepare: cannot write %s\n", out_path);
        goto done;
    }
    kvc_instance_stats is = {.struct_size = sizeof is};
    s.p->instance_stats(s.inst, &is);
    printf("prepared     %s: %s%s%llu calibration tokens in %u windows, feed %.1f s, finalize "
           "%.1f s\n",
           s.p->id, caps & KVC_CAP_NEEDS_WEIGHTS ? "weights of every layer, " : "",
           caps & KVC_CAP_NEEDS_CALIBRATION ? "" : "no calibration; ",
           (unsigned long long)r.calib_tokens, r.calib_windows, r.feed_s, r.finalize_s);
    printf("artifact     %s: %zu bytes (parameters %.2f MiB; kv_ratio %.4f)\n", out_path, size,
           is.bytes_params / 1048576.0, is.kv_ratio);
    rc = 0;
done:
    free(blob);
    if (session_close(&s))
        rc = 1;
    return rc;
}

int kvc_cmd_prepare(int argc, char **argv)
{
    return session_main(run_prepare, argc, argv);
}
