#!/usr/bin/env bash
# Build the vision_msgs subset in vision_msgs_lite/ (LabelInfo, VisionClass) and install it
# into a venv that has ROS 2 from the PyPI wheels, where no vision_msgs wheel exists.
# Does nothing when the venv can already import vision_msgs.msg.LabelInfo (e.g. a robot
# with ROS from apt, or a second run). See README.md, "Set-up and tests".
#
# Usage: bash scripts/build_vision_msgs.sh [VENV]   (default: $OVSS_VENV or .venv)
#        FORCE=1 bash scripts/build_vision_msgs.sh   rebuilds even if importable
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(realpath -e "${1:-${OVSS_VENV:-$repo/.venv}}")"
py="$venv/bin/python"

if [[ "${FORCE:-0}" != 1 ]] && "$py" -c "from vision_msgs.msg import LabelInfo" 2>/dev/null; then
  echo "vision_msgs already importable in $venv: nothing to build"
  exit 0
fi

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

echo "building vision_msgs (LabelInfo, VisionClass) into $venv ..."
cmake -S "$repo/vision_msgs_lite" -B "$build" "${gen[@]}" \
  -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX="$venv" \
  -DPython3_EXECUTABLE="$py" -DBUILD_TESTING=OFF >"$build/configure.log" \
  || { cat "$build/configure.log"; exit 1; }
cmake --build "$build" -j "$(nproc)" >"$build/build.log" || { tail -50 "$build/build.log"; exit 1; }
cmake --install "$build" >/dev/null

"$py" -c "from vision_msgs.msg import LabelInfo, VisionClass" \
  || { echo "vision_msgs installed into $venv but cannot be imported" >&2; exit 1; }
echo "vision_msgs installed into $venv"
