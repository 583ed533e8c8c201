#!/usr/bin/env bash
# The team tracking server: `mlflow server` with a PostgreSQL backend store and proxied
# artifacts (clients upload and download checkpoints through the server over HTTP, so they
# need no access to its disk). Runs in the foreground until stopped (Ctrl-C / SIGTERM);
# prints `tracking URI: http://HOST:PORT` once the server answers /health.
#
#   scripts/team_server.sh --db postgresql://user:pass@dbhost:5432/mlflow --artifacts /srv/mlartifacts
#   scripts/team_server.sh --local-postgres /srv/so8t-pg --artifacts /srv/mlartifacts --host 0.0.0.0
#   scripts/team_server.sh --local-postgres /srv/so8t-pg --stop     # stop a left-over cluster
#
# --db URL               an existing PostgreSQL database (env SO8T_TEAM_DB). postgresql:// and
#                        postgres:// are given to MLflow as postgresql+psycopg2://. A password
#                        may also come from PGPASSWORD or ~/.pgpass instead of the URL.
# --local-postgres DIR   or: initialise (first time) and start a PostgreSQL cluster of its own
#                        in DIR (DIR/data, DIR/password, DIR/postgres.log), listening on
#                        127.0.0.1:--pg-port only; stopped again when this script ends.
#                        Debian/Ubuntu: apt-get install postgresql. Run as root, the cluster
#                        runs as the `postgres` user (SO8T_PG_OS_USER), which must be able to
#                        reach DIR (no private parent folder such as a 0700 home or pytest's
#                        /tmp/pytest-of-root).
# --pg-port N            the local cluster's port (default 5433, beside a system one on 5432)
# --pg-bin DIR           PostgreSQL's bin folder (env PG_BIN; default: pg_config --bindir,
#                        else the newest /usr/lib/postgresql/*/bin, else initdb on PATH)
# --artifacts DIR|URI    where the server keeps artifacts (env SO8T_TEAM_ARTIFACTS;
#                        default ./mlartifacts; s3://... etc. work as for mlflow)
# --host H --port P      where the server listens (default 127.0.0.1:5000; 0.0.0.0 for the team)
# --workers N            server worker processes (default 2)
# --allowed-hosts LIST   MLflow 3's Host-header check: clients must use a name or address
#                        in it (wildcards: 'mlflow.example.com,192.168.*'). Default: MLflow's
#                        (localhost, private IPs), plus this machine's host names when --host is
#                        not loopback
# --stop                 with --local-postgres: stop that cluster and exit
#
# What it runs, in plain commands (non-root user; Debian paths):
#   /usr/lib/postgresql/15/bin/initdb -D DIR/data -U mlflow --pwfile=DIR/password \
#       --auth-host=scram-sha-256 --auth-local=peer
#   /usr/lib/postgresql/15/bin/pg_ctl -D DIR/data -l DIR/postgres.log -w \
#       -o "-c listen_addresses=127.0.0.1 -p 5433 -c unix_socket_directories=''" start
#   PGPASSWORD=... createdb -h 127.0.0.1 -p 5433 -U mlflow mlflow
#   PGPASSWORD=... .venv/bin/mlflow server \
#       --backend-store-uri postgresql+psycopg2://mlflow@127.0.0.1:5433/mlflow \
#       --serve-artifacts --artifacts-destination /srv/mlartifacts \
#       --host 127.0.0.1 --port 5000 --workers 2
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
db="${SO8T_TEAM_DB:-}"
local_pg=""
pg_port=5433
pg_bin="${PG_BIN:-}"
artifacts="${SO8T_TEAM_ARTIFACTS:-./mlartifacts}"
host=127.0.0.1
port=5000
workers=2
allowed_hosts=""
stop=0

die() {
  echo "team_server: $*" >&2
  exit 2
}
need() { [ "$#" -ge 2 ] || die "$1 needs a value"; }

while [ "$#" -gt 0 ]; do
  case "$1" in
    --db) need "$@"; db="$2"; shift 2 ;;
    --local-postgres) need "$@"; local_pg="$2"; shift 2 ;;
    --pg-port) need "$@"; pg_port="$2"; shift 2 ;;
    --pg-bin) need "$@"; pg_bin="$2"; shift 2 ;;
    --artifacts) need "$@"; artifacts="$2"; shift 2 ;;
    --host) need "$@"; host="$2"; shift 2 ;;
    --port) need "$@"; port="$2"; shift 2 ;;
    --workers) need "$@"; workers="$2"; shift 2 ;;
    --allowed-hosts) need "$@"; allowed_hosts="$2"; shift 2 ;;
    --stop) stop=1; shift ;;
    -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

