#!/usr/bin/env bash
# Benchmarks (figures, not tests): decode-attention time per token of the
# `full` plugin at 1k-64k context beside memcpy bandwidth.
set -euo pipefail
here=$(dirname "$0")
bash "$here/setup.sh"
bash "$here/build.sh"
source "$here/env.sh"
export KVC_PLUGIN_PATH="$KVC_BUILD/plugins/full"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
"$KVC_BUILD/tests/bench/kvc-bench-decode" "$@"
