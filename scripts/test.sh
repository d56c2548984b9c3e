#!/usr/bin/env bash
# The README's test command: installs the Debian packages, builds, and runs every test with ctest.
#   scripts/test.sh                 all tests (GPU tests report "Skipped" without a device)
#   scripts/test.sh -L store        only tests with a ctest label
#   KVM_SANITIZE=address,undefined scripts/test.sh   the same under ASan+UBSan (build-asan/)
#   KVM_SANITIZE=thread scripts/test.sh              under TSan (build-tsan/)
#   KVM_SANITIZE=thread KVM_BUILD_TARGET=kvm_sanitize_tests scripts/test.sh -L sanitize
#                                    a CI sanitizer leg: only the server, client, transport and store tests
# Sanitizer builds are RelWithDebInfo without CUDA or the Python package; TSan reads the
# suppressions in tests/tsan.supp (uninstrumented third-party libraries only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
export UCX_TLS=${UCX_TLS:-sm,tcp} UCX_NET_DEVICES=${UCX_NET_DEVICES:-lo}
args=()
if [ -n "${KVM_SANITIZE:-}" ]; then
  case "$KVM_SANITIZE" in thread) d=build-tsan ;; *) d=build-asan ;; esac
  # UCX's memory hooks (libucm) crash under TSan when threads exit; the tests do not need them.
  if [ "$KVM_SANITIZE" = thread ]; then
    export UCX_MEM_EVENTS=no UCX_MEM_MALLOC_HOOKS=no UCX_MEM_MMAP_HOOK_MODE=none
    # ignore_noninstrumented_modules: memcpy/memset that uninstrumented libraries (RocksDB, and
    # libstdc++ called from it) run are not checked. RocksDB's group commit hands a writer's batch
    # to the leader through its own atomics, which TSan cannot see, and the leader's copy of it
    # (WriteBatchInternal::Append, a std::string append in libstdc++) has no RocksDB frame for a
    # suppression to name. Our code's own accesses are all still checked.
    export TSAN_OPTIONS="suppressions=$PWD/tests/tsan.supp:ignore_noninstrumented_modules=1${TSAN_OPTIONS:+:$TSAN_OPTIONS}"
  fi
  export KVM_BUILD_DIR=${KVM_BUILD_DIR:-$d} KVM_BUILD_TYPE=RelWithDebInfo
  args+=(-DKVM_SANITIZE="$KVM_SANITIZE" -DKVM_WITH_CUDA=OFF -DKVM_PYTHON=OFF)
fi
start=$(date +%s)
bash scripts/build.sh "${args[@]}"
echo "build: $(( $(date +%s) - start )) s" >&2
cd "${KVM_BUILD_DIR:-build}"
start=$(date +%s)
rc=0
ctest --output-on-failure -j"${KVM_JOBS:-$(nproc)}" "$@" || rc=$?
echo "tests: $(( $(date +%s) - start )) s" >&2
exit $rc
