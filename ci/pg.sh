#!/usr/bin/env bash
# A private PostgreSQL server for the test suite (the store and crash tests
# run against it as well as against SQLite).
#
#   eval "$(bash ci/pg.sh start)"   install Debian's postgresql if missing, initdb
#                                   a private data directory, start the server on
#                                   127.0.0.1 and a free port from 54329 up, create
#                                   database `fedge`, print `export FEDGE_TEST_PG_URL=...`
#                                   and `export FEDGE_TEST_PG_CA=...` (the TLS tests)
#   eval "$(bash ci/pg.sh env)"     the same export line for a server already started
#   bash ci/pg.sh stop              stop the server and delete its data directory
#
# Each checkout gets its own server (the data directory is named after the
# checkout's path; FEDGE_PG_DIR overrides it), so several can run at once.
# Trust authentication, loopback only: this is a throwaway test server.
# It also speaks TLS, with a certificate for localhost and 127.0.0.1 from
# a CA made here with openssl (FEDGE_TEST_PG_CA); role `fedge_tls` may
# only connect over TLS, so a test connecting as it proves TLS was used.
# PostgreSQL refuses to run as root: as root, the server runs as the
# `postgres` user the package creates. Only the export line goes to
# standard output; everything else goes to standard error.
set -euo pipefail
cd "$(dirname "$0")/.."

key=$(printf %s "$PWD" | cksum | cut -d' ' -f1)
DIR="${FEDGE_PG_DIR:-${TMPDIR:-/tmp}/fedge-pg-$key}"
DATA="$DIR/data"
DB=fedge

log() { echo "pg.sh: $*" >&2; }

bindir() {
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    if [ -n "$d" ] && [ -x "$d/initdb" ]; then
        echo "$d"
    elif command -v initdb >/dev/null 2>&1; then
        dirname "$(command -v initdb)"
    fi
}

install_postgres() {
    [ -n "$(bindir)" ] && return 0
    log "installing Debian's postgresql package"
    local SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends postgresql >&2
    [ -n "$(bindir)" ] || { log "postgresql installed but no initdb found"; exit 1; }
}

# Run a server binary as a user PostgreSQL accepts.
as_pg() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

running() {
    [ -f "$DIR/port" ] && [ -d "$DATA" ] && as_pg "$(bindir)/pg_ctl" -D "$DATA" status >/dev/null 2>&1
}

port_free() {
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

print_env() {
    echo "export FEDGE_TEST_PG_URL=postgres://postgres@127.0.0.1:$(cat "$DIR/port")/$DB"
    echo "export FEDGE_TEST_PG_CA=$DIR/tls/ca.crt"
}

# A CA and a server certificate it signs (P-256, two days), in $DIR/tls.
make_certs() {
    local t="$DIR/tls"
    mkdir -p "$t"
    command -v openssl >/dev/null || { log "openssl not found (Debian's postgresql pulls it in)"; exit 1; }
    openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 -days 2 \
        -subj "/CN=fedge test CA" -keyout "$t/ca.key" -out "$t/ca.crt" 2>/dev/null
    openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
        -subj "/CN=localhost" -keyout "$t/server.key" -out "$t/server.csr" 2>/dev/null
    printf '%s\n' "subjectAltName=DNS:localhost,IP:127.0.0.1" "basicConstraints=CA:FALSE" \
        "extendedKeyUsage=serverAuth" >"$t/ext"
    openssl x509 -req -in "$t/server.csr" -CA "$t/ca.crt" -CAkey "$t/ca.key" -CAcreateserial \
        -days 2 -extfile "$t/ext" -out "$t/server.crt" 2>/dev/null
    chmod 600 "$t/server.key" "$t/ca.key"
    chmod 644 "$t/ca.crt"
}

start() {
    install_postgres
    if running; then
        log "already running ($DIR)"
        print_env
        return
    fi
    local bin port
    bin=$(bindir)
    rm -rf "$DIR"
    mkdir -p "$DATA"
    [ "$(id -u)" -eq 0 ] && chown -R postgres: "$DIR"
    chmod 700 "$DIR"
    as_pg "$bin/initdb" -D "$DATA" -U postgres --auth=trust -E UTF8 --no-sync >"$DIR/initdb.log" 2>&1 \
        || { cat "$DIR/initdb.log" >&2; exit 1; }
    make_certs
    # First match wins: fedge_tls without TLS is rejected before the trust lines.
    { echo "hostnossl all fedge_tls all reject"; cat "$DATA/pg_hba.conf"; } >"$DIR/hba" \
        && cat "$DIR/hba" >"$DATA/pg_hba.conf" && rm "$DIR/hba"
    [ "$(id -u)" -eq 0 ] && chown -R postgres: "$DIR"
    chmod 755 "$DIR" "$DIR/tls"
    for port in $(seq 54329 54399); do
        port_free "$port" || continue
        if as_pg "$bin/pg_ctl" -D "$DATA" -l "$DIR/server.log" -w -t 60 \
            -o "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories=$DIR -c max_connections=200 -c ssl=on -c ssl_cert_file=$DIR/tls/server.crt -c ssl_key_file=$DIR/tls/server.key" \
            start >&2; then
            echo "$port" >"$DIR/port"
            break
        fi
        log "port $port: the server did not start (taken meanwhile?); trying the next"
    done
    [ -f "$DIR/port" ] || { log "no port to start on; see $DIR/server.log"; cat "$DIR/server.log" >&2 || true; exit 1; }
    as_pg "$bin/createdb" -h 127.0.0.1 -p "$(cat "$DIR/port")" -U postgres "$DB"
    as_pg "$bin/psql" -q -h 127.0.0.1 -p "$(cat "$DIR/port")" -U postgres -d "$DB" \
        -c "CREATE ROLE fedge_tls LOGIN SUPERUSER" >&2
    log "started on 127.0.0.1:$(cat "$DIR/port"), data in $DATA"
    print_env
}

stop() {
    if [ -d "$DATA" ] && [ -n "$(bindir)" ]; then
        as_pg "$(bindir)/pg_ctl" -D "$DATA" -m fast -w stop >&2 2>/dev/null || true
    fi
    rm -rf "$DIR"
    log "stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    env)
        running || { log "not running: bash ci/pg.sh start"; exit 1; }
        print_env
        ;;
    *)
        echo "usage: bash ci/pg.sh start|stop|env" >&2
        exit 2
        ;;
esac
