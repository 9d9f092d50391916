#!/usr/bin/env bash
# Installs the Debian packages the build needs, when missing. Idempotent; needs root (or sudo).
set -euo pipefail
packages=(cmake g++ make libeigen3-dev doctest-dev libcli11-dev nlohmann-json3-dev libstb-dev libbenchmark-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  sudo_cmd=""
  [[ $(id -u) -ne 0 ]] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
