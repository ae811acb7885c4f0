#!/usr/bin/env bash
# Print one SHA-256 over an interface package's sources (package.xml, CMakeLists.txt and every
# file under msg/, srv/, action/: names and contents), so that a changed definition is rebuilt.
#
# Usage: bash scripts/msg_package_hash.sh PACKAGE_DIR
set -euo pipefail
cd "$1"
parts=(package.xml CMakeLists.txt)
for folder in msg srv action; do
  [[ -d "$folder" ]] && parts+=("$folder")
done
find "${parts[@]}" -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1
