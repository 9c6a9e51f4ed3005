"""Adversarial fuzz suite (Hypothesis): generated and mutated backups handed to ``backup
verify``, ``backup verify --restore-test``, ``rollback data --dry-run`` and the real ``rollback
data`` (swap, and sometimes ``--strategy in-place``).

It complements test_adversarial_hostile_backups.py (one hand-written payload per test) with
mutations combined at random: truncation, bit flips and lexer-relevant bytes, psql
meta-commands in many spellings inserted at random lines (and at the places that matter:
before ``\\restrict``, inside and after COPY data, after ``\\unrestrict``), scripts whose
``\\restrict`` pair was removed (as an older pg_dump writes them), server-side ``COPY ... TO
PROGRAM``, harmless statements, same-length edits of an archive's table of contents, and
manifest fields changed, with the manifest resealed (size and sha256 recomputed, as anyone
who can write the storage can) or not.

The invariant, for every example and every command:

* the command restores faithfully (exit 0, and the live database then holds exactly the
  backup's data: the same fingerprint as the backup's bytes restored by PostgreSQL's own
  client into a fresh database, and, when no mutation touched the data, the fingerprint taken
  when the backup was made), or it refuses: exit 4 (backup invalid), 5 (the backup's SQL
  failed, database unchanged) or 7 (a guard: only when the manifest names another
  environment, database or type), with the live database unchanged (data fingerprint,
  schema dump, list of databases);
* nothing runs outside the database: no marker file that a smuggled command would create
  ever exists, and no file appears under the test's tmp dir but the logs and safety backups
  the tool writes.

Server-side payloads (``COPY ... TO PROGRAM``) run with the rights of the role the restore
connects as. The test role is a superuser and no signing key is configured in the first
tests: that is the case the tool cannot stop by itself, and the README says so ("when the
restore runs as a superuser without a signing key, the plan and the result say plainly that
the backup's SQL runs with superuser rights"). Such an execution is therefore counted and
printed, and it is a violation only when the command that ran it did not say so (neither
its own output nor the plan of the same backup). The last test configures
``DB_ROLLBACK_SIGNING_KEY`` when the backup is made and when it is restored: then every
resealed mutation must be refused with exit 4 and no marker may ever appear.

Violations are collected over all the examples (not raised one by one, so the run stays
bounded and reports all of them) and the test fails at the end with the exact mutation,
command and outcome of each.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from rollback_cli.storage.base import sha256_artifact
from tests.rollback_helpers import Project, reseal, tier_project
from tests.servers import TestDatabase

KEY = "fuzz-signing-key-0123456789abcdef"
FORMATS = ("plain", "custom", "directory")
EXAMPLES = {"plain": 40, "custom": 25, "directory": 25}
SIGNED_EXAMPLES = 30

_RESTRICT_LINE = re.compile(rb"^\\(?:un)?restrict [A-Za-z0-9]+\r?\n?$")
_LINES = re.compile(rb"[^\n]*\n|[^\n]+$")
_NEEDLE = re.compile(rb"(?:CREATE|ALTER|COPY|SELECT pg_catalog)[^;\x00]*;")


# --------------------------------------------------------------------------- payloads
#
# {c}: a client-side marker (psql runs as this process), {s}: a server-side marker (the
# server runs as its OS user), {g}: a marker only a smuggled \gexec can reach, {rel}: a
# marker relative to the working directory (the test's tmp dir), {inc}: a script holding
# `\! touch`, {key}: the \restrict key of the dump. Trailing " #" keeps the shell from
# seeing what psql passes on after the command.

CLIENT = {
    "shell": "\\! touch {c}",
    "shell-nospace": "\\!touch {c}",
    "shell-indented": "   \\! touch {c}",
    "shell-same-line": "SELECT 1; \\! touch {c}",
    "shell-after-separator": "SELECT 1 \\\\ \\! touch {c}",
    "block-comment-end": "/* a */ \\! touch {c}",
    "pipe-output": "\\o | touch {c}\nSELECT 1;\n\\o",
    "pipe-output-nospace": "\\o|touch {c}\nSELECT 1;\n\\o",
    "out-file": "\\o {c}\nSELECT 1;\n\\o",
    "out-relative": "\\out {rel}\nSELECT 1;\n\\o",
    "g-pipe": "SELECT 1 \\g |touch {c}",
    "g-file": "SELECT 1 \\g {c}",
    "w-pipe": "SELECT 1 \\w |touch {c}",
    "w-file": "SELECT 1 \\w {c}",
    "copy-program": "\\copy (SELECT 1) TO PROGRAM 'touch {c}'",
    "copy-program-lower": "\\copy (select 1) to program 'touch {c}'",
    "copy-file": "\\copy (SELECT 1) TO '{c}'",
    "copy-from-program": "CREATE TEMP TABLE fz_cp (x text);\n\\copy fz_cp FROM PROGRAM 'touch {c}'",
    "setenv": "\\setenv PAGER 'touch {c}'\n\\pset pager always\nSELECT 1;",
    "include": "\\i {inc}",
    "include-relative": "\\ir {inc}",
    "include-long": "\\include {inc}",
    "gexec": "SELECT 'COPY (SELECT 1) TO PROGRAM ''touch {g}''' \\gexec",
    "gset-then-shell": "SELECT 1 AS fz \\gset\n\\! touch {c}",
    "no-error-stop": "\\set ON_ERROR_STOP 0\n\\! touch {c}",
    "lo-export": "\\lo_export 0 {c}",
    "after-copy-block": (
        "CREATE TEMP TABLE fz_c (x text);\nCOPY fz_c FROM stdin;\nrow\n\\.\n\\! touch {c}"
    ),
    "copy-end-early": "\\.\n\\! touch {c} #",
    "unrestrict-then-shell": "\\unrestrict {key}\n\\! touch {c}",
    "fake-unrestrict": "\\unrestrict abc\n\\! touch {c}",
    "unrestrict-then-cr-comment": "\\unrestrict {key}\n-- x\r\\! touch {c} #",
    "scs-off": "SET standard_conforming_strings = off;\nSELECT 'x\\'; \\! touch {c} --';",
    "scs-off-string": "SET standard_conforming_strings = off;\nSELECT 'a\\' , '\\! touch {c} #';",
    "scs-set-config": (
        "SELECT set_config('standard_conforming_strings', 'off', false);\n"
        "SELECT 'a\\' , '\\! touch {c} #';"
    ),
    "scs-no": "SET standard_conforming_strings = no;\nSELECT 'a\\' , '\\! touch {c} #';",
    "scs-to-f": (
        "SET SESSION standard_conforming_strings TO 'f';\nSELECT 'a\\' , '\\! touch {c} #';"
    ),
    "scs-quoted-name": (
        "SET \"standard_conforming_strings\" = off;\nSELECT 'a\\' , '\\! touch {c} #';"
    ),
    "scs-pg-settings": (
        "UPDATE pg_settings SET setting = 'off' WHERE name = 'standard_conforming_strings';\n"
        "SELECT 'a\\' , '\\! touch {c} #';"
    ),
    "cr-comment": "-- note\r\\! touch {c} #",
    "cr-code": "SELECT 1;\r\\! touch {c} #",
    "nul-merge": "SELECT \x00'\n\\! touch {c} #\n';",
    "copy-from-stdin-lookalike": (
        "CREATE TEMP TABLE stdin (x int);\nCOPY (SELECT x FROM stdin) TO STDOUT;\n"
        "\\! touch {c} #\n\\."
    ),
    "copy-from-comment": (
        "CREATE TEMP TABLE fz_t (x text);\nCOPY fz_t FROM/**/stdin;\n\\! touch {c} #\n\\."
    ),
}

SERVER = {
    "srv-program": "COPY (SELECT 1) TO PROGRAM 'touch {s}';",
    "srv-program-lower": "copy (select 1) to program 'touch {s}';",
    "srv-from-program": (
        "CREATE TABLE public.fz_prog (x text);\nCOPY public.fz_prog FROM PROGRAM 'touch {s}';"
    ),
    "srv-do-execute": ("DO $$ BEGIN EXECUTE 'COPY (SELECT 1) TO PROGRAM ''touch {s}'''; END $$;"),
    "srv-file": "COPY (SELECT 1) TO '{s}';",
}

HARMLESS = {
    "new-table": (
        "CREATE TABLE public.fz_extra (note text);\n"
        "INSERT INTO public.fz_extra VALUES ('a\\b'), (E'tab\\there');"
    ),
    "insert-orders": (
        "INSERT INTO public.orders (id, customer_id, amount, placed_at) "
        "VALUES (9001, 1, 1.00, '2024-01-01 00:00:00+00');"
    ),
    "string-backslash": "SELECT 'a \\! b';",
    "estring": "SELECT E'it\\'s \\\\! fine';",
    "quoted-ident": 'SELECT 1 AS "odd \\! name";',
    "do-block": "DO $body$ BEGIN PERFORM '\\! x'; END $body$;",
    "dollar": "SELECT $$ \\! not a command $$;",
    "dollar-multiline": "SELECT $fz$ one\n\\! two\n$fz$;",
    "line-comment": "-- \\! a comment",
    "block-comment": "/* nested /* \\! */ still a comment */ SELECT 1;",
    "multiline-string": "SELECT 'line one\n\\! line two';",
    "unicode-string": "SELECT U&'\\0041';",
}

# Appended to an existing line (a statement, a comment, a COPY data row...).
APPENDED = {
    "append-shell": " \\! touch {c} #",
    "append-pipe": " \\g |touch {c}",
    "append-comment": " -- \\! only a comment",
    "append-program": " COPY (SELECT 1) TO PROGRAM 'touch {s}';",
}

# Same-length replacements of SQL text in an archive's table of contents.
TOC = {
    "toc-shell": "\\! touch {c} #",
    "toc-pipe": "\\o |touch {c}",
    "toc-cr-comment": "-- x\r\\! touch {c} #",
    "toc-program": "COPY (SELECT 1) TO PROGRAM 'touch {s}';",
    "toc-do-program": "DO $$BEGIN EXECUTE 'COPY (SELECT 1) TO PROGRAM ''touch {s}'''; END$$;",
    "toc-stdin-lookalike": "COPY (SELECT 1 FROM stdin) TO STDOUT;\n\\! touch {c} #",
    "toc-harmless": "SELECT 1;",
    "toc-harmless-backslash": "SELECT 'a \\! b';",
}

# The guard is a lexer: the spellings where it and psql could disagree get a weight of their own.
LEXER_TRICKS = sorted(
    k for k in CLIENT if k.startswith(("scs-", "cr-", "nul-", "copy-", "unrestrict-", "block-"))
)
PAYLOADS: dict[str, str] = {**CLIENT, **SERVER, **HARMLESS, **APPENDED, **TOC}
SERVER_KINDS = set(SERVER) | {"append-program", "toc-program", "toc-do-program"}
HARMLESS_KINDS = set(HARMLESS) | {"append-comment", "toc-harmless", "toc-harmless-backslash"}
# Kinds whose effect on the data is none (or a table of their own): when the tool restores
# such a backup, the backup's tables must hold exactly what they held when it was made.
DATA_TOUCHING_KINDS = {"insert-orders"}

# Bytes that change how psql or the guard reads a line.
LEXER_BYTES = [0x00, 0x0D, 0x0A, 0x5C, 0x27, 0x22, 0x24, 0x3B, 0x2D, 0x2A, 0x2F, 0x45, 0xFF]


# --------------------------------------------------------------------------- mutations


@dataclass(frozen=True)
class Insert:
    """Insert a payload before line ``line`` (modulo the line count)."""

    line: int
    kind: str


@dataclass(frozen=True)
class Append:
    """Append a payload to the end of line ``line`` (same line, before its newline)."""

    line: int
    kind: str


@dataclass(frozen=True)
class StripRestrict:
    """Remove pg_dump's \\restrict/\\unrestrict pair, as an older pg_dump writes scripts."""


