"""The example Alembic project (``examples/``): its revisions, and upgrading a database."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

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