if [ -n "$db" ] && [ -n "$local_pg" ]; then die "give --db or --local-postgres, not both"; fi
if [ -z "$db" ] && [ -z "$local_pg" ]; then die "give --db postgresql://... or --local-postgres DIR"; fi

# -- PostgreSQL of our own -------------------------------------------------------------------
find_pg_bin() {
  if [ -n "$pg_bin" ]; then echo "$pg_bin"; return; fi
  if command -v pg_config > /dev/null && [ -x "$(pg_config --bindir)/initdb" ]; then
    pg_config --bindir
    return
  fi
  local newest
  newest="$(ls -d /usr/lib/postgresql/*/bin 2> /dev/null | sort -V | tail -n 1 || true)"
  if [ -n "$newest" ] && [ -x "$newest/initdb" ]; then echo "$newest"; return; fi
  if command -v initdb > /dev/null; then dirname "$(command -v initdb)"; return; fi
  die "PostgreSQL not found (Debian/Ubuntu: apt-get install postgresql; or --pg-bin DIR)"
}

# initdb and postgres refuse to run as root: as root, run them as an unprivileged user.
as_pg() {
  if [ "$(id -u)" -eq 0 ]; then
    (cd / && runuser -u "$pg_user" -- "$@")
  else
    "$@"
  fi
}

pg_started=0
if [ -n "$local_pg" ]; then
  bin="$(find_pg_bin)"
  mkdir -p "$local_pg"
  local_pg="$(cd "$local_pg" && pwd)"
  data="$local_pg/data"
  pg_user="${SO8T_PG_OS_USER:-postgres}"
  if [ "$(id -u)" -eq 0 ]; then
    id "$pg_user" > /dev/null 2>&1 || die "running as root needs an unprivileged user for PostgreSQL: '$pg_user' does not exist (set SO8T_PG_OS_USER)"
    chown "$pg_user" "$local_pg"
    runuser -u "$pg_user" -- test -w "$local_pg" \
      || die "user '$pg_user' cannot reach $local_pg (a parent folder is private): pick a folder it can reach"
  fi
  if [ "$stop" -eq 1 ]; then
    if [ -f "$data/postmaster.pid" ]; then as_pg "$bin/pg_ctl" -D "$data" -m fast -w stop; fi
    exit 0
  fi
  if [ ! -f "$data/PG_VERSION" ]; then
    pw="${SO8T_PG_PASSWORD:-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')}"
    (umask 077 && printf '%s\n' "$pw" > "$local_pg/password")
    [ "$(id -u)" -eq 0 ] && chown "$pg_user" "$local_pg/password"
    echo "team_server: initialising a PostgreSQL cluster in $data"
    as_pg "$bin/initdb" -D "$data" -U mlflow --pwfile="$local_pg/password" -E UTF8 \
      --auth-host=scram-sha-256 --auth-local=peer > "$local_pg/initdb.log" 2>&1 \
      || { cat "$local_pg/initdb.log" >&2; die "initdb failed"; }
  fi
  export PGPASSWORD
  PGPASSWORD="$(cat "$local_pg/password")"
  if [ -f "$data/postmaster.pid" ] && as_pg "$bin/pg_ctl" -D "$data" status > /dev/null 2>&1; then
    echo "team_server: PostgreSQL already running in $data"
  else
    [ "$(id -u)" -eq 0 ] && touch "$local_pg/postgres.log" && chown "$pg_user" "$local_pg/postgres.log"
    as_pg "$bin/pg_ctl" -D "$data" -l "$local_pg/postgres.log" -w -t 60 \
      -o "-c listen_addresses=127.0.0.1 -p $pg_port -c unix_socket_directories=''" start \
      > /dev/null || { tail -n 20 "$local_pg/postgres.log" >&2; die "PostgreSQL did not start"; }
    pg_started=1
  fi
  exists="$("$bin/psql" -h 127.0.0.1 -p "$pg_port" -U mlflow -d postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = 'mlflow'")"
  [ "$exists" = 1 ] || "$bin/createdb" -h 127.0.0.1 -p "$pg_port" -U mlflow mlflow
  db="postgresql+psycopg2://mlflow@127.0.0.1:$pg_port/mlflow"
  echo "team_server: PostgreSQL on 127.0.0.1:$pg_port (user mlflow, password in $local_pg/password)"
