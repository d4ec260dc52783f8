#!/usr/bin/env bash
# The main job: set up (packages, the SmolLM2 model), build, list the
# plugins, then run the real model with its attention through the exact
# `full` plugin: perplexity on GPL-3 beside the built-in exact path, the
# same with fp16 storage, LoRC and SVD-LLM at kv_ratio 0.5, and a chat answer; last, the conformance table
# of every bundled plugin.
set -euo pipefail
here=$(dirname "$0")
bash "$here/setup.sh"
bash "$here/build.sh"
source "$here/env.sh"
for d in "$KVC_BUILD"/plugins/*/; do KVC_PLUGIN_PATH="$d${KVC_PLUGIN_PATH:+:$KVC_PLUGIN_PATH}"; done
export KVC_PLUGIN_PATH
kvc="$KVC_BUILD/host-shim/kvc"
run() { echo; echo "\$ kvc $*"; "$kvc" "$@"; }
run list
run info full
run demo --plugin full --prompt 256 --decode 16
run ppl --plugin full --vs-exact
run ppl --plugin full --opt dtype=fp16
# Low-rank KV caches at half the fp16 bytes: LoRC from the weights alone,
# SVD-LLM whitened by calibration activations (the default license texts,
# not GPL-3). Each prepares its artifact on first use and caches it.
run ppl --plugin lorc --opt kv_ratio=0.5
run ppl --plugin svdllm --opt kv_ratio=0.5
run generate --plugin full --chat --prompt "What is the capital of France, and what is it famous for?" -n 96
# The conformance table of every bundled plugin (quick profile).
for so in "$KVC_BUILD"/plugins/*/kvc-*.so; do
  echo; echo "\$ kvc-conform $so"
  "$KVC_BUILD/conformance/kvc-conform" "$so" --profile quick
done
