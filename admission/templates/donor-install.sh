#!/bin/sh
# RMA Pool: install the donor's `rma` for this pool's head, served by its coordinator at /donor/install.sh.
#
#   curl -fsSL <coordinator>/donor/install.sh | sh
#   curl -fsSL <coordinator>/donor/install.sh | sh -s -- --extras services --overlay-packages
#
# It finds a Python of the head's minor version (or uv, which fetches one), makes a virtual environment under
# ${RMA_HOME:-$HOME/.local/share/rma}/venv, installs the head's wheel with the head's pins (constraints.txt),
# links `rma` into ~/.local/bin (/usr/local/bin as root), checks the versions against the head
# (`rma version --check`) and prints the command that joins. Run it again to upgrade in place. Root is needed
# only for --overlay-packages (the WireGuard overlay's system packages, through apt-get).
#
# Options (or the environment): --extras LIST (RMA_EXTRAS; a service donor wants `services`),
# --overlay-packages (RMA_OVERLAY_PACKAGES=1), --no-uv (RMA_NO_UV=1: plain venv + pip even where uv is).
# RMA_INSTALL_URL: the coordinator's URL to download from and check against, where the one in this script
# (the coordinator's RMA_PUBLIC_URL, or the URL it was asked by) is not how this machine reaches it.
# pip and uv read their usual settings (PIP_INDEX_URL, PIP_FIND_LINKS, UV_INDEX_URL, ...).
set -eu

# The head's values (filled in by the coordinator):
# @HEAD_VALUES@

POOL_URL=${RMA_INSTALL_URL:-$RMA_POOL_URL}
RMA_HOME=${RMA_HOME:-$HOME/.local/share/rma}
VENV=$RMA_HOME/venv
EXTRAS=${RMA_EXTRAS:-}
OVERLAY_PACKAGES=${RMA_OVERLAY_PACKAGES:-}
NO_UV=${RMA_NO_UV:-}
OVERLAY_DEBS="wireguard-tools wireguard-go iproute2 nftables"

say() { printf 'rma install: %s\n' "$*"; }
die() { printf 'rma install: error: %s\n' "$*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --extras) [ $# -ge 2 ] || die "--extras needs a value, e.g. --extras services"; EXTRAS=$2; shift 2 ;;
    --extras=*) EXTRAS=${1#--extras=}; shift ;;
    --overlay-packages) OVERLAY_PACKAGES=1; shift ;;
    --no-uv) NO_UV=1; shift ;;
    -h|--help) printf 'usage: sh install.sh [--extras LIST] [--overlay-packages] [--no-uv]\n'; exit 0 ;;
    *) die "unknown option '$1' (known: --extras LIST, --overlay-packages, --no-uv)" ;;
  esac
done

if [ -n "$EXTRAS" ]; then
  for e in $(printf '%s' "$EXTRAS" | tr ',' ' '); do
    case ",$RMA_DONOR_EXTRAS," in *",$e,"*) ;; *) die "unknown extra '$e' (a donor may ask for: $RMA_DONOR_EXTRAS)" ;; esac
  done
  SPEC="rma-pool[$EXTRAS]"
else
  SPEC="rma-pool"
fi

if [ "$(id -u)" = 0 ]; then BIN=${RMA_BIN_DIR:-/usr/local/bin}; else BIN=${RMA_BIN_DIR:-$HOME/.local/bin}; fi

minor_of() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true; }

USE_UV=
if [ -z "$NO_UV" ] && command -v uv >/dev/null 2>&1; then USE_UV=1; fi

PY=
for c in "python$RMA_PYTHON" python3 python; do
  if command -v "$c" >/dev/null 2>&1 && [ "$(minor_of "$c")" = "$RMA_PYTHON" ]; then PY=$(command -v "$c"); break; fi
done
if [ -z "$PY" ] && [ -z "$USE_UV" ]; then
  die "this pool's head runs Python $RMA_PYTHON and Ray needs the same minor version on every node, but no" \
    "python$RMA_PYTHON is on the PATH: install it (Debian/Ubuntu: sudo apt-get install python$RMA_PYTHON" \
    "python$RMA_PYTHON-venv), or install uv (it fetches Python itself), then run this again"
fi

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
trap 'exit 130' INT TERM

fetch() {  # URL FILE
  if command -v curl >/dev/null 2>&1; then
    curl -fsSL --retry 2 -o "$2" "$1" || die "cannot download $1"
  elif command -v wget >/dev/null 2>&1; then
    wget -q -O "$2" "$1" || die "cannot download $1"
  else
    "${PY:-python3}" -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' \
      "$1" "$2" || die "cannot download $1"
  fi
}

