#!/bin/sh
# Compiles abi/kvc.h alone, as the only include, in C99, C11 and C++17 with
# -Wall -Wextra -pedantic -Werror: the header must stand on its own.
# usage: header_alone.sh CC CXX ABI_DIR
set -eu
cc=$1 cxx=$2 abi=$3
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf '#include "kvc.h"\nint kvc_header_probe(void) { return KVC_ABI_VERSION_MAJOR; }\n' > "$tmp/probe.c"
cp "$tmp/probe.c" "$tmp/probe.cpp"
for std in c99 c11; do
  "$cc" -std=$std -Wall -Wextra -pedantic -Werror -I"$abi" -c "$tmp/probe.c" -o "$tmp/probe-$std.o"
  echo "kvc.h compiles alone as $std"
done
"$cxx" -std=c++17 -Wall -Wextra -pedantic -Werror -I"$abi" -c "$tmp/probe.cpp" -o "$tmp/probe-cxx.o"
echo "kvc.h compiles alone as c++17"
