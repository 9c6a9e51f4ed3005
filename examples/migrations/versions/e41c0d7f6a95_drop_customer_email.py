"""Drop customers.email -- the "bad migration" of the demo.

This migration destroys data: every customer's email address is deleted with the column.
Its downgrade can only put the column back (nullable, with its unique constraint), not the
addresses, so after ``alembic downgrade b7e2f5a91c38`` the schema is right again but every
email is NULL. Getting the data back takes a data rollback from the backup taken before
this migration ran (``db-rollback rollback data`` / ``rollback full``).

Revision ID: e41c0d7f6a95
Revises: b7e2f5a91c38
Create Date: 2025-01-06 09:30:00

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "e41c0d7f6a95"
down_revision: str | Sequence[str] | None = "b7e2f5a91c38"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_column("customers", "email")  # customers_email_key goes with it


def downgrade() -> None:
    # The addresses are gone: the column comes back empty (and therefore nullable).
    op.add_column("customers", sa.Column("email", sa.Text, nullable=True))
    op.create_unique_constraint("customers_email_key", "customers", ["email"])
