# shellcheck shell=bash
# Helpers of scripts/sam-build and scripts/lambda-smoke: what template.yaml
# builds, the Rust target of an architecture, the cross toolchain, and OS
# packages. Source it after lib.sh; don't run it.

# The Rust target of a Lambda architecture (provided.al2023 is glibc-based).
lambda_target() {
  case "$1" in
    arm64) echo aarch64-unknown-linux-gnu ;;
    x86_64) echo x86_64-unknown-linux-gnu ;;
    *) die "unknown architecture '$1' (template.yaml allows arm64 or x86_64)" ;;
  esac
}

# The `readelf -h` machine name of a Lambda architecture's binaries.
elf_machine() {
  case "$1" in
    arm64) echo AArch64 ;;
    x86_64) echo "Advanced Micro Devices X86-64" ;;
  esac
}

# This machine's Lambda architecture name.
host_arch() {
  case "$(uname -m)" in
    aarch64 | arm64) echo arm64 ;;
    x86_64 | amd64) echo x86_64 ;;
    *) uname -m ;;
  esac
}

# Debian's name of a Lambda architecture (multiarch packages).
debian_arch() {
  case "$1" in
    arm64) echo arm64 ;;
    x86_64) echo amd64 ;;
  esac
}

# GNU multiarch triplet (cross libc under /usr/<triplet>).
gnu_triplet() {
  case "$1" in
    arm64) echo aarch64-linux-gnu ;;
    x86_64) echo x86_64-linux-gnu ;;
  esac
}

# What template.yaml (or the template $1) builds, one fact a line:
#   architecture <the Architecture parameter's default>
#   allowed <its allowed values>
#   function <logical id> <binary>     (each rust-cargolambda function)
# and fails when the functions do not take their architecture from that
# parameter (the build would then not be what is deployed).
template_plan() {
  "$VENV/bin/python" - "${1:-$ROOT/template.yaml}" <<'PY'
import sys
from cfnlint.decode import cfn_yaml

t = cfn_yaml.loads(open(sys.argv[1]).read())
param = t.get("Parameters", {}).get("Architecture")
if not param:
    sys.exit(f"{sys.argv[1]}: no Architecture parameter")
want = [{"Ref": "Architecture"}]
glob = t.get("Globals", {}).get("Function", {}).get("Architectures")
if glob != want:
    sys.exit(f"{sys.argv[1]}: Globals.Function.Architectures must be [!Ref Architecture], not {glob}")
print("architecture", param.get("Default", ""))
print("allowed", " ".join(param.get("AllowedValues", [])))
for lid, res in t["Resources"].items():
    if res.get("Type") != "AWS::Serverless::Function":
        continue
    own = res.get("Properties", {}).get("Architectures")
    if own not in (None, want):
        sys.exit(f"{sys.argv[1]}: {lid} sets its own Architectures ({own})")
    meta = res.get("Metadata", {})
    if meta.get("BuildMethod") == "rust-cargolambda":
        print("function", lid, meta.get("BuildProperties", {}).get("Binary", ""))
PY
}

# Install Debian/Ubuntu packages that are missing (as root or through sudo).
APT_UPDATED=0
apt_install() {
  local missing=() pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "missing ${missing[*]}: install them with your package manager"
  local root=()
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || die "missing ${missing[*]}: run as root or install sudo"
    root=(sudo)
  fi
  log "installing ${missing[*]} (apt-get)"
  if [ "$APT_UPDATED" = 0 ]; then
    "${root[@]}" apt-get -q -o DPkg::Lock::Timeout=600 update >/dev/null
    APT_UPDATED=1
  fi
  "${root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=600 \
    install --no-install-recommends "${missing[@]}" >/dev/null
}

# Let dpkg install packages of Debian architecture $1 (multiarch).
dpkg_add_arch() {
  [ "$(dpkg --print-architecture)" = "$1" ] && return 0
  dpkg --print-foreign-architectures | grep -qx "$1" && return 0
  local root=()
  [ "$(id -u)" = 0 ] || root=(sudo)
  log "dpkg --add-architecture $1"
  "${root[@]}" dpkg --add-architecture "$1"
  APT_UPDATED=0
}

# Make cargo (and cargo-lambda) able to build for Lambda architecture $1.
# AGENTHOME_CROSS_RUST picks the standard library:
#   auto (default)  rustup's, added with `rustup target add` when missing;
#                   if that fails, the OS's (below)
#   rustup          rustup's only
#   debian          the OS's: Debian's rustc-web with libstd-rust-web-dev
#                   for the target (Debian 12+, Ubuntu), used as RUSTC
# Zig (from the venv) links either way, against an old glibc.
use_cross_rust() {
  local arch=$1 mode=${AGENTHOME_CROSS_RUST:-auto} target
  target="$(lambda_target "$arch")"
  if [ "$arch" = "$(host_arch)" ] && [ "$mode" != debian ]; then
    return 0
  fi
  case "$mode" in auto | rustup | debian) ;; *) die "AGENTHOME_CROSS_RUST must be auto, rustup or debian" ;; esac
  if [ "$mode" != debian ] && command -v rustup >/dev/null; then
    if rustup target list --installed | grep -qx "$target"; then
      log "Rust standard library for $target: rustup"
      return 0
    fi
    log "rustup target add $target"
    if timeout 600 rustup target add "$target"; then
      return 0
    fi
  fi
  [ "$mode" = rustup ] && die "the $target standard library is missing: run 'rustup target add $target'"
  command -v apt-get >/dev/null \
    || die "no $target standard library: run 'rustup target add $target' (or, on Debian/Ubuntu, AGENTHOME_CROSS_RUST=debian)"
  log "Rust standard library for $target: the OS's rustc-web"
  dpkg_add_arch "$(debian_arch "$arch")"
  apt_install rustc-web "libstd-rust-web-dev:$(debian_arch "$arch")"
  export RUSTC=/usr/bin/rustc
  # cargo-lambda checks (and adds) targets through rustup, and skips the
  # check when there is no rustup at $RUSTUP: this std is not rustup's.
  export RUSTUP=/nonexistent/rustup
  log "RUSTC=$RUSTC ($("$RUSTC" --version))"
}
