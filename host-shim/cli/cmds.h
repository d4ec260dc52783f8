/* Subcommands of the kvc CLI. Each takes the arguments after its name
 * (argv[0] is the subcommand) and returns the process exit status. */
#ifndef KVC_CLI_CMDS_H
#define KVC_CLI_CMDS_H

int kvc_cmd_list(int argc, char **argv); /* kvc list */
int kvc_cmd_info(int argc, char **argv); /* kvc info PLUGIN */
int kvc_cmd_demo(int argc, char **argv); /* kvc demo [--plugin P] [--opt k=v]... */
int kvc_cmd_tokenize(int argc, char **argv); /* kvc tokenize [--model M] TEXT */
int kvc_cmd_ppl(int argc, char **argv);      /* kvc ppl --plugin P ... */
int kvc_cmd_generate(int argc, char **argv); /* kvc generate --plugin P --prompt ... */
int kvc_cmd_prepare(int argc, char **argv);  /* kvc prepare --plugin P ... -o ARTIFACT */

#endif
