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

bash "$repo/scripts/build_msg_package.sh" "$repo/vision_msgs_lite" "$venv"
"$py" -c "from vision_msgs.msg import LabelInfo, VisionClass" \
  || { echo "vision_msgs installed into $venv but cannot be imported" >&2; exit 1; }
echo "vision_msgs installed into $venv"
