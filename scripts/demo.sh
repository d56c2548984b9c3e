#!/usr/bin/env bash
# The README's main job: installs what it needs, builds, then `kvmctl demo` — the committed real
# model decodes a prompt of held-out text (Persuasion, never trained on) with PrHS through the
# kvmanager service, which kvmctl starts on free loopback ports and stops at the end. Prints the
# text and a summary: δ by kind, retrieval overhead, bytes streamed vs dense offload, tokens/s.
# Extra arguments go to `kvmctl demo` (e.g. --target-delta 0 --budget-frac 0.25, --json).
# Data plane: the control channel (TCP); the UCX data plane is not built yet (README "Status").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
bash scripts/build.sh
exec "./${KVM_BUILD_DIR:-build}/tools/kvmctl/kvmctl" demo "$@"
