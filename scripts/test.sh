#!/usr/bin/env bash
# The README's test command: installs the Debian packages, builds, and runs every test with ctest.
#   scripts/test.sh                 all tests (GPU tests report "Skipped" without a device)
#   scripts/test.sh -L store        only tests with a ctest label
#   KVM_SANITIZE=address,undefined scripts/test.sh   the same under ASan+UBSan (build-asan/)
#   KVM_SANITIZE=thread scripts/test.sh              under TSan (build-tsan/)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
export UCX_TLS=${UCX_TLS:-sm,tcp} UCX_NET_DEVICES=${UCX_NET_DEVICES:-lo}
args=()
if [ -n "${KVM_SANITIZE:-}" ]; then
  case "$KVM_SANITIZE" in thread) d=build-tsan ;; *) d=build-asan ;; esac
  # UCX's memory hooks (libucm) crash under TSan when threads exit; the tests do not need them.
  [ "$KVM_SANITIZE" = thread ] && export UCX_MEM_EVENTS=no UCX_MEM_MALLOC_HOOKS=no UCX_MEM_MMAP_HOOK_MODE=none
  export KVM_BUILD_DIR=${KVM_BUILD_DIR:-$d} KVM_BUILD_TYPE=RelWithDebInfo
  args+=(-DKVM_SANITIZE="$KVM_SANITIZE")
fi
start=$(date +%s)
bash scripts/build.sh "${args[@]}"
echo "build: $(( $(date +%s) - start )) s" >&2
cd "${KVM_BUILD_DIR:-build}"
ctest --output-on-failure -j"${KVM_JOBS:-$(nproc)}" "$@"
