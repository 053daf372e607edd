#!/bin/sh
# The coordinator's entrypoint on Fly.io: give the volume (mounted root-owned) to the `rma` user, map Fly's
# DATABASE_URL (set by `fly postgres attach`) onto RMA_DATABASE_URL, then run `rma admission serve` as `rma`.
# Secrets stay in the environment Fly gives the process; none is printed or put on a command line.
set -eu
if [ -z "${RMA_ADMIN_KEY:-}" ]; then
  # without it the first start would mint an admin key and print it, i.e. into the host's logs
  echo "error: set the RMA_ADMIN_KEY secret first (see cluster_configs/README.md, 'Coordinator on Fly.io')" >&2
  exit 1
fi
data="${RMA_DATA_DIR:-/data}"
if [ "$(id -u)" = 0 ]; then
  install -d -m 0700 -o rma -g rma "$data"
  chown -R rma:rma "$data"
fi
if [ -z "${RMA_DATABASE_URL:-}" ] && [ -n "${DATABASE_URL:-}" ]; then
  case "$DATABASE_URL" in
    postgres://*) RMA_DATABASE_URL="postgresql+psycopg://${DATABASE_URL#postgres://}" ;;
    postgresql://*) RMA_DATABASE_URL="postgresql+psycopg://${DATABASE_URL#postgresql://}" ;;
    *) RMA_DATABASE_URL="$DATABASE_URL" ;;
  esac
  export RMA_DATABASE_URL
fi
unset DATABASE_URL
# Fly's proxy is the only way in and it sets X-Forwarded-For: trust it for the per-IP rate limits.
set -- rma admission serve --host 0.0.0.0 --port "${PORT:-8470}" --data-dir "$data" \
  --forwarded-allow-ips "${RMA_FORWARDED_ALLOW_IPS:-*}" "$@"
if [ "$(id -u)" = 0 ]; then
  exec setpriv --reuid=rma --regid=rma --init-groups --inh-caps=-all -- "$@"
fi
exec "$@"
