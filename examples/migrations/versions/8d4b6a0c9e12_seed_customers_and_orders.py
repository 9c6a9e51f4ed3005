"""Seed 20 customers and 50 orders (data migration).

The rows are deterministic, so every database built from these migrations holds the same
data. The downgrade deletes exactly the seeded customers; their orders go with them
(ON DELETE CASCADE).

Revision ID: 8d4b6a0c9e12
Revises: 3f9c1e7a2b40
Create Date: 2025-01-06 09:10:00

"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta, timezone

from alembic import op

# revision identifiers, used by Alembic.
revision: str = "8d4b6a0c9e12"
down_revision: str | Sequence[str] | None = "3f9c1e7a2b40"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAMES = [
    "Ada Lovelace",
    "Alan Turing",
    "Grace Hopper",
    "Edsger Dijkstra",
    "Barbara Liskov",
    "Donald Knuth",
    "Margaret Hamilton",
    "Ken Thompson",
    "Dennis Ritchie",
    "Frances Allen",
    "John McCarthy",
    "Radia Perlman",
    "Leslie Lamport",
    "Tony Hoare",
    "Niklaus Wirth",
    "Shafi Goldwasser",
    "Michael Stonebraker",
    "Jim Gray",
    "Edgar Codd",
    "Katherine Johnson",
]
CUSTOMER_COUNT = len(NAMES)
ORDER_COUNT = 50
_EPOCH = datetime(2024, 1, 1, 9, 0, tzinfo=timezone.utc)


def _email(name: str) -> str:
    return name.lower().replace(" ", ".") + "@example.com"


def _ts(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S+00")


def _quoted(values: Sequence[str]) -> str:
    return ", ".join("'" + value.replace("'", "''") + "'" for value in values)


def upgrade() -> None:
    customers = ",\n    ".join(
        f"('{name}', '{_email(name)}', timestamptz '{_ts(_EPOCH + timedelta(days=i))}')"
        for i, name in enumerate(NAMES)
    )
    op.execute(f"INSERT INTO customers (name, email, created_at) VALUES\n    {customers}")

    rows = []
    for i in range(ORDER_COUNT):
        email = _email(NAMES[(i * 7) % CUSTOMER_COUNT])
        amount = f"{(i * 37) % 400 + 5}.{(i * 13) % 100:02d}"
        placed = _ts(_EPOCH + timedelta(days=40, hours=13 * i))
        rows.append(f"({i}, '{email}', {amount}, timestamptz '{placed}')")
    values = ",\n    ".join(rows)
    op.execute(
        "INSERT INTO orders (customer_id, amount, placed_at)\n"
        "SELECT c.id, v.amount, v.placed_at\n"
        f"FROM (VALUES\n    {values}\n) AS v(n, email, amount, placed_at)\n"
        "JOIN customers c ON c.email = v.email\n"
        "ORDER BY v.n"
    )


def downgrade() -> None:
    # Revision e41c0d7f6a95 drops the email column and its downgrade brings it back empty,
    # so fall back to the names for rows whose email is gone.
    op.execute(
        "DELETE FROM customers\n"
        f"WHERE email IN ({_quoted([_email(n) for n in NAMES])})\n"
        f"   OR (email IS NULL AND name IN ({_quoted(NAMES)}))"
    )
