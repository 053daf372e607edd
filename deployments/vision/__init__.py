"""The pool's vision route, POST /api/inference/vision (image + prompt -> text), behind client keys.

- `request`: the request's shapes (multipart or JSON with base64) and limits; pure.
- `backends`: Ollama through the official client (the server a GPU donor runs beside its node), and the OpenAI-style
  messages for a vLLM multimodal model served by ray.serve.llm.
- `config`: settings (`RMA_VISION_*`): backend, placement (label `rma.io/ollama=true` + tier), limits.
- `app`: the Serve applications (`rma-vision` front at /api/inference/vision, `rma-vision-backend`).
"""
