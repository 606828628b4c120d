#!/usr/bin/env bash
# The demo: the main job on the embedded default.
#   1. bring up 12 simulated counters in 3 branches (real sshd + counter app each), a standby
#      counter, and a backup site (its own sshd: SFTP only, chrooted, pinned host key)
#   2. set up the operators (fleet up writes operators.yaml and each one's SSH key), import the
#      inventory signed by zhang.wei, check the plan (scope, waves, impact)
#   3. two people answer for the plan: zhang.wei signs it, li.na approves it (each with their own key);
#      head office publishes it: each branch gets its own advance notice in its mailbox (what changes,
#      when, which of its counters, how long out of service) and acknowledges it; the upgrade is refused
#      until every branch has acknowledged and the plan's not_before has come
#   4. run the upgrade plan to 1.2.0: canary, then a pilot wave that needs a second person's
#      signed approval (li.na's, since zhang.wei initiated it), then the rest
#   5. show the records: each counter's pre-upgrade backup, encrypted (age) at both sites (neither
#      copy is a readable tar) and verified against its signed manifest; where to open the run in the UI
#   6. a fault reported by a person: assigned, diagnosed, repaired, retested on the counter, closed; a
#      corrective action against its root cause; the monthly fault report (the bank's and each branch's)
#   7. the upgrade's follow-up evaluation from the counters' business figures before and after
#   8. a standby drill: each counter's newest off-site backup restored onto the standby counter
#      (SC-STANDBY-01, outside every plan), started and tested there; RTO and RPO per counter, p50/p90/max
# The fleet is taken down at the end; the Prefect server stays up for the UI (`make stop`).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$PWD/.venv/bin
DIR=${DEMO_DIR:-$PWD/.demo/fleet}
export COUNTEROPS_HOME=${COUNTEROPS_HOME:-$PWD/.demo/home}
export COUNTEROPS_INVENTORY=$DIR/inventory.yaml
started=$(date +%s)
[ -t 1 ] || export COLUMNS=${COLUMNS:-160}   # tables readable in a log too

INBOX_PORT=${DEMO_INBOX_PORT:-25990}
inbox=
trap '[ -n "$inbox" ] && kill $inbox 2>/dev/null; $BIN/counterops fleet down --dir "$DIR" >/dev/null' EXIT
$BIN/counterops fleet down --dir "$DIR" --remove >/dev/null
# A new fleet each time: start its records afresh too (the Prefect server keeps earlier runs for the UI).
rm -rf "$COUNTEROPS_HOME"/counterops.db* "$COUNTEROPS_HOME"/backups "$COUNTEROPS_HOME"/audit-anchors.log
# --traffic: each counter serves simulated customers (60 calls a minute) whose business figures the
# follow-up evaluation compares before and after the upgrade.
$BIN/counterops fleet up --devices "${DEMO_DEVICES:-12}" --branches 3 --outlets 2 --standby 1 --traffic 60 --dir "$DIR"
KEYS=$DIR/keys
# Who is told: head office and each branch have a mailbox (the simulated bank's, an HTTP endpoint that
# apprise's json:// posts to); the inventory's contacts: section points at them.
rm -rf "$DIR/inbox"
$BIN/python -m simfleet.inbox --dir "$DIR/inbox" --port "$INBOX_PORT" & inbox=$!
$BIN/python -m simfleet.inbox --dir "$DIR/inbox" --port "$INBOX_PORT" --contacts "$COUNTEROPS_INVENTORY"
sed -n '/^contacts:/,$p' "$COUNTEROPS_INVENTORY"
$BIN/counterops operators init --from "$DIR/operators.yaml"
$BIN/counterops inventory import "$COUNTEROPS_INVENTORY" --as zhang.wei --key "$KEYS/zhang.wei"

