#!/usr/bin/env bash
# Build one ROS 2 interface package (ament_cmake + rosidl: .msg/.srv definitions) and install it
# into a venv that has ROS 2 from the PyPI wheels, then record a hash of its sources in
# <venv>/share/<package>/source.sha256 (build_ovss_interfaces.sh compares it to skip a rebuild).
# Called by build_vision_msgs.sh and build_ovss_interfaces.sh, which decide whether to build.
#
# Usage: bash scripts/build_msg_package.sh PACKAGE_DIR VENV
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source_dir="$(realpath -e "$1")"
venv="$(realpath -e "$2")"
py="$venv/bin/python"
package="$(sed -n 's:.*<name>\(.*\)</name>.*:\1:p' "$source_dir/package.xml" | head -1)"

# Build-only wheels (rosidl generators, ament_cmake); a no-op when already installed.
# grep drops pip's per-package warnings about this machine's file:// indexes (see setup.sh).
"$py" -m pip install -q --progress-bar off -r "$repo/requirements-build.txt" 2>&1 \
  | { grep -v "^WARNING: Location 'file:" || true; }

build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT

# The ament/rosidl CMake code finds packages via the ament index and CMake prefix of the venv
# and runs its generators with the venv's python (first on PATH).
export VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH"
export AMENT_PREFIX_PATH="$venv" CMAKE_PREFIX_PATH="$venv"
gen=()
command -v ninja >/dev/null && gen=(-G Ninja)

echo "building $package into $venv ..."
cmake -S "$source_dir" -B "$build" "${gen[@]}" \
  -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX="$venv" \
  -DPython3_EXECUTABLE="$py" -DBUILD_TESTING=OFF >"$build/configure.log" 2>&1 \
  || { cat "$build/configure.log"; exit 1; }
cmake --build "$build" -j "$(nproc)" >"$build/build.log" 2>&1 \
  || { tail -50 "$build/build.log"; exit 1; }
cmake --install "$build" >/dev/null
bash "$repo/scripts/msg_package_hash.sh" "$source_dir" >"$venv/share/$package/source.sha256"
