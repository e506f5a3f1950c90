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

# bubblewrap, which the emulator uses to give each machine its own sandbox
# (see emulator/README.md), from the OS packages: apt-get as root (or with
# passwordless sudo), the package lists refreshed only if the first try fails.
# Skipped when bwrap is installed or with DCS_EMULATOR_ISOLATION=none.
ensure_sandbox_tools() {
  if [ "${DCS_EMULATOR_ISOLATION:-namespaces}" = none ] || command -v bwrap >/dev/null; then
    return 0
  fi
  local as_root=()
  [ "$(id -u)" = 0 ] || as_root=(sudo -n)
  command -v apt-get >/dev/null && { [ "$(id -u)" = 0 ] || sudo -n true 2>/dev/null; } ||
    die "the emulator needs bubblewrap (bwrap): install it with your package manager, or set DCS_EMULATOR_ISOLATION=none to run machine commands unisolated on this host"
  log "installing bubblewrap (apt-get, once)"
  export DEBIAN_FRONTEND=noninteractive
  "${as_root[@]}" apt-get install -y -q bubblewrap >/dev/null 2>&1 ||
    { "${as_root[@]}" apt-get update -q >/dev/null && "${as_root[@]}" apt-get install -y -q bubblewrap >/dev/null; } ||
    die "cannot install bubblewrap with apt-get"
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

# Start the local stack on free loopback ports: the Dedalus emulator,
# moto_server with the user→machine table, and `cargo lambda watch` serving
# the three functions. Exports EMU_URL, DDB_URL, LAMBDA_URL, TABLE_NAME, JOURNAL_TABLE,
# STACK_DIR. Everything is stopped by the EXIT trap.
start_local_stack() {
  ensure_python_tools
  ensure_sandbox_tools
  local_aws_env
  export PATH="$VENV/bin:$PATH" # cargo-lambda, and the Python that has ziglang
  STACK_DIR="$(mktemp -d "${TMPDIR:-/tmp}/agenthome-stack.XXXXXX")"
  log "building (first run: a few minutes)"
  cargo build -q -p dcs-emulator -p agenthome-dev -p chat-turn -p provision -p sleep-sweep

  local emu_port ddb_port lambda_port
  emu_port="$(free_port)"
  "$ROOT/target/debug/dcs-emulator" --listen "127.0.0.1:$emu_port" --data-dir "$STACK_DIR/dcs" \
    --api-key local-dev-key --hold-window "${DEMO_HOLD_WINDOW:-0s}" --hold-jitter 0s \
    --boot-delay 300ms --wake-delay 300ms > "$STACK_DIR/emulator.out" 2> "$STACK_DIR/emulator.log" &
  STARTED_PIDS+=($!)
  ddb_port="$(free_port)"
  "$VENV/bin/python" "$ROOT/scripts/moto_serial.py" 127.0.0.1 "$ddb_port" > "$STACK_DIR/moto.log" 2>&1 &
  STARTED_PIDS+=($!)
  wait_port "$emu_port" 30 || die "the emulator did not start ($STACK_DIR/emulator.log)"
  wait_port "$ddb_port" 30 || die "moto_server did not start ($STACK_DIR/moto.log)"
  export EMU_URL="http://127.0.0.1:$emu_port" DDB_URL="http://127.0.0.1:$ddb_port"
  export TABLE_NAME="agenthome-local"
  "$ROOT/target/debug/agenthome-dev" create-table --endpoint "$DDB_URL" --name "$TABLE_NAME" >/dev/null
  export JOURNAL_TABLE="agenthome-local-journal"
  "$ROOT/target/debug/agenthome-dev" create-journal-table --endpoint "$DDB_URL" --name "$JOURNAL_TABLE" >/dev/null

  lambda_port="$(free_port)"
  export LAMBDA_URL="http://127.0.0.1:$lambda_port"
  # The functions' environment: local endpoints, no auth, shell mode unless
  # an LLM is configured, a harmless bootstrap (machine commands run as root
  # without capabilities in the emulator's sandbox: no package installs),
  # and "detached" provisioning invokes (cargo lambda runs async
  # invokes to the end before answering).
  export DEDALUS_BASE_URL="$EMU_URL" DEDALUS_API_KEY=local-dev-key
  export AWS_ENDPOINT_URL_DYNAMODB="$DDB_URL" AWS_ENDPOINT_URL_LAMBDA="$LAMBDA_URL"
  export AUTH_MODE=none PROVISION_FUNCTION=provision PROVISION_INVOKE=detached
  export BOOTSTRAP_SCRIPT="${BOOTSTRAP_SCRIPT:-echo \"bootstrapped at \$(date)\" >> ~/.agenthome-bootstrap.log}"
  export IDLE_AFTER="${IDLE_AFTER:-2s}" TURN_DEADLINE="${TURN_DEADLINE:-25s}"
  # One chat-turn serving both: JSON, or Server-Sent Events with
  # `Accept: text/event-stream` (as the streaming Function URL does in AWS).
  export RESPONSE_MODE="${RESPONSE_MODE:-streaming}"
  export RUST_LOG="${RUST_LOG:-info}"
  (cd "$ROOT" && exec cargo-lambda lambda watch --invoke-address 127.0.0.1 --invoke-port "$lambda_port" \
      --ignore-changes --quiet > "$STACK_DIR/lambda.log" 2>&1) &
  STARTED_PIDS+=($!)
  wait_port "$lambda_port" 120 || die "cargo lambda watch did not start ($STACK_DIR/lambda.log)"
  log "local stack up: emulator $EMU_URL, DynamoDB $DDB_URL, functions $LAMBDA_URL (logs in $STACK_DIR)"
}

# Serve the playground page (playground/) on 127.0.0.1:${PLAYGROUND_PORT:-a
# free port}, proxying /api/<function>/… to the local functions (one origin,
# so no CORS). Needs start_local_stack first. Exports PLAYGROUND_URL.
start_playground_server() {
  local port="${PLAYGROUND_PORT:-$(free_port)}"
  "$VENV/bin/python" "$ROOT/scripts/playground.py" --listen "127.0.0.1:$port" \
    --root "$ROOT/playground" --functions "$LAMBDA_URL/lambda-url" > "$STACK_DIR/playground.log" 2>&1 &
  STARTED_PIDS+=($!)
  wait_port "$port" 30 || die "the playground server did not start ($STACK_DIR/playground.log)"
  export PLAYGROUND_URL="http://127.0.0.1:$port/"
}
