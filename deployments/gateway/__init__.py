"""The Serve side's one kit: what every Serve app that clients reach builds on (no app imports another app).

- `auth`: how a client key is checked (`current_client`, `ClientDep`, `AUTH`), over the keyring of `keys`;
- `refusal`: how an error reaches a client (`Refusal`, `install_refusals`: the pool's shape on /api, OpenAI's
  on /v1; `validation_message`);
- `asgi`: `ClientKeyGate` (in front of vLLM's own app), `StreamCoalescer`, `PrefixIsRoot`, `body_limit` (the
  pool's one body limit, `rma_ray.bodylimit`);
- `deploy`: `wait_running`, `delete_apps`, `app_status` for drivers (tests, benches) that run apps themselves.
"""
