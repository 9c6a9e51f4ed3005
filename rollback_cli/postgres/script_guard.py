"""What psql may be handed: SQL, never a meta-command a backup smuggled in.

psql runs backslash commands (``\\!`` runs a shell, ``\\o |`` pipes to one, ``\\copy ...
program``, ``\\setenv``, ``\\i``, ``\\gexec``...) wherever they appear outside a quoted
string, a quoted identifier, a dollar-quoted body, a comment or COPY data. A backup is
input from outside the process, so every byte the tool hands psql goes through
:class:`ScriptGuard` first, a lexer that follows psql's own rules. The only meta-commands
pg_dump itself writes are ``\\restrict KEY`` at the start and ``\\unrestrict KEY`` at the
end (PostgreSQL 17.6+/18); they are allowed in exactly that form and place. Anything else
is refused (exit 4) before psql reads it.

psql's lexing of ``'...'`` depends on ``standard_conforming_strings``; pg_dump always
writes it ``on``, and a script that turns it off is refused, so the guard and psql never
disagree about where a string ends.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from rollback_cli.errors import BackupError

_RESTRICT = re.compile(rb"^\\(restrict|unrestrict) [A-Za-z0-9]+\r?\n?$")
# Only pg_dump's own form: COPY table [(columns)] FROM stdin (no query in parentheses).
_COPY_FROM_STDIN = re.compile(
    rb'^\s*COPY\s+(?:ONLY\s+)?(?:"(?:[^"]|"")+"|[A-Za-z_\x80-\xff][\w$\x80-\xff]*)'
    rb'(?:\.(?:"(?:[^"]|"")+"|[A-Za-z_\x80-\xff][\w$\x80-\xff]*))?'
    rb"\s*(?:\([^()]*\))?\s+FROM\s+stdin\s*$",
    re.IGNORECASE,
)
_SCS_PG_DUMP = re.compile(rb"^\s*SET\s+standard_conforming_strings\s*=\s*on\s*$", re.IGNORECASE)
_DOLLAR_TAG = re.compile(rb"\$([A-Za-z_\x80-\xff][A-Za-z0-9_\x80-\xff]*)?\$")
_IDENT_CHAR = re.compile(rb"[A-Za-z0-9_$\x80-\xff]")


class UnsafeScript(BackupError):
    """The backup holds something that would run outside the database."""


class ScriptGuard:
    """Feed a script line by line (bytes, with their newline); :meth:`check` raises
    UnsafeScript at the first line psql would treat as a meta-command.

    The script is lexed twice, with ``standard_conforming_strings`` on and off (psql follows
    the server's setting, which a script can change in ways no pattern can list, e.g. by
    dynamic SQL): a line is refused when either reading finds a meta-command."""

    def __init__(self, source: str = "the backup") -> None:
        self.source = source
        self.line_number = 0
        self._readings = (_Lexer(source, scs_off=False), _Lexer(source, scs_off=True))

    def check(self, line: bytes) -> None:
        self.line_number += 1
        if b"\x00" in line:
            raise UnsafeScript(
                f"{self.source} holds a NUL byte (line {self.line_number}), which pg_dump never "
                "writes and psql reads as the end of the line; refused, nothing was restored"
            )
        for reading in self._readings:
            reading.check(line)

    def check_all(self, lines: Iterable[bytes]) -> None:
        for line in lines:
            self.check(line)
        self.finish()

    def finish(self) -> None:
        for reading in self._readings:
            reading.finish()

    def filtered(self, lines: Iterable[bytes]) -> Iterator[bytes]:
        """``lines``, each checked before it is passed on."""
        for line in lines:
            self.check(line)
            yield line
        self.finish()


class _Lexer:
    """One reading of the script, following psql's lexer."""

    def __init__(self, source: str, *, scs_off: bool) -> None:
        self.source = source
        self.scs_off = scs_off
        self.line_number = 0
        self._copy_data = False
        self._quote: bytes | None = None  # b"'", b"E'", b'"' or a dollar tag
        self._block_comments = 0
        self._statement = bytearray()
        self._restricted: bytes | None = None
        self._unrestricted = False

    def check(self, line: bytes) -> None:
        self.line_number += 1
        if self._copy_data:
            if line.rstrip(b"\r\n") == b"\\.":
                self._copy_data = False
            return
        if self._unrestricted and line.strip() and not line.lstrip().startswith(b"--"):
            self._refuse("text after the \\unrestrict line that ends a pg_dump script")
        if self._quote is None and not self._block_comments and _RESTRICT.match(line):
            self._restrict(line)
            return
        self._scan(line)

    def check_all(self, lines: Iterable[bytes]) -> None:
        for line in lines:
            self.check(line)
        self.finish()

    def finish(self) -> None:
        if self._restricted is not None and not self._unrestricted:
            self._refuse("\\restrict without its \\unrestrict: the script is incomplete")

    def filtered(self, lines: Iterable[bytes]) -> Iterator[bytes]:
        """``lines``, each checked before it is passed on."""
        for line in lines:
            self.check(line)
            yield line
        self.finish()

    def _restrict(self, line: bytes) -> None:
        command, key = line.strip().split(b" ", 1)
        if command == b"\\restrict":
            if self._restricted is not None or self.line_number > 20:
                self._refuse("a \\restrict line pg_dump did not write")
            self._restricted = key
        elif self._restricted is None or key != self._restricted:
            self._refuse("an \\unrestrict line without its \\restrict")
        else:
            self._unrestricted = True

    def _scan(self, line: bytes) -> None:
        i, n = 0, len(line)
        while i < n:
            if self._block_comments:
                i = self._in_block_comment(line, i)
            elif self._quote is not None:
                i = self._in_quote(line, i)
            else:
                i = self._in_code(line, i)

    def _in_block_comment(self, line: bytes, i: int) -> int:
        if line.startswith(b"*/", i):
            self._block_comments -= 1
            return i + 2
        if line.startswith(b"/*", i):
            self._block_comments += 1
            return i + 2
        return i + 1

    def _in_quote(self, line: bytes, i: int) -> int:
        quote = self._quote
        assert quote is not None
        if quote == b"E'":
            if line[i : i + 1] == b"\\":
                return i + 2
            if line.startswith(b"''", i):
                return i + 2
            if line[i : i + 1] == b"'":
                self._quote = None
            return i + 1
        if quote in (b"'", b'"'):
            if line.startswith(quote * 2, i):
                return i + 2
            if line.startswith(quote, i):
                self._quote = None
            return i + 1
        if line.startswith(quote, i):  # a dollar tag
            self._quote = None
            self._statement += b"''"
            return i + len(quote)
        return i + 1

    def _in_code(self, line: bytes, i: int) -> int:
        char = line[i : i + 1]
        if char == b"\\":
            command = line[i:].split(None, 1)[0].decode("utf-8", "replace")
            self._refuse(f"the psql meta-command {command[:20]!r}")
        if line.startswith(b"--", i):
            # psql ends a comment at a carriage return as well as at a newline.
            end = line.find(b"\r", i)
            return len(line) if end == -1 else end + 1
        if line.startswith(b"/*", i):
            self._block_comments = 1
            return i + 2
        if char in (b"'", b'"'):
            escape = char == b"'" and i > 0 and line[i - 1 : i] in (b"E", b"e")
            escape = escape and not (i > 1 and _IDENT_CHAR.match(line[i - 2 : i - 1]))
            escape = escape or (char == b"'" and self.scs_off)
            self._quote = b"E'" if escape else char
            self._statement += char
            return i + 1
        if char == b"$" and not (i > 0 and _IDENT_CHAR.match(line[i - 1 : i])):
            tag = _DOLLAR_TAG.match(line, i)
            if tag:
                self._quote = tag.group(0)
                return tag.end()
        if char == b";":
            self._end_statement()
            return i + 1
        self._statement += char
        return i + 1

    def _end_statement(self) -> None:
        statement = bytes(self._statement)
        self._statement.clear()
        if re.search(rb"standard_conforming_strings", statement, re.IGNORECASE) and not (
            _SCS_PG_DUMP.match(statement)
        ):
            self._refuse("a change of standard_conforming_strings (pg_dump only turns it on)")
        if _COPY_FROM_STDIN.match(statement):
            self._copy_data = True

    def _refuse(self, what: str) -> None:
        raise UnsafeScript(
            f"{self.source} holds {what} (line {self.line_number}); refused: a backup must "
            "never run anything outside the database; nothing was restored"
        )
