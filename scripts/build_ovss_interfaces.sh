#!/usr/bin/env bash
# Build ovss_interfaces/ (the node's services: SetVocabulary, Segment) and install it into a venv
# that has ROS 2 from the PyPI wheels and vision_msgs (build_vision_msgs.sh runs first).
# Does nothing when the venv imports ovss_interfaces built from these very sources (the hash of
# ovss_interfaces/ is recorded at install): a second run is a check, an edited .srv rebuilds.
#
# Usage: bash scripts/build_ovss_interfaces.sh [VENV]   (default: $OVSS_VENV or .venv)
#        FORCE=1 bash scripts/build_ovss_interfaces.sh   rebuilds in any case
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(realpath -e "${1:-${OVSS_VENV:-$repo/.venv}}")"
py="$venv/bin/python"
source_dir="$repo/ovss_interfaces"
stamp="$venv/share/ovss_interfaces/source.sha256"
check="from ovss_interfaces.srv import Segment, SetVocabulary"

wanted="$(bash "$repo/scripts/msg_package_hash.sh" "$source_dir")"
if [[ "${FORCE:-0}" != 1 && -f "$stamp" && "$(cat "$stamp")" == "$wanted" ]] \
  && "$py" -c "$check" 2>/dev/null; then
  echo "ovss_interfaces already installed in $venv from these sources: nothing to build"
  exit 0
fi

bash "$repo/scripts/build_msg_package.sh" "$source_dir" "$venv"
"$py" -c "$check" \
  || { echo "ovss_interfaces installed into $venv but cannot be imported" >&2; exit 1; }
echo "ovss_interfaces installed into $venv"
