#!/usr/bin/env bash
# Prints a Pareto CSV (scripts/pareto/common.sh's header) as the Markdown
# table of README.md: every row, each system's perplexity change against
# its own fp16 run; "-" where a cell is empty (kvc's KL fields before
# kvc ppl --kld).
# Usage: scripts/pareto/table.sh CSV [CAPTION]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh"
csv=$1
if [ "$(head -n1 "$csv")" != "$PARETO_HEADER" ]; then
  echo "table: $csv does not start with the header $PARETO_HEADER" >&2
  exit 1
fi
if [ -n "${2:-}" ]; then printf '%s\n\n' "$2"; fi
awk -F, '
  function cell(v, fmt) { return v == "" ? "-" : sprintf(fmt, v == 0 ? 0 : v) }  # no "-0.0000"
  NR == 1 {
    print "| system | configuration | KV bytes/token | of fp16 | perplexity | vs own fp16 | KLD mean | KLD 99% | same top |"
    print "|---|---|---|---|---|---|---|---|---|"
    next
  }
  { kld = $10 == "" ? "-" : cell($10, "%.4f") " ± " cell($11, "%.4f")
    printf "| %s | %s | %.0f | %.3f | %.4f ± %.4f | %+.2f%% | %s | %s | %s |\n",
      $1, $2, $5, $6, $7, $8, $9 == 0 ? 0 : $9, kld, cell($12, "%.4f"), cell($13, "%.2f%%") }
' "$csv"
