"""FakeOllamaServer: a STAND-IN for an Ollama server, because a real Ollama (its binary and a vision model such as
llava) cannot run on this machine. It is not Ollama: it speaks the parts of Ollama's HTTP wire format that the pool
uses (GET /api/tags, POST /api/show, POST /api/chat without streaming, errors as {"error": ...} with Ollama's status
codes), so that the real `ollama` client, the capabilities probe and the vision deployment are exercised over HTTP.

Its "answer" is no model output: it decodes the image it was sent (Pillow) and replies with what it received —
"[stand-in] PNG 64x48 sha256:... prompt='...'" — so a test can check that the image and prompt crossed the pool
intact. Tests that need a real model use RMA_TEST_OLLAMA_URL instead and are skipped without it.
"""

from __future__ import annotations

import base64
import hashlib
import io
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from tests.support import ServerThread

# name -> (capabilities as /api/show reports them (None: an older server that reports none), families)
DEFAULT_MODELS: dict[str, tuple[list[str] | None, list[str]]] = {
    "llava:7b": (["completion", "vision"], ["llama", "clip"]),
    "llama3.2:1b": (["completion", "tools"], ["llama"]),
    "bakllava:latest": (None, ["llama", "clip"]),  # vision known only from its encoder family (older Ollama)
}


def describe_image(b64: str) -> str:
    from PIL import Image

    data = base64.b64decode(b64)
    with Image.open(io.BytesIO(data)) as img:
        return f"{img.format} {img.size[0]}x{img.size[1]} sha256:{hashlib.sha256(data).hexdigest()[:16]}"


@dataclass
class FakeOllamaServer:
    """Stand-in; real Ollama cannot run on this machine. `with FakeOllamaServer(host) as srv: srv.url`."""

    host: str = "127.0.0.1"
    models: dict[str, tuple[list[str] | None, list[str]]] = field(
        default_factory=lambda: dict(DEFAULT_MODELS)
    )
    requests: list[dict[str, Any]] = field(default_factory=list)
    server: ServerThread | None = None

    def app(self) -> FastAPI:
        app = FastAPI()

        def not_found(name: str) -> JSONResponse:
            return JSONResponse({"error": f"model '{name}' not found"}, status_code=404)

        @app.get("/")
        def root() -> PlainTextResponse:
            return PlainTextResponse("Ollama is running (stand-in)")

        @app.get(
            "/healthz"
        )  # for tests.support.ServerThread's readiness wait; Ollama itself has no such route
        def healthz() -> dict[str, bool]:
            return {"ok": True}

        @app.get("/api/tags")
        def tags() -> dict[str, Any]:
            return {
                "models": [
                    {
                        "name": n,
                        "model": n,
                        "modified_at": "2025-01-01T00:00:00Z",
                        "size": 4_700_000_000,
                        "digest": hashlib.sha256(n.encode()).hexdigest(),
                        "details": {
                            "format": "gguf",
                            "family": fams[0],
                            "families": fams,
                            "parameter_size": "7B",
                            "quantization_level": "Q4_0",
                        },
                    }
                    for n, (_caps, fams) in self.models.items()
                ]
            }

        @app.post("/api/show")
        async def show(request: Request) -> Any:
            body = await request.json()
            name = body.get("model") or body.get("name") or ""
            if name not in self.models:
                return not_found(name)
            caps, fams = self.models[name]
            out: dict[str, Any] = {
                "modelfile": "",
                "parameters": "",
                "template": "{{ .Prompt }}",
                "details": {"format": "gguf", "family": fams[0], "families": fams},
                "model_info": {"general.architecture": fams[0]},
            }
            if caps is not None:
                out["capabilities"] = caps
            return out

        @app.post("/api/chat")
        async def chat(request: Request) -> Any:
            body = await request.json()
            self.requests.append(body)
            name = body.get("model", "")
            if name not in self.models:
                return not_found(name)
            if body.get("stream", True):
                return JSONResponse({"error": "stand-in: streaming is not implemented"}, status_code=400)
            user = [m for m in body.get("messages", []) if m.get("role") == "user"][-1]
            images = user.get("images") or []
            seen = describe_image(images[0]) if images else "no image"
            text = f"[stand-in] {seen} prompt={user.get('content', '')!r}"
            limit = int((body.get("options") or {}).get("num_predict") or 10_000)
            words = text.split()
            done_reason = "length" if len(words) > limit else "stop"
            text = " ".join(words[:limit])
            return {
                "model": name,
                "created_at": "2025-01-01T00:00:00Z",
                "message": {"role": "assistant", "content": text},
                "done": True,
                "done_reason": done_reason,
                "total_duration": 1_000_000,
                "load_duration": 0,
                "prompt_eval_count": 576 + len(user["content"]),
                "prompt_eval_duration": 500_000,
                "eval_count": min(len(words), limit),
                "eval_duration": 500_000,
            }

        return app

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    def __enter__(self) -> FakeOllamaServer:
        self.server = ServerThread(self.app(), host=self.host).__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.server is not None:
            self.server.__exit__(*exc)
