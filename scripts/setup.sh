#!/usr/bin/env bash
# Installs the Debian packages the build needs, when missing. Idempotent; needs root (or sudo).
set -euo pipefail
packages=(cmake g++ make libeigen3-dev doctest-dev libcli11-dev nlohmann-json3-dev libstb-dev libbenchmark-dev libopenmpi-dev openmpi-bin)
# The Python package's build (scripts/python-test.sh) needs venv/ensurepip and the Python headers: Debian's python3
# lacks them unless these are installed (a pyenv or python.org build has them).
if ! python3 -c "import venv, ensurepip, sysconfig, os; assert os.path.exists(sysconfig.get_paths()['include'] + '/Python.h')" >/dev/null 2>&1; then
  packages+=(python3-venv python3-dev)
fi
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
