"""Document-ingest jobs (`deployments.services.ingest`): create one over a file or an upload, read its state and
progress, follow it as SSE, cancel it. The jobs live in the rma-batches app's store and runner; another
client's job is as absent as one that never existed (404)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from sse_starlette.sse import EventSourceResponse

from deployments.gateway import quota
from deployments.gateway.auth import ClientDep
from deployments.gateway.refusal import Refusal
from deployments.services.http import Api, ApiContext, form_file, owner
from deployments.services.ingest import FINAL

router = APIRouter()
IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
EVENTS_POLL_S = 0.5
EVENTS_PING_S = 15
EVENTS_MAX_S = 150.0  # a stream ends by itself before Serve's request_timeout_s (180 s) cuts it
EVENTS_RETRY_MS = 1000
OPTION_FIELDS = ("ocr", "rag", "graph")


def jobs_backend(request: Request) -> Any:
    """The job store: the one `create_api` was given (tests), else the rma-batches app's `batch_store`
    deployment, by name on first use."""
    state = request.app.state
    if getattr(state, "jobs", None) is None:
        from ray import serve

        from deployments.services.backends import as_backend
        from deployments.services.batch_api import BATCHES_APP, STORE_DEPLOYMENT

        state.jobs = as_backend(serve.get_deployment_handle(STORE_DEPLOYMENT, app_name=BATCHES_APP))
    return state.jobs


def _key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is not None and not IDEMPOTENCY_KEY.match(key):
        raise Refusal(
            400,
            "bad_idempotency_key",
            "Idempotency-Key must be 1-255 visible ASCII characters (a UUID is a good key)",
        )
    return key


def _form_options(fields: dict[str, str]) -> dict[str, Any]:
    """A form's option fields: `ocr`, `graph` ("true"/"false") and `rag` ("client", or the JSON object
    {"collection": NAME})."""
    unknown = sorted(set(fields) - {*OPTION_FIELDS, "upload_id"})
    if unknown:
        raise Refusal(
            422,
            "invalid_options",
            f"unknown form field(s) {', '.join(unknown)}: the fields are file, ocr, rag and graph",
        )
    out: dict[str, Any] = {k: fields[k] for k in ("ocr", "graph") if k in fields}
    rag = fields.get("rag")
    if rag:
        if rag.strip().startswith("{"):
            try:
                out["rag"] = json.loads(rag)
            except (ValueError, RecursionError):
                raise Refusal(
                    422, "invalid_options", 'rag must be "client" or JSON like {"collection": "handbook"}'
                ) from None
        else:
            out["rag"] = rag
    return out


@router.post("/jobs/ingest", status_code=202)
async def create_ingest_job(request: Request, client: ClientDep, api: Api) -> Any:
    key = _key(request)
    ctype = request.headers.get("content-type", "")
    data: bytes | None = None
    filename = file_type = upload_id = None
    if ctype.startswith("multipart/form-data"):
        data, filename, file_type, fields = await form_file(request, api.settings.upload_max_bytes)
        if fields.get("upload_id"):
            raise Refusal(
                422, "invalid_body", "send either a file or upload_id, not both: the job reads one document"
            )
        options = _form_options(fields)
    else:
        raw = await request.body()
        if not raw:
            raise Refusal(
                422,
                "invalid_body",
                'send the document: a multipart file (field "file") or JSON {"upload_id": ...}',
            )
        if ctype and not ctype.startswith("application/json"):
            raise Refusal(
                415, "unsupported_media_type", 'send JSON {"upload_id": ...} or a multipart/form-data file'
            )
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; too deep: RecursionError
            raise Refusal(400, "bad_json", "the body is not valid JSON (or nested too deeply)") from None
        if not isinstance(body, dict):
            raise Refusal(422, "invalid_body", "the body must be a JSON object")
        upload_id = body.pop("upload_id", None)
        if not upload_id or not isinstance(upload_id, str):
            raise Refusal(
                422,
                "invalid_body",
                "upload_id: a string is required (the id POST /api/uploads gave), or send a multipart file",
            )
        options = body
    status, job = await api.call(
        "jobs",
        jobs_backend(request).ingest_create,
        owner(client),
        data,
        filename,
        file_type,
        upload_id,
        options,
        key,
    )
    m = quota.meter()
    if data is not None and status == 202 and m is not None:
        # a new job stored the file as an upload: the day's upload quota, as POST /api/uploads (a replay, a
        # 409, a 429 or a refused file is not charged); past the quota the new job is withdrawn
        try:
            await m.charge_upload(client.key_id, client.quota, len(data))
        except Refusal as exc:
            await api.call("jobs", jobs_backend(request).ingest_withdraw, job["id"], owner(client), exc.code)
            raise
    return JSONResponse(job, status_code=status, headers={"Location": f"/api/jobs/{job['id']}"})


@router.get("/jobs")
async def list_jobs(
    request: Request,
    client: ClientDep,
    api: Api,
    limit: int = Query(default=20, ge=1, le=100),
    after: str | None = Query(default=None, max_length=40),
) -> Any:
    return await api.call("jobs", jobs_backend(request).ingest_list, owner(client), limit, after, retry=True)


@router.get("/jobs/{job_id}")
async def get_job(job_id: str, request: Request, client: ClientDep, api: Api) -> Any:
    return await api.call("jobs", jobs_backend(request).ingest_get, job_id, owner(client), retry=True)


@router.get("/jobs/{job_id}/text")
async def get_job_text(job_id: str, request: Request, client: ClientDep, api: Api) -> Any:
    text = await api.call("jobs", jobs_backend(request).ingest_text, job_id, owner(client), retry=True)
    return PlainTextResponse(text)


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, request: Request, client: ClientDep, api: Api) -> Any:
    return await api.call("jobs", jobs_backend(request).ingest_cancel, job_id, owner(client), retry=True)


async def _events(
    api: ApiContext, jobs: Any, job_id: str, who: str, first: dict[str, Any], after: int | None
) -> AsyncIterator[Any]:
    """A `progress` event each time the job changed (its revision, the event's id), the last one named by the
    final state, then the end of the stream. A stream ends by itself after `EVENTS_MAX_S` (a `retry:` hint and
    a comment): the client reconnects with `Last-Event-ID` and gets the changes after that revision."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + EVENTS_MAX_S
    job, last = first, after
    while True:
        final = job["state"] in FINAL
        if last is None or job["revision"] > last:
            last = job["revision"]
            yield {"event": job["state"] if final else "progress", "id": str(last), "data": json.dumps(job)}
        if final:
            return
        if loop.time() >= deadline:
            yield {"retry": EVENTS_RETRY_MS, "comment": "stream time limit: reconnect with Last-Event-ID"}
            return
        await asyncio.sleep(EVENTS_POLL_S)
        job = await api.call("jobs", jobs.ingest_get, job_id, who, retry=True)


def _last_event_id(request: Request) -> int | None:
    raw = request.headers.get("last-event-id")
    if raw is None or not raw.strip():
        return None
    try:
        return int(raw)
    except ValueError:
        raise Refusal(
            400, "bad_last_event_id", "Last-Event-ID must be an event id this stream sent (a revision number)"
        ) from None


@router.get("/jobs/{job_id}/events")
async def job_events(job_id: str, request: Request, client: ClientDep, api: Api) -> Any:
    after = _last_event_id(request)
    jobs = jobs_backend(request)
    first = await api.call("jobs", jobs.ingest_get, job_id, owner(client), retry=True)  # 404 before a 200
    return EventSourceResponse(
        _events(api, jobs, job_id, owner(client), first, after),
        ping=EVENTS_PING_S,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
