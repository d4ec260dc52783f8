#!/usr/bin/env bash
# The llama.cpp side of scripts/pareto.sh: llama.cpp's own KV-cache types
# (-ctk/-ctv) on the same model, text and protocol as `kvc ppl`, with
# llama.cpp's own KL divergence against its f16 cache.
#
# Builds `llama-perplexity` (CPU only) from the llama.cpp that the
# llama-cpp-python 0.3.36 sdist vendors (vendor/llama.cpp), fetched from
# PyPI with pip and checked against its SHA-256; cached in
# ${KVC_CACHE:-~/.cache/kvc}/llama.cpp-0.3.36/ (bin/ the binary, src/ the
# sources), so later runs reuse it. The build takes 3 to 8 minutes on 2
# cores (3 when the machine is quiet) and installs cmake, g++ and ninja
# from Debian when missing.
#
# Then, per context size: one f16/f16 run that saves the base logits
# (--kl-divergence-base), then every type of the list with --kl-divergence
# against them (f16/f16 too, so all rows come from the same code path), one
# CSV row each (header in scripts/pareto/common.sh). KV bytes per token
# are read from llama.cpp's log line `llama_kv_cache: size = X MiB (N
# cells, ...), K (type): ... MiB, V (type): ... MiB`: X MiB over N cells
# (X is K + V, rounded once; the K and V parts are rounded again). The log
# prints MiB to 2 decimals: about +-10 B/token at ctx 512 (q8_0 shows
# 0.532 of f16 where its blocks give 0.531), 4x finer at 2048. Each chunk
# is one batch and one micro-batch (-b = -ub = ctx): one sequence of
# n_ctx cells, as kvc ppl.
#
# Quantized K and V caches are rotated by a Walsh-Hadamard transform by
# default in this llama.cpp (src/llama-kv-cache.cpp); --no-rot adds, for
# every quantized type, a row with LLAMA_ATTN_ROT_DISABLE=1 (config
# "K/V no-rot").
#
# Usage: scripts/pareto/llama-cpp.sh [--build-only] [--ctx N] [--csv FILE]
#          [--short] [--types 'K/V K/V ...'] [--no-rot]
#   --ctx N       context (chunk) size, default 512
#   --csv FILE    CSV to append to (header written when absent), default
#                 ${OUT_DIR:-pareto-out}/pareto-ctxN.csv
#   --short       the short list of types (types_short below) instead of all
#   --types LIST  these types instead (f16/f16 is always run first)
#   --no-rot      also the no-rotation rows
# Environment: KVC_MODEL (the GGUF), PARETO_TEXT (default GPL-3),
#   LLAMA_THREADS (default 2), KVC_CACHE.
# About 30 s (up to 100 s on a busy host) a type at ctx 512 on 2 cores.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../env.sh"
source "$here/common.sh"

# The KV-cache types, K/V, in one place. types_short is the list of the
# ctx 2048 runs (scripts/pareto.sh --ctx2048).
types=(
  f16/f16
  q8_0/q8_0 q5_1/q5_1 q5_0/q5_0 q4_1/q4_1 iq4_nl/iq4_nl q4_0/q4_0
  q8_0/q5_0 q8_0/q4_0 q5_0/q4_0 q4_0/q8_0 q5_1/q4_1
)
types_short=(f16/f16 q8_0/q8_0 q4_0/q4_0)

version=0.3.36
sdist=llama_cpp_python-$version.tar.gz
sdist_sha256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
dir=$KVC_CACHE/llama.cpp-$version
bin=$dir/bin/llama-perplexity

build_only=0 ctx=512 csv='' short=0 norot=0 list=()
while (($#)); do
  case $1 in
    --build-only) build_only=1 ;;
    --ctx) ctx=$2; shift ;;
    --csv) csv=$2; shift ;;
    --short) short=1 ;;
    --types) read -r -a list <<< "$2"; shift ;;
    --no-rot) norot=1 ;;
    *) echo "llama-cpp: unknown argument $1 (see the top of $0)" >&2; exit 2 ;;
  esac
  shift
done

