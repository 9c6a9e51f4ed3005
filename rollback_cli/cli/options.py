"""What the group callback hands every command, and option decorators commands share."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from rollback_cli.errors import UsageError
from rollback_cli.settings import RunOptions, SigningKeys, StorageConfig, Target

F = TypeVar("F", bound=Callable[..., Any])


def prompt(text: str) -> str:
    return str(click.prompt(text, default="", show_default=False, err=True))


@dataclasses.dataclass(frozen=True)
class App:
    """The global options, resolved once; output options stay here, out of the core."""

    database_url: str | None = dataclasses.field(repr=False)
    restore_url: str | None = dataclasses.field(repr=False)
    environment: str
    storage_options: StorageConfig
    pg_bin_dir: Path | None
    alembic_config: Path
    log_dir: Path
    log_format: str
    log_level: str
    dry_run: bool = False
    yes: bool = False
    json_output: bool = False
    interactive: bool = False
    #: the user named --alembic-config (or its variable): a missing file is then an error
    alembic_config_named: bool = False
    alembic_script_location: str | None = None

    def with_flags(self, dry_run: bool, yes: bool, json_output: bool) -> App:
        """``--dry-run``, ``--yes`` and ``--json`` count before or after the command."""
        return dataclasses.replace(
            self,
            dry_run=self.dry_run or dry_run,
            yes=self.yes or yes,
            json_output=self.json_output or json_output,
        )

    @property
    def storage(self) -> StorageConfig:
        """The storage options with the signing keys of the environment (read when the
        command runs, so a bad key file is a configuration error, exit 3)."""
        return dataclasses.replace(self.storage_options, signing=SigningKeys.from_environment())

    def target(self) -> Target:
        """The target database; ConfigError (exit 3) when none is configured or valid."""
        return Target.resolve(
            self.database_url,
            environment=self.environment,
            pg_bin_dir=self.pg_bin_dir,
            alembic_config=self.alembic_config,
            restore_url=self.restore_url,
            alembic_script_location=self.alembic_script_location,
        )

    @property
    def run(self) -> RunOptions:
        return RunOptions(
            dry_run=self.dry_run, yes=self.yes, prompt=prompt, interactive=self.interactive
        )


pass_app = click.make_pass_decorator(App)


def run_flags(func: F) -> F:
    """``--dry-run``, ``--yes`` and ``--json`` are accepted after the command too."""
    func = click.option(
        "--json", "json_output", is_flag=True, help="Print one JSON result on stdout."
    )(func)
    func = click.option("--yes", "-y", is_flag=True, help="Confirm protected environments.")(func)
    return click.option("--dry-run", is_flag=True, help="Check everything, change nothing.")(func)


def parsed(parse: Callable[[str], Any], text: str, param_hint: str) -> Any:
    """``parse(text)``, its UsageError shown as Click's bad-parameter error."""
    try:
        return parse(text)
    except UsageError as exc:
        raise click.BadParameter(exc.message, param_hint=param_hint) from None


if TYPE_CHECKING:  # generic from click 8.5 on; plain at run time before
    _JobsBase = click.ParamType[int | None]
else:
    _JobsBase = click.ParamType


class JobsParam(_JobsBase):
    """``auto`` (None: chosen from cores, tables and free connection slots) or N >= 1."""

    name = "auto|N"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value is None or (isinstance(value, int) and not isinstance(value, bool)):
            if value is not None and value < 1:
                self.fail(f"{value} is not at least 1", param, ctx)
            return value
        text = str(value).strip().lower()
        if text == "auto":
            return None
        if text.isdigit() and int(text) >= 1:
            return int(text)
        return self.fail(f"{value!r} is neither auto nor a whole number of at least 1", param, ctx)


JOBS = JobsParam()
