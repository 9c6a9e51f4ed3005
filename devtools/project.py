"""The example Alembic project (``examples/``): its revisions, and upgrading a database."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from devtools.data import bulk_orders_sql
from devtools.postgres import PostgresCluster, TestDatabase

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE_ALEMBIC_INI = EXAMPLES_DIR / "alembic.ini"

REV_CREATE = "3f9c1e7a2b40"  # the customers and orders tables
REV_SEED = "8d4b6a0c9e12"  # 20 customers and 50 orders
REV_TIER = "b7e2f5a91c38"  # customers.tier: the "current release"
REV_DROP_EMAIL = "e41c0d7f6a95"  # drops customers.email: the "bad migration" (head)


def sqlalchemy_url(url: str) -> str:
    """``url`` with the psycopg2 driver spelled out, as SQLAlchemy wants it."""
    return url.replace("postgresql://", "postgresql+psycopg2://", 1)


def alembic_upgrade(url: str, revision: str, alembic_ini: Path = EXAMPLE_ALEMBIC_INI) -> None:
    """``alembic upgrade revision`` on the database at ``url``, in process."""
    config = Config(str(alembic_ini))
    config.attributes["configure_logger"] = False
    config.set_main_option("sqlalchemy.url", sqlalchemy_url(url).replace("%", "%%"))
    command.upgrade(config, revision)


def example_database(
    server: PostgresCluster, dbname: str, rows: int, *, then_to: str | None = None
) -> int:
    """A new database ``dbname`` of the example project at the tier revision with ``rows``
    generated orders (upgraded on to ``then_to`` when given), vacuumed; its size in bytes."""
    server.create_database(dbname)
    db = TestDatabase(name=dbname, server=server)
    alembic_upgrade(db.url, REV_TIER, EXAMPLE_ALEMBIC_INI)
    chunk = 500_000
    for done in range(0, rows, chunk):
        db.execute(bulk_orders_sql(min(chunk, rows - done)))
    if then_to is not None:
        alembic_upgrade(db.url, then_to, EXAMPLE_ALEMBIC_INI)
    server.execute("VACUUM ANALYZE", dbname=dbname)
    return int(server.query("SELECT pg_database_size(%s)", (dbname,), dbname=dbname)[0][0])