say "pool at $POOL_URL: rma-pool $RMA_POOL_VERSION (revision $RMA_REVISION), Ray $RMA_RAY, Python $RMA_PYTHON"
fetch "$POOL_URL/donor/$RMA_WHEEL" "$TMP/$RMA_WHEEL"
fetch "$POOL_URL/donor/constraints.txt" "$TMP/constraints.txt"
if command -v sha256sum >/dev/null 2>&1; then
  GOT=$(sha256sum "$TMP/$RMA_WHEEL" | cut -d' ' -f1)
else
  GOT=$("${PY:-python3}" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' \
    "$TMP/$RMA_WHEEL")
fi
[ "$GOT" = "$RMA_WHEEL_SHA256" ] || die "$RMA_WHEEL from $POOL_URL does not match its sha256 in this script: run it again"

# A venv of another Python minor version (the head moved on) is made anew; one of the right version is upgraded.
if [ -x "$VENV/bin/python" ] && [ "$(minor_of "$VENV/bin/python")" != "$RMA_PYTHON" ]; then
  say "replacing $VENV (Python $(minor_of "$VENV/bin/python"); the head runs $RMA_PYTHON)"
  rm -rf "$VENV"
fi
mkdir -p "$RMA_HOME"
WHEEL_URL="file://$TMP/$RMA_WHEEL"
if [ -n "$USE_UV" ]; then
  [ -x "$VENV/bin/python" ] || uv venv -q --python "$RMA_PYTHON" "$VENV" \
    || die "uv could not make a Python $RMA_PYTHON environment in $VENV"
  say "installing into $VENV with uv"
  uv pip install -q --python "$VENV/bin/python" --constraint "$TMP/constraints.txt" "$SPEC @ $WHEEL_URL" \
    || die "installing $RMA_WHEEL failed (uv's output above)"
  uv pip install -q --python "$VENV/bin/python" --no-deps --reinstall-package rma-pool "$TMP/$RMA_WHEEL" \
    || die "reinstalling $RMA_WHEEL failed (uv's output above)"
else
  pip_() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
  # a venv made by uv (an earlier run where uv was on the PATH) has no pip: add it, or make the venv anew
  if [ -x "$VENV/bin/python" ] && ! pip_ --version >/dev/null 2>&1; then
    "$VENV/bin/python" -m ensurepip -q >/dev/null 2>&1 \
      || { say "replacing $VENV (it has no pip)"; rm -rf "$VENV"; }
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV" 2>"$TMP/venv.log" || {
      rm -rf "$VENV"
      die "$PY cannot make a virtual environment (Debian/Ubuntu: sudo apt-get install python$RMA_PYTHON-venv)"
    }
  fi
  say "installing into $VENV with pip"
  pip_ install -q --upgrade --constraint "$TMP/constraints.txt" "$SPEC @ $WHEEL_URL" \
    || die "installing $RMA_WHEEL failed (pip's output above)"
  pip_ install -q --force-reinstall --no-deps "$TMP/$RMA_WHEEL" \
    || die "reinstalling $RMA_WHEEL failed (pip's output above)"
fi

mkdir -p "$BIN"
ln -sf "$VENV/bin/rma" "$BIN/rma"
say "linked $BIN/rma -> $VENV/bin/rma"
case ":$PATH:" in
  *":$BIN:"*) ;;
  *) say "$BIN is not on your PATH: add it (e.g. echo 'export PATH=\"$BIN:\$PATH\"' >> ~/.profile)" ;;
esac

if [ -n "$OVERLAY_PACKAGES" ]; then
  command -v apt-get >/dev/null 2>&1 || die "no apt-get here: install $OVERLAY_DEBS with your package manager"
  if [ "$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null 2>&1; then SUDO=sudo; else
    die "--overlay-packages needs root: run it as root or install sudo"
  fi
  say "installing the overlay's packages (root): $OVERLAY_DEBS"
  # shellcheck disable=SC2086  # an empty or a `sudo`
  $SUDO apt-get update -q || die "apt-get update failed (its output above)"
  # shellcheck disable=SC2086  # two words on purpose: the packages, and an empty or a `sudo`
  $SUDO apt-get install -y -q $OVERLAY_DEBS || die "apt-get could not install $OVERLAY_DEBS"
elif [ "$RMA_POOL_OVERLAY" = yes ]; then
  say "this pool runs a WireGuard overlay: joining needs root and $OVERLAY_DEBS" \
    "(run this again with --overlay-packages, or install them yourself)"
fi

"$VENV/bin/rma" version --check "$POOL_URL" \
  || die "this machine does not match the pool's head (above): nothing joined; run this script again"

say "done. Next: keep the join token from the admin in a file only you can read, then join:"
printf '  (umask 077 && mkdir -p ~/.config/rma && cat > ~/.config/rma/join-token)   # paste, Enter, Ctrl-D\n'
printf '  rma join %s --token-file ~/.config/rma/join-token\n' "$POOL_URL"