@dataclass(frozen=True)
class Truncate:
    at: int
    file: int = 0


@dataclass(frozen=True)
class FlipBit:
    at: int
    bit: int
    file: int = 0


@dataclass(frozen=True)
class SetByte:
    at: int
    value: int
    file: int = 0


@dataclass(frozen=True)
class ReplaceSql:
    """Replace an SQL text of the archive's TOC with a same-length payload: the
    ``needle``-th (modulo) of those long enough to hold it."""

    needle: int
    kind: str


@dataclass(frozen=True)
class DeleteFile:
    file: int


@dataclass(frozen=True)
class AddFile:
    name: str


@dataclass(frozen=True)
class ManifestEdit:
    """Set a manifest field (``<delete>`` removes it; field ``<raw>`` replaces the text)."""

    field: str
    value: Any


@dataclass(frozen=True)
class Plan:
    ops: tuple[Any, ...]
    reseal: bool
    strategy: str = "swap"

    @property
    def kinds(self) -> set[str]:
        return {op.kind for op in self.ops if isinstance(op, Insert | Append | ReplaceSql)}

    @property
    def guard_edits(self) -> bool:
        """A manifest edit a data rollback refuses with exit 7 (another environment,
        database, or a partial type)."""
        return any(
            isinstance(op, ManifestEdit) and op.field in ("environment", "database", "type")
            for op in self.ops
        )

    @property
    def harmless_only(self) -> bool:
        return bool(self.ops) and all(
            isinstance(op, Insert | Append | ReplaceSql) and op.kind in HARMLESS_KINDS
            for op in self.ops
        )

    @property
    def keeps_data(self) -> bool:
        """No mutation that could change the rows of the backup's own tables."""
        return not any(
            isinstance(op, Truncate | FlipBit | SetByte | DeleteFile)
            or (isinstance(op, Insert | Append | ReplaceSql) and op.kind in DATA_TOUCHING_KINDS)
            for op in self.ops
        )


