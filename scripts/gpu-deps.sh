#!/usr/bin/env bash
# Copies the header-only libraries the GPU engine's build needs (Eigen, nlohmann/json, CLI11, doctest, stb) from
# this machine's Debian packages into .deps/ (ignored by git), with minimal CMake package files, so that a device
# machine without those packages can build the engine suites and specdiff-gpu-bench in scripts/gpu-check.sh. Run it
# here, then hand the device tool carry [".deps"] (about 14 MiB). scripts/gpu-check.sh puts .deps on
# CMAKE_PREFIX_PATH when it exists; the device machine's own packages are not needed then.
#
# --cmake also puts PyPI's `cmake` wheel (CMake 3.31, a static build for manylinux2014 x86_64: about 28 MiB, still
# compressed) into .deps/cmake-wheel, fetched with pip; scripts/gpu-check.sh's preflight unpacks it into the build
# folder and uses it when the device machine has no CMake >= 3.25. .deps is then about 42 MiB of the device tool's
# 64 MiB carry limit.
set -euo pipefail
with_cmake=0
for arg in "$@"; do
  case $arg in
    --cmake) with_cmake=1 ;;
    *) echo "gpu-deps: unknown argument '$arg' (--cmake: also a CMake wheel for the device machine)" >&2; exit 1 ;;
  esac
done
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
deps=$root/.deps
rm -rf "$deps"
mkdir -p "$deps/include" "$deps/lib/cmake"
for dir in eigen3 nlohmann CLI doctest stb; do
  [[ -d /usr/include/$dir ]] || { echo "gpu-deps: /usr/include/$dir is missing (scripts/setup.sh installs it)" >&2; exit 1; }
  cp -r "/usr/include/$dir" "$deps/include/"
done
mkdir -p "$deps/doctest" && cp /usr/include/doctest/doctest.h "$deps/doctest/"  # the older layout tests/cuda also accepts

# package NAME VERSION TARGET INCLUDE: a config file that defines TARGET over .deps/include/INCLUDE, and its version file.
package() {
  local name=$1 version=$2 target=$3 include=$4
  mkdir -p "$deps/lib/cmake/$name"
  cat >"$deps/lib/cmake/$name/${name}Config.cmake" <<CMAKE
# Written by scripts/gpu-deps.sh: headers copied from this machine's package (version $version).
if(NOT TARGET $target)
  add_library($target INTERFACE IMPORTED)
  set_target_properties($target PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "\${CMAKE_CURRENT_LIST_DIR}/../../../include/$include")
endif()
set(${name}_VERSION $version)
CMAKE
  cat >"$deps/lib/cmake/$name/${name}ConfigVersion.cmake" <<CMAKE
set(PACKAGE_VERSION $version)
if(PACKAGE_FIND_VERSION VERSION_GREATER PACKAGE_VERSION)
  set(PACKAGE_VERSION_COMPATIBLE FALSE)
else()
  set(PACKAGE_VERSION_COMPATIBLE TRUE)
  if(PACKAGE_FIND_VERSION VERSION_EQUAL PACKAGE_VERSION)
    set(PACKAGE_VERSION_EXACT TRUE)
  endif()
endif()
CMAKE
}
# The Debian package's upstream version (3.4.0-4 -> 3.4.0).
version_of() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null | sed 's/[-+~].*//'; }
package Eigen3 "$(version_of libeigen3-dev)" Eigen3::Eigen eigen3
package nlohmann_json "$(version_of nlohmann-json3-dev)" nlohmann_json::nlohmann_json ""
package CLI11 "$(version_of libcli11-dev)" CLI11::CLI11 ""
package doctest "$(version_of doctest-dev)" doctest::doctest ""
if ((with_cmake)); then
  python3 -m pip download "cmake==3.31.6" --no-deps --only-binary=:all: --platform manylinux2014_x86_64 --python-version 3.8 \
    -d "$deps/cmake-wheel" >/dev/null
  echo "gpu-deps: $(ls "$deps"/cmake-wheel/*.whl)"
fi
echo "gpu-deps: $(du -sh "$deps" | cut -f1) in $deps"
