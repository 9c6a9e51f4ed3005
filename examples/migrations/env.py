"""Alembic environment for the example project.

The database URL comes from ``sqlalchemy.url`` in alembic.ini when it is set (db-rollback
sets it), otherwise from the ``DATABASE_URL`` environment variable. A bare ``postgresql://``
or ``postgres://`` URL is pointed at psycopg2, the driver installed alongside SQLAlchemy:
SQLAlchemy 2.1 would otherwise pick psycopg 3.
"""

from __future__ import annotations

import os
import re
from logging.config import fileConfig

from alembic import context
from sqlalchemy import engine_from_config, pool
from sqlalchemy.engine import Connection

config = context.config

# db-rollback sets configure_logger=False so that its own log handlers stay in place.
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

# No autogenerate in this project: the migrations are written by hand.
target_metadata = None

_BARE_SCHEME = re.compile(r"^(postgresql|postgres)://", re.IGNORECASE)


def database_url() -> str | None:
    url = (config.get_main_option("sqlalchemy.url") or "").strip()
    if not url:
        url = os.environ.get("DATABASE_URL", "").strip()
    if not url:
        return None
    return _BARE_SCHEME.sub("postgresql+psycopg2://", url, count=1)


def run_migrations_offline() -> None:
    """Render the SQL instead of running it (``alembic upgrade head --sql``)."""
    url = database_url()
    options = {"url": url} if url else {"dialect_name": "postgresql"}
    context.configure(
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        **options,
    )
    with context.begin_transaction():
        context.run_migrations()


def _run_with(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run against the database: a connection handed over by the caller, or a new engine."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_with(connection)
        return
    url = database_url()
    if url is None:
        raise RuntimeError("no database URL: set DATABASE_URL or sqlalchemy.url in alembic.ini")
    section = dict(config.get_section(config.config_ini_section, {}))
    section["sqlalchemy.url"] = url
    engine = engine_from_config(section, prefix="sqlalchemy.", poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            _run_with(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