PLAN=$DIR/plan-1.2.0.yaml
export COUNTEROPS_MIN_LEAD_TIME_H=0
NOT_BEFORE=$(TZ=Asia/Shanghai date -d "+${DEMO_NOTICE_S:-45} seconds" +%Y-%m-%dT%H:%M:%S%:z)
cat > "$PLAN" <<YAML
name: demo-smartcounter-1.2.0
target_version: "1.2.0"
package: packages/smartcounter-1.2.0.tar.gz     # sha256 from packages/SHA256SUMS
waves:
  - {name: canary, size: 1, max_failures: 0}
  - {name: pilot, size: "25%", max_failure_ratio: 0.1, approval: true, soak_seconds: 5}
  - {name: rest, size: "100%", max_failure_ratio: 0.05}
parallelism: 4
max_unavailable_per_outlet: 1
maintenance_window: always
initiator: zhang.wei
# Advance notice: not before NOT_BEFORE (Asia/Shanghai), told to each branch with these notes, and
# every branch must acknowledge. The bank's minimum lead time is 24 h; the demo sets it to 0.
not_before: "$NOT_BEFORE"
require_ack: true
release_notes: >-
  Card opening asks for the customer's phone number once instead of twice; transfers show the
  payee's bank name before confirmation; the data schema gains a column (migration, no data rewritten).
YAML
$BIN/counterops plan check "$PLAN"
# Two people: the initiator signs the plan, an approver approves it (both bound to the plan's digest,
# the package's sha256 in it: change a byte of either and neither counts).
$BIN/counterops plan sign "$PLAN" --as zhang.wei --key "$KEYS/zhang.wei"
echo "# zhang.wei approving his own plan by typing --as li.na: refused, his key is not hers"
$BIN/counterops plan approve "$PLAN" --as li.na --key "$KEYS/zhang.wei" || true
$BIN/counterops plan approve "$PLAN" --as li.na --key "$KEYS/li.na"
$BIN/counterops plan status "$PLAN"
# Advance notice: head office publishes the plan, each branch receives its own notice in its mailbox.
$BIN/counterops plan publish "$PLAN" --as zhang.wei --key "$KEYS/zhang.wei"
echo "# What branch BR01 received:"
$BIN/python -c 'import json,sys; n=json.load(open(sys.argv[1])); print(n["title"]); print(n["message"])' "$DIR/inbox/BR01/001.json"
$BIN/counterops plan ack "$PLAN" --branch BR01 --as wang.fang --key "$KEYS/wang.fang"
$BIN/counterops plan ack "$PLAN" --branch BR02 --as liu.yang --key "$KEYS/liu.yang"
echo "# Starting before BR03 has acknowledged and before not_before: refused, nothing touched"
$BIN/counterops upgrade "$PLAN" --as zhang.wei --key "$KEYS/zhang.wei" || true
$BIN/counterops plan ack "$PLAN" --branch BR03 --as zhao.lei --key "$KEYS/zhao.lei"
$BIN/counterops plan status "$PLAN"
wait_s=$(( $(date -d "$NOT_BEFORE" +%s) - $(date +%s) ))
if [ "$wait_s" -gt 0 ]; then echo "# waiting ${wait_s} s for not_before ($NOT_BEFORE)"; sleep "$wait_s"; fi

# li.na approves the pilot wave as soon as the run waits for it, with a statement signed with her key
# and bound to this run, this plan and this wave (from the Prefect UI: paste the line that
# `counterops approve RUN --as li.na --print-statement` prints into the resume form).
(
    for _ in $(seq 1 240); do
        if $BIN/counterops approve demo-smartcounter-1.2.0 --as li.na --key "$KEYS/li.na" --comment "canary healthy" 2>/dev/null; then exit 0; fi
        sleep 1
    done
) &
approver=$!
$BIN/counterops upgrade "$PLAN" --as zhang.wei --key "$KEYS/zhang.wei"
wait $approver || true

echo "# What each mailbox received for this upgrade (count, size, titles):"
$BIN/python -m simfleet.inbox --dir "$DIR/inbox" --summary
$BIN/counterops backups list --limit 5
# Each backup is at both sites, encrypted: neither copy is a readable tar (only the age identity opens them).
$BIN/python - "$COUNTEROPS_HOME" "$DIR" <<'PY'
import json, subprocess, sys, tarfile
from pathlib import Path
home, fleet = sys.argv[1], Path(sys.argv[2])
b = json.loads(subprocess.run([sys.executable, "-m", "counterops.cli", "backups", "list", "--json", "--limit", "1"],
                              capture_output=True, text=True, check=True).stdout)[0]
