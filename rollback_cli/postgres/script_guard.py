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
_COPY_FROM_STDIN = re.compile(rb"^\s*COPY\b.*\bFROM\s+stdin\b", re.IGNORECASE | re.DOTALL)
_SCS_OFF = re.compile(
    rb"\bstandard_conforming_strings\b\s*(=|\bTO\b)\s*'?(off|false|0)'?", re.IGNORECASE
)
_DOLLAR_TAG = re.compile(rb"\$([A-Za-z_\x80-\xff][A-Za-z0-9_\x80-\xff]*)?\$")
_IDENT_CHAR = re.compile(rb"[A-Za-z0-9_$\x80-\xff]")


class UnsafeScript(BackupError):
    """The backup holds something that would run outside the database."""


class ScriptGuard:
    """Feed a script line by line (bytes, with their newline); :meth:`check` raises
    UnsafeScript at the first line psql would treat as a meta-command."""

    def __init__(self, source: str = "the backup") -> None:
        self.source = source
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
            return len(line)  # a comment to the end of the line
        if line.startswith(b"/*", i):
            self._block_comments = 1
            return i + 2
        if char in (b"'", b'"'):
            escape = char == b"'" and i > 0 and line[i - 1 : i] in (b"E", b"e")
            escape = escape and not (i > 1 and _IDENT_CHAR.match(line[i - 2 : i - 1]))
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
        if _SCS_OFF.search(statement):
            self._refuse("standard_conforming_strings turned off (pg_dump never does)")
        if _COPY_FROM_STDIN.match(statement):
            self._copy_data = True

    def _refuse(self, what: str) -> None:
        raise UnsafeScript(
            f"{self.source} holds {what} (line {self.line_number}); refused: a backup must "
            "never run anything outside the database; nothing was restored"
        )
