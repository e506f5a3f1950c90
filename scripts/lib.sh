# shellcheck shell=bash
# Shared helpers for scripts/test and scripts/demo. Source it; don't run it.
#
# Everything here stays on loopback: the AWS SDK gets a fixed region, dummy
# credentials and no instance-metadata lookups; services listen on 127.0.0.1.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

log() { printf '\033[1;34m==>\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31merror:\033[0m %s\n' "$*" >&2; exit 1; }

# Never let anything reach a real cloud endpoint or the metadata service.
local_aws_env() {
  export AWS_REGION=us-east-1
  export AWS_DEFAULT_REGION=us-east-1
  export AWS_EC2_METADATA_DISABLED=true
  export AWS_ACCESS_KEY_ID=test
  export AWS_SECRET_ACCESS_KEY=test
}

# Project-local Python venv with the pinned tools (moto_server, ...).
# Re-installs only when requirements-dev.txt changed.
ensure_python_tools() {
  local req="$ROOT/scripts/requirements-dev.txt" stamp="$VENV/.requirements.sha"
  local want
  want="$(sha256sum "$req" | cut -d' ' -f1)"
  if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  command -v python3 >/dev/null || die "python3 is required"
  log "installing Python tools into .venv (once)"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$req"
  echo "$want" > "$stamp"
}

# A free TCP port on 127.0.0.1.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# Wait until 127.0.0.1:$1 accepts connections (max $2 seconds, default 30).
wait_port() {
  local port=$1 limit=${2:-30} i=0
  while ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
    i=$((i + 1))
    [ "$i" -le $((limit * 10)) ] || return 1
    sleep 0.1
  done
}

# PIDs of the services this script started; stopped on exit (ours only).
STARTED_PIDS=()
stop_started() {
  local pid
  for pid in "${STARTED_PIDS[@]:-}"; do
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  done
  for pid in "${STARTED_PIDS[@]:-}"; do
    [ -n "$pid" ] && wait "$pid" 2>/dev/null || true
  done
  STARTED_PIDS=()
}
trap stop_started EXIT INT TERM
