#!/usr/bin/env bash
# The composite action's main step: validate the inputs, hide the credentials, run db-rollback
# with --json (in its container image or with the runner's Python), then hand the result
# document to report.py for step outputs, the job summary and annotations.
#
# Inputs arrive as INPUT_* environment variables set by action.yml's `env:` block, never
# spliced into the script text, so no input value is ever executed as shell.
#
# Runtimes:
#   docker  docker run INPUT_IMAGE with the working directory mounted at /work, as the
#           runner's uid so the files it writes stay the runner's.
#   python  pip install the action's own checkout ($GITHUB_ACTION_PATH) into the active
#           Python (setup-python's or an activated venv; a venv under RUNNER_TEMP when the
#           system Python is externally managed) and run db-rollback from there. Set
#           DB_ROLLBACK_ACTION_SKIP_INSTALL=1 to use a db-rollback already on PATH instead
#           (the action's own tests do, to run the checkout under test).
#
# Exits with db-rollback's exit code (2 for inputs this script rejects).
set -Eeuo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
action_path=${GITHUB_ACTION_PATH:-$(cd "$here/../.." && pwd)}
container_dir=/work

# GitHub turns these lines into annotations; elsewhere they are plain, readable lines.
annotation_escape() {
    local text=${1//'%'/'%25'}
    text=${text//$'\r'/'%0D'}
    printf '%s' "${text//$'\n'/'%0A'}"
}
fail_input() {
    echo "::error title=db-rollback: invalid input::$(annotation_escape "$*")"
    exit 2
}
warn() { echo "::warning title=db-rollback::$(annotation_escape "$*")"; }

lower() { printf '%s' "${1,,}"; }
# boolean_input VAR NAME VALUE: VAR=true|false, or fail. It sets VAR instead of printing, so
# its ::error:: line is never swallowed by a command substitution.
boolean_input() {
    local value
    value=$(lower "${3:-}")
    case "$value" in
        true | false) printf -v "$1" '%s' "$value" ;;
        '') printf -v "$1" 'false' ;;
        *) fail_input "$2 must be 'true' or 'false', not '$3'" ;;
    esac
}

# ------------------------------------------------------------------------------ credentials
# Mask before anything else can print them: the URL whole, then every spelling (raw,
# percent-encoded, percent-decoded) of each password report.py finds: the database URL's,
# PGPASSWORD, the AWS keys, and that of any URL in the storage, endpoint, backup-file and
# extra-args inputs (tools may print a URL rebuilt without its other parts).
if [[ -n ${INPUT_DATABASE_URL:-} ]]; then
    export DATABASE_URL=$INPUT_DATABASE_URL
fi
mask() {
    local value=$1 escaped
    [[ -z $value ]] && return 0
    # The runner unescapes a command's data (%25, %0D, %0A): escape it so that it masks
    # this exact value; the raw line stays for values with nothing to escape.
    escaped=$(annotation_escape "$value")
    [[ $value != *$'\n'* && $value != *$'\r'* ]] && echo "::add-mask::$value"
    [[ $escaped != "$value" ]] && echo "::add-mask::$escaped"
    return 0
}
[[ -n ${DATABASE_URL:-} ]] && mask "$DATABASE_URL"
while IFS= read -r secret; do
    mask "$secret"
done < <(python3 "$here/report.py" --secrets || true)
[[ -n ${PGPASSWORD:-} ]] && mask "$PGPASSWORD"
for name in AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN; do
    [[ -n ${!name:-} ]] && mask "${!name}"
done

# ----------------------------------------------------------------------------------- inputs
command=$(lower "${INPUT_COMMAND:-}")
type=$(lower "${INPUT_TYPE:-}")
environment=${INPUT_ENVIRONMENT:-staging}
to_revision=${INPUT_TO_REVISION:-}
backup_file=${INPUT_BACKUP_FILE:-}
dry_run=false yes=false upload_artifacts=true
boolean_input dry_run dry-run "${INPUT_DRY_RUN:-false}"
boolean_input yes yes "${INPUT_YES:-false}"
boolean_input upload_artifacts upload-artifacts "${INPUT_UPLOAD_ARTIFACTS:-true}"
runtime=$(lower "${INPUT_RUNTIME:-docker}")
image=${INPUT_IMAGE:-ghcr.io/opssight/db-rollback:v1}
working_directory=${INPUT_WORKING_DIRECTORY:-.}
s3_sse=${INPUT_S3_SSE:-}
retention_days=${INPUT_RETENTION_DAYS:-}
older_than=${INPUT_OLDER_THAN:-30d}
keep_last=${INPUT_KEEP_LAST:-}
max_age=${INPUT_MAX_AGE:-}

commands="backup, rollback, verify, list, cleanup, status, validate, drill"
case "$command" in
    backup | rollback | verify | list | cleanup | status | validate | drill) ;;
    '') fail_input "command is required: one of $commands" ;;
    *) fail_input "unknown command '${INPUT_COMMAND}': expected one of $commands" ;;
