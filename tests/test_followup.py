"""Evaluation days after the upgrade (issue 12, item 5): the counter app's business figures per period,
generated customer traffic, follow-up evaluations scheduled by the upgrade as Prefect scheduled flow
runs, and their verdicts (stable; degraded with the reason) from real counter figures.

One fleet of two counters in two branches; the real Prefect server of the session; real HTTP calls to
the counter apps; periods of seconds instead of days.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from inventory.models import RunKind
from inventory.store import Store
from simfleet import fleet as simfleet
from tasks.evaluate import previous_versions, report_markdown, wave_metrics
from tasks.followup import DEPLOYMENT, Totals, degradation, followup_offsets, schedule_followups
from tests.plugins.fleet import port
from tests.test_evaluate import outcome
from tests.test_upgrade import cli, write_plan

TRAFFIC_PER_MIN = 600  # ten generated customers a second on each counter, while the test wants traffic


def _app(inventory: Path) -> dict[str, str]:
    from inventory.loader import load_inventory

    return {d.id: f"http://127.0.0.1:{d.http_port}" for d in load_inventory(inventory).devices}


def _traffic(fleet_dir: Path, device_id: str, per_minute: float) -> None:
    """What `fleet up --traffic` writes: the app reads counter.json's traffic_per_minute every second."""
    config = fleet_dir / "devices" / device_id / "etc/smartcounter/counter.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"traffic_per_minute": per_minute}))


