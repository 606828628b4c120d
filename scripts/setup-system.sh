#!/usr/bin/env bash
# Installs the system parts the demo and the tests run for real:
# OpenSSH's server (one sshd per simulated counter); with --for-tests also
# PostgreSQL (store and Prefect-on-PostgreSQL tests), Chromium (the UI check) and
# nftables (tests/faults drops a counter's traffic with an nft rule).
# Idempotent; needs root only when something is missing.
set -euo pipefail

missing=()
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
if [ "${1:-}" = "--for-tests" ]; then
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
    command -v chromium >/dev/null || missing+=(chromium)
    command -v nft >/dev/null || [ -x /usr/sbin/nft ] || missing+=(nftables)
fi

if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "error: missing system packages: ${missing[*]}; run as root: apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
    echo "installing ${missing[*]} ..."
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's package starts nothing here (no systemd); we never use its default cluster or sshd.
