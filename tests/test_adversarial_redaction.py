"""Adversarial suite: redaction without gaps.

One redactor (``rollback_cli.log.redactor``) replaces the exact known secrets first, in every
spelling (raw, percent-encoded, escaped), and only then applies its patterns (URL user-info,
key=value), so a password holding "@", ":", "/", "%", "#" or "?" is never cut by a pattern
into a piece the exact pass no longer finds. It runs last on every way out: the error line
on stderr, Click's usage errors, log lines, the log file, ``--json`` and rendered stdout;
the action's report.py holds its own copy of the same rules (it runs without db-rollback).

The property: no substring of four or more characters of a password appears anywhere.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import string
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from rollback_cli.errors import ExitCode
from rollback_cli.log import REDACTED, Redactor, redactor, url_passwords
from tests.cli_helpers import REPO_ROOT, Run, Workspace, invoke, run_subprocess, unused_port
from tests.servers import TestDatabase

URL_SPECIALS = "@:/?#[]%!$&'()*+,;= \"\\"
ALPHABET = st.sampled_from(URL_SPECIALS + string.ascii_letters + string.digits) | st.characters(
    categories=("L", "Nd")
)
PASSWORDS = st.text(alphabet=ALPHABET, min_size=4, max_size=24)
TEMPLATES = (
    "postgresql://user:{}@host/db",
    "s3://{}@b/x",
    "gs://AKIA:{}@bucket/x",
    "password={}",
    "could not authenticate with {} (giving up)",
)
WINDOW = 4


def spellings(secret: str) -> list[str]:
    """The secret as the tests embed it: raw and URL-encoded both ways."""
    return list(dict.fromkeys([secret, quote(secret, safe=""), quote(secret)]))


def windows(secret: str) -> set[str]:
    return {secret[i : i + WINDOW] for i in range(len(secret) - WINDOW + 1)}


def leaked(secret: str, output: str, *, scaffold: str = "") -> set[str]:
    """The substrings (of WINDOW characters) of ``secret`` in ``output`` that the text
    around the secret (``scaffold``, with the secret replaced) does not explain."""
    return {w for w in windows(secret) if w in output and w not in scaffold}


def strings_in(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from strings_in(item)
    elif isinstance(value, list | tuple | set | frozenset):
        for item in value:
            yield from strings_in(item)


def load_report() -> ModuleType:
    """scripts/action/report.py, which is no package module (it runs on the bare runner)."""
    spec = importlib.util.spec_from_file_location(
        "action_report", REPO_ROOT / "scripts" / "action" / "report.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REPORT = load_report()


def report_scrubber(secret: str) -> Callable[[str], str]:
    forms = sorted(REPORT.secret_forms(secret), key=lambda f: (-len(f), f))
    return lambda text: str(REPORT.scrub(text, forms))


def redactor_scrubber(secret: str) -> Callable[[str], str]:
    fresh = Redactor()
    fresh.add_secret(secret)
    return fresh.scrub


# --------------------------------------------------------------------------------- properties


@pytest.mark.parametrize("make", [redactor_scrubber, report_scrubber], ids=["log", "action"])
@settings(max_examples=200, deadline=None)
@given(secret=PASSWORDS)
@example(secret="wJa@lr/SECRET")
@example(secret="p%40ss:w/rd#?")
@example(secret="a  b\\c'd\"e")
def test_a_registered_secret_leaves_no_piece_behind(
    make: Callable[[str], Callable[[str], str]], secret: str
) -> None:
    """Raw or URL-encoded, in a URL, a key=value pair or free text: nothing of the secret
    is left, whatever URL-special characters it holds."""
    scrub = make(secret)
    for template, form in itertools.product(TEMPLATES, spellings(secret)):
        text = template.format(form)
        scrubbed = scrub(text)
        scaffold = template.format(REDACTED)
        assert not leaked(secret, scrubbed, scaffold=scaffold), (text, scrubbed)
        assert not leaked(form, scrubbed, scaffold=scaffold), (text, scrubbed)
    everything = "\n".join(t.format(f) for t in TEMPLATES for f in spellings(secret))
    scaffold = "\n".join(t.format(REDACTED) for t in TEMPLATES)
    assert not leaked(secret, scrub(everything), scaffold=scaffold)


@settings(max_examples=200, deadline=None)
@given(secret=PASSWORDS)
def test_scrub_value_scrubs_every_string_of_a_document(secret: str) -> None:
    # A secret inside one of the document's own key names would (rightly) scrub that key.
    assume(
        not any(
            secret in key
            for key in ("message storage checks check detail nested url password", "a key")
        )
    )
    fresh = Redactor()
    fresh.add_secret(secret)

    def document(texts: list[str], password: str) -> dict[Any, Any]:
        return {
            "message": texts[0],
            "storage": texts[1],
            "checks": [{"check": "x", "detail": text} for text in texts],
            "nested": ({"url": texts[-1]}, [texts[2]]),
            "password": password,
            texts[3]: "a key",
        }

    texts = [t.format(f) for t in TEMPLATES for f in spellings(secret)]
    scrubbed = fresh.scrub_value(document(texts, secret))
    assert scrubbed["password"] == REDACTED
    skeleton = document([t.format(REDACTED) for t in TEMPLATES for _ in spellings(secret)], "")
    scaffold = "\n".join(strings_in(skeleton))
    for text in strings_in(scrubbed):
        assert not leaked(secret, text, scaffold=scaffold), text


@settings(max_examples=200, deadline=None)
@given(secret=PASSWORDS)
def test_a_password_read_off_a_url_argument_is_enough(secret: str) -> None:
    """What the runner registers from the command line (the password of each URL-shaped
    argument, raw or encoded) scrubs that argument whole, with no other help."""
    wrappers: list[Callable[[str], str]] = [
        lambda url: url,
        lambda url: f"unsupported storage {url!r}",
        lambda url: f"x {url} y",
    ]
    for template in ("postgresql://user:{}@host/db", "gs://AKIA:{}@bucket/x"):
        for form in spellings(secret):
            argument = template.format(form)
            fresh = Redactor()
            fresh.add_url_secrets(argument)
            for wrap in wrappers:
                scrubbed = fresh.scrub(wrap(argument))
                scaffold = wrap(template.format(REDACTED))
                assert not leaked(secret, scrubbed, scaffold=scaffold), (argument, scrubbed)
            assert set(url_passwords(argument, whole=True)) == set(REPORT.url_passwords(argument))


def test_the_observed_leaks() -> None:
    """The two gaps this suite was written for, as they were seen."""
    fresh = Redactor()
    fresh.add_url_secrets("s3://AKIA:wJa@lr/SECRET@bucket/x")
    assert (
        fresh.scrub("storage s3://AKIA:wJa@lr/SECRET@bucket/x") == "storage s3://AKIA:***@bucket/x"
    )
    fresh = Redactor()
    fresh.add_secret("pa@ss")
    assert fresh.scrub("postgresql://u:pa@ss@h/db") == "postgresql://u:***@h/db"
    assert fresh.scrub("postgresql://u:pa%40ss@h/db") == "postgresql://u:***@h/db"
    # Without the secret, the pattern still takes everything up to the last "@" of the host.
    assert Redactor().scrub("postgresql://u:pa@ss@h/db") == "postgresql://u:***@h/db"
    # A PostgreSQL URL's user name is no secret; a lone token in another URL is.
    assert Redactor().scrub("postgresql://app@h/db") == "postgresql://app@h/db"
    assert Redactor().scrub("https://ghp_token@github.com/x") == "https://***@github.com/x"


# ---------------------------------------------------------------------------- the command line

MARKERS = "üßλé中"
# Every substring of four characters of these holds a letter no output has otherwise, so a
# match anywhere is a leak, not a coincidence with a timestamp or a field name.
NASTY = [
    "p@ssü:w/rdß#?é",
    "ab%40ü%2Fcdß%25",
    "q:üw@ßr/λt#é?",
    'it\'sü "qλ"é\\bß',
    "a ü bß  cλ",
    "中@/:é#?ü%40ß",
]


def marked(chunks: list[str]) -> str:
    return "".join(chunk + MARKERS[i % len(MARKERS)] for i, chunk in enumerate(chunks))


NASTY_PASSWORDS = st.lists(
    st.text(alphabet=st.sampled_from(URL_SPECIALS + string.ascii_letters), min_size=1, max_size=3),
    min_size=2,
    max_size=5,
).map(marked)


class PasswordRole:
    """A login role owning the test database, whose password each case sets."""

    def __init__(self, db: TestDatabase, workdir: Path) -> None:
        self.db = db
        self.name = f"rd_{db.name}"
        self.workdir = workdir
        self.count = 0
        db.server.execute(f'CREATE ROLE "{self.name}" LOGIN')
        db.server.execute(f'ALTER DATABASE "{db.name}" OWNER TO "{self.name}"')
        db.execute(f'CREATE TABLE t (id int); ALTER TABLE t OWNER TO "{self.name}"')
        db.execute("INSERT INTO t SELECT generate_series(1, 10)")

    def set_password(self, password: str) -> None:
        self.db.server.execute(f'ALTER ROLE "{self.name}" PASSWORD %s', (password,))

    def url(self, password: str) -> str:
        server = self.db.server
        return (
            f"postgresql://{self.name}:{quote(password, safe='')}@{server.host}:{server.port}/"
            f"{self.db.name}"
        )

    def workspace(self) -> Workspace:
        self.count += 1
        return Workspace(self.db, self.workdir / f"case-{self.count}")

    def drop(self) -> None:
        server = self.db.server
        server.execute(f'ALTER DATABASE "{self.db.name}" OWNER TO postgres')
        server.execute(f'DROP OWNED BY "{self.name}"', dbname=self.db.name)
        server.execute(f'DROP ROLE "{self.name}"')


@pytest.fixture
def role(database18: TestDatabase, tmp_path: Path, cli_env: dict[str, str]) -> Iterator[Any]:
    made = PasswordRole(database18, tmp_path)
    try:
        yield made
    finally:
        made.drop()
        redactor.clear()  # the in-process runs registered the passwords of these cases


def with_format(args: list[str], log_format: str) -> list[str]:
    at = args.index("--log-format")
    return [*args[: at + 1], log_format, *args[at + 2 :]]


def written(ws: Workspace, runs: list[Run]) -> list[tuple[str, str]]:
    """Everything the runs wrote, as written and with JSON decoded (escapes undone)."""
    texts: list[tuple[str, str]] = []
    for i, run in enumerate(runs):
        texts += [(f"stdout of run {i}", run.stdout), (f"stderr of run {i}", run.stderr)]
    files = list(ws.log_files())
    if ws.backup_dir.is_dir():
        files += list(ws.backup_dir.rglob("*.json"))
    texts += [(str(path), path.read_text("utf-8")) for path in files]
    decoded: list[tuple[str, str]] = []
    for where, text in texts:
        for line in [text, *text.splitlines()]:
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            decoded += [(f"{where} (decoded)", s) for s in strings_in(doc)]
    return texts + decoded


def assert_nothing_of(password: str, ws: Workspace, runs: list[Run]) -> None:
    for where, text in written(ws, runs):
        found = leaked(password, text)
        assert not found, f"{sorted(found)} of the password in {where}:\n{text[:3000]}"


# No AWS credentials from anywhere, no retries: the s3:// cases fail at once, offline.
NO_AWS = {
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/credentials",
    "AWS_CONFIG_FILE": "/nonexistent/config",
    "AWS_MAX_ATTEMPTS": "1",
}


def exercise(role: PasswordRole, password: str) -> None:
    """The commands of one case, with the password set on the role, both log formats."""
    role.set_password(password)
    ws = role.workspace()
    url = role.url(password)
    env = NO_AWS
    s3_endpoint = ["--s3-endpoint-url", f"http://127.0.0.1:{unused_port()}"]
    runs: list[Run] = []

    def run(args: list[str], *, expect: int | None = None, process: bool = False) -> Run:
        result = run_subprocess(args, {**os.environ, **env}) if process else invoke(args, env=env)
        if expect is not None:
            assert result.exit_code == expect, str(result)
        runs.append(result)
        return result

    for log_format in ("json", "console"):
        base = with_format(ws.args(url=url), log_format)
        run([*base, "status"], expect=ExitCode.OK)
        run([*base, "--json", "status"], expect=ExitCode.OK)
        run([*base, "--json", "backup", "create"], expect=ExitCode.OK)
        run([*base, "backup", "create"], expect=ExitCode.OK)
        for storage in (
            f"gs://AKIAEXAMPLE:{password}@bucket/x",
            f"gs://AKIA:{quote(password)}@b/x",
        ):
            # A raw "[" or "]" makes urlsplit itself fail in open_storage (storage/), which
            # is reported as an unexpected error (exit 1); redacted all the same.
            usage = None if set("[]") & set(storage) else ExitCode.USAGE
            for args in (["--storage", storage], ["--json", "--storage", storage]):
                failed = run([*base, *args, "backup", "list"], expect=usage)
                assert failed.exit_code != ExitCode.OK, str(failed)
        for uri in (f"s3://AKIA:{password}@bucket/x", f"s3://AKIA:{quote(password, safe='')}@b/x"):
            failed = run([*base, *s3_endpoint, "backup", "verify", uri])
            assert failed.exit_code != ExitCode.OK, str(failed)
            run([*base, *s3_endpoint, "--json", "backup", "verify", uri])
        # Click's own usage errors, quoting the offending word back.
        run([*base, url.replace(quote(password, safe=""), password), "status"], expect=2)
        run([*base, "backup", "create", "--type", url], expect=ExitCode.USAGE)
        # A wrong password (the real one with more after it) fails to connect.
        wrong = role.url(password + "!x")
        run([*with_format(ws.args(url=wrong), log_format), "status"], expect=ExitCode.CONFIG)
    # The password from libpq's variables, no URL at all.
    pg_env = {
        "PGHOST": role.db.server.host,
        "PGPORT": str(role.db.server.port),
        "PGUSER": role.name,
        "PGPASSWORD": password,
        "PGDATABASE": role.db.name,
    }
    no_url = [a for a in ws.args() if a not in ("--database-url", ws.url)]
    from_environment = invoke([*no_url, "--json", "status"], env={**env, **pg_env})
    assert from_environment.exit_code == ExitCode.OK, str(from_environment)
    runs.append(from_environment)
    # As a real process: the entry point's own error output.
    console = with_format(ws.args(url=url), "console")
    storage = f"gs://AKIAEXAMPLE:{password}@bucket/x"
    usage = None if set("[]") & set(password) else ExitCode.USAGE
    failed = run([*console, "--storage", storage, "backup", "list"], expect=usage, process=True)
    assert failed.exit_code != ExitCode.OK, str(failed)
    run([*console, f"gs://AKIA:{password}@bucket/x", "status"], expect=2, process=True)
    assert_nothing_of(password, ws, runs)


@pytest.mark.parametrize("password", NASTY, ids=range(len(NASTY)))
def test_nasty_passwords_leak_nowhere(role: PasswordRole, password: str) -> None:
    exercise(role, password)


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(password=NASTY_PASSWORDS)
def test_generated_passwords_leak_nowhere(role: PasswordRole, password: str) -> None:
    exercise(role, password)


# --------------------------------------------------------------------------------- the action


def test_the_action_shows_no_password_anywhere(
    role: PasswordRole, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """run.sh masks every spelling, shows the command line scrubbed word by word, and
    report.py scrubs the summary, the outputs and the ::error:: annotation."""
    password = NASTY[0]
    role.set_password(password)
    work = tmp_path / "action"
    work.mkdir()
    files = {name: tmp_path / name for name in ("output", "summary")}
    for path in files.values():
        path.touch()
    env = {
        **cli_env,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{cli_env.get('PATH', '')}",
        "DB_ROLLBACK_ACTION_SKIP_INSTALL": "1",
        "DB_ROLLBACK_PG_BIN_DIR": str(role.db.server.bin_dir),
        "GITHUB_OUTPUT": str(files["output"]),
        "GITHUB_STEP_SUMMARY": str(files["summary"]),
        "RUNNER_TEMP": str(tmp_path),
        **NO_AWS,
        "INPUT_COMMAND": "verify",
        "INPUT_RUNTIME": "python",
        "INPUT_DATABASE_URL": role.url(password),
        "INPUT_BACKUP_FILE": f"s3://AKIA:{password}@bucket/x",
        "INPUT_EXTRA_ARGS": f"--s3-endpoint-url 'http://k:{password}@127.0.0.1:9/'",
        "INPUT_WORKING_DIRECTORY": str(work),
    }
    proc = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "action" / "run.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == ExitCode.USAGE, proc.stdout + proc.stderr
    masks = [ln for ln in proc.stdout.splitlines() if ln.startswith("::add-mask::")]
    assert f"::add-mask::{password}" in masks
    assert f"::add-mask::{quote(password, safe='')}" in masks
    shown = "\n".join(ln for ln in proc.stdout.splitlines() if ln not in masks)
    errors = [ln for ln in shown.splitlines() if ln.startswith("::error")]
    assert len(errors) == 1, shown
    summary = files["summary"].read_text("utf-8")
    assert "| command line |" in summary and "s3://AKIA:" in summary
    for where, text in [
        ("stdout", shown),
        ("stderr", proc.stderr),
        ("summary", summary),
        ("outputs", files["output"].read_text("utf-8")),
    ]:
        found = leaked(password, text)
        assert not found, f"{sorted(found)} in {where}:\n{text}"
