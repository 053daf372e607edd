#!/usr/bin/env bash
# Build the data-store images for the supervisor's docker runtime, all locally (no registry): the debootstrap
# base (images/base/build.sh), then images/stores/<store>/Dockerfile FROM it, tagged rma-store-<store>:<hash>
# and :latest. <hash> covers the store's build context and the base image id, so an unchanged store is not
# rebuilt (a kept docker data root makes a re-run take well under a second per image).
#
#   scripts/build-store-images.sh              # every store under images/stores/
#   scripts/build-store-images.sh redis        # only these
#
# Uses DOCKER_HOST like every docker client; builds run with --network host, so a dockerd started with
# --bridge=none --iptables=false can still reach the Debian mirror inside `apt-get`.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v docker >/dev/null || { echo "the docker CLI is not installed: apt-get install docker.io" >&2; exit 2; }
docker version --format '{{.Server.Version}}' >/dev/null 2>&1 \
  || { echo "no docker daemon answers at ${DOCKER_HOST:-unix:///var/run/docker.sock}: start dockerd or set DOCKER_HOST" >&2; exit 2; }

# pip for stores whose images install wheels (requirements.txt beside the Dockerfile)
PIP="${PIP:-$( [ -x .venv/bin/pip ] && echo "$PWD/.venv/bin/pip" || echo pip )}"

images/base/build.sh
base_id="$(docker image inspect --format '{{.Id}}' rma-base:bookworm)"

if [ $# -eq 0 ]; then
  set -- $(cd images/stores && ls -d */ | tr -d /)
fi
for store in "$@"; do
  ctx="images/stores/$store"
  [ -f "$ctx/Dockerfile" ] || { echo "no image for store '$store': $ctx/Dockerfile is missing" >&2; exit 2; }
  hash="$( { (cd "$ctx" && find . -type f -print0 | sort -z | xargs -0 sha256sum); echo "$base_id"; } \
           | sha256sum | cut -c1-12)"
  tag="rma-store-$store:$hash"
  if docker image inspect "$tag" >/dev/null 2>&1; then
    docker tag "$tag" "rma-store-$store:latest"
    echo "$store: $tag present, not rebuilt"
    continue
  fi
  t0=$(date +%s)
  log="$(mktemp)"
  build_ctx="$(mktemp -d)"
  cp -a "$ctx/." "$build_ctx/"
  if [ -f "$ctx/requirements.txt" ]; then
    # Python wheels come through this host's pip (its index, proxy and CA bundle), not from inside the build
    mkdir -p "$build_ctx/wheels"
    if ! "$PIP" download -q --no-deps --only-binary=:all: --python-version 3.11 \
           --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
           -r "$ctx/requirements.txt" -d "$build_ctx/wheels" >"$log" 2>&1; then
      tail -n 20 "$log" >&2; rm -rf "$log" "$build_ctx"
      echo "downloading the wheels for rma-store-$store failed (see above; PIP=$PIP)" >&2; exit 1
    fi
  fi
  if ! DOCKER_BUILDKIT=0 docker build --network host --label "rma.io/content-hash=$hash" \
         -t "$tag" -t "rma-store-$store:latest" "$build_ctx" >"$log" 2>&1; then
    tail -n 30 "$log" >&2; rm -rf "$log" "$build_ctx"
    echo "building rma-store-$store failed (see above)" >&2; exit 1
  fi
  rm -rf "$log" "$build_ctx"
  echo "$store: built $tag in $(( $(date +%s) - t0 )) s"
  # older builds of this store: untag them (their layers go once no container uses them)
  docker image ls --format '{{.Repository}}:{{.Tag}}' "rma-store-$store" \
    | grep -vE ":(latest|$hash)\$" | xargs -r docker rmi >/dev/null 2>&1 || true
done
