/* kvc.c -- the kvc command: dispatch to a subcommand. */
#include <stdio.h>
#include <string.h>

#include "cmds.h"
#include "kvch.h"

#ifndef KVC_VERSION
#define KVC_VERSION "0.1.0"
#endif

static void usage(FILE *f)
{
    fprintf(f,
            "usage: kvc COMMAND [ARGS]\n"
            "\n"
            "commands:\n"
            "  list           list the plugins found, with version, ABI and capabilities\n"
            "  info PLUGIN    show a plugin's descriptor and option table\n"
            "  demo [ARGS]    run a synthetic prefill and decode through a plugin\n"
            "                 (kvc demo --help)\n"
            "  tokenize [--model M] TEXT       token ids of TEXT\n"
            "  ppl --plugin P [ARGS]           perplexity on a text (kvc ppl --help)\n"
            "  generate --plugin P --prompt T  generate text (kvc generate --help)\n"
            "  prepare --plugin P -o FILE      prepare a compressor (kvc prepare --help)\n"
            "  help           show this help\n"
            "\n"
            "options:\n"
            "  -h, --help     show this help\n"
            "  --version      show the version of kvc and of its plugin ABI\n"
            "\n"
            "PLUGIN is a path to a .so, or a name NAME looked up as kvc-NAME.so in each\n"
            "directory of $KVC_PLUGIN_PATH (':'-separated), then in %s.\n",
            kvch_install_dir());
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    const char *cmd = argv[1];
    if (strcmp(cmd, "help") == 0 || strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0) {
        usage(stdout);
        return 0;
    }
    if (strcmp(cmd, "--version") == 0) {
        printf("kvc %s (plugin ABI %d.%d)\n", KVC_VERSION, KVC_ABI_VERSION_MAJOR,
               KVC_ABI_VERSION_MINOR);
        return 0;
    }
    if (strcmp(cmd, "list") == 0)
        return kvc_cmd_list(argc - 1, argv + 1);
    if (strcmp(cmd, "info") == 0)
        return kvc_cmd_info(argc - 1, argv + 1);
    if (strcmp(cmd, "demo") == 0)
        return kvc_cmd_demo(argc - 1, argv + 1);
    if (strcmp(cmd, "tokenize") == 0)
        return kvc_cmd_tokenize(argc - 1, argv + 1);
    if (strcmp(cmd, "ppl") == 0)
        return kvc_cmd_ppl(argc - 1, argv + 1);
    if (strcmp(cmd, "generate") == 0)
        return kvc_cmd_generate(argc - 1, argv + 1);
    if (strcmp(cmd, "prepare") == 0)
        return kvc_cmd_prepare(argc - 1, argv + 1);

    fprintf(stderr, "kvc: unknown command \"%s\"\n\n", cmd);
    usage(stderr);
    return 2;
}
