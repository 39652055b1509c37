#!/usr/bin/env bash
# Builds etcd + kube-apiserver + kube-controller-manager v1.20.2 for the local control plane, once.
#
# Debian bookworm's `kubernetes` source package vendors its Go dependencies, so the build needs only Debian's
# package registry. Binaries are cached under $FORGE_CACHE_DIR/k8s-1.20.2/bin (default ~/.cache/forge) and the
# build is skipped when they are already there. See docs/architecture.md, "Local control plane".
set -euo pipefail

K8S_VERSION=1.20.2
CACHE_ROOT="${FORGE_CACHE_DIR:-$HOME/.cache/forge}"
PREFIX="$CACHE_ROOT/k8s-$K8S_VERSION"
BIN_DIR="$PREFIX/bin"
BUILD_DIR="$PREFIX/build"
LOG="$PREFIX/build.log"

step() { printf '[control-plane build] %s\n' "$*" >&2; }
fail() { printf '[control-plane build] FAILED at step "%s": %s\n' "$CURRENT_STEP" "$*" >&2; exit 1; }
CURRENT_STEP="start"
trap 'fail "command exited with status $? (full log: $LOG)"' ERR

have_all() {
  [ -x "$BIN_DIR/kube-apiserver" ] && [ -x "$BIN_DIR/kube-controller-manager" ] && command -v etcd >/dev/null
}

if have_all; then
  step "cached binaries found in $BIN_DIR, nothing to build"
  exit 0
fi

mkdir -p "$BIN_DIR" "$BUILD_DIR"
: >"$LOG"

free_kb=$(df -Pk "$PREFIX" | awk 'NR==2 {print $4}')
if [ "$free_kb" -lt 6000000 ]; then
  CURRENT_STEP="disk check"
  fail "less than 6 GB free under $PREFIX ($((free_kb / 1024)) MB); the build needs about 5 GB"
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

CURRENT_STEP="apt-get install (golang-go, etcd-server, rsync, jq, reflect2, dpkg-dev)"
step "$CURRENT_STEP"
if ! $SUDO apt-get update >>"$LOG" 2>&1; then
  fail "apt-get update failed: is Debian's package registry reachable? (log: $LOG)"
fi
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
  golang-go rsync jq etcd-server golang-github-modern-go-reflect2-dev dpkg-dev openssl make >>"$LOG" 2>&1 \
  || fail "apt-get install failed (log: $LOG)"

if [ ! -x "$BIN_DIR/kube-apiserver" ] || [ ! -x "$BIN_DIR/kube-controller-manager" ]; then
  CURRENT_STEP="download the kubernetes source package"
  step "$CURRENT_STEP"
  SRC_LIST=/etc/apt/sources.list.d/forge-deb-src.sources
  if ! grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/ && [ ! -f "$SRC_LIST" ]; then
    $SUDO tee "$SRC_LIST" >/dev/null <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  fi
  $SUDO apt-get update >>"$LOG" 2>&1 || fail "apt-get update (deb-src) failed (log: $LOG)"
  cd "$BUILD_DIR"
  # Debian names the tarball kubernetes_1.20.5+really1.20.2.orig.tar.gz.
  if ! ls kubernetes_*"$K8S_VERSION".orig.tar.gz >/dev/null 2>&1; then
    apt-get source --download-only kubernetes >>"$LOG" 2>&1 \
      || fail "apt-get source kubernetes failed: is Debian's package registry reachable? (log: $LOG)"
  fi
  ORIG_TARBALL=$(ls kubernetes_*"$K8S_VERSION".orig.tar.gz | head -n 1)

  CURRENT_STEP="unpack and patch the source tree"
  step "$CURRENT_STEP"
  rm -rf "kubernetes-$K8S_VERSION"
  tar -xzf "$ORIG_TARBALL"
  SRC_DIR="$BUILD_DIR/kubernetes-$K8S_VERSION"
  [ -d "$SRC_DIR/vendor" ] || fail "unpacked tree has no vendor/ folder"
  # Go >= 1.19 crashes the vendored reflect2 1.0.1 (json-iterator map iteration): use Debian's 1.0.2.
  rm -rf "$SRC_DIR/vendor/github.com/modern-go/reflect2"
  cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$SRC_DIR/vendor/github.com/modern-go/reflect2"
  mkdir -p "$SRC_DIR/.go/src/k8s.io"
  ln -sfn ../../.. "$SRC_DIR/.go/src/k8s.io/kubernetes"
  mkdir -p "$BUILD_DIR/home"

  for what in kube-apiserver kube-controller-manager; do
    CURRENT_STEP="go build $what (several minutes on 2 cores)"
    step "$CURRENT_STEP"
    cd "$SRC_DIR/.go/src/k8s.io/kubernetes"
    started=$(date +%s)
    (
      GOPATH="$SRC_DIR/.go" GO111MODULE=off CGO_ENABLED=0 HOME="$BUILD_DIR/home" GOFLAGS= \
        make WHAT="cmd/$what" >>"$LOG" 2>&1
    ) &
    build_pid=$!
    while kill -0 "$build_pid" 2>/dev/null; do
      sleep 30
      kill -0 "$build_pid" 2>/dev/null && step "  ... $what still building ($(($(date +%s) - started)) s)"
    done
    wait "$build_pid" || fail "make WHAT=cmd/$what failed (log: $LOG)"
    cp "$SRC_DIR/_output/local/bin/linux/amd64/$what" "$BIN_DIR/$what"
    step "  built $what in $(($(date +%s) - started)) s"
  done

  CURRENT_STEP="clean up the build tree"
  rm -rf "$SRC_DIR"
fi

have_all || { CURRENT_STEP="final check"; fail "binaries missing after the build"; }
step "done: $BIN_DIR"
