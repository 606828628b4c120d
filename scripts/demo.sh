#!/usr/bin/env bash
# The demo: bring up 20 simulated counters in 4 branches, show them, precheck
# them all through a Prefect flow on the local Prefect server, take them down.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
DIR=${DEMO_DIR:-.demo/fleet}
export COUNTEROPS_HOME=${COUNTEROPS_HOME:-$PWD/.demo/home}

trap '$BIN/counterops fleet down --dir "$DIR"' EXIT
$BIN/counterops fleet up --devices "${DEMO_DEVICES:-20}" --branches "${DEMO_BRANCHES:-4}" --dir "$DIR"
$BIN/counterops fleet status --dir "$DIR"
$BIN/counterops inventory import "$DIR/inventory.yaml" --as zhang.wei
$BIN/counterops inventory list --branch BR01
$BIN/counterops check --inventory "$DIR/inventory.yaml"
$BIN/counterops server status
echo "The Prefect UI stays up for you: see the URL above; 'make stop' stops it."
