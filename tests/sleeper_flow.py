"""A tiny flow for tests that need a deployed run which stays Running (tests/test_workers.py: the
zombie-run automation). Deployed from this checkout; not a product flow."""

from __future__ import annotations

import time

from prefect import flow


@flow(name="counterops-test-sleeper")
def sleeper(seconds: float = 600) -> None:
    time.sleep(seconds)
