#!/bin/bash
# rma-ollama's entrypoint: start `ollama serve` (loopback), wait until it answers, pull the donor's models
# (RMA_OLLAMA_MODELS, space- or comma-separated, e.g. "llava:7b"), then run rma-node's entrypoint (`rma join`,
# token from RMA_JOIN_TOKEN or a secret file) beside it. Docker's SIGTERM (forwarded by tini) goes to the agent,
# which drains and leaves; then Ollama stops. If Ollama dies, the donor leaves too: a vision node without its
# model server is no use to the pool.
set -uo pipefail

ollama serve &
ollama_pid=$!
deadline=$(( SECONDS + ${RMA_OLLAMA_START_TIMEOUT:-60} ))
until ollama list >/dev/null 2>&1; do
  kill -0 "$ollama_pid" 2>/dev/null || { echo "error: ollama serve exited while starting" >&2; exit 1; }
  [ "$SECONDS" -lt "$deadline" ] || { echo "error: ollama serve did not answer within ${RMA_OLLAMA_START_TIMEOUT:-60} s" >&2; kill "$ollama_pid"; exit 1; }
  sleep 0.5
done
models="${RMA_OLLAMA_MODELS:-}"
for model in ${models//,/ }; do
  echo "pulling $model (kept on the /var/lib/ollama volume)"
  ollama pull "$model" || { echo "error: could not pull the Ollama model '$model'" >&2; kill "$ollama_pid"; exit 1; }
done

/usr/local/bin/rma-node-entrypoint "$@" &
join_pid=$!
trap 'kill -TERM "$join_pid" 2>/dev/null' TERM INT
while :; do
  done_pid=""
  wait -n -p done_pid "$join_pid" "$ollama_pid"
  code=$?
  if [ "$done_pid" = "$join_pid" ]; then  # the agent left (or failed): stop Ollama, exit with the agent's code
    kill -TERM "$ollama_pid" 2>/dev/null
    wait "$ollama_pid"
    exit "$code"
  fi
  if [ "$done_pid" = "$ollama_pid" ]; then  # Ollama died under a running agent
    echo "error: ollama serve exited; leaving the pool" >&2
    kill -TERM "$join_pid"
    wait "$join_pid"
    exit 1
  fi
  # a trapped signal interrupted `wait` (done_pid unset): keep waiting while the agent drains and leaves
done