local = Path(b["path"])
site = fleet / "backup-site" / "backups" / b["device_id"] / local.name
for where, path in (("local", local), ("backup site", site)):
    head = path.read_bytes()[:21]
    print(f"backup {b['id']} ({b['device_id']}) {where}: {path} ({path.stat().st_mode & 0o777:o}), "
          f"a readable tar: {tarfile.is_tarfile(path)}, starts with {head!r}")
PY
$BIN/counterops backups verify "$($BIN/counterops backups list --json --limit 1 | $BIN/python -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')" --decrypt
$BIN/counterops fleet status --dir "$DIR"
$BIN/counterops server status
# Who did what, and proof that nobody changed it since: the audit trail is a hash chain, anchored outside the database.
$BIN/counterops audit list --limit 12
$BIN/counterops audit verify
# A fault reported by a person (六(二)): branch IT of BR01 opens it, head office assigns it, it is
# diagnosed and repaired, retested on the counter (functional and business tests) and only then closed.
OPENED=$($BIN/counterops faults open --device SC-BR01-O01-01 --symptom "card reader rejects every card" --severity urgent \
         --as wang.fang --key "$KEYS/wang.fang")
echo "$OPENED"   # (not tee /dev/stderr: with the output in a file, that would truncate it)
FAULT=$(echo "$OPENED" | sed -n 's/^fault #\([0-9]*\) opened.*/\1/p')
$BIN/counterops faults assign "$FAULT" --to wang.fang --as zhang.wei --key "$KEYS/zhang.wei"
$BIN/counterops faults diagnose "$FAULT" --cause hardware --text "reader head worn" --as wang.fang --key "$KEYS/wang.fang"
$BIN/counterops faults repair "$FAULT" --method "replaced the card reader" --as wang.fang --key "$KEYS/wang.fang"
$BIN/counterops faults retest "$FAULT" --as wang.fang --key "$KEYS/wang.fang"
$BIN/counterops faults close "$FAULT" --result "reader replaced, cards accepted again" --as wang.fang --key "$KEYS/wang.fang"
# The root cause, beyond this repair: a corrective action with an owner and a due date (六(二)3); then the
# monthly fault report, now: by cause, recurring, actions and their status, MTTR per severity — the bank's
# to head office, each branch's own to that branch.
$BIN/counterops faults action "$FAULT" --text "check the card readers of this model batch at every BR01 outlet" \
    --owner wang.fang --due "$(date -u -d '+14 days' +%F)" --as zhang.wei --key "$KEYS/zhang.wei"
$BIN/counterops faults show "$FAULT"
$BIN/counterops faults list --limit 5
$BIN/counterops faults report --days 30 --as zhang.wei --key "$KEYS/zhang.wei"
# The upgrade's evaluation days later (六(三)3), here over its first 20 s: each counter's real business
# figures (transactions by type, success rate, handling time, errors, restarts, satisfaction) after the
# upgrade against the same length before it, per counter, outlet, branch and bank; the verdict to head office.
# (With `make serve`'s worker the upgrade schedules these itself at +1 day and +7 days.)
$BIN/counterops evaluate followup demo-smartcounter-1.2.0 --period 20s --as zhang.wei --key "$KEYS/zhang.wei"
# The real RTO: every counter's newest verified backup (the pre-upgrade one, taken on 1.0.0 like the
# standby, which no plan upgrades) restored from its off-site copy onto the standby, one at a time,
# app started, functional and business tests passed there; then the standby gets its own data back.
$BIN/counterops drill --standby SC-STANDBY-01 --rto-objective 600 --rpo-objective 93600 --as zhang.wei --key "$KEYS/zhang.wei"
echo "Demo finished in $(( $(date +%s) - started )) s. Open the UI URL above → Runs → demo-smartcounter-1.2.0"
echo "(artifacts: wave progress, every counter's final state, the evaluation; each branch's own child runs"
echo "'demo-smartcounter-1.2.0 · <wave> · BR0x', tagged branch:BR0x, with its table). 'make stop' stops the server."
