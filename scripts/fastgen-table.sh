#!/usr/bin/env bash
# The FastGen table of README.md: SmolLM2 on GPL-3 (every chunk, at ctx
# 512 and 2048), perplexity, measured resident KV bytes per token and the
# policy mix of `full` (fp32, fp16) and FastGen at t = 0.98, 0.95, 0.90
# and at kv_ratio 0.5, all in one run. FastGen stores fp16 here (dtype=fp16;
# kv_ratio picks it by itself) so its bytes compare with full fp16.
# Usage: scripts/fastgen-table.sh [CTX...]   (after scripts/build.sh)
set -euo pipefail
here=$(dirname "$0")
source "$here/env.sh"
for d in "$KVC_BUILD"/plugins/*/; do KVC_PLUGIN_PATH="$d${KVC_PLUGIN_PATH:+:$KVC_PLUGIN_PATH}"; done
export KVC_PLUGIN_PATH
kvc="$KVC_BUILD/host-shim/kvc"
ctxs=("$@")
[ ${#ctxs[@]} -gt 0 ] || ctxs=(512 2048)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
i=0
row() { # ctx, label, plugin, options...
  local ctx=$1 label=$2 plugin=$3; shift 3
  local args=() o
  for o in "$@"; do args+=(--opt "$o"); done
  i=$((i + 1))
  local t0=$SECONDS
  "$kvc" ppl --plugin "$plugin" "${args[@]}" --ctx "$ctx" --verbose --json > "$out/$i.json" \
    2> "$out/$i.err" || { echo "FAILED: $label ($plugin $*)" >&2; cat "$out/$i.err" >&2; return 1; }
  echo "$label" > "$out/$i.label"
  echo "  ctx $ctx $label: $((SECONDS - t0)) s" >&2
}
for ctx in "${ctxs[@]}"; do
  row "$ctx" "full fp32" full
  row "$ctx" "full fp16" full dtype=fp16
  for t in 0.98 0.95 0.90; do
    row "$ctx" "fastgen t=$t" fastgen "t=$t" dtype=fp16
  done
  row "$ctx" "fastgen kv_ratio=0.5" fastgen kv_ratio=0.5
done
python3 - "$out" "$i" <<'PY'
import json, sys
d, n = sys.argv[1], int(sys.argv[2])
short = {"special": "S", "punct": "P", "frequent": "F", "local": "L"}
def abbrev(name):
    if name == "full":
        return "full"
    base, _, scale = name.partition("@")
    s = "+".join(short.get(w, w) for w in base.split("+"))
    return s + ("@" + scale if scale else "")
rows = []
for k in range(1, n + 1):
    rows.append((open(f"{d}/{k}.label").read().strip(), json.load(open(f"{d}/{k}.json"))))
by_ctx = {}
for label, j in rows:
    by_ctx.setdefault(j["n_ctx"], []).append((label, j))
for ctx, rs in by_ctx.items():
    j0 = rs[0][1]
    base = j0["ppl"]
    print(f"SmolLM2-135M-Instruct Q4_1, {j0['text']} ({j0['text_tokens']} tokens), ctx {ctx}, "
          f"{j0['chunks']} chunks, {j0['tokens_scored']} tokens scored")
    print()
    print("| configuration | perplexity | vs full fp32 | KV bytes/token | of fp16 full | "
          "tokens held | policy mix (KV heads x layers x chunks) |")
    print("|---|---|---|---|---|---|---|")
    for label, j in rs:
        pol = j.get("policies") or []
        mix, held = {}, "-"
        if pol and any(p.get("counts") for p in pol):
            tot = 0
            for p in pol:
                for k2, c in p["counts"].items():
                    mix[k2] = mix.get(k2, 0) + c
                    tot += c
            hs = [p["held"] for p in pol if "held" in p]
            held = f"{100 * sum(hs) / len(hs):.1f}%" if hs else "-"
            mixs = ", ".join(f"{abbrev(k2)} {100 * c / tot:.0f}%"
                             for k2, c in sorted(mix.items(), key=lambda x: -x[1]) if 100 * c / tot >= 0.5)
        else:
            mixs = "-"
        print(f"| {label} | {j['ppl']:.4f} | {100 * (j['ppl'] / base - 1):+.2f}% | "
              f"{j['kv_bytes_per_token']:.1f} | "
              f"{j['kv_bytes_per_token'] / j['fp16_full_bytes_per_token']:.3f} | {held} | {mixs} |")
    print()
PY