# --------------------------------------------------------------------------- the bench


def lines_of(data: bytes) -> list[bytes]:
    return _LINES.findall(data)


def artifact_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [path]


def restricted(script: bytes) -> bytes:
    """The script with psql's restricted mode on from its first line: the oracle restore
    may then run SQL only, never a meta-command."""
    kept = [line for line in lines_of(script) if not _RESTRICT_LINE.match(line)]
    return b"\\restrict fuzzoracle\n" + b"".join(kept)


def first_error(text: str, exit_code: int | None = None) -> str:
    """The tool's one-line error (or what else best says what happened)."""
    if exit_code == 0:
        return "succeeded"
    lines = [line for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("db-rollback:")]
    return (errors or lines or [""])[-1][:300]


@dataclass
class Outcome:
    command: str
    exit_code: int
    text: str
    exception: str | None


@dataclass
class Bench:
    """One test's database, its pristine backup of one format, and the bookkeeping."""

    project: Project
    #: the test's tmp dir: no file may appear under it but the tool's logs and backups
    tmp_path: Path
    #: where this bench keeps its pristine backups and mutated copies (under tmp_path)
    home: Path
    fmt: str
    marker_dir: Path
    signed: bool
    pristine: Path = field(init=False)
    pristine_plain: Path = field(init=False)
    manifest: dict[str, Any] = field(init=False)
    backup_print: dict[str, str] = field(init=False)
    key: str = field(init=False)
    include: Path = field(init=False)
    violations: list[str] = field(default_factory=list)
    stats: Counter[str] = field(default_factory=Counter)
    server_runs: list[str] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    problems: Counter[str] = field(default_factory=Counter)
    harmless_refusals: list[str] = field(default_factory=list)
    count: int = 0

    def __post_init__(self) -> None:
        for name in ("pristine", "cases", "oracle-cwd"):
            (self.home / name).mkdir(parents=True, exist_ok=True)
        self.include = self.home / "include_me.sql"
        self.include.write_text(f"\\! touch {self.marker_dir}/c-included\n")
        plain = Path(self.project.backup("--format", "plain"))
        self.backup_print = self.project.data_fingerprint()
        self.pristine_plain = self._keep(plain, "for-reset")
        made = plain if self.fmt == "plain" else Path(self.project.backup("--format", self.fmt))
        assert self.project.data_fingerprint() == self.backup_print
        self.pristine = self._keep(made, "fuzzed")
        self.manifest = json.loads(Path(f"{self.pristine}.json").read_text())
        match = re.search(rb"^\\restrict ([A-Za-z0-9]+)$", self.pristine_plain.read_bytes(), re.M)
        self.key = match.group(1).decode() if match else "nokey"

    def _keep(self, backup: Path, tag: str) -> Path:
        target = self.home / "pristine" / tag / backup.name
        target.parent.mkdir()
        if backup.is_dir():
            shutil.copytree(backup, target)
        else:
            shutil.copy2(backup, target)
        shutil.copy2(f"{backup}.json", f"{target}.json")
        return target

    # -- what a strategy needs to know ----------------------------------------------------

    @property
    def files(self) -> list[Path]:
        return artifact_files(self.pristine)

    @property
    def lines(self) -> list[bytes]:
        return lines_of(self.pristine.read_bytes()) if self.fmt == "plain" else []

    @property
    def toc(self) -> Path:
        return self.pristine / "toc.dat" if self.fmt == "directory" else self.pristine

    @property
    def needles(self) -> list[bytes]:
        if self.fmt == "plain":
            return []
        return [m.group() for m in _NEEDLE.finditer(self.toc.read_bytes())]

    def needle_index(self, kind: str, prefix: bytes) -> int:
        """The ReplaceSql index that replaces the SQL text starting with ``prefix``."""
        size = len(self.render(kind)) + 3
        fitting = [n for n in self.needles if len(n) >= size]
        return next(i for i, n in enumerate(fitting) if n.startswith(prefix))

    def anchors(self) -> list[int]:
        """Line positions that matter to psql and the guard."""
        lines = self.lines
        found = {0, 1, 2, len(lines), len(lines) - 1}
        for i, line in enumerate(lines):
            if line.startswith(b"\\restrict"):
                found |= {i, i + 1}
            if line.startswith(b"\\unrestrict"):
                found |= {i, i + 1, i + 2}
            if line.startswith(b"COPY "):
                found |= {i + 1, i + 2}
            if line == b"\\.\n":
                found |= {i, i + 1}
            if line.startswith((b"SET standard_conforming_strings", b"CREATE TABLE")):
                found |= {i + 1, i + 2}
        return sorted(found)

    def render(self, kind: str) -> bytes:
        text = PAYLOADS[kind]
        for name, value in (
            ("{c}", f"{self.marker_dir}/c-{kind}"),
            ("{s}", f"{self.marker_dir}/s-{kind}"),
            ("{g}", f"{self.marker_dir}/g-{kind}"),
            ("{rel}", f"rel-{kind}"),
            ("{inc}", str(self.include)),
            ("{key}", self.key),
        ):
            text = text.replace(name, value)
        return text.encode()

    # -- building one mutated backup ------------------------------------------------------

    def build(self, plan: Plan) -> Path:
        case = self.home / "cases" / f"{self.count:03d}"
        case.mkdir()
        backup = case / self.pristine.name
        if self.pristine.is_dir():
            shutil.copytree(self.pristine, backup)
        else:
            shutil.copy2(self.pristine, backup)
        shutil.copy2(f"{self.pristine}.json", f"{backup}.json")
        edits = [op for op in plan.ops if isinstance(op, ManifestEdit)]
        for op in plan.ops:
            if not isinstance(op, ManifestEdit):
                self._apply(backup, op)
        if plan.reseal:
            reseal(backup)
        for op in edits:
            self._edit_manifest(backup, op)
        return backup

    def unchanged(self, backup: Path) -> bool:
        """The mutations cancelled out or did nothing: the pristine backup itself."""
        if sha256_artifact(backup) != sha256_artifact(self.pristine):
            return False
        try:
            return json.loads(Path(f"{backup}.json").read_text()) == self.manifest
        except ValueError:
            return False

    def _apply(self, backup: Path, op: Any) -> None:
        if isinstance(op, AddFile):
            if backup.is_dir():
                (backup / op.name).write_bytes(b"not part of the dump\n")
            return
        files = artifact_files(backup)
        if not files:
            return
        if isinstance(op, DeleteFile):
            if backup.is_dir():
                files[op.file % len(files)].unlink()
            return
        if isinstance(op, Insert | Append | StripRestrict):
            if self.fmt != "plain":
                return
            target = backup
        elif isinstance(op, ReplaceSql):
            target = backup / "toc.dat" if backup.is_dir() else backup
        else:
            target = files[op.file % len(files)]
        if not target.is_file():  # a directory's toc.dat deleted by an earlier mutation
            return
        data = target.read_bytes()
        target.write_bytes(self._mutate(data, op))

    def _mutate(self, data: bytes, op: Any) -> bytes:
        if isinstance(op, Truncate):
            return data[: op.at % max(len(data), 1)]
        if isinstance(op, FlipBit | SetByte):
            if not data:
                return data
            at = op.at % len(data)
            value = data[at] ^ (1 << op.bit) if isinstance(op, FlipBit) else op.value
            return data[:at] + bytes([value]) + data[at + 1 :]
        if isinstance(op, StripRestrict):
            return b"".join(line for line in lines_of(data) if not _RESTRICT_LINE.match(line))
        if isinstance(op, Insert):
            lines = lines_of(data)
            at = op.line % (len(lines) + 1)
            if at == len(lines) and lines and not lines[-1].endswith(b"\n"):
                lines[-1] += b"\n"
            return b"".join([*lines[:at], self.render(op.kind) + b"\n", *lines[at:]])
        if isinstance(op, Append):
            lines = lines_of(data)
            if not lines:
                return data
            at = op.line % len(lines)
            line = lines[at]
            end = len(line) - (1 if line.endswith(b"\n") else 0)
            lines[at] = line[:end] + self.render(op.kind) + line[end:]
            return b"".join(lines)
        if isinstance(op, ReplaceSql):
            payload = self.render(op.kind) + b"\n"
            needles = [m.group() for m in _NEEDLE.finditer(data)]
            fitting = [n for n in needles if len(n) >= len(payload) + 2]
            if not fitting:
                return data
            needle = fitting[op.needle % len(fitting)]
            evil = payload + b"-" * (len(needle) - len(payload))
            return data.replace(needle, evil, 1)
        raise AssertionError(op)

    def _edit_manifest(self, backup: Path, op: ManifestEdit) -> None:
        path = Path(f"{backup}.json")
        if op.field == "<raw>":
            path.write_text(op.value)
            return
        try:
            manifest = json.loads(path.read_text())
        except ValueError:
            return  # an earlier edit left no JSON: nothing to set a field in
        if not isinstance(manifest, dict):
            return
        if op.value == "<delete>":
            manifest.pop(op.field, None)
        else:
            manifest[op.field] = op.value
        path.write_text(json.dumps(manifest))

    # -- the live database ----------------------------------------------------------------

    def reset_live(self) -> None:
        """The live database back to the backup's state, then changed so that any restore
        (or partial restore) shows: 5 orders fewer and a table the backup does not have."""
        db, server = self.project.db, self.project.db.server
        for name in db.related_databases():
            server.drop_database(name)
        server.create_database(db.name)
        db.psql(file=self.pristine_plain)
        db.execute(
            "DELETE FROM public.orders WHERE id > 45; CREATE TABLE public.live_only (x int); "
            "INSERT INTO public.live_only VALUES (1)"
        )

    def state(self, schema: bool = True) -> tuple[dict[str, str], str | None, list[str]]:
        project = self.project
        return (
            project.data_fingerprint(),
            project.schema_dump() if schema else None,
            project.databases(),
        )

    def oracle_print(self, backup: Path) -> dict[str, str] | str:
        """The backup's bytes restored by PostgreSQL's own client into a fresh database (psql
        in restricted mode: SQL only), and that database's data fingerprint."""
        server = self.project.db.server
        name = f"{self.project.db.name}_oracle"
        server.drop_database(name)
        server.create_database(name)
        try:
            env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
            env.update(server.conninfo_env(name))
            if self.fmt == "plain":
                argv = [str(server.bin_dir / "psql"), "--no-psqlrc", "--quiet"]
                argv += ["-v", "ON_ERROR_STOP=1", "--single-transaction", "--file=-"]
                stdin: bytes | None = restricted(backup.read_bytes())
            else:
                argv = [str(server.bin_dir / "pg_restore"), "--exit-on-error", "--no-password"]
                argv += [f"--dbname={name}", str(backup)]
                stdin = None
            done = subprocess.run(
                argv,
                input=stdin,
                env=env,
                capture_output=True,
                timeout=120,
                cwd=self.home / "oracle-cwd",
                check=False,
            )
            if done.returncode != 0:
                return "oracle restore failed: " + first_error(
                    done.stderr.decode("utf-8", "replace")
                )
            oracle = Project(TestDatabase(name, server), self.project.alembic_ini, self.tmp_path)
            return oracle.data_fingerprint()
        finally:
            server.drop_database(name)
            # Server-side payloads run again in the oracle's restore: not the tool's doing.
            for marker in self.marker_dir.iterdir():
                marker.unlink()

    # -- outside the database -------------------------------------------------------------

    def tree(self) -> set[Path]:
        return set(self.tmp_path.rglob("*"))

    def expected_file(self, path: Path) -> bool:
        parts = path.relative_to(self.tmp_path).parts
        if "__pycache__" in parts:
            return True
        if parts[:2] == ("work", "logs"):
            return path.suffix == ".log" or path == self.project.log_dir
        if parts[:2] == ("work", "backups"):
            return len(parts) == 2 or (
                len(parts) == 3 and parts[2].startswith("backup_") and "_safety" in parts[2]
            )
        return parts == ("work",)

    def outside(self, baseline: set[Path]) -> tuple[list[str], list[Path]]:
        """Markers found (then removed) and unexpected new files under the tmp dir (then
        removed, so the next command is judged on its own)."""
        markers = sorted(p.name for p in self.marker_dir.iterdir())
        for name in markers:
            (self.marker_dir / name).unlink()
        strays = sorted(p for p in self.tree() - baseline if not self.expected_file(p))
        for stray in strays:
            if stray.is_dir() and not stray.is_symlink():
                shutil.rmtree(stray, ignore_errors=True)
            else:
                stray.unlink(missing_ok=True)
        return markers, strays

    # -- one example ----------------------------------------------------------------------

    def commands(self, backup: Path, plan: Plan) -> Iterator[tuple[str, list[str]]]:
        yield "verify", ["backup", "verify", str(backup)]
        yield "restore-test", ["backup", "verify", str(backup), "--restore-test"]
        yield "dry-run", ["--dry-run", "rollback", "data", "--backup-file", str(backup)]
        real = ["rollback", "data", "--backup-file", str(backup)]
        if plan.strategy == "in-place":
            real += ["--strategy", "in-place"]
        yield "rollback", real

    def allowed_exits(self, command: str, plan: Plan) -> set[int]:
        if self.signed:
            return {4}
        allowed = {"verify": {0, 4}, "restore-test": {0, 4, 5}, "dry-run": {0, 4}}.get(
            command, {0, 4, 5}
        )
        if command in ("dry-run", "rollback") and plan.guard_edits:
            allowed = allowed | {7}
        return allowed

    def run_example(self, plan: Plan) -> None:
        if repr(plan) in self.seen:  # Hypothesis may draw a plan twice: judge it once
            return
        self.seen.add(repr(plan))
        self.count += 1
        for stale in self.marker_dir.iterdir():  # only the oracle restore may leave one
            stale.unlink()
        label = f"[{self.fmt} #{self.count}] {plan!r}"
        backup = self.build(plan)
        if self.unchanged(backup):
            # Not a mutation: with a key it must be accepted, so it is not judged there;
            # without one it is a control (it must restore faithfully).
            self.stats["unchanged"] += 1
            if self.signed:
                self.count -= 1
                shutil.rmtree(backup.parent, ignore_errors=True)
                return
        self.reset_live()
        baseline = self.tree()
        before = self.state()
        outcomes: dict[str, Outcome] = {}
        plan_warned = False

        def violation(what: str, outcome: Outcome | None = None) -> None:
            detail = ""
            if outcome is not None:
                said = first_error(outcome.text, outcome.exit_code)
                detail = f"\n    {outcome.command}: exit {outcome.exit_code}: {said}"
                if outcome.exception:
                    detail += f"\n    exception: {outcome.exception}"
            self.violations.append(f"{label}\n    {what}{detail}")
            self.problems[f"{outcome.command if outcome else '-'}: {what}"] += 1

        for command, args in self.commands(backup, plan):
            result = self.project.run(*args)
            text = result.stdout + result.stderr
            exception = None
            if result.exception is not None and not isinstance(result.exception, SystemExit):
                exception = repr(result.exception)[:300]
            outcome = Outcome(command, result.exit_code, text, exception)
            outcomes[command] = outcome
            self.stats[f"{command}:{result.exit_code}"] += 1
            warned = "superuser rights" in text
            if command == "dry-run":
                plan_warned = warned

            markers, strays = self.outside(baseline)
            for marker in markers:
                if marker.startswith("s-") and not self.signed and (warned or plan_warned):
                    self.server_runs.append(f"{command} ran {marker} (exit {result.exit_code})")
                    continue
                who = "server-side" if marker.startswith(("s-", "g-")) else "client-side"
                said = "" if marker.startswith("c-") else " and nothing said it runs as superuser"
                violation(f"{who} command ran outside the database: {marker}{said}", outcome)
            for stray in strays:
                violation(f"unexpected file {stray.relative_to(self.tmp_path)}", outcome)

            if result.exit_code not in self.allowed_exits(command, plan):
                violation("exit code outside the invariant", outcome)

            if command != "rollback":
                now = self.state(schema=command == "dry-run")
                if now[0] != before[0] or now[2] != before[2]:
                    violation("the live database changed", outcome)
                if command == "dry-run" and now[1] != before[1]:
                    violation("the live schema changed", outcome)
                continue
            self._judge_rollback(backup, plan, outcome, before, violation)

        verify = outcomes["verify"]
        if verify.exit_code == 4:
            for outcome in outcomes.values():
                if outcome.exit_code == 0:
                    violation("verify refused the backup, yet this command accepted it", outcome)
        if plan.harmless_only:
            self.stats["harmless only"] += 1
            if verify.exit_code == 4:
                self.stats["harmless refused by verify"] += 1
                self.harmless_refusals.append(f"{plan!r}: {first_error(verify.text)}")
        shutil.rmtree(backup.parent, ignore_errors=True)

    def _judge_rollback(
        self,
        backup: Path,
        plan: Plan,
        outcome: Outcome,
        before: tuple[dict[str, str], str | None, list[str]],
        violation: Callable[[str, Outcome | None], None],
    ) -> None:
        after = self.state()
        key = {0: "restored", 4: "refused", 5: "failed", 7: "guarded"}.get(
            outcome.exit_code, f"exit {outcome.exit_code}"
        )
        self.stats[f"rollback {key}"] += 1
        if outcome.exit_code != 0:
            for what, was, now in zip(("data", "schema", "databases"), before, after, strict=True):
                if was != now:
                    violation(f"refused or failed, but the live {what} changed", outcome)
            return
        oracle = self.oracle_print(backup)
        if after[0] != oracle:
            shown = oracle if isinstance(oracle, str) else "a different fingerprint"
            violation(f"restored, but not what PostgreSQL restores from it ({shown})", outcome)
        base = {table: after[0].get(table) for table in self.backup_print}
        if plan.keeps_data and base != self.backup_print:
            changed = sorted(t for t in base if base[t] != self.backup_print[t])
            violation(f"restored, but the backup's tables differ from its data: {changed}", outcome)
        new = sorted(set(after[2]) - set(before[2]))
        gone = sorted(set(before[2]) - set(after[2]))
        if plan.strategy == "in-place" and (new or gone):
            violation(f"in-place restore changed the databases: +{new} -{gone}", outcome)
        if plan.strategy == "swap" and (gone or len(new) != 1 or "_pre_" not in new[0]):
            violation(f"swap left unexpected databases: +{new} -{gone}", outcome)

    def summary(self) -> str:
        s = self.stats
        line = (
            f"fuzzed {self.count} {self.fmt} backups: {s['rollback refused']} refused (4), "
            f"{s['rollback failed']} failed unchanged (5), {s['rollback guarded']} refused by a "
            f"guard (7), {s['rollback restored']} restored faithfully"
        )
        others = sum(v for k, v in s.items() if k.startswith("rollback exit"))
        if others:
            line += f", {others} other exits"
        line += (
            f"; verify refused {s['verify:4']}, restore-test refused {s['restore-test:4']}"
            f" (+{s['restore-test:5']} exit 5), dry-run refused {s['dry-run:4']}"
        )
        if s["harmless only"]:
            line += (
                f"; harmless-only mutations: {s['harmless only']}, refused by verify "
                f"{s['harmless refused by verify']}"
            )
        if self.server_runs:
            line += (
                f"\n  server-side TO PROGRAM payloads EXECUTED {len(self.server_runs)} times "
                "(superuser restore, no signing key: the documented risk): "
                + "; ".join(sorted(set(self.server_runs))[:12])
            )
        for refusal in self.harmless_refusals[:5]:
            line += f"\n  harmless, refused (allowed, recorded): {refusal[:300]}"
        line += f"\n  invariant violations: {len(self.violations)}"
        for problem, times in sorted(self.problems.items()):
            line += f"\n    {times:3d} x {problem[:160]}"
        return line

    def report(self) -> str:
        return f"{len(self.violations)} invariant violations\n" + "\n".join(self.violations)


