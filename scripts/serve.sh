#!/usr/bin/env bash
# Serve the deployments locally, as head-office IT would on its own server:
# a Prefect server (the embedded default), the process work pool, every
# deployment of deployments/prefect.yaml, and a worker in the foreground
# (Ctrl-C stops it). Uses the demo fleet (.demo/fleet), brought up when missing or
# down (`make demo` takes its fleet down at the end).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$PWD/.venv/bin
DIR=${DEMO_DIR:-$PWD/.demo/fleet}
export COUNTEROPS_HOME=${COUNTEROPS_HOME:-$PWD/.demo/home}
export COUNTEROPS_CHECKOUT=$PWD
export COUNTEROPS_INVENTORY=${COUNTEROPS_INVENTORY:-$DIR/inventory.yaml}
export COUNTEROPS_WORK_POOL=${COUNTEROPS_WORK_POOL:-counterops}
# Scheduled runs act as the service identity: the demo fleet's counterops-scheduler key (its role: service).
export COUNTEROPS_SERVICE_KEY=${COUNTEROPS_SERVICE_KEY:-$DIR/keys/counterops-scheduler}

if ! $BIN/counterops fleet status --dir "$DIR" >/dev/null 2>&1; then
    $BIN/counterops fleet up --devices "${DEMO_DEVICES:-12}" --branches 3 --outlets 2 --dir "$DIR"
fi
# The simulated bank's mailboxes, when the inventory's contacts point at them (`make demo` adds them): without
# them every notice would be undelivered and an upgrade would stop at its advance notice. `make stop` stops them.
INBOX_PORT=${DEMO_INBOX_PORT:-25990}
if grep -q "json://127.0.0.1:$INBOX_PORT/" "$COUNTEROPS_INVENTORY" && ! (exec 3<>/dev/tcp/127.0.0.1/$INBOX_PORT) 2>/dev/null; then
    nohup $BIN/python -m simfleet.inbox --dir "$DIR/inbox" --port "$INBOX_PORT" >>"$DIR/inbox.log" 2>&1 &
    echo $! > "$DIR/inbox.pid"
    echo "mailboxes (head office, branches) at http://127.0.0.1:$INBOX_PORT/, kept in $DIR/inbox"
fi
# The operators (and the service identity) in the store, once: `operators init` refuses a store that has them.
if ! $BIN/counterops operators list --json | grep -q '"name"'; then
    $BIN/counterops operators init --from "$DIR/operators.yaml"
fi
# The fleet as head-office IT declares it (scheduled runs act as the service identity, which may not change it).
$BIN/counterops inventory import "$COUNTEROPS_INVENTORY" --as zhang.wei --key "$DIR/keys/zhang.wei"
$BIN/counterops server start   # with the automation that marks flow runs Crashed when their heartbeat stops
# The worker (and the flow runs it starts, which inherit its environment) sends the server's auth string.
eval "$($BIN/python - <<'PY'
from counterops import localserver
print(f"export PREFECT_API_URL={localserver.status().url}")
print(f"export PREFECT_API_AUTH_STRING=\"$(cat {localserver.auth_file()})\"")
PY
)"
$BIN/prefect work-pool create "$COUNTEROPS_WORK_POOL" --type process --overwrite >/dev/null
$BIN/prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml
# Now that crash-alert/crash-alert exists: the automation that runs it for every crashed flow run.
$BIN/counterops server setup
echo "Worker starting on pool $COUNTEROPS_WORK_POOL; trigger a drill with:"
echo "  PREFECT_API_URL=$PREFECT_API_URL PREFECT_API_AUTH_STRING=\"\$(cat $COUNTEROPS_HOME/prefect/auth-string)\" $BIN/prefect deployment run 'backup-restore-drill/weekly-drill' --watch"
echo "The UI ($(dirname "$PREFECT_API_URL")) asks for the same auth string (user:password) on its login page."
exec $BIN/prefect worker start --pool "$COUNTEROPS_WORK_POOL"
