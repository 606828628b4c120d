#!/usr/bin/env bash
# `make test`: the suite in two shards side by side, one per core (CI has two). Each shard is its own
# pytest session: its own Prefect server, PostgreSQL cluster and store, its fleets on ports shifted by
# its own COUNTEROPS_TEST_PORT_OFFSET (tests/plugins/fleet.py), its own basetemp and cache. The shards
# split the files so that each takes about half the time; a test never depends on the other shard.
# Extra arguments go to both shards (e.g. `-k backup`, `-m slow`). With PYTEST_ONE_SHARD=1 (or
# arguments naming test files) it is a single plain pytest session instead.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTEST=.venv/bin/pytest

for arg in "$@"; do
    case "$arg" in tests/*|*.py|*::*) PYTEST_ONE_SHARD=1 ;; esac
done
if [ "${PYTEST_ONE_SHARD:-0}" = 1 ]; then
    exec "$PYTEST" "$@"
fi

# Shared system parts both shards would otherwise race to create: the fleets' logins.
.venv/bin/python -c 'from simfleet import fleet; fleet._fleet_user(); fleet._site_user(); fleet._jump_user()' || exit 1

# Shard 1: fault injection, the SSH layer, identity and audit, and a few flow tests to even the time out; shard 2: the other flows.
SHARD1=(tests/faults tests/test_upgrade_faults.py tests/test_control_api.py tests/test_fault_messages.py tests/test_ssh.py
        tests/test_fleet.py tests/test_leases.py tests/test_audit.py tests/test_operators.py tests/test_plan.py
        tests/test_inventory.py tests/test_retention.py tests/test_playbook.py tests/test_cli.py tests/test_backup.py
        tests/test_two_person.py tests/test_counter_app.py tests/test_evaluate.py tests/test_followup.py tests/test_watch.py
        tests/test_fault_report.py tests/test_jump_host.py tests/test_same_work_floor.py
        tests/test_shared_apps.py tests/test_distributed.py)
SHARD2=()
for f in tests/test_*.py; do
    case " ${SHARD1[*]} " in *" $f "*) ;; *) SHARD2+=("$f") ;; esac
done

logs=$(mktemp -d /tmp/counterops-test-logs.XXXXXX)
run_shard() {  # N OFFSET FILES...
    local n=$1 offset=$2; shift 2
    COUNTEROPS_TEST_PORT_OFFSET=$offset "$PYTEST" --basetemp="/tmp/counterops-pytest-shard$n" -o cache_dir=".pytest_cache/shard$n" \
        --durations=15 "$@" >"$logs/shard$n.log" 2>&1
}
started=$(date +%s)
run_shard 1 0 "${SHARD1[@]}" "$@" & one=$!
run_shard 2 40 "${SHARD2[@]}" "$@" & two=$!
trap 'kill $one $two 2>/dev/null; wait; exit 130' INT TERM
wait $one; rc1=$?
wait $two; rc2=$?
for n in 1 2; do
    echo "=============================== shard $n ==============================="
    cat "$logs/shard$n.log"
done
echo "=============================== summary ================================"
for n in 1 2; do echo "shard $n: $(tail -n 1 "$logs/shard$n.log")"; done
echo "wall time: $(( $(date +%s) - started )) s"
rm -rf "$logs"
[ $rc1 -eq 0 ] && [ $rc2 -eq 0 ]