# --------------------------------------------------------------------------- strategies


def manifest_edits(bench: Bench) -> st.SearchStrategy[ManifestEdit]:
    manifest = bench.manifest
    counts: dict[str, int] = manifest["row_counts"]
    table = sorted(counts)[-1]
    revision = manifest["alembic_revisions"][0] if manifest["alembic_revisions"] else "x"
    values: dict[str, list[Any]] = {
        "environment": ["production", "", "staging ", 7],
        "database": ["postgres", manifest["database"] + "x", None],
        "type": ["schema", "data", "bogus"],
        "format": [f for f in (*FORMATS, "zip") if f != manifest["format"]],
        "row_counts": [
            {**counts, table: counts[table] + 1},
            {k: v for k, v in counts.items() if k != table},
            {**counts, "public.missing": 0},
            {**counts, table: str(counts[table])},
            {},
            [],
        ],
        "alembic_revisions": [[], ["0000deadbeef"], [revision, revision], revision],
        "size": [manifest["size"] + 1, 0, -1, str(manifest["size"])],
        "sha256": ["0" * 64, "abc"],
        "file_name": ["backup_staging_other.sql", "../" + manifest["file_name"]],
        "manifest_version": [2, "1"],
        "created_at": ["not a date"],
        "signature": ["<delete>", "hmac-sha256:00000000:" + "0" * 64],
        "<raw>": ["{not json", "[]", ""],
    }
    return st.sampled_from(
        [ManifestEdit(name, value) for name, options in values.items() for value in options]
    )


