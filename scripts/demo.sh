#!/usr/bin/env bash
# The README's main job. Installs what it needs, builds, and runs what exists of the vertical slice:
# the reference worker on the committed real model (dense KV, in-process) decoding a continuation of
# held-out text, then the kvmanager service started on the embedded default and stopped. The
# retrieval engine, the UCX data plane and `kvmctl demo` (PrHS through the service) are NOT built yet;
# this script says so instead of pretending.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
bash scripts/build.sh
KVMCTL=./${KVM_BUILD_DIR:-build}/tools/kvmctl/kvmctl
echo "== attention of the committed model (how much the oracle keeps at 1/8 of a 1024-token context)" >&2
"$KVMCTL" attn-stats --context 1024 --queries 32
echo "== greedy continuation of held-out text (Persuasion, never trained on), dense KV" >&2
"$KVMCTL" generate --tokens models/austen/heldout.u16 --offset 2000 --count 200 --max-new 120 --greedy
echo "== kvmanager on the embedded default settings (free port, temporary data dir)" >&2
data=$(mktemp -d)
./${KVM_BUILD_DIR:-build}/kvmanager/kvmanager --listen 127.0.0.1:0 --admin 127.0.0.1:0 --data-dir "$data" &
pid=$!
sleep 1
kill -TERM $pid && wait $pid
rm -rf "$data"
cat >&2 <<'MSG'
== not built yet: the retrieval engine, the UCX data plane, and `kvmctl demo` (PrHS through the
   service with δ by kind, retrieval overhead and bytes streamed). See README.md "Status".
MSG
