#!/usr/bin/env bash
# Debian packages the tests and the demo need at run time: etcd (control plane), openssl (service-account keys),
# g++ (DeepSpeed JIT-compiles a CPU op), prometheus (metrics tests). Installs only what is missing.
set -euo pipefail

need=()
command -v etcd >/dev/null || need+=(etcd-server)
command -v openssl >/dev/null || need+=(openssl)
command -v g++ >/dev/null || need+=(g++)
command -v prometheus >/dev/null || need+=(prometheus)
[ ${#need[@]} -eq 0 ] && exit 0

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "[system packages] installing: ${need[*]}" >&2
$SUDO apt-get update -qq || { echo "[system packages] FAILED: apt-get update (is Debian's registry reachable?)" >&2; exit 1; }
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
  || { echo "[system packages] FAILED: apt-get install ${need[*]}" >&2; exit 1; }
