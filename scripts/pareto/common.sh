# shellcheck shell=bash
# Sourced by scripts/pareto.sh and scripts/pareto/*.sh: what the Pareto runs
# share (the CSV header, where things live) and the Debian-package check.

# The one CSV header every part writes to or appends under.
PARETO_HEADER=system,config,k_type,v_type,kv_bytes_per_token,of_fp16,ppl,ppl_err,vs_base_pct,kld_mean,kld_err,kld_p99,same_top_pct

KVC_CACHE=${KVC_CACHE:-$HOME/.cache/kvc}
KVC_MODEL=${KVC_MODEL:-$KVC_CACHE/SmolLM2-135M-Instruct.Q4_1.gguf}
PARETO_TEXT=${PARETO_TEXT:-/usr/share/common-licenses/GPL-3}
export KVC_CACHE KVC_MODEL PARETO_TEXT

# pareto_need_debs WHO PACKAGE...: installs the Debian packages not yet
# installed (as scripts/setup.sh does: apt is only asked when one is missing).
pareto_need_debs() {
  local who=$1 p missing=()
  shift
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  if [ "$(id -u)" != 0 ]; then
    echo "$who: missing Debian packages: ${missing[*]}; install them as root" >&2
    return 1
  fi
  echo "$who: installing ${missing[*]}" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# pareto_csv_init FILE: writes the header when FILE is absent or empty;
# refuses a FILE whose first line is another header.
pareto_csv_init() {
  if [ ! -s "$1" ]; then
    mkdir -p "$(dirname "$1")"
    echo "$PARETO_HEADER" > "$1"
  elif [ "$(head -n1 "$1")" != "$PARETO_HEADER" ]; then
    echo "pareto: $1 has another header than $PARETO_HEADER; remove it first" >&2
    return 1
  fi
}

# pareto_grid_read FILE: the configuration lines of a grid file (format at
# the top of scripts/pareto/grid.txt), one per output line as
# "label<TAB>plugin<TAB>opt=v opt=v": comments and blank lines dropped,
# spaces around fields trimmed. A malformed line is an error naming it.
pareto_grid_read() {
  local grid=$1 line label plugin opts extra
  while IFS= read -r line || [ -n "$line" ]; do
    line=${line%$'\r'}
    [[ $line =~ ^[[:space:]]*(#|$) ]] && continue
    IFS='|' read -r label plugin opts extra <<< "$line"
    label=$(echo "$label" | sed 's/^ *//; s/ *$//')
    plugin=$(echo "$plugin" | sed 's/^ *//; s/ *$//')
    if [ -z "$label" ] || [ -z "$plugin" ] || [ -n "${extra:-}" ] || [[ $label == *,* ]]; then
      echo "pareto: $grid: bad line (label|plugin|opt=v ..., no commas in the label): $line" >&2
      return 1
    fi
    printf '%s\t%s\t%s\n' "$label" "$plugin" "${opts:-}"
  done < "$grid"
}
