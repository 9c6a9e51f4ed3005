"""Safety guards shared by destructive commands."""

from __future__ import annotations

from collections.abc import Callable

from rollback_cli.errors import Refused
from rollback_cli.log import get_logger
from rollback_cli.settings import Settings

Prompt = Callable[[str], str]


def confirm_protected(
    settings: Settings, dbname: str, action: str, prompt: Prompt | None = None
) -> None:
    """Require ``--yes`` or the database name typed at a terminal in protected environments."""
    if not settings.is_protected:
        return
    logger = get_logger()
    if settings.yes:
        logger.warning("protected environment confirmed with --yes", action=action, database=dbname)
        return
    if prompt is None or not settings.interactive:
        raise Refused(
            f"{action} in protected environment {settings.environment!r} needs confirmation",
            hint="pass --yes (or DB_ROLLBACK_YES=1) in non-interactive runs",
        )
    typed = prompt(
        f"{action} in {settings.environment!r}. Type the database name ({dbname}) to continue"
    )
    if typed.strip() != dbname:
        raise Refused(f"confirmation did not match the database name {dbname!r}; nothing changed")
    logger.warning("protected environment confirmed interactively", action=action, database=dbname)
