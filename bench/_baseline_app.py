"""The ceiling for the heartbeat benchmark: a bare FastAPI route taking the same body."""

from __future__ import annotations

from fastapi import FastAPI, Response
from pydantic import BaseModel

app = FastAPI()


class Beat(BaseModel):
    status: str = "healthy"
    current_load: float = 0.0
    available_memory_mb: int | None = None


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/api/worker/heartbeat")
async def heartbeat(beat: Beat) -> Response:
    return Response(b'{"action":"none"}', media_type="application/json")
