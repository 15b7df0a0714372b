#!/usr/bin/env bash
# Install the Debian packages listed in deploy/packages.txt that are missing.
# Idempotent; when nothing is missing it only runs one dpkg-query (well under
# a second). Needs root (or sudo) only when something must be installed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
mapfile -t want < <(grep -v -E '^\s*(#|$)' "$here/packages.txt" | awk '{print $1}')
missing=()
for p in "${want[@]}"; do
    s=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [ "$s" = "install ok installed" ] || missing+=("$p")
done
# Node.js runs the frontend build and the official-SDK tests; Debian's own
# packages serve when the machine has none.
command -v node >/dev/null 2>&1 || missing+=(nodejs npm)
[ ${#missing[@]} -eq 0 ] && exit 0
echo "deps: installing ${missing[*]}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q >/dev/null
$sudo apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
echo "deps: done"
