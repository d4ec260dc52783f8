#!/bin/sh
# A plugin's dynamic symbol table must hold exactly one defined symbol of
# its own: kvc_plugin_entry (KVC-REQ-2). usage: only_entry_exported.sh NM PLUGIN.so...
set -eu
nm=$1; shift
for so in "$@"; do
  defined=$("$nm" -D --defined-only "$so" | awk '{print $3}' | grep -v '^_' | sort -u)
  if [ "$defined" != "kvc_plugin_entry" ]; then
    echo "FAIL: $so exports: $(echo $defined)"
    exit 1
  fi
  echo "$so exports only kvc_plugin_entry"
done
