#!/usr/bin/env bash
# Installs the Debian 12 packages scales needs to build, test and run its demo.
# Idempotent: only packages that are missing are installed.
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config ccache
  libboost1.81-dev libboost-json1.81-dev libboost-url1.81-dev
  libthrift-dev thrift-compiler libevent-dev  # libevent: TNonblockingServer (testserver)
  libzookeeper-mt-dev zookeeper default-jre-headless
  libssl-dev
  nginx wrk
  libfmt-dev
  googletest libgtest-dev libgmock-dev
  libbenchmark-dev
  python3-thrift python3-kazoo
  procps curl
  clang libclang-rt-14-dev  # scripts/fuzz.sh: clang++ and the libFuzzer/ASan runtimes
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages already installed"
  exit 0
fi

echo "install-deps: installing ${missing[*]}"
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# --no-install-recommends keeps the JVM and nginx installs small; nginx must not
# start a system service on port 80 during tests, so we stop it if it did.
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
if command -v systemctl >/dev/null 2>&1; then
  $SUDO systemctl stop nginx 2>/dev/null || true
  $SUDO systemctl stop zookeeper 2>/dev/null || true
fi
echo "install-deps: done"
