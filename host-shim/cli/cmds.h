/* Subcommands of the kvc CLI. Each takes the arguments after its name
 * (argv[0] is the subcommand) and returns the process exit status. */
#ifndef KVC_CLI_CMDS_H
#define KVC_CLI_CMDS_H

int kvc_cmd_list(int argc, char **argv); /* kvc list */
int kvc_cmd_info(int argc, char **argv); /* kvc info PLUGIN */
int kvc_cmd_demo(int argc, char **argv); /* kvc demo [--plugin P] [--opt k=v]... */

#endif
