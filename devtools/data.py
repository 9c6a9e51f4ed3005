"""Bulk data for the example project's database (``examples/``)."""

from __future__ import annotations

from pathlib import Path

SEED_BULK = Path(__file__).resolve().parent.parent / "examples" / "seed_bulk.sql"


def bulk_orders_sql(rows: int) -> str:
    """examples/seed_bulk.sql's INSERT of ``rows`` generated orders, without psql variables."""
    text = SEED_BULK.read_text()
    start = text.index("INSERT INTO orders")
    return text[start : text.index(";", start)].replace(":rows", str(rows))
