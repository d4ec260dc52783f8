#!/usr/bin/env bash
# The main job: set up, build, list the plugins, show the exact `full`
# plugin, and run its demo (prefill + decode through every layer of
# SmolLM2-135M's attention shape, checked against float64 exact attention).
set -euo pipefail
here=$(dirname "$0")
bash "$here/setup.sh"
bash "$here/build.sh"
source "$here/env.sh"
export KVC_PLUGIN_PATH="$KVC_BUILD/plugins/full${KVC_PLUGIN_PATH:+:$KVC_PLUGIN_PATH}"
kvc="$KVC_BUILD/host-shim/kvc"
echo; echo '$ kvc list'; "$kvc" list
echo; echo '$ kvc info full'; "$kvc" info full
echo; echo '$ kvc demo --plugin full'; "$kvc" demo --plugin full
echo; echo '$ kvc demo --plugin full --opt dtype=fp16'; "$kvc" demo --plugin full --opt dtype=fp16
