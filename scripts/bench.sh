#!/usr/bin/env bash
# Benchmarks (figures, not tests): decode time per token (append 1 token +
# attend 1 query) on one layer of SmolLM2-135M's geometry, at 1k-64k
# context, for `full` (fp32, fp16) and the low-rank plugins at kv_ratio
# 0.75 / 0.5 / 0.35 (svdllm also with key_space=post), FastGen (t = 0.95
# in fp16; kv_ratio 0.5 and 0.25; its prompt is the first warm-up step, a
# single query over the whole context of random keys), the quantized store
# (full with 4-bit keys before or after RoPE, 2-bit after; kvquant at 4
# bits on synthetic calibration), beside memcpy bandwidth. Two tables: cache cold (configurations interleaved step by
# step, CPU caches flushed before each step: a model whose other layers ran
# in between; the ratios to `full` are measured side by side) and cache warm
# (each configuration's steps back to back, as the earlier full-only bench).
# Extra arguments go to both runs after these: `--contexts 4096,16384`
# replaces the contexts, `--plugin 'NAME|opt=value|...'` adds a
# configuration, `--reps N`. `scripts/bench.sh --quant [args]`: the
# quantized stores' table instead (below).
set -euo pipefail
here=$(dirname "$0")
bash "$here/setup.sh"
bash "$here/build.sh"
source "$here/env.sh"
# Every plugin the build made is found by name: each build directory of
# plugins/ holding a kvc-*.so goes on the search path.
plugin_path=
for d in "$KVC_BUILD"/plugins/*/; do
  if compgen -G "${d}kvc-*.so" >/dev/null; then
    plugin_path+=${plugin_path:+:}${d%/}
  fi
done
export KVC_PLUGIN_PATH=$plugin_path
# One BLAS thread: the low-rank plugins' GEMMs otherwise spread over cores
# and the figures wander with the machine's load.
export OPENBLAS_NUM_THREADS=1
configs=(
  'full'
  'full|dtype=fp16'
  'lorc|kv_ratio=0.75' 'lorc|kv_ratio=0.5' 'lorc|kv_ratio=0.35'
  'svdllm|kv_ratio=0.75' 'svdllm|kv_ratio=0.5' 'svdllm|kv_ratio=0.35'
  'svdllm|kv_ratio=0.5|key_space=post'
  'fastgen|dtype=fp16' 'fastgen|kv_ratio=0.5' 'fastgen|kv_ratio=0.25'
  'full|k_bits=4|v_bits=4' 'full|k_bits=4|v_bits=4|k_rope=post'
  'full|k_bits=2|v_bits=2|k_rope=post' 'kvquant|k_bits=4|v_bits=4'
)
args=(--contexts 1024,4096,16384,65536 --reps 20)
caches=(cold warm)
# --quant: the quantized stores' table of README.md instead: `full` fp32 and
# fp16 beside 4-bit and 2-bit keys and values (full before and after RoPE;
# kvquant's default and 2.5/3-bit settings; FastGen's budget with 4-bit
# rows) at 4k, 16k and 64k tokens, caches cold, one run.
if [ "${1:-}" = --quant ]; then
  shift
  configs=(
    'full' 'full|dtype=fp16'
    'full|k_bits=4|v_bits=4' 'full|k_bits=4|v_bits=4|k_rope=post'
    'full|k_bits=2|v_bits=2|k_rope=post'
    'kvquant' 'kvquant|k_bits=2.5|v_bits=3|window=32|block_tokens=32'
    'fastgen|kv_ratio=0.25|k_bits=4|v_bits=4'
  )
  args=(--contexts 4096,16384,65536 --reps 20)
  caches=(cold)
fi
for c in "${configs[@]}"; do
  args+=(--plugin "$c")
done
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
for cache in "${caches[@]}"; do
  echo
  "$KVC_BUILD/tests/bench/kvc-bench-decode" --cache "$cache" "${args[@]}" "$@"
done
