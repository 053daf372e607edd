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
# Client IPs (rate limits, failed-auth limits, audit rows) come from Fly's proxy and nobody else: its
# Fly-Client-IP header (which it overwrites) is read only when the connection comes from the proxy's own
# network (RMA_TRUSTED_PROXIES, set in fly.toml). Never '*': a client would pick its own IP (and anyone else's).
export RMA_TRUSTED_PROXIES="${RMA_TRUSTED_PROXIES:-172.16.0.0/12}"
export RMA_CLIENT_IP_HEADER="${RMA_CLIENT_IP_HEADER:-Fly-Client-IP}"
set -- rma admission serve --host 0.0.0.0 --port "${PORT:-8470}" --data-dir "$data" "$@"
if [ "$(id -u)" = 0 ]; then
  exec setpriv --reuid=rma --regid=rma --init-groups --inh-caps=-all -- "$@"
fi
exec "$@"
