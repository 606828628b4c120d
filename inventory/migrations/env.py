"""Alembic environment for the Smart Counter Ops store.

Runs three ways:
- from ``Store.open()``, which passes its open connection in
  ``config.attributes["connection"]`` (the normal path; no alembic.ini needed);
- from the command line for developers, ``alembic -c inventory/alembic.ini ...``,
  against ``COUNTEROPS_DATABASE_URL`` or the default SQLite database;
- offline (``alembic ... upgrade head --sql``) to hand a DBA the DDL to review.
"""

from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection

from inventory.records import Base
from inventory.store import make_engine, database_url

config = context.config
if config.config_file_name is not None:  # command line only: Store.open() leaves logging alone
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _configure(**kwargs: object) -> None:
    context.configure(
        target_metadata=Base.metadata,
        compare_type=True,
        # SQLite cannot ALTER most things; batch mode recreates the table instead.
        render_as_batch=True,
        **kwargs,
    )


def run_offline() -> None:
    _configure(url=config.get_main_option("sqlalchemy.url") or database_url(), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
elif (conn := config.attributes.get("connection")) is not None:
    run_online(conn)
else:
    engine = make_engine(config.get_main_option("sqlalchemy.url") or database_url())  # SQLite pragmas and atomic DDL
    with engine.begin() as conn:
        run_online(conn)
    engine.dispose()
