#!/usr/bin/env bash
# Installs what is missing, builds scales (Release) and runs the demo: three local HTTP
# servers called through one scales client, one of them stopped and restarted under load.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cmake --preset release >/dev/null
cmake --build --preset release -j "$(nproc)" --target scales_tool
exec build/release/tools/scales demo "$@"
