"""The original rollback script's command lines, translated to commands.

``db-rollback --create-backup --type schema --environment production`` becomes
``db-rollback --environment production backup create --type schema``, and so on, so
every existing runbook and cron line keeps working verbatim.
"""

from __future__ import annotations

from rollback_cli.errors import UsageError

COMMANDS = {"backup", "rollback", "status", "validate", "cleanup-artifacts"}
ACTIONS = ("--create-backup", "--list-backups", "--verify-backup", "--cleanup-backups", "--cleanup")
# Options of the original script that belong to the action, not to the global group.
_VALUE_FLAGS = ("--type", "--to-revision", "--backup-file", "--verify-backup", "--cleanup-backups")
_ROLLBACK_TYPES = ("schema", "data", "full")
# Options of the commands (not of the group) a legacy line may carry; they move after the
# command. True: the option takes a value.
_COMMAND_OPTIONS = {
    "--strategy": True,
    "--jobs": True,
    "-j": True,
    "--lock-timeout": True,
    "--statement-timeout": True,
    "--checks": True,
    "--allow-cross-environment": False,
    "--allow-other-database": False,
    "--no-rehearsal": False,
    "--accept-data-loss": False,
    "--no-safety-backup": False,
    "--format": True,
    "--compress": True,
    "--label": True,
    "--keep-last": True,
    "--keep-days": True,
    "--restore-test": False,
}


def is_legacy(args: list[str]) -> bool:
    if any(arg in COMMANDS for arg in args):
        return False
    return any(
        _flag_name(arg) in (*ACTIONS, "--type", "--to-revision", "--backup-file") for arg in args
    )


def _flag_name(arg: str) -> str:
    return arg.split("=", 1)[0]


def _split(args: list[str]) -> tuple[dict[str, str], set[str], list[str], list[str]]:
    """The legacy line's valued flags, bare flags, global options and command options."""
    values: dict[str, str] = {}
    flags: set[str] = set()
    rest: list[str] = []
    tail: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        name = _flag_name(arg)
        if name in _VALUE_FLAGS:
            if "=" in arg:
                values[name] = arg.split("=", 1)[1]
            elif i + 1 < len(args):
                values[name] = args[i + 1]
                i += 1
            else:
                raise UsageError(f"option {name} requires a value")
        elif name in ("--create-backup", "--list-backups", "--cleanup"):
            flags.add(name)
        elif name in _COMMAND_OPTIONS:
            tail.append(arg)
            if _COMMAND_OPTIONS[name] and "=" not in arg:
                if i + 1 >= len(args):
                    raise UsageError(f"option {name} requires a value")
                tail.append(args[i + 1])
                i += 1
        else:
            rest.append(arg)
        i += 1
    return values, flags, rest, tail


def translate(args: list[str]) -> list[str]:
    """Rewrite a legacy command line; any other command line is returned unchanged."""
    if not is_legacy(args):
        return args
    values, flags, rest, tail = _split(args)
    actions = [a for a in ACTIONS if a in flags or a in values]
    if len(actions) > 1:
        raise UsageError(f"choose one of {', '.join(actions)}")
    kind = values.get("--type")
    if "--create-backup" in flags:
        command = ["backup", "create"] + (["--type", kind] if kind else [])
    elif "--list-backups" in flags:
        command = ["backup", "list"]
    elif "--verify-backup" in values:
        command = ["backup", "verify", values["--verify-backup"]]
    elif "--cleanup-backups" in values:
        days = values["--cleanup-backups"]
        if not days.strip().isdigit():
            raise UsageError(f"--cleanup-backups takes a number of days, got {days!r}")
        command = ["backup", "cleanup", "--older-than", f"{days.strip()}d"]
    elif "--cleanup" in flags:
        command = ["cleanup-artifacts"]
    else:
        if kind not in _ROLLBACK_TYPES:
            raise UsageError(
                "--type must be schema, data or full for a rollback "
                "(or add --create-backup to back up)"
            )
        command = ["rollback", kind]
        if "--to-revision" in values:
            command += ["--to-revision", values["--to-revision"]]
        if "--backup-file" in values:
            command += ["--backup-file", values["--backup-file"]]
    return rest + command + tail
