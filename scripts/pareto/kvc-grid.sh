#!/usr/bin/env bash
# The kvc side of scripts/pareto.sh: each configuration of a grid file
# (default scripts/pareto/grid.txt) through `kvc ppl --json` on the same
# model, text and context as the llama.cpp rows, one CSV row each (system
# `kvc`), appended to the CSV (header written when absent).
#
# vs_base_pct is relative to a `full` fp16 run (--plugin full --opt
# dtype=fp16) made here first: each system is measured against its own
# fp16 baseline (kvc's host and llama.cpp differ by about 0.5% at fp16).
# of_fp16 = kv_bytes_per_token / fp16_full_bytes_per_token (both from kvc).
# KL divergence: when `kvc ppl` offers --kld it is passed and the fields
# kld_mean, kld_err, kld_p99 and same_top (a fraction) fill their cells;
# without it, or when a field is absent, the cells stay empty.
#
# Usage: scripts/pareto/kvc-grid.sh [--ctx N] [--csv FILE] [--grid FILE]
#   (after scripts/build.sh; KVC_BUILD picks another build directory)
# Environment: KVC_MODEL (the GGUF), PARETO_TEXT (default GPL-3).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../env.sh"
source "$here/common.sh"

ctx=512 csv='' grid=$here/grid.txt
while (($#)); do
  case $1 in
    --ctx) ctx=$2; shift ;;
    --csv) csv=$2; shift ;;
    --grid) grid=$2; shift ;;
    *) echo "kvc-grid: unknown argument $1 (see the top of $0)" >&2; exit 2 ;;
  esac
  shift
done
csv=${csv:-${OUT_DIR:-pareto-out}/pareto-ctx$ctx.csv}

kvc=$KVC_BUILD/host-shim/kvc
if [ ! -x "$kvc" ]; then
  echo "kvc-grid: no $kvc; build kvc first (scripts/build.sh)" >&2
  exit 1
fi
for d in "$KVC_BUILD"/plugins/*/; do KVC_PLUGIN_PATH="$d${KVC_PLUGIN_PATH:+:$KVC_PLUGIN_PATH}"; done
export KVC_PLUGIN_PATH
kld=()
usage=$("$kvc" ppl --help 2>&1 || true)
[[ $usage == *--kld* ]] && kld=(--kld)

pareto_csv_init "$csv"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# run KEY PLUGIN OPTS...: kvc ppl into $work/KEY.json (once per KEY).
run() {
  local key=$1 plugin=$2 args=() o t=$SECONDS
  shift 2
  [ -s "$work/$key.json" ] && return 0
  for o in "$@"; do args+=(--opt "$o"); done
  "$kvc" ppl --plugin "$plugin" "${args[@]}" --model "$KVC_MODEL" --text "$PARETO_TEXT" \
    --ctx "$ctx" "${kld[@]}" --json > "$work/$key.tmp" 2> "$work/$key.err" || {
      echo "kvc-grid: kvc ppl failed: --plugin $plugin $*" >&2
      cat "$work/$key.err" >&2
      return 1
    }
  mv "$work/$key.tmp" "$work/$key.json"
  grep -E "prepared in|using cached" "$work/$key.err" | sed "s|^|  |" >&2 || true
  echo "  kvc $plugin $*: $((SECONDS - t)) s" >&2
}
# key PLUGIN OPTS...: a file name for one plugin and option set.
key() { echo "$*" | md5sum | cut -c1-16; }

echo "kvc-grid: ctx $ctx, $(basename "$KVC_MODEL"), $PARETO_TEXT -> $csv${kld:+ (with --kld)}" >&2
t0=$SECONDS
base=$(key full dtype=fp16)
run "$base" full dtype=fp16
n=0
lines=$(pareto_grid_read "$grid")
while IFS=$'\t' read -r label plugin opts; do
  [ -n "$label" ] || continue
  read -r -a o <<< "${opts:-}"
  k=$(key "$plugin" "${o[@]}")
  run "$k" "$plugin" "${o[@]}"
  python3 - "$work/$k.json" "$work/$base.json" "$label" "${o[@]}" >> "$csv" <<'PY'
import json, sys
j, b = (json.load(open(p)) for p in sys.argv[1:3])
label, opts = sys.argv[3], dict(o.split("=", 1) for o in sys.argv[4:] if "=" in o)
def num(d, k, fmt, scale=1.0):
    v = d.get(k)
    return "" if v is None else fmt % (v * scale)
dtype = opts.get("dtype", "")
def kind(bits):  # quantized stores: "4b" (kvquant's fractional widths: "2.5b")
    return (bits + "b") if bits and bits != "16" else dtype
row = ["kvc", label, kind(opts.get("k_bits")), kind(opts.get("v_bits")),
       "%.1f" % j["kv_bytes_per_token"],
       "%.4f" % (j["kv_bytes_per_token"] / j["fp16_full_bytes_per_token"]),
       "%.4f" % j["ppl"], num(j, "ppl_err", "%.4f"),
       "%.3f" % ((j["ppl"] / b["ppl"] - 1) * 100),
       num(j, "kld_mean", "%.6f"), num(j, "kld_err", "%.6f"), num(j, "kld_p99", "%.6f"),
       num(j, "same_top", "%.3f", 100.0)]
print(",".join(row))
PY
  n=$((n + 1))
done <<< "$lines"
echo "kvc-grid: ctx $ctx, $n rows in $((SECONDS - t0)) s" >&2
