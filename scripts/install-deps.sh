#!/usr/bin/env bash
# Installs the host packages kiln needs, when missing. Safe to run again.
#
# Installing one package can remove another (Debian's qemu-system-x86 7.2 replaces a
# backported qemu-utils), so this checks the commands again after each install.
set -euo pipefail

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive

# command → package that provides it
declare -A NEEDS=(
  [qemu-system-x86_64]=qemu-system-x86
  [qemu-img]=qemu-utils
  [mke2fs]=e2fsprogs
  [dpkg-deb]=dpkg
  [apt-get]=apt
  [curl]=curl
  [pkg-config]=pkg-config
)

missing() {
  local out=()
  for cmd in "${!NEEDS[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || out+=("${NEEDS[$cmd]}")
  done
  echo "${out[@]:-}"
}

updated=0
for round in 1 2 3; do
  pkgs=$(missing)
  [ -z "$pkgs" ] && break
  if [ "$updated" = 0 ]; then
    echo "==> apt-get update"
    $SUDO apt-get update -q
    updated=1
  fi
  echo "==> installing: $pkgs"
  for p in $pkgs; do
    $SUDO apt-get install -y -q --no-install-recommends "$p"
  done
done
pkgs=$(missing)
if [ -n "$pkgs" ]; then
  echo "error: could not install: $pkgs" >&2
  exit 1
fi

# `apt-get download` (guest kernel, busybox) needs package lists.
if ! compgen -G "/var/lib/apt/lists/*_Packages*" >/dev/null; then
  echo "==> apt-get update (package lists for apt-get download)"
  $SUDO apt-get update -q
fi
# kilnd's endpoint tokens (josekit) link OpenSSL: building needs its headers.
if ! pkg-config --exists openssl 2>/dev/null; then
  echo "==> installing libssl-dev"
  $SUDO apt-get install -y -q --no-install-recommends libssl-dev
fi
# The tests drive kiln with the AWS CLI and boto3 from a virtualenv.
if ! python3 -m venv --help >/dev/null 2>&1; then
  echo "==> installing python3-venv"
  $SUDO apt-get install -y -q --no-install-recommends python3 python3-venv
fi
command -v cargo >/dev/null || { echo "error: cargo not found: install Rust (rustup) first" >&2; exit 1; }
