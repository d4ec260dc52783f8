#!/usr/bin/env bash
# Every configuration of a Pareto grid file through `kvc-conform --profile
# quick`: the settings the README's tables publish must keep the whole
# contract (bad input, step rule, export, budgets, allocator == reported,
# accuracy on SmolLM2), not only score well. A check, not in CI (CI runs
# the bundled plugins' defaults and a few quantized settings; this runs
# each published one, a minute or two each).
#
# Lossy settings clear KVC_CAP_EXACT in their instance caps (ABI 1.3), so
# kvc-conform skips accuracy/lossless_exact for them by itself; nothing is
# left out here by hand. A line's extra kvc-conform arguments, if any, come
# from the environment: CONFORM_ARGS (e.g. "--seed 7").
#
# Usage: scripts/pareto/conform-grid.sh [--grid FILE] [--out DIR]
#   (after scripts/build.sh) --grid defaults to scripts/pareto/grid.txt;
#   each run's JSON and log go to DIR (default pareto-out/conform).
# Prints one line per configuration (passed/failed/skipped counts, the
# failed tests' names) and exits 1 when any configuration failed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../env.sh"
source "$here/common.sh"

grid=$here/grid.txt out=${OUT_DIR:-pareto-out}/conform
while (($#)); do
  case $1 in
    --grid) grid=$2; shift ;;
    --out) out=$2; shift ;;
    *) echo "conform-grid: unknown argument $1 (see the top of $0)" >&2; exit 2 ;;
  esac
  shift
done
conform=$KVC_BUILD/conformance/kvc-conform
if [ ! -x "$conform" ]; then
  echo "conform-grid: no $conform; build kvc first (scripts/build.sh)" >&2
  exit 1
fi
for d in "$KVC_BUILD"/plugins/*/; do KVC_PLUGIN_PATH="$d${KVC_PLUGIN_PATH:+:$KVC_PLUGIN_PATH}"; done
export KVC_PLUGIN_PATH
mkdir -p "$out"
read -r -a extra <<< "${CONFORM_ARGS:-}"

lines=$(pareto_grid_read "$grid")
bad=0 n=0 t0=$SECONDS
while IFS=$'\t' read -r label plugin opts; do
  [ -n "$label" ] || continue
  read -r -a o <<< "$opts"
  args=()
  for x in "${o[@]}"; do args+=(--opt "$x"); done
  n=$((n + 1))
  json=$out/$n.json t=$SECONDS rc=0
  "$conform" "$plugin" --profile quick "${args[@]}" "${extra[@]}" --json "$json" \
    > "$out/$n.log" 2>&1 < /dev/null || rc=$?
  summary=$(python3 - "$json" <<'PY' 2>/dev/null || echo "no JSON written"
import json, sys
d = json.load(open(sys.argv[1]))
s = d["summary"]
bad = [r["group"] + "/" + r["test"] + (" (" + (r.get("reason") or r.get("figure") or "") + ")")
       for r in d["results"] if r["result"] in ("failed", "crashed")]
skip = [r["group"] + "/" + r["test"] for r in d["results"] if r["result"] == "skipped"]
print(f"{s['passed']} passed, {s['failed']} failed, {s['crashed']} crashed, "
      f"{s['skipped']} skipped ({' '.join(skip) or '-'})" + ("; FAILED: " + "; ".join(bad) if bad else ""))
PY
)
  [ "$rc" = 0 ] || bad=1
  printf '%-34s %-8s %s (%d s, exit %d; log %s)\n' "$label" "$plugin" "$summary" \
    $((SECONDS - t)) "$rc" "$out/$n.log"
done <<< "$lines"
echo "conform-grid: $n configurations in $((SECONDS - t0)) s, $([ $bad = 0 ] && echo none failed || echo SOME FAILED)"
exit $bad