esac
case "$runtime" in
    docker | python) ;;
    *) fail_input "runtime must be 'docker' or 'python', not '${INPUT_RUNTIME}'" ;;
esac
[[ -n $environment ]] || fail_input "environment must not be empty"

case "$command" in
    backup)
        case "$type" in
            '' | full | schema | data) ;;
            *) fail_input "type for command backup must be full, schema or data, not '$type'" ;;
        esac ;;
    rollback)
        case "$type" in
            schema | full)
                [[ -n $to_revision ]] \
                    || fail_input "rollback of type $type needs to-revision (the Alembic revision to go back to)" ;;
            data)
                [[ -n $backup_file ]] \
                    || fail_input "rollback of type data needs backup-file (the backup to restore)" ;;
            '') fail_input "command rollback needs type: schema, data or full" ;;
            *) fail_input "type for command rollback must be schema, data or full, not '$type'" ;;
        esac ;;
    verify)
        [[ -n $backup_file ]] || fail_input "command verify needs backup-file" ;;
    drill)
        case "$type" in
            '' | full | schema | data) ;;
            *) fail_input "type for command drill must be full, schema or data, not '$type'" ;;
        esac ;;
    *)
        [[ -z $type ]] || warn "type '$type' is ignored by command $command" ;;
esac
if [[ -n $to_revision && ! ($command == rollback && $type != data) ]]; then
    warn "to-revision is ignored by command $command${type:+ $type}"
fi
# drill: the CLI reads max-age strictly (exit 2 on a bad value); here only where it applies.
[[ -z $max_age || $command == drill ]] || warn "max-age is ignored by command $command"
case "$s3_sse" in
    '' | AES256 | aws:kms) ;;
    *) fail_input "s3-sse must be AES256 or aws:kms, not '$s3_sse'" ;;
esac
if [[ -n $retention_days ]] && ! [[ $retention_days =~ ^[0-9]+$ && $retention_days -ge 1 && $retention_days -le 90 ]]; then
    fail_input "retention-days must be a number of days from 1 to 90, not '$retention_days'"
fi
if [[ -n $keep_last ]] && ! [[ $keep_last =~ ^[0-9]+$ ]]; then
    fail_input "keep-last must be a whole number, not '$keep_last'"
fi
[[ -d $working_directory ]] || fail_input "working-directory '$working_directory' does not exist"
cd "$working_directory"
host_dir=$(pwd -P)

# The upload step reads the normalised value, whatever happens below.
[[ -n ${GITHUB_OUTPUT:-} ]] && echo "upload-artifacts=$upload_artifacts" >> "$GITHUB_OUTPUT"

# extra-args: split like a shell would (quotes group words) but never evaluated.
extra_args=()
if [[ -n ${INPUT_EXTRA_ARGS:-} ]]; then
    words_file=$(mktemp "${RUNNER_TEMP:-/tmp}/db-rollback-args.XXXXXX")
    python3 -c '
import os, shlex, sys
try:
    words = shlex.split(os.environ["INPUT_EXTRA_ARGS"])
except ValueError as exc:
    sys.exit(f"{exc}")
sys.stdout.write("".join(word + "\0" for word in words))
' > "$words_file" 2> "$words_file.err" || {
        reason=$(cat "$words_file.err"); rm -f "$words_file" "$words_file.err"
        fail_input "extra-args cannot be split into words: $reason"
    }
    mapfile -d '' -t extra_args < "$words_file"
    rm -f "$words_file" "$words_file.err"
fi