def weighted(*choices: tuple[st.SearchStrategy[Any], int]) -> st.SearchStrategy[Any]:
    """One of the strategies, each drawn in proportion to its weight."""
    pool = [strategy for strategy, weight in choices for _ in range(weight)]
    return st.sampled_from(pool).flatmap(lambda strategy: strategy)


def plans(bench: Bench, *, reseal_always: bool = False) -> st.SearchStrategy[Plan]:
    sizes = [p.stat().st_size for p in bench.files]
    offset = st.integers(0, max(sizes) - 1)
    file = st.integers(0, len(sizes) - 1)
    byte_ops = st.one_of(
        st.builds(FlipBit, offset, st.integers(0, 7), file),
        st.builds(SetByte, offset, st.sampled_from(LEXER_BYTES) | st.integers(0, 255), file),
        st.builds(Truncate, offset, file),
    )
    edits = manifest_edits(bench)
    if bench.fmt == "plain":
        n = len(bench.lines)
        line = st.sampled_from(bench.anchors()) | st.integers(0, n)
        kinds = st.one_of(
            st.sampled_from(sorted(CLIENT)),
            st.sampled_from(LEXER_TRICKS),
            st.sampled_from(sorted(SERVER)),
            st.sampled_from(sorted(HARMLESS)),
        )
        inserts = st.builds(Insert, line, kinds)
        appends = st.builds(Append, st.integers(0, n - 1), st.sampled_from(sorted(APPENDED)))
        op = weighted((inserts, 5), (appends, 1), (byte_ops, 2), (edits, 2))
        # Half the scripts lose their \restrict pair first, as an older pg_dump writes them
        # (psql's restricted mode would otherwise stop a meta-command the guard let through).
        ops = st.tuples(st.booleans(), st.lists(op, min_size=1, max_size=3)).map(
            lambda t: ((StripRestrict(),) if t[0] else ()) + tuple(t[1])
        )
    else:
        replace = st.builds(
            ReplaceSql, st.integers(0, len(bench.needles) - 1), st.sampled_from(sorted(TOC))
        )
        extra: list[st.SearchStrategy[Any]] = []
        if bench.fmt == "directory":
            extra = [st.builds(DeleteFile, file), st.just(AddFile("9999.dat.gz"))]
        op = weighted((replace, 4), (byte_ops, 3), (edits, 2), *((e, 1) for e in extra))
        ops = st.lists(op, min_size=1, max_size=3).map(tuple)
    reseal_flag = st.just(True) if reseal_always else st.sampled_from([True, True, True, False])
    return st.builds(
        Plan,
        ops,
        reseal_flag,
        st.sampled_from(["swap", "swap", "in-place"]),
    )