build() {
  if [ -x "$bin" ]; then
    echo "llama-cpp: $bin present (llama.cpp of llama-cpp-python $version)" >&2
    return 0
  fi
  pareto_need_debs llama-cpp cmake g++ ninja-build ca-certificates
  if ! python3 -m pip --version >/dev/null 2>&1; then
    pareto_need_debs llama-cpp python3-pip
  fi
  mkdir -p "$dir"
  local tmp t0
  tmp=$(mktemp -d "$dir/.build.XXXXXX")
  # shellcheck disable=SC2064  # expand now: tmp is local
  trap "rm -rf '$tmp'" EXIT
  t0=$(date +%s)
  echo "llama-cpp: downloading the llama-cpp-python $version sdist from PyPI (about 77 MB)" >&2
  python3 -m pip download --quiet --no-deps --no-binary :all: --dest "$tmp" \
    "llama-cpp-python==$version" >&2
  if ! echo "$sdist_sha256  $tmp/$sdist" | sha256sum --check --status; then
    echo "llama-cpp: $sdist does not have the expected sha256 $sdist_sha256; refusing it" >&2
    exit 1
  fi
  mkdir "$tmp/src"
  tar -xzf "$tmp/$sdist" -C "$tmp/src" --strip-components=3 \
    "llama_cpp_python-$version/vendor/llama.cpp"
  # CPU only even where nvcc is installed; static, so bin/ holds one file.
  # (LLAMA_CURL is deprecated and ignored in this version; LLAMA_OPENSSL
  # is its successor, off: nothing is downloaded at run time.)
  # No AMX: where the CPU reports it, -march=native turns on ggml's AMX
  # kernels, and on a VM that lists AMX without running it (Firecracker
  # here) the first matrix product segfaults. Explicit -mno-amx-* win over
  # -march=native whatever their order; the AVX-512 kernels do the work.
  local flags=
  case $("${CC:-cc}" -march=native -dM -E - </dev/null 2>/dev/null) in
    *__AMX_TILE__*) flags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" ;;
  esac
  echo "llama-cpp: building llama-perplexity (CPU only${flags:+, $flags})" >&2
  local t1 t2
  t1=$(date +%s)
  cmake -S "$tmp/src" -B "$tmp/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_C_FLAGS="$flags" -DCMAKE_CXX_FLAGS="$flags" \
    -DBUILD_SHARED_LIBS=OFF -DGGML_CUDA=OFF -DGGML_NATIVE=ON -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF >"$tmp/cmake.log" 2>&1 || { cat "$tmp/cmake.log" >&2; exit 1; }
  cmake --build "$tmp/build" --target llama-perplexity -j "$(nproc)" >"$tmp/build.log" 2>&1 ||
    { tail -n 50 "$tmp/build.log" >&2; exit 1; }
  t2=$(date +%s)
  rm -rf "${dir:?}/src" "${dir:?}/bin"
  mkdir -p "$dir/bin"
  cp "$tmp/build/bin/llama-perplexity" "$bin"
  mv "$tmp/src" "$dir/src"
  rm -rf "$tmp"
  trap - EXIT
  echo "llama-cpp: built $bin in $((t2 - t1)) s (download and unpack $((t1 - t0)) s)" >&2
}

build
((build_only)) && exit 0

if [ ! -f "$KVC_MODEL" ]; then
  echo "llama-cpp: no model at $KVC_MODEL (scripts/fetch-model.sh fetches it)" >&2
  exit 1