elif [ "$stop" -eq 1 ]; then
  die "--stop goes with --local-postgres DIR"
fi

case "$db" in
  postgres://*) db="postgresql+psycopg2://${db#postgres://}" ;;
  postgresql://*) db="postgresql+psycopg2://${db#postgresql://}" ;;
  postgresql+*://*) ;;
  *) die "not a PostgreSQL URL: $db (postgresql://user:pass@host:5432/db)" ;;
esac

# -- the MLflow server -----------------------------------------------------------------------
mlflow="${SO8T_MLFLOW:-$here/.venv/bin/mlflow}"
[ -x "$mlflow" ] || mlflow="$(command -v mlflow || true)"
[ -n "$mlflow" ] || die "mlflow not found (bash scripts/setup.sh, or set SO8T_MLFLOW)"
python="$(dirname "$mlflow")/python"
[ -x "$python" ] || python="$(command -v python3)"
"$python" -c "import psycopg2" 2> /dev/null \
  || die "the PostgreSQL driver is missing: $python -m pip install psycopg2-binary (or .[team])"
case "$artifacts" in
  *://*) ;;
  *) mkdir -p "$artifacts" && artifacts="$(cd "$artifacts" && pwd)" ;;
esac

# MLflow 3's job runner (GenAI scorers, trace archival: a pool of huey workers) is not needed
# for training runs; off unless asked for, which also makes the server start faster.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

args=(server --backend-store-uri "$db" --serve-artifacts --artifacts-destination "$artifacts")
args+=(--host "$host" --port "$port" --workers "$workers")
# MLflow 3 answers 403 "Invalid Host header" to a Host header that is not localhost or a private
# IP: listening beyond loopback, also allow this machine's names unless told otherwise.
if [ -z "$allowed_hosts" ] && [ "$host" != 127.0.0.1 ] && [ "$host" != localhost ]; then
  allowed_hosts="localhost,localhost:*,127.0.0.1,127.0.0.1:*,10.*,192.168.*"
  for i in $(seq 16 31); do allowed_hosts+=",172.$i.*"; done
  for name in $(hostname) $(hostname -f 2> /dev/null || true); do
    allowed_hosts+=",$name,$name:*"
  done
fi
[ -n "$allowed_hosts" ] && args+=(--allowed-hosts "$allowed_hosts")

server_pid=""
cleanup() {
  trap - EXIT INT TERM HUP
  if [ -n "$server_pid" ]; then
    kill -TERM -- "-$server_pid" 2> /dev/null || true
    for _ in $(seq 100); do kill -0 "$server_pid" 2> /dev/null || break; sleep 0.1; done
    kill -KILL -- "-$server_pid" 2> /dev/null || true
  fi
  if [ "$pg_started" -eq 1 ]; then
    as_pg "$bin/pg_ctl" -D "$data" -m fast -w stop > /dev/null 2>&1 || true
  fi
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT
trap 'exit 129' HUP

# Its own process group, so that stopping it stops its workers too.
setsid "$mlflow" "${args[@]}" &
server_pid=$!

shown="$host"
[ "$host" = 0.0.0.0 ] || [ "$host" = "::" ] && shown="$(hostname)"
[ "$host" = 0.0.0.0 ] && probe=127.0.0.1 || probe="$host"
for _ in $(seq 600); do
  kill -0 "$server_pid" 2> /dev/null || { wait "$server_pid" || true; die "mlflow server exited"; }
  if "$python" -c "import sys,urllib.request as u; u.urlopen(sys.argv[1], timeout=2)" \
    "http://$probe:$port/health" 2> /dev/null; then
    echo "tracking URI: http://$shown:$port"
    echo "  python -m so8t_exp.train tracking.uri=http://$shown:$port   (or MLFLOW_TRACKING_URI)"
    wait "$server_pid"
    exit $?
  fi
  sleep 0.5
done
die "mlflow server did not answer http://$probe:$port/health in 300 s"
