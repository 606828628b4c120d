"""Read one flow run's times and its task runs' times from the Prefect API, as JSON (for the
bench's profile). Run with the project's venv and PREFECT_API_URL pointing at the bench's server:

    .venv/bin/python bench/prefect_times.py FLOW_RUN_ID [EXPECTED_TASK_RUNS]

Task runs reach the API asynchronously: waits (≤ 30 s) until EXPECTED_TASK_RUNS are in.
"""

from __future__ import annotations

import json
import sys
import time
import uuid


def main() -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run_id = uuid.UUID(sys.argv[1])
    expected = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    deadline = time.monotonic() + 30
    with get_client(sync_client=True) as client:
        while True:
            task_runs, offset = [], 0
            while True:
                page = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                             limit=200, offset=offset)
                task_runs += page
                offset += len(page)
                if len(page) < 200:
                    break
            done = [t for t in task_runs if t.end_time is not None]
            if len(done) >= expected or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        flow = client.read_flow_run(flow_run_id)

    def ts(value):
        return value.timestamp() if value is not None else None

    print(json.dumps({
        "flow_run": {"name": flow.name, "state": flow.state_type.value if flow.state_type else None,
                     "start": ts(flow.start_time), "end": ts(flow.end_time), "created": ts(flow.created)},
        "task_runs": [{"name": t.name, "task": t.task_key, "state": t.state_type.value if t.state_type else None,
                       "start": ts(t.start_time), "end": ts(t.end_time)} for t in task_runs],
    }))


if __name__ == "__main__":
    main()
