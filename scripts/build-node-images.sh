#!/usr/bin/env bash
# Build the donor images: rma-node (FROM the local debootstrap base, no registry: buildable on this machine),
# rma-node-gpu (the same base + vLLM's CUDA wheels, ~5 GB from PyPI) and, on a machine that can pull from Docker
# Hub, rma-ollama (rma-node + the Ollama binary from its official image).
#
#   scripts/build-node-images.sh                   # rma-node
#   scripts/build-node-images.sh node ollama       # these (ollama needs a registry, and node first)
#
# Tags: rma-<image>:<hash> and :latest. <hash> covers the image's folder, the pool's source (pyproject.toml,
# rma_ray/, deployments/) and the base image, so an unchanged image is not rebuilt (well under a second with a
# kept docker data root). Python packages come through this host's pip (its index, proxy and CA bundle), never
# from inside the build: wheels/ holds exactly the pins of images/node/constraints.txt (regenerate that file with
# `.venv/bin/python images/node/constraints.py > images/node/constraints.txt` after changing dependencies).
# rma-node-gpu adds vLLM's pin (images/node-gpu/requirements.txt) and what it requires, resolved by that pip
# against the same constraints; the image records the result in /opt/rma/installed.txt.
#
# Environment: DOCKER_HOST (which dockerd), PIP (default .venv/bin/pip), RMA_WHEELHOUSE (where downloaded wheels
# are kept between runs; default /var/cache/rma/wheels when writable, else ~/.cache/rma/wheels),
# RMA_BUILD_VERBOSE=1 (show docker build's output as it runs).
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "$*"; }
die() { echo "$1" >&2; exit "${2:-2}"; }

command -v docker >/dev/null || die "the docker CLI is not installed: apt-get install docker.io"
docker version --format '{{.Server.Version}}' >/dev/null 2>&1 \
  || die "no docker daemon answers at ${DOCKER_HOST:-unix:///var/run/docker.sock}: start dockerd or set DOCKER_HOST"
PIP="${PIP:-$( [ -x .venv/bin/pip ] && echo "$PWD/.venv/bin/pip" || echo pip )}"
command -v "$PIP" >/dev/null || [ -x "$PIP" ] || die "no pip at $PIP: run \`make venv\` or set PIP"
if [ -z "${RMA_WHEELHOUSE:-}" ]; then
  if mkdir -p /var/cache/rma/wheels 2>/dev/null && [ -w /var/cache/rma/wheels ]; then
    RMA_WHEELHOUSE=/var/cache/rma/wheels
  else
    RMA_WHEELHOUSE="$HOME/.cache/rma/wheels"
  fi
fi
mkdir -p "$RMA_WHEELHOUSE"

[ $# -gt 0 ] || set -- node
for img in "$@"; do
  case "$img" in node|node-gpu|ollama) ;; *) die "unknown image '$img': choose from node, node-gpu, ollama" ;; esac
done

VERSION="$(sed -nE 's/^version = "(.+)"$/\1/p' pyproject.toml | head -n1)"
REVISION="$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
[ -z "$(git status --porcelain -- pyproject.toml rma_ray deployments images 2>/dev/null)" ] || REVISION="$REVISION-dirty"
CTX=""
cleanup() { [ -z "$CTX" ] || rm -rf "$CTX"; }
trap cleanup EXIT

source_hash() {  # the pool's own files that go into every donor image (README.md only feeds the wheel's metadata)
  { find pyproject.toml rma_ray deployments -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 \
      | sort -z | xargs -0 sha256sum; } | sha256sum | cut -c1-12
}

stage_common() {  # $1: build context; the pool's wheel (rma_ray + deployments; no coordinator) and the node files
  local ctx="$1" src
  src="$(mktemp -d)"
  cp -a pyproject.toml README.md rma_ray deployments "$src/"
  find "$src" -name __pycache__ -prune -exec rm -rf {} +
  if ! "$PIP" wheel -q --no-deps --no-build-isolation -w "$ctx/dist" "$src" >"$ctx/pip.log" 2>&1; then
    tail -n 20 "$ctx/pip.log" >&2; rm -rf "$src"
    die "building the rma-pool wheel failed (see above; PIP=$PIP needs setuptools>=69: \`make venv\`)" 1
  fi
  rm -rf "$src" "$ctx/pip.log"
  cp images/node/constraints.txt images/node/entrypoint.sh images/node/with-net-admin.sh images/node/healthcheck.py \
     "$ctx/"
}

fetch_wheels() {  # $1: build context, $2..: what to fetch. Wheels for the images' Python (bookworm's 3.11, x86_64)
  local ctx="$1" log="$1/pip.log"
  shift
  local target=(--only-binary=:all: --python-version 3.11 --implementation cp --abi cp311
                --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64
                --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux1_x86_64
                --platform manylinux2010_x86_64 --platform linux_x86_64 "$@")
  # offline from the kept wheelhouse first; the index only for what is missing there
  if ! "$PIP" download -q --no-index --find-links "$RMA_WHEELHOUSE" "${target[@]}" -d "$ctx/wheels" >"$log" 2>&1
  then
    say "downloading wheels into $RMA_WHEELHOUSE: $*"
    if ! "$PIP" download -q "${target[@]}" -d "$RMA_WHEELHOUSE" >"$log" 2>&1 \
       || ! "$PIP" download -q --no-index --find-links "$RMA_WHEELHOUSE" "${target[@]}" -d "$ctx/wheels" \
              >"$log" 2>&1; then
      grep -v 'is ignored' "$log" | tail -n 20 >&2
      die "downloading the wheels failed (see above; PIP=$PIP): $*" 1
    fi
  fi
  rm -f "$log"
}

