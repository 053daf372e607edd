#!/bin/sh
# rma-node's entrypoint: `rma join <coordinator-url> [options]`. The join token reaches `rma join` through the
# environment (RMA_JOIN_TOKEN, which the CLI reads itself) or a file: RMA_JOIN_TOKEN_FILE, else the docker/compose
# secret /run/secrets/rma_join_token when it exists. Never through argv, where `ps` and `docker inspect` show it.
# Each `rma join` spends a join token (invites are single-use unless the admin sets `uses`): a container that
# restarts needs a token with uses left. CAP_NET_ADMIN, when the container has it, goes to the agent (overlay).
set -eu
if [ -z "${RMA_JOIN_TOKEN:-}" ]; then
  file="${RMA_JOIN_TOKEN_FILE:-/run/secrets/rma_join_token}"
  if [ -n "${RMA_JOIN_TOKEN_FILE:-}" ] || [ -e "$file" ]; then
    exec rma-with-net-admin rma join --token-file "$file" "$@"
  fi
fi
exec rma-with-net-admin rma join "$@"
