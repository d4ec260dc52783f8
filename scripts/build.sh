#!/usr/bin/env bash
# Configures (once) and builds kvc in ./build (or $KVC_BUILD), release mode.
set -euo pipefail
source "$(dirname "$0")/env.sh"
if [ ! -f "$KVC_BUILD/build.ninja" ]; then
  meson setup "$KVC_BUILD" "$KVC_ROOT" --buildtype=release -Dcuda=auto "$@"
fi
ninja -C "$KVC_BUILD"
