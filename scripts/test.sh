#!/usr/bin/env bash
# The test job: set up, build, run every Check suite, then again under
# AddressSanitizer + UndefinedBehaviorSanitizer and the threaded tests under
# ThreadSanitizer. Tests that need what is absent (a GPU; the model, when
# setup ran with KVC_NO_MODEL=1) report SKIP.
set -euo pipefail
here=$(dirname "$0")
bash "$here/setup.sh"
bash "$here/build.sh"
source "$here/env.sh"
# One BLAS thread: the tests' threads are the plugin's callers, and
# sanitizers cannot see inside OpenBLAS's own thread pool.
export OPENBLAS_NUM_THREADS=1

echo "== tests (release build)"
meson test -C "$KVC_BUILD" --print-errorlogs

echo "== tests under ASan + UBSan"
asan=$KVC_ROOT/build-asan
[ -f "$asan/build.ninja" ] || meson setup "$asan" "$KVC_ROOT" --buildtype=debugoptimized \
  -Db_sanitize=address,undefined -Db_lundef=false -Dcuda=disabled >/dev/null
ninja -C "$asan" >/dev/null
# Instrumented code runs 2-3x slower: Check's per-test limits scale with it.
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
  CK_TIMEOUT_MULTIPLIER=3 meson test -C "$asan" --print-errorlogs --no-suite install \
  --no-suite release-only

echo "== threaded tests under TSan"
tsan=$KVC_ROOT/build-tsan
[ -f "$tsan/build.ninja" ] || meson setup "$tsan" "$KVC_ROOT" --buildtype=debugoptimized \
  -Db_sanitize=thread -Db_lundef=false -Dcuda=disabled >/dev/null
ninja -C "$tsan" >/dev/null
TSAN_OPTIONS=halt_on_error=1 CK_RUN_CASE=semantics meson test -C "$tsan" --print-errorlogs full
TSAN_OPTIONS=halt_on_error=1 meson test -C "$tsan" --print-errorlogs tracker
# kvc-conform's threads test: distinct sequences on distinct threads.
TSAN_OPTIONS=halt_on_error=1 "$tsan/conformance/kvc-conform" "$tsan/plugins/full/kvc-full.so" \
  --only semantics/threads
# The low-rank core (shared by lorc and svdllm) under the same test.
TSAN_OPTIONS=halt_on_error=1 "$tsan/conformance/kvc-conform" "$tsan/plugins/lorc/kvc-lorc.so" \
  --only semantics/threads
# FastGen's steps, profiling and eviction under the same test.
TSAN_OPTIONS=halt_on_error=1 "$tsan/conformance/kvc-conform" \
  "$tsan/plugins/fastgen/kvc-fastgen.so" --only semantics/threads
# The quantized store (full with 4-bit keys and values; kvquant's
# calibrated widths) under the same test.
TSAN_OPTIONS=halt_on_error=1 "$tsan/conformance/kvc-conform" "$tsan/plugins/full/kvc-full.so" \
  --opt k_bits=4 --opt v_bits=4 --only semantics/threads
TSAN_OPTIONS=halt_on_error=1 "$tsan/conformance/kvc-conform" \
  "$tsan/plugins/kvquant/kvc-kvquant.so" --only semantics/threads