def _period(base: str, start: float, end: float | None = None, **more) -> dict:
    params = {"from": str(start)} | ({"to": str(end)} if end else {}) | more
    r = httpx.get(f"{base}/metrics", params=params, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def _customer_rows(fleet_dir: Path, device_id: str) -> dict[str, int]:
    db = fleet_dir / "devices" / device_id / "var/lib/smartcounter/counter.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("customers", "cards", "transactions")}


def _wait_for(predicate, timeout: float = 20, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture
def followup_deployment(prefect_api):
    """The upgrade-followup deployment on the session server (no work pool: its runs stay Scheduled), removed after."""
    from prefect.client.orchestration import get_client

    from flows.followup import upgrade_followup

    deployment_id = upgrade_followup.to_deployment(name="upgrade-followup").apply()
    try:
        yield deployment_id
    finally:
        with get_client(sync_client=True) as client:
            client.delete_deployment(deployment_id)


def test_followups_scheduled_by_the_upgrade_and_their_verdicts_from_real_figures(fleet_dir, receiver, followup_deployment,
                                                                                 monkeypatch):
    simfleet.up(fleet_dir, devices=2, branches=2, outlets_per_branch=1, ssh_base_port=port(23600), http_base_port=port(23800))
    inventory = fleet_dir / "inventory.yaml"
    apps = _app(inventory)
    a, b = sorted(apps)

    # --- the figures are real: customer calls counted per type, the smoke tests' /test/ calls not, feedback kept
    t0 = time.time()
    opened = httpx.post(f"{apps[a]}/card/open", json={"customer_name": "王芳", "id_number": "110101199001011234",
                                                     "phone": "13800138000"}, timeout=10).json()
    assert httpx.post(f"{apps[a]}/card/activate", json={"card_no": opened["card_no"]}, timeout=10).status_code == 200
    assert httpx.post(f"{apps[a]}/card/activate", json={"card_no": "6217990000000000000"}, timeout=10).status_code == 404
    assert httpx.post(f"{apps[a]}/test/card/open", json={"customer_name": "T", "id_number": "110101199001011234",
                                                        "phone": "13800138000"}, timeout=10).status_code == 200
    assert httpx.post(f"{apps[a]}/feedback", json={"score": 4}, timeout=10).status_code == 200
    assert httpx.post(f"{apps[a]}/feedback", json={"score": 9}, timeout=10).json()["field"] == "score"
    doc = _period(apps[a], t0, time.time() + 1, period_s="1")
    period = doc["period"]
    assert period["transactions"] == {"card_open": 1, "card_activate": 1, "transfer": 0, "account_update": 0}, period
    assert (period["transactions_total"], period["errors"], period["success_rate"]) == (2, 1, 0.6667)
    assert period["satisfaction"] == {"mean": 4.0, "responses": 1} and period["restarts"] == 0
    assert sum(p["transactions_total"] + p["errors"] for p in doc["periods"]) == 3  # the buckets add up to the period
    assert {"requests_total", "transactions_total", "business_errors_total", "latency_ms", "restarts", "started_at"} <= set(doc)
    assert httpx.get(f"{apps[a]}/metrics", params={"from": "yesterday"}, timeout=10).json()["field"] == "from"

    # --- generated customers: counted, through the business code, never in the customer tables
    rows = {d: _customer_rows(fleet_dir, d) for d in apps}
    traffic_from = time.time()
    for d in apps:
        _traffic(fleet_dir, d, TRAFFIC_PER_MIN)
    _wait_for(lambda: all(_period(apps[d], traffic_from)["period"]["transactions_total"] >= 10 for d in apps), what="traffic")
    generated = _period(apps[b], traffic_from)["period"]
    assert generated["errors"] == 0 and generated["mean_handling_ms"] > 0 and sum(generated["transactions"].values()) >= 10
    assert {d: _customer_rows(fleet_dir, d) for d in apps} == rows  # the sim_ tables take them

    # --- the upgrade, with follow-ups at +30 s and +1 h; traffic keeps going around it (paused while drained)
    time.sleep(2)  # a "before" period with traffic
    checked_at = float(int(time.time()))  # whole seconds already past: nothing more can land in them
    before_upgrade = _period(apps[a], t0, checked_at)["period"]
    monkeypatch.setenv("COUNTEROPS_FOLLOWUPS", "30s,1h")
    plan = write_plan(fleet_dir, "followup-run", "1.1.0", receiver, waves=[{"name": "all", "size": "100%"}])
    started = datetime.now(UTC)
    ran = cli("upgrade", str(plan), "--inventory", str(inventory))
    ended = datetime.now(UTC)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "follow-up evaluations: scheduled +30s at" in ran.stdout and "+1h at" in ran.stdout, ran.stdout
    with Store.open() as store:
        [run] = [r for r in store.runs(kind=RunKind.UPGRADE, limit=20) if r.name == "followup-run"]
    assert sorted(run.summary["upgraded_counters"]) == [a, b]
    assert run.summary["upgraded_counters"][a]["from_version"] == "1.0.0"

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[followup_deployment])))
    mine = sorted((r for r in runs if r.parameters.get("run_id") == run.id), key=lambda r: r.expected_start_time)
    assert [(r.state.type.value, r.parameters["offset"]) for r in mine] == [("SCHEDULED", "30s"), ("SCHEDULED", "1h")]
    for r, offset in zip(mine, (timedelta(seconds=30), timedelta(hours=1))):
        assert started + offset - timedelta(seconds=1) <= r.expected_start_time <= ended + offset + timedelta(seconds=1), r
        assert r.parameters["inventory"] == str(inventory.resolve())

    # --- follow-up of a healthy upgrade: stable (same traffic after as before, no errors, no restart)
    time.sleep(2)
    since = (datetime.now(UTC) - ended).total_seconds()
    stable = cli("evaluate", "followup", str(run.id), "--inventory", str(inventory), "--period", f"{int(since)}s",
                 "--notify", receiver.url)
    assert stable.returncode == 0, stable.stdout + stable.stderr
    assert "follow-up now: stable" in stable.stdout, stable.stdout

    # --- one counter starts failing customers after the upgrade: degraded, with the reason, for it, its outlet and branch
    for d in apps:
        _traffic(fleet_dir, d, 0)
    for _ in range(6):
        assert httpx.post(f"{apps[a]}/card/activate", json={"card_no": "6217990000000000000"}, timeout=10).status_code == 404
    degraded = cli("evaluate", "followup", str(run.id), "--inventory", str(inventory), "--notify", receiver.url)
    assert degraded.returncode == 1, degraded.stdout + degraded.stderr
    assert "follow-up now: degraded" in degraded.stdout, degraded.stdout
    assert re.search(rf"counter {a}: .*6 failed customer calls \(before: [01]\)", degraded.stdout), degraded.stdout
    assert f"counter {b}" not in degraded.stdout, degraded.stdout

    with Store.open() as store:
        followups = [e for e in store.evaluations(run.id) if e.metrics.get("kind") == "followup"]
    assert [e.verdict for e in followups] == ["stable", "degraded"]
    judged = {(j["scope"], j["name"]): j for j in followups[1].metrics["judged"]}
    assert judged[("counter", b)]["verdict"] == "stable" and judged[("counter", a)]["after"]["errors"] == 6
    outlet_a = next(n for s, n in judged if s == "outlet" and n.startswith(a.split("-")[1]))
    assert judged[("outlet", outlet_a)]["verdict"] == "degraded"
    titles = receiver.titles()
    assert "Upgrade follow-up (now) of followup-run: stable" in titles and "Upgrade follow-up (now) of followup-run: degraded" in titles
    report = next(n["message"] for _, n in receiver.received if n["title"].endswith(": degraded"))
    assert "1.0.0 → 1.1.0" in report and "6 failed customer calls" in report

    # the figures from before the upgrade outlived it (kept outside the release and the restored data)
    assert _period(apps[a], t0, checked_at)["period"] == before_upgrade and before_upgrade["transactions"]["card_open"] >= 1


