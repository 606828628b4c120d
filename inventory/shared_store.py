"""Distributed runs need a store every worker shares: PostgreSQL, never SQLite.

Workers on several machines (one per region) write the same run records, counter outcomes, leases
and audit trail, and read the wave's failure count before each counter: a SQLite file on one
machine is not shared, and under several writers it locks. ``require_shared_store`` refuses it with
the one line that says the fix; `counterops worker start` and the upgrade flow in distributed mode
call it before any work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from inventory.store import Store

DATABASE_URL_ENV = "COUNTEROPS_DATABASE_URL"  # what inventory.store.database_url() reads
README_SECTION = "README, 'Run it distributed'"


class SharedStoreRequired(ValueError):
    """The store is SQLite where a store shared by every worker (PostgreSQL) is needed; the message says the fix."""


def shared_store_problem(url: str) -> str | None:
    """Why the store at ``url`` (a SQLAlchemy URL) cannot be shared by workers, or None when it can."""
    if url.strip().lower().startswith("sqlite"):
        where = url.split("?", 1)[0].removeprefix("sqlite:///") or "in memory"
        return (f"distributed runs need the store on PostgreSQL, not SQLite ({where}): set "
                f"{DATABASE_URL_ENV}=postgresql+psycopg://USER@HOST:5432/counterops on every machine that runs a "
                f"worker or starts the upgrade ({README_SECTION})")
    return None


def require_shared_store(store: Store) -> None:
    """Raise SharedStoreRequired (one line naming the fix) when ``store`` is SQLite: workers on several
    machines cannot share it. PostgreSQL passes."""
    url = store.engine.url
    problem = shared_store_problem(url.render_as_string(hide_password=True)) if url.get_backend_name() == "sqlite" else None
    if problem:
        raise SharedStoreRequired(problem)
