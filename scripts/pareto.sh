#!/usr/bin/env bash
# The Pareto comparison of README.md (a benchmark, not a test; not in CI):
# kvc's compressors against llama.cpp's own KV-cache types on the same
# model (SmolLM2-135M-Instruct Q4_1), text (GPL-3, every chunk) and
# protocol (llama-perplexity's: chunks of CTX tokens, second halves
# scored), perplexity change against KV bytes per token.
#
#  1. scripts/setup.sh and scripts/build.sh (kvc, release);
#  2. scripts/pareto/llama-cpp.sh: builds llama-perplexity from the
#     llama.cpp vendored by the llama-cpp-python 0.3.36 sdist (PyPI), CPU
#     only, cached in ~/.cache/kvc/llama.cpp-0.3.36 (first time 3 to 8 min
#     on 2 cores), then runs each type of its list with llama.cpp's own KL
#     divergence against its f16 cache;
#  3. scripts/pareto/kvc-grid.sh: each line of scripts/pareto/grid.txt
#     (grid-ctx2048.txt at ctx 2048) through `kvc ppl`, against kvc's own
#     fp16 `full` run; kvquant rows are prepared once per option set on
#     the default calibration texts (about 20 s) and cached;
#  4. scripts/pareto/plot.sh: PNG and SVG of each CSV (gnuplot);
#  5. scripts/pareto/table.sh: one Markdown table per context size;
#  6. scripts/pareto/front.py: for each llama.cpp point the kvc row with
#     no more bytes and no larger change, and kvc's best row under the
#     issue's byte limits beside its bar (0.531/0.375/0.281/0.15 of fp16:
#     +0.1/+0.5/+2/+8% at ctx 512; 0.281: +3% at ctx 2048).
# plot.sh and table.sh also run alone on a CSV.
# Output in ${OUT_DIR:-pareto-out}/: pareto-ctx512.csv (.png, .svg), and
# pareto-ctx2048.* with --ctx2048. CSVs of an earlier run there are
# replaced.
#
# Usage: scripts/pareto.sh [--ctx2048] [--no-rot]
#   --ctx2048 (or PARETO_CTX2048=1)  also ctx 2048: llama.cpp's short type
#             list (f16, q8_0, q4_0) and kvc's best rows
#             (scripts/pareto/grid-ctx2048.txt)
#   --no-rot  (or PARETO_NOROT=1)    also every quantized llama.cpp type at
#             ctx 512 with its Hadamard rotation off (LLAMA_ATTN_ROT_DISABLE=1)
# Time on 2 cores (a shared VM: the lower figures when it is quiet), once
# llama-perplexity is built: 30 to 100 s a llama.cpp run at ctx 512 (13
# runs: about 10 min; 11 more with --no-rot), 15 to 60 s a kvc row (the
# first svdllm row also prepares its artifact, about 35 s); ctx 2048 adds
# about 4 to 7 min. All of it with --ctx2048 --no-rot: 32 min with the
# build on a quiet VM, 40 min without it on a busy one.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
ctx2048=${PARETO_CTX2048:-0} norot=${PARETO_NOROT:-0}
while (($#)); do
  case $1 in
    --ctx2048) ctx2048=1 ;;
    --no-rot) norot=1 ;;
    *) echo "pareto: unknown argument $1 (see the top of $0)" >&2; exit 2 ;;
  esac
  shift
done
t0=$SECONDS
bash "$here/setup.sh"
bash "$here/build.sh"
source "$here/env.sh"
source "$here/pareto/common.sh"
pareto_need_debs pareto gnuplot-nox
bash "$here/pareto/llama-cpp.sh" --build-only

caption() { echo "$(basename "$KVC_MODEL" .gguf), $(basename "$PARETO_TEXT"), ctx $1"; }
out=${OUT_DIR:-pareto-out}
mkdir -p "$out"
ctxs=(512)
[ "$ctx2048" = 1 ] && ctxs+=(2048)
for ctx in "${ctxs[@]}"; do
  csv=$out/pareto-ctx$ctx.csv
  rm -f "$csv"
  largs=(--ctx "$ctx" --csv "$csv")
  [ "$ctx" = 512 ] || largs+=(--short)
  [ "$ctx" = 512 ] && [ "$norot" = 1 ] && largs+=(--no-rot)
  bash "$here/pareto/llama-cpp.sh" "${largs[@]}"
  grid=$here/pareto/grid.txt
  [ "$ctx" = 512 ] || grid=$here/pareto/grid-ctx2048.txt
  bash "$here/pareto/kvc-grid.sh" --ctx "$ctx" --csv "$csv" --grid "$grid"
  bash "$here/pareto/plot.sh" "$csv" "${csv%.csv}" "$(caption "$ctx")"
done

# The Markdown tables: each system's change is against its own fp16 run.
for ctx in "${ctxs[@]}"; do
  echo
  bash "$here/pareto/table.sh" "$out/pareto-ctx$ctx.csv" "$(caption "$ctx"), every chunk
(llama.cpp: llama-perplexity of llama-cpp-python 0.3.36, -fa on; kvc: kvc ppl)"
done
# The issue's checks: which kvc row dominates each llama.cpp point, and
# kvc's best row under each byte limit beside its bar (scripts/pareto/front.py).
for ctx in "${ctxs[@]}"; do
  echo
  echo "Dominance and byte limits, ctx $ctx:"
  echo
  if [ "$ctx" = 512 ]; then
    python3 "$here/pareto/front.py" "$out/pareto-ctx$ctx.csv" \
      --limits 0.531,0.375,0.281,0.15 --bars 0.1,0.5,2,8
  else
    python3 "$here/pareto/front.py" "$out/pareto-ctx$ctx.csv" --limits 0.531,0.281 --bars 0.1,3
  fi
done
echo
echo "pareto: CSVs and plots in $out/ ($(((SECONDS - t0) / 60)) min)"
ls "$out"/pareto-ctx*.{csv,png,svg} 2>/dev/null || true