def seeds(bench: Bench) -> list[Plan]:
    """Explicit examples run first on every run: mutations known to matter."""
    counts = bench.manifest["row_counts"]
    more_rows = ManifestEdit("row_counts", {**counts, "public.customers": 21})
    manifest_seeds = [Plan((more_rows,), True, "in-place"), Plan((more_rows,), True)]
    if bench.fmt == "plain":
        lines = bench.lines
        scs = next(i for i, x in enumerate(lines) if x.startswith(b"SET standard_conforming"))
        trailer = next(i for i, x in enumerate(lines) if x.startswith(b"\\unrestrict"))
        return [
            Plan((StripRestrict(), Insert(scs + 1, "cr-comment")), True),
            Plan((Insert(2, "scs-set-config"),), True, "in-place"),
            Plan((StripRestrict(), Insert(scs + 1, "copy-from-stdin-lookalike")), True),
            Plan((Insert(2, "nul-merge"),), True),
            Plan((Insert(trailer, "srv-program"),), True),
            Plan((Insert(trailer, "new-table"),), True),
            *manifest_seeds,
        ]
    default = b"ALTER TABLE ONLY public.customers ALTER COLUMN id SET DEFAULT"
    return [
        Plan((ReplaceSql(bench.needle_index("toc-program", default), "toc-program"),), True),
        Plan(
            (ReplaceSql(bench.needle_index("toc-shell", default), "toc-shell"),), True, "in-place"
        ),
        Plan((ReplaceSql(bench.needle_index("toc-harmless", default), "toc-harmless"),), True),
        # The archive header's version byte: a corrupt archive, whatever it then claims.
        Plan((FlipBit(6, 7, len(bench.files) - 1),), True),
        *manifest_seeds,
    ]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def project15(
    database15: TestDatabase,
    alembic_project: Path,
    tmp_path: Path,
    cli_env: dict,
    monkeypatch: pytest.MonkeyPatch,
) -> Project:
    # psql and the tool run here: a relative path in a payload lands under the tmp dir.
    monkeypatch.chdir(tmp_path)
    return tier_project(database15, alembic_project, tmp_path)


