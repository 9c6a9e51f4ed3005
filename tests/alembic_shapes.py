"""Small Alembic projects written on the fly, in the shapes real applications have: a
version table of their own in a schema of their own, several script trees in one
database, version locations env.py adds at run time, branches and merges, downgrades
that run outside a transaction or rebuild tables in batch mode.

A project is an ``alembic.ini``, an ``env.py`` and revision files; ``upgrade`` runs
Alembic's own command on it, as the application would.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path

ENV_PY = """
from alembic import context
from sqlalchemy import engine_from_config, pool

config = context.config
OPTIONS = dict({options})
{preamble}


def run_migrations_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True, **OPTIONS)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = engine_from_config(
        config.get_section(config.config_ini_section, {{}}),
        prefix="sqlalchemy.",
        poolclass=pool.NullPool,
    )
    try:
        with engine.connect() as connection:
            context.configure(connection=connection, **OPTIONS)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
"""

REVISION = '''
"""{message}"""
import sqlalchemy as sa
from alembic import op

revision = {revision!r}
down_revision = {down!r}
branch_labels = {labels!r}
depends_on = {depends!r}


def upgrade() -> None:
{upgrade}


def downgrade() -> None:
{downgrade}
'''


@dataclass
class Revision:
    revision: str
    down: str | tuple[str, ...] | None
    upgrade: str
    downgrade: str
    message: str = ""
    labels: tuple[str, ...] | None = None
    depends: str | tuple[str, ...] | None = None
    #: a directory name under the project: revisions found only through what env.py adds
    location: str = "versions"


@dataclass
class Shape:
    root: Path
    revisions: list[Revision]
    #: keyword arguments env.py hands to context.configure (version_table, ...)
    options: dict[str, object] = field(default_factory=dict)
    #: module-level code of env.py (e.g. adding version locations at run time)
    preamble: str = ""

    @property
    def ini(self) -> Path:
        return self.root / "alembic.ini"

    def write(self) -> Path:
        scripts = self.root / "migrations"
        (scripts / "versions").mkdir(parents=True, exist_ok=True)
        self.ini.write_text(
            "[alembic]\nscript_location = %(here)s/migrations\nsqlalchemy.url =\n"
            "path_separator = os\n"
        )
        (scripts / "script.py.mako").write_text("")
        (scripts / "env.py").write_text(
            ENV_PY.format(options=repr(self.options), preamble=textwrap.dedent(self.preamble))
        )
        for rev in self.revisions:
            where = scripts / rev.location
            where.mkdir(parents=True, exist_ok=True)
            (where / f"{rev.revision}.py").write_text(
                REVISION.format(
                    message=rev.message or rev.revision,
                    revision=rev.revision,
                    down=rev.down,
                    labels=rev.labels,
                    depends=rev.depends,
                    upgrade=textwrap.indent(textwrap.dedent(rev.upgrade).strip() or "pass", "    "),
                    downgrade=textwrap.indent(
                        textwrap.dedent(rev.downgrade).strip() or "pass", "    "
                    ),
                )
            )
        return self.ini


def alembic_command(ini: Path, url: str, name: str, *args: str) -> None:
    """Alembic's own command on the project, as the application runs it."""
    from alembic import command
    from alembic.config import Config

    config = Config(str(ini))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    getattr(command, name)(config, *args)
