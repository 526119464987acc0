#!/usr/bin/env bash
# Installs what is missing, builds scales (Release) and runs the demo: HTTP, Thrift and ThriftMux
# servers found through a local ZooKeeper, load with one server killed and restarted, a summary
# table and an HTML report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cmake --preset release >/dev/null
cmake --build --preset release -j "$(nproc)" --target scales_tool
exec build/release/tools/scales demo "$@"
