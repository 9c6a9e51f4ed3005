"""How results look on a terminal (``--json`` prints the document itself)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any

import click

from rollback_cli.cli.options import App


def human_size(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    return f"{size} B"


def age_text(when: datetime | None, now: float) -> str:
    if when is None:
        return "?"
    seconds = max(0.0, now - when.timestamp())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def progress_printer(app: App) -> Callable[[int, float], None] | None:
    if app.json_output or not sys.stderr.isatty():
        return None

    def show(size: int, elapsed: float) -> None:
        rate = size / elapsed / 1048576 if elapsed else 0.0
        click.echo(f"\r  dumped {size / 1048576:,.1f} MiB ({rate:,.1f} MiB/s)", err=True, nl=False)

    return show


def plan(steps: list[dict[str, str]]) -> None:
    click.echo("dry run: nothing was changed. Plan:")
    for number, item in enumerate(steps, 1):
        click.echo(f"  {number}. {item['step']}: {item['detail']}")


def checks(items: list[dict[str, Any]]) -> None:
    marks = {"ok": "✓", "warning": "!", "fail": "✗", "info": "·"}
    for check in items:
        click.echo(f"  {marks.get(check['status'], '?')} {check['name']}: {check['detail']}")


def backup_created(doc: dict[str, Any]) -> None:
    if doc.get("plan"):
        plan(doc["plan"])
        return
    click.echo(f"backup created: {doc['backup_file']}")
    click.echo(f"  uri:      {doc['backup_uri']}")
    click.echo(f"  size:     {human_size(doc['backup_size'])}")
    click.echo(f"  sha256:   {doc['backup_sha256']}")
    click.echo(f"  revision: {doc['revision_after'] or '-'}")


def backup_listing(doc: dict[str, Any], now: float) -> None:
    rows = doc["backups"]
    kept = doc["kept_databases"]
    if kept:
        click.echo("pre-rollback databases (`rollback undo` swaps back the newest):")
        for database in kept:
            click.echo(f"  {database['name']}")
        click.echo()
    if not rows:
        click.echo("no backups found")
        return
    header = ("NAME", "LOCATION", "SIZE", "AGE", "TYPE", "REVISION", "STATUS")
    table = [header] + [
        (
            r["name"],
            r["location"],
            human_size(r["size"]),
            age_text(datetime.fromisoformat(r["created_at"]) if r["created_at"] else None, now),
            r["type"] or "-",
            r["alembic_revision"] or "-",
            "valid" if r["valid"] else f"INVALID: {r['problem']}",
        )
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header) - 1)]
    for row in table:
        cells = [str(c).ljust(w) for c, w in zip(row[:-1], widths, strict=True)]
        click.echo("  ".join([*cells, str(row[-1])]))


def rollback(app: App) -> Callable[[dict[str, Any]], None]:
    def render(doc: dict[str, Any]) -> None:
        if app.dry_run:
            plan(doc["plan"])
            for step in doc.get("reverted") or []:
                click.echo(f"\n-- downgrade SQL of {step['revision']} ({step['message']}):")
                click.echo(step["sql"].rstrip() or "-- (empty)")
        else:
            click.echo(
                f"rollback finished: {doc['database']} "
                f"{doc['revision_before'] or '-'} → {doc['revision_after'] or '-'}"
            )
            if doc.get("backup_uri"):
                click.echo(f"  safety backup:  {doc['backup_uri']}")
            if doc.get("kept_database"):
                click.echo(
                    f"  previous database kept as {doc['kept_database']} "
                    "(`rollback undo` swaps it back)"
                )
            if doc.get("unavailable_ms") is not None:
                click.echo(f"  unavailable for {doc['unavailable_ms']} ms")
        for warning in doc.get("warnings") or []:
            click.echo(f"  ! {warning}")

    return render
