#!/usr/bin/env bash
# The service-level crash campaign (issue 21): per trial, kvmanager on loopback with a fresh data
# directory, clients appending in durable mode over the wire, kill -9 at a random moment after at
# least 500 acknowledged appends, a restart on the same directory, then every acknowledged append
# checked byte for byte (K, V, token ids), new appends, and `kvmanager --verify-store DIR`.
#   scripts/crash_campaign.sh --trials N [--json] [--seed S] [--min-acks 500] [--clients 4] [--keep]
#   scripts/crash_campaign.sh --trials 1 --control   the check itself: cache sequences (gone after a
#                                                    restart) must all be counted lost
# Progress goes to stderr; with --json the last stdout line is
#   {"trials": N, "acknowledged": A, "lost": L, "corrupt": C}
# Exit status: 0 when nothing was lost or corrupt and every check passed, 1 otherwise, 2 for a
# missing binary, 77 when the Python package is not built. The binaries: KVM_KVMANAGER (default
# $KVM_BUILD_DIR/kvmanager/kvmanager), the Python package from $KVM_BUILD_DIR/python (default
# build/); Debian's /usr/bin/python3 (it has numpy; KVM_PYTHON overrides).
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
build=${KVM_BUILD_DIR:-$src/build}
export KVM_KVMANAGER=${KVM_KVMANAGER:-$build/kvmanager/kvmanager}
export PYTHONPATH="$build/python${PYTHONPATH:+:$PYTHONPATH}" PYTHONDONTWRITEBYTECODE=1
export UCX_TLS=${UCX_TLS:-sm,tcp} UCX_NET_DEVICES=${UCX_NET_DEVICES:-lo}
exec "${KVM_PYTHON:-/usr/bin/python3}" "$src/scripts/crash_campaign.py" "$@"
