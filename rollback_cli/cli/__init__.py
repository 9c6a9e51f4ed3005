"""The command line, a thin shell over :mod:`rollback_cli.api`."""

from rollback_cli.cli.main import cli, main

__all__ = ["cli", "main"]
