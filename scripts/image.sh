#!/usr/bin/env bash
# Builds the kvmanager container image where no image registry is reachable (only Debian's
# mirror), and checks it:
#   1. a Debian 12 base root filesystem with mmdebstrap, from the Debian mirror;
#   2. `podman --storage-driver vfs import` of it as localhost/kvmanager-base:bookworm;
#   3. `podman build --isolation chroot` of the Containerfile with BASE_IMAGE set to that base, from
#      the committed tree at HEAD (git archive: uncommitted edits do not leak into an image);
#   4. an OCI archive at build/image/kvmanager-oci.tar (`podman load -i` or `skopeo copy
#      oci-archive:...` puts it into a registry);
#   5. verification: the image's root filesystem exported and chroot-ed into (podman run does not
#      work in this sandbox), running `kvmanager --version`, `kvmanager --help`, `kvmctl --help` and
#      ldd on both as the image's user; then the image size.
# The image is CPU-only: Debian's UCX 1.13 has no CUDA transports and the image is built without
# nvcc. Not run in CI (it takes minutes and a few GB of scratch space). Needs root (mmdebstrap,
# podman with vfs storage, chroot); installs podman and mmdebstrap with apt when missing.
#   scripts/image.sh                      build, verify, clean up the podman storage
#   KVM_JOBS=1 scripts/image.sh           compile jobs inside the build (default: nproc)
#   KVM_IMAGE_KEEP=1 scripts/image.sh     keep the scratch directory (podman storage, rootfs)
#   KVM_IMAGE_WORK=/big/disk/dir          scratch directory (default: a new one under /var/tmp)
#   KVM_DEBIAN_MIRROR=http://deb.debian.org/debian   mirror for mmdebstrap
#   KVM_IMAGE_VERIFY_ONLY=1 scripts/image.sh   only load the existing OCI archive and verify it
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
[ "$(id -u)" -eq 0 ] || { echo "image: needs root (mmdebstrap, podman vfs storage, chroot)" >&2; exit 1; }
jobs=${KVM_JOBS:-$(nproc)}
version=$(sed -n 's/^project(kvmanager VERSION \([0-9.]*\).*/\1/p' CMakeLists.txt)
revision=$(git rev-parse HEAD)
tag="localhost/kvmanager:$version"
base="localhost/kvmanager-base:bookworm"
out=${KVM_IMAGE_OUT:-$root/build/image}
archive="$out/kvmanager-oci.tar"
work=${KVM_IMAGE_WORK:-$(mktemp -d /var/tmp/kvm-image.XXXXXX)}
mkdir -p "$work" "$out"
podman_() { podman --storage-driver vfs --root "$work/storage" --runroot "$work/run" "$@"; }
cleanup() {
  mountpoint -q "$work/rootfs/proc" 2> /dev/null && umount "$work/rootfs/proc"
  if [ "${KVM_IMAGE_KEEP:-0}" = 1 ]; then
    echo "image: scratch kept in $work" >&2
    return
  fi
  # vfs storage holds a full copy of every layer: remove the images, reset the store, delete it.
  podman_ rmi -a -f > /dev/null 2>&1 || true
  podman_ system reset -f > /dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
step() { echo "image: [$(( $(date +%s) - t0 )) s] $*" >&2; }
t0=$(date +%s)

need=()
command -v podman > /dev/null || need+=(podman crun fuse-overlayfs uidmap)
command -v mmdebstrap > /dev/null || need+=(mmdebstrap)
if [ ${#need[@]} -gt 0 ]; then
  step "installing ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" > /dev/null
fi

if [ "${KVM_IMAGE_VERIFY_ONLY:-0}" = 1 ]; then
  [ -f "$archive" ] || { echo "image: no $archive to verify" >&2; exit 1; }
  step "loading $archive"
  podman_ load -q -i "$archive" > /dev/null
  podman_ image exists "$tag" || podman_ tag "$(podman_ images -q | head -1)" "$tag"
  t_base=$t0 t_build=0 jobs=0
else
  step "1/5 Debian 12 base with mmdebstrap"
  mmdebstrap --quiet --variant=minbase bookworm "$work/base.tar" ${KVM_DEBIAN_MIRROR:-}
  t_base=$(date +%s)

  step "2/5 podman import of the base"
  podman_ import "$work/base.tar" "$base" > /dev/null
  rm -f "$work/base.tar"

  step "3/5 podman build --isolation chroot (HEAD $revision, $jobs jobs)"
  mkdir -p "$work/context"
  git archive HEAD | tar -x -C "$work/context"
  t_build0=$(date +%s)
  podman_ build --isolation chroot --pull=never \
    --build-arg BASE_IMAGE="$base" --build-arg JOBS="$jobs" \
    --build-arg VERSION="$version" --build-arg REVISION="$revision" \
    -t "$tag" -f "$work/context/Containerfile" "$work/context" > "$work/build.log" 2>&1 ||
    { tail -40 "$work/build.log" >&2; echo "image: podman build failed (log above)" >&2; exit 1; }
  t_build=$(( $(date +%s) - t_build0 ))
  grep '^runtime packages:' "$work/build.log" | sed 's/^/image: /' >&2 || true

  step "4/5 OCI archive"
  rm -f "$archive"
  podman_ save --format oci-archive -o "$archive" "$tag"
fi

step "5/5 verification from the exported root filesystem"
cid=$(podman_ create "$tag")
mkdir -p "$work/rootfs"
podman_ export "$cid" | tar -x -C "$work/rootfs"
podman_ rm "$cid" > /dev/null
user=$(podman_ image inspect --format '{{.Config.User}}' "$tag")
entry=$(podman_ image inspect --format '{{json .Config.Entrypoint}}' "$tag")
[ "$entry" = '["kvmanager"]' ] || { echo "image: entrypoint is $entry, not [\"kvmanager\"]" >&2; exit 1; }
[ "${user%%:*}" = 10001 ] || { echo "image: user is '$user', not 10001" >&2; exit 1; }
[ "$(stat -c %u "$work/rootfs/data")" = 10001 ] || { echo "image: /data is not owned by 10001" >&2; exit 1; }
# /proc as in a container (UCX reads the boot id when it loads; kvmanager reads meminfo).
mount -t proc proc "$work/rootfs/proc"
run() { chroot --userspec=10001:10001 "$work/rootfs" "$@"; }
if run ldd /usr/bin/kvmanager /usr/bin/kvmctl | grep 'not found'; then
  echo "image: a shared library is missing in the image" >&2; exit 1
fi
run /usr/bin/kvmanager --version | tee "$work/version"
grep -q "^kvmanager $version$" "$work/version" || { echo "image: --version does not say $version" >&2; exit 1; }
grep -q "CUDA off" "$work/version" || { echo "image: expected a CPU-only build" >&2; exit 1; }
run /usr/bin/kvmanager --help > "$work/help"
grep -q -- "--tenants-file" "$work/help" || { echo "image: kvmanager --help lacks --tenants-file" >&2; exit 1; }
echo "image: kvmanager --help: $(wc -l < "$work/help") lines" >&2
# The chart's way of starting it, validated by the image's own binary as its user.
mkdir -p "$work/rootfs/tmp/check"
printf 'listen: 0.0.0.0:7420\nadmin: 0.0.0.0:7421\ndata_dir: /data/kvmanager-data\n' > "$work/rootfs/tmp/check/kvmanager.yaml"
printf 'tenants:\n  - name: t\n    token_file: t.token\n' > "$work/rootfs/tmp/check/tenants.yaml"
printf 'image-check-token\n' > "$work/rootfs/tmp/check/t.token"
chmod -R a+rX "$work/rootfs/tmp/check"
run /usr/bin/kvmanager --check-config --config /tmp/check/kvmanager.yaml \
  --tenants-file /tmp/check/tenants.yaml | tee "$work/check" | sed 's/^/image: --check-config: /' >&2
grep -qx "config ok" "$work/check" || { echo "image: kvmanager --check-config failed" >&2; exit 1; }
run /usr/bin/kvmctl --help > "$work/kvmctl" 2>&1 && grep -q "^usage: kvmctl" "$work/kvmctl" ||
  { echo "image: kvmctl --help does not run" >&2; cat "$work/kvmctl" >&2; exit 1; }
grep -q "^  status" "$work/kvmctl" && echo "image: kvmctl has the status command (helm test)" >&2 ||
  echo "image: note: this kvmctl has no status command yet, so the chart's helm test cannot pass with it" >&2

size=$(podman_ image inspect --format '{{.Size}}' "$tag")
t_total=$(( $(date +%s) - t0 ))
echo "image: $tag built and verified (CPU-only: Debian's UCX has no CUDA transports)"
echo "image: size $(( size / 1000000 )) MB ($size bytes, uncompressed layers); OCI archive $archive $(( $(stat -c %s "$archive") / 1000000 )) MB"
if [ "${KVM_IMAGE_VERIFY_ONLY:-0}" = 1 ]; then
  echo "image: verified in ${t_total} s"
else
  echo "image: time ${t_total} s in all (base $(( t_base - t0 )) s, podman build ${t_build} s with $jobs jobs)"
fi
