"""Add customers.tier ('standard' or 'gold'); customers who spent 650 or more become gold.

Revision ID: b7e2f5a91c38
Revises: 8d4b6a0c9e12
Create Date: 2025-01-06 09:20:00

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "b7e2f5a91c38"
down_revision: str | Sequence[str] | None = "8d4b6a0c9e12"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

GOLD_THRESHOLD = 650


def upgrade() -> None:
    op.add_column(
        "customers",
        sa.Column("tier", sa.Text, nullable=False, server_default=sa.text("'standard'")),
    )
    op.create_check_constraint("customers_tier_check", "customers", "tier IN ('standard', 'gold')")
    op.execute(
        "UPDATE customers SET tier = 'gold'\n"
        "WHERE id IN (SELECT customer_id FROM orders GROUP BY customer_id\n"
        f"             HAVING sum(amount) >= {GOLD_THRESHOLD})"
    )


def downgrade() -> None:
    op.drop_column("customers", "tier")  # drops customers_tier_check with it
