#!/usr/bin/env bash
# Installs the host packages kiln needs, when missing. Safe to run again.
#
# What to install comes from scripts/host-tools.tsv, the one table of host tools (kiln
# reads the same file): every line but the optional and bench ones; `--bench` adds the
# bench ones (what `make bench` compares kiln with).
#
# Installing one package can remove another (Debian's qemu-system-x86 7.2 replaces a
# backported qemu-utils), so this checks every line again after each round of installs.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TABLE=$ROOT/scripts/host-tools.tsv

BENCH=0
[ "${1:-}" = --bench ] && BENCH=1

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive

# Whether one line's command is present: a program on PATH, lib:NAME via pkg-config,
# py:MODULE importable by python3, file:PATH existing.
present() {
    case "$1" in
    lib:*) command -v pkg-config >/dev/null 2>&1 && pkg-config --exists "${1#lib:}" ;;
    py:*) command -v python3 >/dev/null 2>&1 && python3 -c "import ${1#py:}" >/dev/null 2>&1 ;;
    file:*) [ -f "${1#file:}" ] ;;
    *) command -v "$1" >/dev/null 2>&1 ;;
    esac
}

# The packages of the table's lines (optional ones left out, bench ones unless --bench)
# whose command is absent.
missing() {
    local out=() cmd pkg needed _why
    while IFS=$'\t' read -r cmd pkg needed _why; do
        [[ -z $cmd || $cmd == \#* || $needed == optional ]] && continue
        [[ $needed == bench && $BENCH == 0 ]] && continue
        present "$cmd" || out+=("$pkg")
    done <"$TABLE"
    printf '%s\n' "${out[@]}" | sort -u | tr '\n' ' '
}

updated=0
for round in 1 2 3; do
    pkgs=$(missing)
    [ -z "${pkgs// /}" ] && break
    if [ "$updated" = 0 ]; then
        echo "==> apt-get update"
        $SUDO apt-get update -q
        updated=1
    fi
    echo "==> installing (round $round): $pkgs"
    for p in $pkgs; do
        $SUDO apt-get install -y -q --no-install-recommends "$p"
    done
done
pkgs=$(missing)
if [ -n "${pkgs// /}" ]; then
    echo "error: could not install: $pkgs (see scripts/host-tools.tsv for what needs them)" >&2
    exit 1
fi

# `apt-get download` (guest kernel, busybox) needs package lists.
if ! compgen -G "/var/lib/apt/lists/*_Packages*" >/dev/null; then
    echo "==> apt-get update (package lists for apt-get download)"
    $SUDO apt-get update -q
fi
command -v cargo >/dev/null || { echo "error: cargo not found: install Rust (rustup) first" >&2; exit 1; }
