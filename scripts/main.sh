#!/usr/bin/env bash
# The main job: set up (packages, the SmolLM2 model), build, list the
# plugins, then run the real model with its attention through the exact
# `full` plugin: perplexity on GPL-3 beside the built-in exact path, the
# same with fp16 storage, quantized storage (full at 4 bits; kvquant's
# calibrated 4 bits; a budget of 0.3 of fp16) with KL divergence against
# exact, LoRC and SVD-LLM at kv_ratio 0.5, FastGen (t = 0.95 and kv_ratio
# 0.5, with its per-layer policies; 4-bit kept tokens), and a chat answer;
# last, the conformance table of every bundled plugin.
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
run ppl --plugin full --opt dtype=fp16 --kld
# Quantized KV caches: full's calibration-free store at 4 bits, kvquant's
# calibrated widths (prepared on first use from the default license texts,
# then cached), and budgets: the most accurate setting inside 0.3 of fp16.
run ppl --plugin full --opt k_bits=4 --opt v_bits=4 --kld
run ppl --plugin kvquant --kld
run ppl --plugin kvquant --opt kv_ratio=0.3 --kld
# Low-rank KV caches at half the fp16 bytes: LoRC from the weights alone,
# SVD-LLM whitened by calibration activations (the default license texts,
# not GPL-3). Each prepares its artifact on first use and caches it.
run ppl --plugin lorc --opt kv_ratio=0.5
run ppl --plugin svdllm --opt kv_ratio=0.5
# Token eviction: FastGen profiles each chunk's first half (the prompt) and
# picks a policy per KV head; --verbose prints the mix per layer.
run ppl --plugin fastgen --opt t=0.95 --opt dtype=fp16 --verbose
run ppl --plugin fastgen --opt kv_ratio=0.5
run ppl --plugin fastgen --opt kv_ratio=0.2 --opt k_bits=4 --opt v_bits=4 --kld
run generate --plugin full --chat --prompt "What is the capital of France, and what is it famous for?" -n 96
# The conformance table of every bundled plugin (quick profile).
for so in "$KVC_BUILD"/plugins/*/kvc-*.so; do
  echo; echo "\$ kvc-conform $so --profile quick"
  "$KVC_BUILD/conformance/kvc-conform" "$so" --profile quick
done
# Quantized settings as CI runs them (tests/conform/meson.build).
conform() { echo; echo "\$ kvc-conform $*"; "$KVC_BUILD/conformance/kvc-conform" "$@"; }
conform "$KVC_BUILD/plugins/full/kvc-full.so" --profile quick --opt k_bits=4 --opt v_bits=4
conform "$KVC_BUILD/plugins/fastgen/kvc-fastgen.so" --profile quick --opt k_bits=8 --opt v_bits=4
conform "$KVC_BUILD/plugins/fastgen/kvc-fastgen.so" --profile quick --opt t=1
