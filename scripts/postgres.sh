#!/usr/bin/env bash
# A throwaway PostgreSQL server for the store's tests (and CI).
#
#   scripts/postgres.sh start [--no-install] [DIR]   # prints the URL; also written to DIR/url
#   scripts/postgres.sh stop [DIR]                   # stops it and deletes the cluster
#
# DIR defaults to .pg/ at the repo root (git-ignored). `start` finds initdb (/usr/lib/postgresql/*/bin,
# then PATH; $ENGRAM_PG_BINDIR overrides both), apt-get installs `postgresql` when there is none (unless
# --no-install), initdb's a cluster, starts it on 127.0.0.1 at a free port with its unix socket beside it
# and creates the database `engram` (trust auth, superuser `engram`). As root the server runs as the
# `postgres` user (else `nobody`): postgres refuses to run as root.
# Exit codes: 0 started (or already running); 3 no server could be started, the reason on stderr.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
NO_SERVER=3

why() { echo "postgres.sh: $*" >&2; }

find_bindir() {
    if [ -n "${ENGRAM_PG_BINDIR:-}" ]; then
        if [ -x "$ENGRAM_PG_BINDIR/initdb" ]; then echo "$ENGRAM_PG_BINDIR"; fi
        return 0
    fi
    local d
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [ -x "$d/initdb" ]; then echo "$d"; return 0; fi
    done
    if command -v initdb >/dev/null 2>&1; then dirname "$(command -v initdb)"; fi
    return 0
}

install_postgres() {
    local sudo=()
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            sudo=(sudo -n)
        else
            why "not root and no password-less sudo: cannot apt-get install postgresql"; return 1
        fi
    fi
    command -v apt-get >/dev/null 2>&1 || { why "no apt-get here: install PostgreSQL yourself"; return 1; }
    local apt=(${sudo[@]+"${sudo[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get -q)
    why "installing the Debian package postgresql"
    # The package lists may be stale on a fresh machine: update once, then try again.
    "${apt[@]}" install -y postgresql >&2 || { "${apt[@]}" update >&2 && "${apt[@]}" install -y postgresql >&2; } \
        || { why "apt-get install postgresql failed"; return 1; }
}

# Run a command as the server's user: ourselves, or (as root) RUN_USER.
as_user() {
    if [ -z "$RUN_USER" ]; then "$@"
    elif command -v runuser >/dev/null 2>&1; then runuser -u "$RUN_USER" -- "$@"
    else su -s /bin/sh "$RUN_USER" -c "$(printf '%q ' "$@")"
    fi
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' \
        2>/dev/null || echo $((20000 + RANDOM % 40000))
}

running() {  # DIR holds a live server's URL
    [ -f "$DIR/url" ] && [ -f "$DIR/cluster" ] && as_user "$BIN/pg_ctl" -D "$(cat "$DIR/cluster")/data" status >/dev/null 2>&1
}

start() {
    BIN="$(find_bindir)"
    if [ -z "$BIN" ]; then
        if [ "$INSTALL" = 1 ] && install_postgres; then BIN="$(find_bindir)"; fi
        [ -n "$BIN" ] || { why "initdb not found (looked in ${ENGRAM_PG_BINDIR:-/usr/lib/postgresql/*/bin and PATH})"; exit $NO_SERVER; }
    fi
    mkdir -p "$DIR"
    if running; then cat "$DIR/url"; return; fi
    stop_cluster  # a dead server's leftovers
    # The cluster lives in DIR unless the server's user cannot reach it, or the socket path would pass
    # the kernel's ~107-byte limit: then in a fresh folder under /tmp.
    local cluster="$DIR/cluster.d"
    rm -rf "$cluster" && mkdir -p "$cluster"
    [ -z "$RUN_USER" ] || chown "$RUN_USER" "$cluster"
    if [ "${#cluster}" -gt 80 ] || ! as_user test -w "$cluster"; then
        rm -rf "$cluster"
        cluster="$(mktemp -d /tmp/engram-pg.XXXXXX)"
        [ -z "$RUN_USER" ] || chown "$RUN_USER" "$cluster"
    fi
    echo "$cluster" >"$DIR/cluster"
    as_user "$BIN/initdb" -D "$cluster/data" -U engram --auth=trust -E UTF8 --locale=C --no-sync \
        >"$DIR/initdb.log" 2>&1 || { why "initdb failed: $(tail -n 3 "$DIR/initdb.log")"; exit $NO_SERVER; }
    local port attempt
    for attempt in 1 2 3 4 5; do  # another process may take the free port first
        port="$(free_port)"
        # Durability off: a test server that loses its data in a crash loses nothing of value.
        if as_user "$BIN/pg_ctl" -D "$cluster/data" -l "$cluster/log" -w -t 60 -o \
            "-c listen_addresses=127.0.0.1 -p $port -k '$cluster' -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300" \
            start >/dev/null 2>&1; then
            "$BIN/createdb" -h 127.0.0.1 -p "$port" -U engram engram \
                || { why "createdb failed"; stop_cluster; exit $NO_SERVER; }
            echo "postgresql+psycopg://engram@127.0.0.1:$port/engram" | tee "$DIR/url"
            return
        fi
    done
    why "the server did not start: $(tail -n 5 "$cluster/log" 2>/dev/null)"
    stop_cluster
    exit $NO_SERVER
}

stop_cluster() {
    [ -f "$DIR/cluster" ] || return 0
    local cluster
    cluster="$(cat "$DIR/cluster")"
    BIN="${BIN:-$(find_bindir)}"
    if [ -n "$BIN" ] && [ -d "$cluster/data" ]; then
        as_user "$BIN/pg_ctl" -D "$cluster/data" -m fast -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$cluster"
    rm -f "$DIR/cluster" "$DIR/url" "$DIR/initdb.log"
}

ACTION="${1:-}"
shift || true
INSTALL=1
if [ "${1:-}" = "--no-install" ]; then INSTALL=0; shift; fi
DIR="$(mkdir -p "${1:-$ROOT/.pg}" && cd "${1:-$ROOT/.pg}" && pwd)"
RUN_USER=""
if [ "$(id -u)" = 0 ]; then
    if id postgres >/dev/null 2>&1; then RUN_USER=postgres; else RUN_USER=nobody; fi
fi
BIN=""
case "$ACTION" in
    start) start ;;
    stop) stop_cluster ;;
    *) echo "usage: $0 start [--no-install] [DIR] | stop [DIR]" >&2; exit 2 ;;
esac