def test_no_deployment_means_no_followups_scheduled_and_says_so(prefect_api, monkeypatch):
    monkeypatch.setenv("COUNTEROPS_FOLLOWUPS", "1d,7d")
    said = schedule_followups(1, "/nowhere/inventory.yaml", deployment="upgrade-followup/no-such-deployment")
    assert said["scheduled"] == [] and "no deployment upgrade-followup/no-such-deployment" in said["not_scheduled"]
    assert "counterops evaluate followup 1" in said["said"] and "+1d, +7d" in said["said"]
    monkeypatch.setenv("COUNTEROPS_FOLLOWUPS", "tomorrow")
    bad = schedule_followups(1, "/nowhere/inventory.yaml")
    assert "COUNTEROPS_FOLLOWUPS: 'tomorrow' is not a duration" in bad["not_scheduled"]
    assert DEPLOYMENT == "upgrade-followup/upgrade-followup"


def test_followup_offsets_and_thresholds(monkeypatch):
    monkeypatch.delenv("COUNTEROPS_FOLLOWUPS", raising=False)
    assert followup_offsets() == [("1d", 86400), ("7d", 7 * 86400)]
    assert followup_offsets(["30s"]) == [("30s", 30)] and followup_offsets([]) == []
    monkeypatch.setenv("COUNTEROPS_FOLLOWUPS", "none")
    assert followup_offsets() == []

    calm = Totals(calls=100, ok=99, errors=1, handling_ms=100 * 40.0, score_sum=20 * 4.8, responses=20)
    assert degradation(calm, calm) == []
    assert degradation(calm, None) == ["no figures after the upgrade: the counter did not answer"]
    slow = calm.model_copy(update={"handling_ms": 100 * 200.0})
    assert degradation(calm, slow) == ["mean handling time 200 ms (before: 40 ms)"]
    failing = Totals(calls=100, ok=80, errors=20, handling_ms=100 * 40.0, restarts=2, score_sum=20 * 3.0, responses=20)
    reasons = degradation(calm, failing)
    assert reasons == ["restarted 2 times (before: 0)", "success rate 80.0% (before: 99.0%)",
                       "20 failed customer calls (before: 1)", "customer satisfaction 3.00/5 (before: 4.80/5)"]


def test_the_evaluation_title_shows_the_previous_version_not_the_plan_name():
    outcomes = [outcome("SC-1", "upgraded", 4), outcome("SC-2", "already_current", 1)]
    outcomes = [outcomes[0].model_copy(update={"from_version": "1.0.0"}), outcomes[1].model_copy(update={"from_version": "1.2.0"})]
    previous = previous_versions(outcomes, "1.2.0")
    m = wave_metrics(outcomes)
    text = report_markdown("smartcounter-1.2.0", "1.2.0", [], {"metrics": m, "verdict": "stable"}, None, previous)
    assert text.splitlines()[0] == "# Upgrade evaluation: smartcounter-1.2.0, 1.0.0 → 1.2.0"