build() {  # $1: image name, $2: hash, $3: context, $4..: extra docker build args
  local name="$1" hash="$2" ctx="$3" log t0
  shift 3
  log="$(mktemp)"
  t0=$(date +%s)
  if ! DOCKER_BUILDKIT=0 docker build --network host --label "rma.io/content-hash=$hash" \
         --build-arg "RMA_VERSION=$VERSION" --build-arg "RMA_REVISION=$REVISION" "$@" \
         -t "rma-$name:$hash" -t "rma-$name:latest" "$ctx" 2>&1 \
       | if [ -n "${RMA_BUILD_VERBOSE:-}" ]; then tee "$log"; else cat >"$log"; fi; then
    tail -n 30 "$log" >&2
    if grep -qE 'pull access denied|dial tcp|no such host|manifest unknown|TLS handshake' "$log"; then
      rm -f "$log"; die "building rma-$name needs a registry (Docker Hub) that this docker daemon cannot reach" 1
    fi
    rm -f "$log"; die "building rma-$name failed (see above)" 1
  fi
  rm -f "$log"
  say "$name: built rma-$name:$hash in $(( $(date +%s) - t0 )) s ($(docker image inspect --format '{{.Size}}' "rma-$name:$hash" | awk '{printf "%.0f MiB", $1/1048576}'))"
  # older builds: untag them (their layers go once no container uses them)
  docker image ls --format '{{.Repository}}:{{.Tag}}' "rma-$name" \
    | grep -vE ":(latest|$hash)\$" | xargs -r docker rmi >/dev/null 2>&1 || true
}

present() {  # $1: name, $2: hash
  if docker image inspect "rma-$1:$2" >/dev/null 2>&1; then
    docker tag "rma-$1:$2" "rma-$1:latest"
    say "$1: rma-$1:$2 present, not rebuilt"
    return 0
  fi
  return 1
}

folder_hash() { (cd "images/$1" && find . -type f ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum) | sha256sum | cut -c1-12; }

SRC_HASH="$(source_hash)"
NODE_ID=""
for img in "$@"; do
  case "$img" in
    node)
      images/base/build.sh
      base_id="$(docker image inspect --format '{{.Id}}' rma-base:bookworm)"
      hash="$(echo "$(folder_hash node) $SRC_HASH $base_id" | sha256sum | cut -c1-12)"
      if ! present node "$hash"; then
        CTX="$(mktemp -d)"
        stage_common "$CTX"
        cp images/node/Dockerfile "$CTX/"
        fetch_wheels "$CTX" --no-deps -r images/node/constraints.txt
        build node "$hash" "$CTX"
        rm -rf "$CTX"; CTX=""
      fi
      NODE_ID="$(docker image inspect --format '{{.Id}}' rma-node:latest)"
      ;;
    node-gpu)
      images/base/build.sh
      base_id="$(docker image inspect --format '{{.Id}}' rma-base:bookworm)"
      hash="$(echo "$(folder_hash node-gpu) $(folder_hash node) $SRC_HASH $base_id" | sha256sum | cut -c1-12)"
      if ! present node-gpu "$hash"; then
        CTX="$(mktemp -d)"
        stage_common "$CTX"
        cp images/node-gpu/* "$CTX/"
        fetch_wheels "$CTX" --no-deps -r images/node/constraints.txt
        # vLLM's CUDA build and the stack it pins (torch 2.13.0, nvidia-*-cu13): ~5 GB, resolved by this pip
        fetch_wheels "$CTX" -c images/node/constraints.txt -r images/node-gpu/requirements.txt
        if ls "$CTX"/wheels/torch-*+cpu-*.whl >/dev/null 2>&1; then
          die "pip ($PIP) resolved torch to a CPU build ($(basename "$(ls "$CTX"/wheels/torch-*.whl)")): rma-node-gpu needs PyPI's CUDA wheels; check this pip's find-links and index" 1
        fi
        build node-gpu "$hash" "$CTX"
        rm -rf "$CTX"; CTX=""
      fi
      ;;
    ollama)
      [ -n "$NODE_ID" ] || NODE_ID="$(docker image inspect --format '{{.Id}}' rma-node:latest 2>/dev/null)" \
        || die "rma-ollama is built FROM rma-node: build it first (scripts/build-node-images.sh node ollama)"
      hash="$(echo "$(folder_hash ollama) $NODE_ID" | sha256sum | cut -c1-12)"
      if ! present ollama "$hash"; then
        CTX="$(mktemp -d)"
        cp images/ollama/* "$CTX/"
        build ollama "$hash" "$CTX"
        rm -rf "$CTX"; CTX=""
      fi
      ;;
  esac
done
