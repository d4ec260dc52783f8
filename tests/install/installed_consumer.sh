#!/bin/sh
# Installs the build into a scratch DESTDIR, then builds examples/host_example.c
# using only the installed kvc.h and kvc.pc, and runs it on the installed
# kvc-full.so: prefill plus decode through a plugin found via pkg-config.
# usage: installed_consumer.sh BUILD_DIR SOURCE_DIR CC
set -eu
build=$1 src=$2 cc=$3
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
DESTDIR="$tmp/root" meson install -C "$build" --no-rebuild --quiet >/dev/null
pcdir=$(dirname "$(find "$tmp/root" -name kvc.pc | head -n 1)")
[ -f "$pcdir/kvc.pc" ] || { echo "FAIL: kvc.pc not installed"; exit 1; }
export PKG_CONFIG_PATH="$pcdir"
# Relocate: the .pc says prefix=/usr/local (or the configured prefix).
prefix=$(pkg-config --variable=prefix kvc)
relocate="--define-variable=prefix=$tmp/root$prefix"
cflags=$(pkg-config $relocate --cflags kvc)
plugindir=$(pkg-config $relocate --variable=plugindir kvc)
[ -f "$plugindir/kvc-full.so" ] || { echo "FAIL: kvc-full.so not in plugindir $plugindir"; exit 1; }
header=$(find "$tmp/root" -name kvc.h | head -n 1)
case "$cflags" in *"$(dirname "$header")"*) ;; *) echo "FAIL: cflags '$cflags' miss $header"; exit 1;; esac
# The example sees the installed header only: no -I into the source tree.
"$cc" -std=c11 -Wall -Wextra -Werror $cflags "$src/examples/host_example.c" -ldl -lm -o "$tmp/host_example"
"$tmp/host_example" "$plugindir/kvc-full.so"
for f in kvc kvc-host.pc kvch.h; do
  find "$tmp/root" -name "$f" | grep -q . || { echo "FAIL: $f not installed"; exit 1; }
done
echo "installed kvc.h + kvc.pc build a working host"
