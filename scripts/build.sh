#!/usr/bin/env bash
# Configures and builds kvmanager into ${KVM_BUILD_DIR:-build} (Release; CUDA when nvcc is found).
# Extra CMake arguments are passed through, e.g. scripts/build.sh -DKVM_SANITIZE=address,undefined
# KVM_BUILD_TARGET=name builds only that target (the sanitizer legs: kvm_sanitize_tests).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${KVM_BUILD_DIR:-build}
JOBS=${KVM_JOBS:-$(nproc)}
if [ ! -f "$BUILD/build.ninja" ] || [ $# -gt 0 ]; then
  cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=${KVM_BUILD_TYPE:-Release} "$@" >&2
fi
cmake --build "$BUILD" -j"$JOBS" ${KVM_BUILD_TARGET:+--target "$KVM_BUILD_TARGET"} >&2