@pytest.fixture
def marker_dir() -> Iterator[Path]:
    """A directory both this process and the server's OS user can write (markers)."""
    path = Path(tempfile.mkdtemp(prefix="fz", dir="/tmp"))
    path.chmod(0o777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.filter_too_much,
        ],
    )


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("fmt", FORMATS)
def test_fuzzed_backups_restore_faithfully_or_are_refused_and_run_nothing_outside(
    project15: Project,
    tmp_path: Path,
    marker_dir: Path,
    capsys: pytest.CaptureFixture[str],
    fmt: str,
) -> None:
    bench = Bench(project15, tmp_path, tmp_path / "fuzz", fmt, marker_dir, signed=False)

    def fuzz(plan: Plan) -> None:
        bench.run_example(plan)

    for seed in seeds(bench):
        fuzz = example(plan=seed)(fuzz)
    fuzz_settings(EXAMPLES[fmt])(given(plan=plans(bench))(fuzz))()

    with capsys.disabled():
        print(f"\n{bench.summary()}")
    assert not bench.violations, bench.report()


def test_with_a_signing_key_every_resealed_mutation_is_refused(
    project15: Project,
    tmp_path: Path,
    marker_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The key is set when the backups are made and when they are used: whatever an
    attacker changes and reseals (bytes, TOC, manifest fields), it is refused with exit 4
    by every command, before any of its SQL runs anywhere."""
    monkeypatch.setenv("DB_ROLLBACK_SIGNING_KEY", KEY)
    benches = {}
    for fmt in FORMATS:
        benches[fmt] = Bench(project15, tmp_path, tmp_path / fmt, fmt, marker_dir, signed=True)
        assert json.loads(Path(f"{benches[fmt].pristine}.json").read_text())["signature"]
    strategy = st.sampled_from(FORMATS).flatmap(
        lambda fmt: st.tuples(st.just(fmt), plans(benches[fmt], reseal_always=True))
    )

    @fuzz_settings(SIGNED_EXAMPLES)
    @given(case=strategy)
    @example(case=("plain", seeds(benches["plain"])[0]))
    @example(case=("plain", seeds(benches["plain"])[4]))
    @example(case=("custom", seeds(benches["custom"])[0]))
    def fuzz(case: tuple[str, Plan]) -> None:
        fmt, plan = case
        benches[fmt].run_example(plan)

    fuzz()

    total = sum(b.count for b in benches.values())
    refused = sum(b.stats["rollback refused"] for b in benches.values())
    violations = [v for b in benches.values() for v in b.violations]
    per_format = ", ".join(f"{b.count} {fmt}" for fmt, b in benches.items())
    with capsys.disabled():
        print(
            f"\nfuzzed {total} resealed backups with a signing key ({per_format}): "
            f"{refused} refused (4), {total - refused} not; invariant violations: "
            f"{len(violations)}"
        )
        problems: Counter[str] = sum((b.problems for b in benches.values()), Counter())
        for problem, times in sorted(problems.items()):
            print(f"    {times:3d} x {problem[:160]}")
    assert not violations, f"{len(violations)} invariant violations\n" + "\n".join(violations)