fi
if ((${#list[@]} == 0)); then
  if ((short)); then list=("${types_short[@]}"); else list=("${types[@]}"); fi
fi
csv=${csv:-${OUT_DIR:-pareto-out}/pareto-ctx$ctx.csv}
pareto_csv_init "$csv"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
base=$work/base-logits.bin

# ppl LOG K V [args...]: one llama-perplexity run, its log in LOG. -lv 4:
# the llama_kv_cache lines (size, attn_rot_k/v) are logged at that level.
ppl() {
  local log=$1 k=$2 v=$3
  shift 3
  "$bin" -m "$KVC_MODEL" -f "$PARETO_TEXT" -c "$ctx" -b "$ctx" -ub "$ctx" \
    -t "${LLAMA_THREADS:-2}" -fa on -ctk "$k" -ctv "$v" -lv 4 "$@" > "$log" 2>&1 || {
      echo "llama-cpp: llama-perplexity failed (ctx $ctx, $k/$v); its log:" >&2
      tail -n 30 "$log" >&2
      return 1
    }
}

# parse LOG: prints "bytes_per_token ppl ppl_err kld_mean kld_err kld_p99
# same_top_pct" from a --kl-divergence run's log.
#   llama_kv_cache: size =   11.25 MiB (   512 cells,  30 layers,  1/1 seqs), K (f16):    5.62 MiB, V (f16):    5.62 MiB
#   Mean    PPL(Q)                   :  18.391383 ±   0.484738
#   Mean    KLD:   0.000000 ±   0.000000
#   99.0%   KLD:   0.000000
#   Same top p: 100.000 ± 0.000 %
parse() {
  awk '
    /llama_kv_cache: size = / && kv == "" {
      s = $0
      sub(/.*size = */, "", s); sub(/\(/, "", s)
      split(s, f, /[ ,]+/)           # MiB "MiB" cells "cells" ...
      if (f[2] != "MiB" || f[4] != "cells" || f[3] + 0 <= 0) exit 2
      kv = f[1] * 1048576 / f[3]
    }
    /^Mean +PPL\(Q\) +:/ { ppl = $4; ppl_err = $6 }
    /^Mean +KLD:/        { kld = $3; kld_err = $5 }
    /^99\.0% +KLD:/      { p99 = $3 }
    /^Same top p:/       { top = $4 }
    END {
      if (kv == "" || ppl == "" || kld == "" || p99 == "" || top == "") exit 1
      printf "%.1f %s %s %s %s %s %s\n", kv, ppl, ppl_err, kld, kld_err, p99, top
    }' "$1"
}

echo "llama-cpp: ctx $ctx, $(basename "$KVC_MODEL"), $PARETO_TEXT -> $csv" >&2
t0=$SECONDS
ppl "$work/base.log" f16 f16 --kl-divergence-base "$base"
echo "  f16/f16 base logits saved: $((SECONDS - t0)) s" >&2

f16_bytes='' f16_ppl=''
row() { # K V [" no-rot": the run with LLAMA_ATTN_ROT_DISABLE=1]
  local k=$1 v=$2 suffix=${3:-} t=$SECONDS log=$work/$1-$2${3:+-norot}.log out
  if [ -n "$suffix" ]; then
    LLAMA_ATTN_ROT_DISABLE=1 ppl "$log" "$k" "$v" --kl-divergence-base "$base" --kl-divergence
    grep -q 'attention rotation force disabled' "$log" || {
      echo "llama-cpp: LLAMA_ATTN_ROT_DISABLE=1 was not honoured ($k/$v)" >&2; return 1; }
  else
    ppl "$log" "$k" "$v" --kl-divergence-base "$base" --kl-divergence
  fi
  out=$(parse "$log") || { echo "llama-cpp: could not parse $k/$v's log:" >&2; tail -n 30 "$log" >&2; return 1; }
  local bytes ppl_ ppl_err kld kld_err p99 top
  read -r bytes ppl_ ppl_err kld kld_err p99 top <<< "$out"
  if [ "$k/$v" = f16/f16 ] && [ -z "$suffix" ]; then f16_bytes=$bytes f16_ppl=$ppl_; fi
  awk -v cfg="$k/$v$suffix" -v k="$k" -v v="$v" -v b="$bytes" -v fb="$f16_bytes" \
      -v p="$ppl_" -v pe="$ppl_err" -v fp="$f16_ppl" -v kl="$kld" -v ke="$kld_err" \
      -v p99="$p99" -v top="$top" 'BEGIN {
    printf "llama.cpp,%s,%s,%s,%.1f,%.4f,%.4f,%.4f,%.3f,%s,%s,%s,%s\n",
      cfg, k, v, b, b / fb, p, pe, (p / fp - 1) * 100, kl, ke, p99, top }' >> "$csv"
  echo "  $k/$v$suffix: ppl $ppl_, KLD $kld, same top $top%, $bytes B/token: $((SECONDS - t)) s" >&2
}

row f16 f16
for kv in "${list[@]}"; do
  [ "$kv" = f16/f16 ] || row "${kv%/*}" "${kv#*/}"
done
if ((norot)); then
  for kv in "${list[@]}"; do
    [ "$kv" = f16/f16 ] || row "${kv%/*}" "${kv#*/}" " no-rot"
  done
fi
echo "llama-cpp: ctx $ctx done in $((SECONDS - t0)) s" >&2
