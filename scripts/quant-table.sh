#!/usr/bin/env bash
# The quantization ablation table of docs/quantization.md: SmolLM2 on
# GPL-3 (every chunk, ctx 512), perplexity against kvc's own fp16 `full`,
# KL divergence against exact attention, the share of positions whose top
# token is unchanged, and measured resident KV bytes per token, for one
# design choice changed at a time, all in one run:
#   full (calibration-free) at 4 bits: keys per token after RoPE without
#     and with the Hadamard rotation, per channel after RoPE, per channel
#     before RoPE (the default), then sinks and a recent fp16 window;
#   kvquant (calibrated) at 3 bits, where the choices show: uniform
#     widths and levels, then sensitivity-allocated key widths, fitted
#     levels (the default), sinks (default 4), an 8-bit recent value window
#     of 32 tokens (with 32-token blocks), 1% exact outliers.
# kvquant's artifact is prepared on first use (default calibration texts,
# about 20 s per option set) and cached.
# Usage: scripts/quant-table.sh [CTX]   (after scripts/build.sh)
set -euo pipefail
here=$(dirname "$0")
source "$here/env.sh"
for d in "$KVC_BUILD"/plugins/*/; do KVC_PLUGIN_PATH="$d${KVC_PLUGIN_PATH:+:$KVC_PLUGIN_PATH}"; done
export KVC_PLUGIN_PATH
kvc="$KVC_BUILD/host-shim/kvc"
ctx=${1:-512}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
i=0
row() { # label, plugin, options...
  local label=$1 plugin=$2; shift 2
  local args=() o
  for o in "$@"; do args+=(--opt "$o"); done
  i=$((i + 1))
  local t0=$SECONDS
  "$kvc" ppl --plugin "$plugin" "${args[@]}" --ctx "$ctx" --kld --json > "$out/$i.json" \
    2> "$out/$i.err" || { echo "FAILED: $label ($plugin $*)" >&2; cat "$out/$i.err" >&2; return 1; }
  echo "$label" > "$out/$i.label"
  echo "  $label: $((SECONDS - t0)) s" >&2
}
row "full fp16" full dtype=fp16
q4=(k_bits=4 v_bits=4)
row "full K4V4, keys per token post-RoPE, no rotation" full "${q4[@]}" k_scale=token k_rope=post hadamard=none
row "full K4V4, keys per token post-RoPE, Hadamard K and V" full "${q4[@]}" k_scale=token k_rope=post
row "full K4V4, keys per channel post-RoPE" full "${q4[@]}" k_rope=post
row "full K4V4, keys per channel pre-RoPE (default)" full "${q4[@]}"
row "full K4V4 + 4 fp16 sinks" full "${q4[@]}" sink=4
row "full K4V4 + 4 sinks + 32-token fp16 window" full "${q4[@]}" sink=4 window=32
q3=(k_bits=3 v_bits=3 window=0 block_tokens=32)
row "kvquant K3V3, uniform widths and levels, no sinks" kvquant "${q3[@]}" alloc=uniform levels=uniform sink=0
row "kvquant K3V3, sensitivity widths, uniform levels, no sinks" kvquant "${q3[@]}" levels=uniform sink=0
row "kvquant K3V3, sensitivity widths, fitted levels, no sinks" kvquant "${q3[@]}" sink=0
row "kvquant K3V3 + 4 sinks" kvquant "${q3[@]}"
row "kvquant K3V3 + 4 sinks + 32-token 8-bit value window" kvquant k_bits=3 v_bits=3 window=32 block_tokens=32
row "kvquant K3V3 + 4 sinks + window 32 + 1% outliers" kvquant k_bits=3 v_bits=3 window=32 block_tokens=32 outliers=0.01
python3 - "$out" "$i" <<'PY'
import json, sys
d, n = sys.argv[1], int(sys.argv[2])
rows = [(open(f"{d}/{k}.label").read().strip(), json.load(open(f"{d}/{k}.json")))
        for k in range(1, n + 1)]
j0 = rows[0][1]
base = j0["ppl"]
print(f"SmolLM2-135M-Instruct Q4_1, {j0['text']} ({j0['text_tokens']} tokens), ctx {j0['n_ctx']}, "
      f"{j0['chunks']} chunks, {j0['tokens_scored']} tokens scored; KLD against exact attention")
print()
print("| configuration | of fp16 | perplexity | vs fp16 | KLD mean | KLD 99% | same top |")
print("|---|---:|---:|---:|---:|---:|---:|")
for label, j in rows:
    r = j["kv_bytes_per_token"] / j["fp16_full_bytes_per_token"]
    print(f"| {label} | {r:.3f} | {j['ppl']:.4f} | {(j['ppl'] / base - 1) * 100:+.2f}% | "
          f"{j['kld_mean']:.5f} | {j['kld_p99']:.4f} | {j['same_top'] * 100:.2f}% |")
PY
