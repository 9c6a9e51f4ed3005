"""No SQL text is built with Python string formatting anywhere in the package.

Identifiers and literals go through ``psycopg2.sql`` or bound parameters; a database name
with ``%`` or a quote is then just a character (see test_adversarial_artifacts for the
names themselves). This check reads the source, so a new f-string query fails here first.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "rollback_cli"
EXECUTING = {"execute", "executemany", "mogrify"}


def _formatted(node: ast.AST) -> bool:
    """An f-string, ``"..." % x``, ``"..." + x`` or ``"...".format(...)``."""
    if isinstance(node, ast.JoinedStr):
        return True
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod | ast.Add):
        return True
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "format"
        and isinstance(node.func.value, ast.Constant | ast.JoinedStr)
    )


def offences(source: str, filename: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        first = node.args[0]
        if name in EXECUTING and _formatted(first):
            found.append(f"{filename}:{node.lineno}: SQL built with string formatting")
        # sql.SQL(f"...") would smuggle formatted text into a composed statement.
        if name == "SQL" and isinstance(first, ast.JoinedStr | ast.BinOp):
            found.append(f"{filename}:{node.lineno}: sql.SQL() of a formatted string")
    return found


@pytest.mark.parametrize(
    "bad",
    [
        'cur.execute(f"DROP DATABASE {name}")',
        'cur.execute("DROP DATABASE %s" % name)',
        'cur.execute("DROP DATABASE " + name)',
        'cur.execute("DROP DATABASE {}".format(name))',
        'conn.cursor().executemany(f"INSERT INTO {t} VALUES (%s)", rows)',
        'sql.SQL(f"ALTER DATABASE {db}")',
    ],
)
def test_the_check_catches_each_form(bad: str) -> None:
    assert offences(bad, "example.py")


@pytest.mark.parametrize(
    "good",
    [
        'cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))',
        'cur.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)))',
        "cur.execute(statement)",
    ],
)
def test_the_check_allows_composed_sql(good: str) -> None:
    assert not offences(good, "example.py")


def test_no_module_builds_sql_with_string_formatting() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found += offences(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE)))
    assert found == []
