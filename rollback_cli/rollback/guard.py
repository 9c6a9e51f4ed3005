"""The production guard: protected environments need ``--yes`` or the database name typed."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rollback_cli.errors import Refused
from rollback_cli.log import get_logger

if TYPE_CHECKING:
    from rollback_cli.settings import RunOptions, Target


def confirm_protected(target: Target, run: RunOptions, action: str) -> None:
    """Require ``--yes`` or the database name typed at a terminal in protected environments."""
    if not target.is_protected:
        return
    logger = get_logger()
    dbname = target.dbname
    if run.yes:
        logger.warning("protected environment confirmed with --yes", action=action, database=dbname)
        return
    if run.prompt is None or not run.interactive:
        raise Refused(
            f"{action} in protected environment {target.environment!r} needs confirmation",
            hint="pass --yes (or DB_ROLLBACK_YES=1) in non-interactive runs",
        )
    typed = run.prompt(
        f"{action} in {target.environment!r}. Type the database name ({dbname}) to continue"
    )
    if typed.strip() != dbname:
        raise Refused(f"confirmation did not match the database name {dbname!r}; nothing changed")
    logger.warning("protected environment confirmed interactively", action=action, database=dbname)