# A backup named by a path on the runner must be reachable inside the container: paths
# under the working directory are rewritten relative to it, others are refused. A file://
# URI (the backup-uri output of an earlier step) is a path too.
if [[ $backup_file == file://* ]]; then
    backup_file=$(python3 -c 'import sys; from urllib.parse import unquote, urlsplit
print(unquote(urlsplit(sys.argv[1]).path))' "$backup_file")
fi
if [[ $runtime == docker && $backup_file == /* ]]; then
    if [[ $backup_file == "$host_dir"/* ]]; then
        backup_file=${backup_file#"$host_dir"/}
    else
        fail_input "backup-file '$backup_file' is outside working-directory and cannot be reached in the container (use runtime: python, a storage URI, or a path under working-directory)"
    fi
fi

# ----------------------------------------------------------------------------------- argv
# Settings travel as environment variables (DATABASE_URL above, DB_ROLLBACK_* here), so the
# command line holds no credentials and stays short enough to show in the summary.
export DB_ROLLBACK_ENVIRONMENT=$environment
[[ -n ${INPUT_STORAGE:-} ]] && export DB_ROLLBACK_STORAGE=$INPUT_STORAGE
[[ -n ${INPUT_S3_ENDPOINT_URL:-} ]] && export AWS_ENDPOINT_URL=$INPUT_S3_ENDPOINT_URL
[[ -n $s3_sse ]] && export DB_ROLLBACK_S3_SSE=$s3_sse
if [[ -n ${INPUT_SIGNING_KEY:-} ]]; then
    echo "::add-mask::$INPUT_SIGNING_KEY"
    export DB_ROLLBACK_SIGNING_KEY=$INPUT_SIGNING_KEY
fi
[[ -n ${INPUT_ALEMBIC_CONFIG:-} ]] && export DB_ROLLBACK_ALEMBIC_CONFIG=$INPUT_ALEMBIC_CONFIG
export DB_ROLLBACK_LOG_FORMAT=json

argv=(--json)
[[ $dry_run == true ]] && argv+=(--dry-run)
[[ $yes == true ]] && argv+=(--yes)
case "$command" in
    backup) argv+=(backup create --type "${type:-full}") ;;
    rollback)
        argv+=(rollback "$type")
        [[ $type != data ]] && argv+=(--to-revision "$to_revision")
        [[ -n $backup_file ]] && argv+=(--backup-file "$backup_file") ;;
    verify) argv+=(backup verify "$backup_file") ;;
    list) argv+=(backup list) ;;
    cleanup)
        argv+=(backup cleanup --older-than "$older_than")
        [[ -n $keep_last ]] && argv+=(--keep-last "$keep_last") ;;
    status) argv+=(status) ;;
    validate) argv+=(validate) ;;
    drill)
        # The newest backup of the database, or backup-file when given.
        argv+=(drill)
        [[ -n $type ]] && argv+=(--type "$type")
        [[ -n $backup_file ]] && argv+=("$backup_file")
        [[ -n $max_age ]] && argv+=(--max-age "$max_age") ;;
esac
argv+=("${extra_args[@]}")

# ------------------------------------------------------------------------------------ run
result_file=$(mktemp "${RUNNER_TEMP:-/tmp}/db-rollback-result.XXXXXX")
trap 'rm -f "$result_file"' EXIT

case "$runtime" in
    docker)
        command -v docker > /dev/null || fail_input "runtime docker needs docker on the runner (or use runtime: python)"
        # Pass through by name only: values never appear in docker's argv.
        env_args=()
        while IFS= read -r name; do
            env_args+=(-e "$name")
        done < <(compgen -e | grep -E '^(DATABASE_URL|PG[A-Z]+|DB_ROLLBACK_[A-Z0-9_]+|AWS_[A-Z_]+|GITHUB_(ACTOR|REPOSITORY|RUN_ID|RUN_ATTEMPT|SHA|WORKFLOW|JOB)|CI)$' \
                 | grep -v '^DB_ROLLBACK_ACTION_' || true)
        runner=(docker run --rm --network host --user "$(id -u):$(id -g)" -e HOME=/tmp
                "${env_args[@]}" -v "$host_dir:$container_dir" -w "$container_dir"
                "$image")
        export ACTION_CONTAINER_DIR=$container_dir
        ;;
    python)
        if [[ ${DB_ROLLBACK_ACTION_SKIP_INSTALL:-} == 1 ]]; then
            command -v db-rollback > /dev/null \
                || fail_input "DB_ROLLBACK_ACTION_SKIP_INSTALL=1 but db-rollback is not on PATH"
            echo "using the db-rollback already on PATH: $(command -v db-rollback)"
            runner=(db-rollback)
        else
            python=python3
            if python3 -c 'import os, sys, sysconfig
managed = os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
sys.exit(0 if managed and sys.prefix == sys.base_prefix else 1)'; then
                venv=${RUNNER_TEMP:-/tmp}/db-rollback-venv
                echo "the system Python is externally managed: installing into $venv"
                python3 -m venv --system-site-packages "$venv"
                python=$venv/bin/python
            fi
            echo "::group::pip install db-rollback from $action_path"
            "$python" -m pip install --disable-pip-version-check --quiet "$action_path"
            echo "::endgroup::"
            runner=("$python" -m rollback_cli)
        fi
        ;;
esac

export ACTION_COMMAND=$command ACTION_HOST_DIR=$host_dir
export ACTION_ARTIFACT_NAME=${INPUT_ARTIFACT_NAME:-}
# The command line to show, each word scrubbed of credentials before it is shell-quoted
# (once quoted, a password's spelling changes and no mask would match it).
shown_words=()
mapfile -d '' -t shown_words < <(python3 "$here/report.py" --scrub-words "${argv[@]}" || true)
[[ ${#shown_words[@]} -eq ${#argv[@]} ]] || shown_words=("${argv[@]//*:\/\/*/***}")
printf -v shown '%q ' "${shown_words[@]}"
export ACTION_CLI_COMMAND="db-rollback ${shown% }"
echo "$ACTION_CLI_COMMAND  (environment $environment, runtime $runtime, in $host_dir)"

# The GitHub token is for report.py's pull request comment only: the command (and the
# application code its env.py imports) never sees it.
github_token=${INPUT_GITHUB_TOKEN:-}
unset INPUT_GITHUB_TOKEN

set +e
"${runner[@]}" "${argv[@]}" > "$result_file"
exit_code=$?
set -e

INPUT_GITHUB_TOKEN=$github_token python3 "$here/report.py" "$result_file" "$exit_code"
exit "$exit_code"
