#!/usr/bin/env bash
# The low-rank table of README.md: SmolLM2 on GPL-3 (ctx 512, every chunk),
# perplexity and measured resident KV bytes per token of `full`, LoRC
# (progressive and uniform ranks) and SVD-LLM (plain, refit, post-RoPE keys)
# at kv_ratio 0.75, 0.5 and 0.35, all in one run. Artifacts are prepared
# on first use (calibration: the default license texts, never GPL-3) and
# cached; preparation times are printed from each first run.
# Usage: scripts/lowrank-table.sh [RATIOS...]   (after scripts/build.sh)
set -euo pipefail
here=$(dirname "$0")
source "$here/env.sh"
for d in "$KVC_BUILD"/plugins/*/; do KVC_PLUGIN_PATH="$d${KVC_PLUGIN_PATH:+:$KVC_PLUGIN_PATH}"; done
export KVC_PLUGIN_PATH
kvc="$KVC_BUILD/host-shim/kvc"
ratios=("$@")
[ ${#ratios[@]} -gt 0 ] || ratios=(0.75 0.5 0.35)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
i=0
row() { # label, plugin, options...
  local label=$1 plugin=$2; shift 2
  local args=() o
  for o in "$@"; do args+=(--opt "$o"); done
  i=$((i + 1))
  local t0=$SECONDS
  "$kvc" ppl --plugin "$plugin" "${args[@]}" --json > "$out/$i.json" 2> "$out/$i.err" || {
    echo "FAILED: $label ($plugin $*)" >&2; cat "$out/$i.err" >&2; return 1; }
  echo "$label" > "$out/$i.label"
  grep -E "prepared in|using cached" "$out/$i.err" | sed "s|^|  $label: |" >&2 || true
  echo "  $label: $((SECONDS - t0)) s" >&2
}
row "full (fp32)" full
row "full (fp16)" full dtype=fp16
for r in "${ratios[@]}"; do
  row "lorc progressive" lorc "kv_ratio=$r"
  row "lorc uniform" lorc "kv_ratio=$r" alloc=uniform
  row "svdllm" svdllm "kv_ratio=$r"
  row "svdllm refit" svdllm "kv_ratio=$r" refit=true
  row "svdllm post-RoPE keys" svdllm "kv_ratio=$r" key_space=post
done
python3 - "$out" "$i" <<'PY'
import json, sys
d, n = sys.argv[1], int(sys.argv[2])
rows = []
for k in range(1, n + 1):
    j = json.load(open(f"{d}/{k}.json"))
    rows.append((open(f"{d}/{k}.label").read().strip(), j))
base = rows[0][1]["ppl"]
j0 = rows[0][1]
print(f"SmolLM2-135M-Instruct Q4_1, {j0['text']} ({j0['text_tokens']} tokens), ctx {j0['n_ctx']}, "
      f"{j0['chunks']} chunks, {j0['tokens_scored']} tokens scored")
print()
print("| configuration | kv_ratio | perplexity | vs full fp32 | KV bytes/token | of fp16 full |")
print("|---|---|---|---|---|---|")
for label, j in rows:
    r = j["options"].get("kv_ratio", "-")
    print(f"| {label} | {r} | {j['ppl']:.4f} | {100 * (j['ppl'] / base - 1):+.2f}% | "
          f"{j['kv_bytes_per_token']:.1f} | {j['kv_bytes_per_token'] / j['fp16_full_bytes_per_token']:.3f} |")
PY
