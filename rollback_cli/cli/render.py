"""How results look on a terminal (``--json`` prints the document itself)."""

from __future__ import annotations

import sys
import time
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


def step_progress(app: App) -> Callable[[str, int, int | None, str], None] | None:
    """A progress bar on stderr per long step (the dump's bytes, the restore's tables of
    ``total``), fed ``(label, done, total, unit)``; None without a terminal, with --json,
    or when stderr carries JSON lines.

    A bar is never ended here: the step's own line (``✓ dump (3.1 s)``, written by the
    console log handler, which clears the line first) takes its place once it finishes."""
    if app.json_output or app.log_format != "console" or not sys.stderr.isatty():
        return None
    bars: dict[str, dict[str, Any]] = {}

    def describe(item: str | None) -> str:
        return item or ""

    def show(label: str, done: int, total: int | None, unit: str) -> None:
        state = bars.get(label)
        if state is None or state["total"] != total or done < state["pos"]:
            state = {
                # A total when known (position and ETA); else a bar that pulses.
                "bar": click.progressbar(
                    iter(()) if total is None else None,
                    length=total,
                    label=f"  {label}",
                    file=sys.stderr,
                    width=24,
                    show_pos=total is not None,
                    show_eta=bool(total),
                    item_show_func=describe,
                ),
                "pos": 0,
                "total": total,
                "started": time.monotonic(),
            }
            bars[label] = state
        text = unit
        if unit == "bytes":
            elapsed = time.monotonic() - state["started"]
            rate = f" {human_size(round(done / elapsed))}/s" if elapsed > 0 else ""
            text = f"{human_size(done)}{rate}"
        state["bar"].update(done - state["pos"], text)
        state["pos"] = done

    return show


def end_live_line() -> None:
    """Clear a line a progress bar or a running step left open on the terminal, so that
    what follows starts at the left margin."""
    if sys.stderr.isatty():
        click.echo("\r\x1b[K", err=True, nl=False)


def plan(steps: list[dict[str, str]]) -> None:
    click.echo("dry run: nothing was changed. Plan:")
    for number, item in enumerate(steps, 1):
        click.echo(f"  {number}. {item['step']}: {item['detail']}")


def checks(items: list[dict[str, Any]] | None) -> None:
    """Every check with its verdict: failed ones first, then warnings, then the rest."""
    marks = {"ok": "✓", "warning": "!", "fail": "✗", "info": "·"}
    rank = {"fail": 0, "warning": 1}
    for check in sorted(items or [], key=lambda c: rank.get(c["status"], 2)):
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
    header = (
        "NAME",
        "DATABASE",
        "ENV",
        "LOCATION",
        "SIZE",
        "AGE",
        "TYPE",
        "REVISION",
        "LABEL",
        "STATUS",
    )
    table = [header] + [
        (
            r["name"],
            r.get("database") or "-",
            r.get("environment") or "-",
            r["location"],
            human_size(r["size"]),
            age_text(datetime.fromisoformat(r["created_at"]) if r["created_at"] else None, now),
            r["type"] or "-",
            r["alembic_revision"] or "-",
            _cell(r.get("label")),
            "valid" if r["valid"] else f"INVALID: {r['problem']}",
        )
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header) - 1)]
    for row in table:
        cells = [str(c).ljust(w) for c, w in zip(row[:-1], widths, strict=True)]
        click.echo("  ".join([*cells, str(row[-1])]))


def _cell(text: str | None, width: int = 30) -> str:
    """A free-text value on one line of a table, cut to ``width``."""
    if not text:
        return "-"
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def revision_change(before: str | None, after: str | None) -> str:
    """The Alembic revision's move, in words."""
    if before is None and after is None:
        return "no Alembic revision recorded (alembic_version is empty or missing)"
    if before == after:
        return f"Alembic revision unchanged at {before}"
    return f"Alembic revision {before or 'none'} → {after or 'none (base)'}"


def rollback_summary(doc: dict[str, Any]) -> str:
    """What the rollback did, in one line."""
    database = doc["database"]
    revisions = revision_change(doc["revision_before"], doc["revision_after"])
    command = doc.get("command") or ""
    if command == "rollback undo":
        return (
            f"rollback undone: {database} is again the database the last rollback replaced; "
            f"{revisions}"
        )
    if command == "rollback schema":
        return f"schema rolled back: {database}, {revisions}"
    if doc.get("backup_used"):
        what = "full rollback finished" if command == "rollback full" else "data rolled back"
        return f"{what}: {database} restored from {doc['backup_used']}; {revisions}"
    return f"rollback finished: {database}, {revisions}"


def rollback(app: App) -> Callable[[dict[str, Any]], None]:
    def render(doc: dict[str, Any]) -> None:
        if app.dry_run:
            plan(doc["plan"])
            for step in doc.get("reverted") or []:
                if "executed_sql" in step:
                    what = f"SQL the rehearsal ran for {step['revision']}"
                    what += f" ({step['message']}; {step['duration_ms']} ms)"
                else:
                    what = f"downgrade SQL of {step['revision']} ({step['message']}; offline)"
                click.echo(f"\n-- {what}:")
                click.echo(step["sql"].rstrip() or "-- (no statement)")
        else:
            click.echo(rollback_summary(doc))
            if doc.get("backup_uri"):
                click.echo(f"  safety backup:  {doc['backup_uri']}")
            if doc.get("kept_database"):
                click.echo(
                    f"  replaced database kept as {doc['kept_database']} "
                    "(`rollback undo` swaps it back)"
                )
            if doc.get("unavailable_ms") is not None:
                click.echo(f"  unavailable for {doc['unavailable_ms']} ms")
            if doc.get("time_to_recovery_ms") is not None:
                line = f"  recovered in {doc['time_to_recovery_ms'] / 1000:.1f} s (live, validated)"
                if doc.get("total_ms") is not None:
                    line += f"; total {doc['total_ms'] / 1000:.1f} s"
                if doc.get("safety_backup_source"):
                    line += (
                        f", the safety backup of the kept {doc['safety_backup_source']} after it"
                    )
                click.echo(line)
        for warning in doc.get("warnings") or []:
            click.echo(f"  ! {warning}")

    return render
