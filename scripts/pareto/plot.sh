#!/usr/bin/env bash
# Plots a Pareto CSV (scripts/pareto/common.sh's header): perplexity change
# vs KV bytes per token as a fraction of fp16, one point style per series,
# each series' Pareto front as a step line; writes PREFIX.png and
# PREFIX.svg (default: the CSV's path without .csv). Series: the CSV's
# system, with llama.cpp's "no-rot" rows (Hadamard rotation off) a series
# of their own; every point but the no-rot ones is labelled with its config. A point is on its series' front when no other point of the
# series has <= bytes and <= perplexity change (awk, below); gnuplot
# (Debian: gnuplot-nox, installed when missing) draws scripts/pareto/plot.gp.
# Usage: scripts/pareto/plot.sh CSV [PREFIX [TITLE]]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh"
csv=$1
prefix=${2:-${csv%.csv}}
title=${3:-$(basename "$csv" .csv)}
if [ "$(head -n1 "$csv")" != "$PARETO_HEADER" ]; then
  echo "plot: $csv does not start with the header $PARETO_HEADER" >&2
  exit 1
fi
command -v gnuplot >/dev/null 2>&1 || pareto_need_debs plot gnuplot-nox
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Rows as series<TAB>x<TAB>y<TAB>label, series in order of first appearance.
awk -F, 'NR > 1 && $6 != "" && $9 != "" {
  s = $1; c = $2
  if (c ~ / no-rot$/) { s = s " no-rot"; sub(/ no-rot$/, "", c) }
  if (!(s in id)) { id[s] = ++n; print s > "'"$work"'/names" }
  printf "%d\t%s\t%s\t%s\n", id[s], $6, $9, c
}' "$csv" > "$work/rows"
[ -s "$work/rows" ] || { echo "plot: no rows in $csv" >&2; exit 1; }
n=$(wc -l < "$work/names")

# Per series, sorted by bytes then by change: a point is on the front when
# its change is below every change at fewer or equal bytes seen before it.
sort -t$'\t' -k1,1n -k2,2g -k3,3g "$work/rows" | awk -F'\t' -v n="$n" -v w="$work" '
  { if ($1 != cur) { cur = $1; best = "" }
    print $2 "\t" $3 "\t" $4 > (w "/p" $1)
    if (best == "" || $3 + 0 < best) { best = $3 + 0; print $2 "\t" $3 "\t" $4 > (w "/f" $1) } }
  END { for (i = 1; i <= n; i++) { close(w "/p" i); close(w "/f" i) } }'
: > "$work/points"; : > "$work/fronts"
args="n=$n"
labels=
for i in $(seq 1 "$n"); do
  cat "$work/p$i" >> "$work/points"; printf '\n\n' >> "$work/points"
  cat "$work/f$i" >> "$work/fronts"; printf '\n\n' >> "$work/fronts"
  name=$(sed -n "${i}p" "$work/names")
  # The same style for a system in every plot: llama.cpp, its no-rot
  # rows and kvc first, other systems after them in order.
  case $name in
    llama.cpp) style=1 ;;
    'llama.cpp no-rot') style=2 ;;
    kvc) style=3 ;;
    *) style=$((3 + i)) ;;
  esac
  args+="; name$i='${name//\'/}'; style$i=$style"
  # Labels on every series but the no-rot one (its points sit straight
  # above their rotated twins, whose labels name them).
  [[ $name == *no-rot ]] || labels+="${labels:+ }$i"
done
title="$title: perplexity change vs KV bytes per token"
gnuplot -e "$args; labels='$labels'; points='$work/points'; fronts='$work/fronts'; title_='$title'; out='$prefix'" \
  "$here/plot.gp"
echo "plot: $prefix.png $prefix.svg" >&2
