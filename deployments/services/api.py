"""The gateway's HTTP API (FastAPI), mounted by Serve at /api. Routes are thin: authenticate the client key,
check the input, call one backend, shape the answer. Every route needs a client key (a drift test lists them);
every refusal is `{"error": {"code", "message", "request_id"}}`; every response carries X-Request-ID."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.gateway.auth import ClientDep, current_client, rma_error_handler
from deployments.services import llm
from deployments.services.backends import as_backend
from deployments.services.errors import ServiceError, unwrap
from deployments.services.rag import collection_name
from deployments.services.settings import ServicesSettings
from rma_ray.bodylimit import BodyLimit, json_refusal
from rma_ray.client_keys import ClientIdentity

log = logging.getLogger("rma.services.api")
REQUEST_ID = "x-request-id"
DIED = {"ActorDiedError", "RayActorError", "ActorUnavailableError", "WorkerCrashedError"}


@dataclass
class Backends:
    documents: Any
    ocr: Any
    uploads: Any
    notes: Any
    rag: Any
    graph: Any
    client_rag: Any = None  # clients' own collections (trusted nodes); the shared RAG deployment when absent

    def __post_init__(self) -> None:
        if self.client_rag is None:
            self.client_rag = self.rag
        for name in ("documents", "ocr", "uploads", "notes", "rag", "graph", "client_rag"):
            setattr(self, name, as_backend(getattr(self, name)))


# -- wire shapes -------------------------------------------------------------------------------------------------


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class IngestDoc(Strict):
    text: str = Field(min_length=1, max_length=5_000_000)
    source: str | None = Field(default=None, max_length=500)
    metadata: dict[str, str | int | float | bool] = Field(default_factory=dict)


class IngestBody(Strict):
    collection: str = "default"
    text: str | None = Field(default=None, min_length=1, max_length=5_000_000)
    source: str | None = Field(default=None, max_length=500)
    metadata: dict[str, str | int | float | bool] = Field(default_factory=dict)
    documents: list[IngestDoc] | None = Field(default=None, min_length=1, max_length=1000)
    upload_id: str | None = None


class QueryBody(Strict):
    query: str = Field(min_length=1, max_length=4000)
    top_k: int = Field(default=5, ge=1, le=50)
    collection: str = "default"
    answer: bool = True
    stream: bool = False


class ClientIngestBody(Strict):
    text: str | None = Field(default=None, min_length=1, max_length=5_000_000)
    source: str | None = Field(default=None, max_length=500)
    metadata: dict[str, str | int | float | bool] = Field(default_factory=dict)
    documents: list[IngestDoc] | None = Field(default=None, min_length=1, max_length=1000)
    upload_id: str | None = None


class ClientQueryBody(Strict):
    query: str = Field(min_length=1, max_length=4000)
    top_k: int = Field(default=5, ge=1, le=50)
    answer: bool = True
    stream: bool = False


class NoteIn(Strict):
    title: str = Field(min_length=1, max_length=300)
    body: str = Field(default="", max_length=1_000_000)
    tags: list[Annotated[str, Field(min_length=1, max_length=50)]] = Field(default_factory=list, max_length=50)


class NotePatch(Strict):
    title: str | None = Field(default=None, min_length=1, max_length=300)
    body: str | None = Field(default=None, max_length=1_000_000)
    tags: list[Annotated[str, Field(min_length=1, max_length=50)]] | None = Field(default=None, max_length=50)


class SummarizeBody(Strict):
    max_words: int = Field(default=80, ge=10, le=500)


class ExtractBody(Strict):
    text: str = Field(min_length=1, max_length=100_000)
    source: str | None = Field(default=None, max_length=500)
    write: bool = True


class GraphQueryBody(Strict):
    entity: str = Field(min_length=1, max_length=300)
    limit: int = Field(default=25, ge=1, le=500)

    @field_validator("entity")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        return v


class ClientLimiter:
    """Per-client request rate (the `limits` library, sliding window counter, in this replica's memory): one
    client cannot take the whole gateway; past the rate it gets 429 with Retry-After. The sliding window counter
    costs the same per request at any rate (a moving window keeps one timestamp per request in the window)."""

    def __init__(self, rate: str) -> None:
        from limits import parse
        from limits.storage import MemoryStorage
        from limits.strategies import SlidingWindowCounterRateLimiter

        self.item = parse(rate)
        self._limiter = SlidingWindowCounterRateLimiter(MemoryStorage())

    def hit(self, client: ClientIdentity) -> None:
        import math

        if not self._limiter.hit(self.item, client.key_id):
            reset = self._limiter.get_window_stats(self.item, client.key_id).reset_time
            retry = max(1, math.ceil(reset - time.time()))
            raise ServiceError(429, "rate_limited", f"this API key sent more than {self.item} requests; retry in "
                                                    f"{retry} s", retry)


class GatewayMiddleware:
    """Request ids, the body-size limit before anything is read, and per-route metrics, as plain ASGI (Starlette's
    BaseHTTPMiddleware costs a task and a stream per request)."""

    def __init__(self, app: Any, settings: ServicesSettings, set_request_id: bool, metrics: Any) -> None:
        self.app, self.settings, self.set_request_id, self.metrics = app, settings, set_request_id, metrics
        self.limit = BodyLimit(app, settings.upload_max_bytes + 64 * 1024, json_refusal("body_too_large"))

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        rid = (headers.get(b"x-request-id") or b"").decode("latin-1") or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        t0 = time.perf_counter()
        status = 500

        async def send_with_id(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if self.set_request_id:
                    out = list(message.get("headers") or [])
                    if not any(k.lower() == b"x-request-id" for k, _ in out):
                        out.append((b"x-request-id", rid.encode("latin-1")))
                    message = {**message, "headers": out}
            await send(message)

        # the one streamed body limit (rma_ray.bodylimit): chunked bodies are counted as read
        await self.limit(scope, receive, send_with_id)
        if self.metrics is not None:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.observe(route, scope["method"], status, (time.perf_counter() - t0) * 1000)


# -- helpers -----------------------------------------------------------------------------------------------------


def _owner(client: ClientIdentity) -> str:
    return client.client or f"key-{client.key_id}"


def _error(status: int, code: str, message: str, request: Request, headers: dict[str, str] | None = None) -> JSONResponse:
    rid = request.headers.get(REQUEST_ID) or getattr(request.state, "request_id", None)
    return JSONResponse({"error": {"code": code, "message": message, "request_id": rid}}, status_code=status,
                        headers=headers)


def _validation_message(errors: list[Any]) -> str:
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body",)) or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    return "; ".join(parts)


async def _json_body(request: Request, model: type[BaseModel]) -> Any:
    try:
        raw = await request.body()
        data = json.loads(raw) if raw else {}
    except (ValueError, UnicodeDecodeError):
        raise ServiceError(400, "bad_json", "the body is not valid JSON") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ServiceError(422, "invalid_body", _validation_message(exc.errors())) from None


async def _form_file(request: Request, limit: int, field: str = "file") -> tuple[bytes, str | None, str | None, dict[str, str]]:
    """The multipart file (read with a size limit) and the other form fields."""
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise ServiceError(415, "multipart_required",
                           f"send the file as multipart/form-data in a field named {field!r}")
    try:
        form = await request.form(max_files=1, max_fields=20)
    except StarletteHTTPException as exc:
        raise ServiceError(400, "bad_multipart", exc.detail) from None
    except Exception as exc:  # a malformed multipart body
        raise ServiceError(400, "bad_multipart", f"the multipart body could not be read: {exc}") from None
    upload = form.get(field)
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    if not isinstance(upload, UploadFile):
        raise ServiceError(400, "missing_file", f"the form has no file field named {field!r}")
    data = await upload.read(limit + 1)
    await form.close()
    if len(data) > limit:
        raise ServiceError(413, "file_too_large", f"the file is larger than the limit of {limit:,} bytes")
    return data, upload.filename, upload.content_type, fields


# -- the app -----------------------------------------------------------------------------------------------------


def create_api(backends: Backends, settings: ServicesSettings | None = None, *, set_request_id: bool = True,
               metrics: Any = None) -> FastAPI:
    """The FastAPI app. `set_request_id`: add X-Request-ID here (off under Serve, whose proxy adds it to every
    response, its own 503s and 408s included)."""
    s = settings or ServicesSettings()
    b = backends
    limiter = ClientLimiter(s.client_rate) if s.client_rate else None

    async def authenticated(request: Request) -> ClientIdentity:
        client = await current_client(request)
        if limiter is not None:
            limiter.hit(client)
        return client

    # the schema is served by a route of its own below, behind the key like every other route
    app = FastAPI(title="RMA services", version="1", docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=[Depends(authenticated)])
    rma_error_handler(app)

    async def call(what: str, fn: Callable[..., Awaitable[Any]], *args: Any, retry: bool = False,
                   hostile: bool = False, **kwargs: Any) -> Any:
        """One backend call with the gateway's time limit; Serve's refusals become 503s with Retry-After, and
        an idempotent call (`retry`) is sent once more when the replica it reached died under it. A call
        that hands the caller's file to a parser (`hostile`) is never retried: a replica that died under it
        is taken as the file's doing (one bomb must not take down a second replica), and answered 422."""
        for attempt in (1, 2):
            try:
                return await asyncio.wait_for(fn(*args, **kwargs), s.request_timeout_s)
            except TimeoutError:
                raise ServiceError(504, "timeout", f"the {what} service did not answer within "
                                                   f"{s.request_timeout_s:g} s; try again or send less") from None
            except ServiceError:
                raise
            except Exception as exc:
                name = type(unwrap(exc)).__name__
                if name == "BackPressureError":
                    raise ServiceError(503, "overloaded", f"the {what} service is at capacity; retry shortly",
                                       s.retry_after_s) from None
                if name in DIED and hostile:
                    log.warning("%s replica died under a file; the file is refused, not retried", what)
                    raise ServiceError(422, "parser_limits_exceeded",
                                       f"the {what} service's replica died while processing this file: "
                                       f"this file made the parser exceed its limits; it was not processed "
                                       f"and is not retried. Send a smaller or simpler file") from None
                if name in DIED and retry and attempt == 1:
                    log.warning("%s replica died under a request; retrying once", what)
                    if metrics is not None:
                        metrics.retried(what)
                    continue
                if name in DIED or name == "DeploymentUnavailableError":
                    raise ServiceError(503, "service_unavailable", f"the {what} service is not available right "
                                                                   f"now ({name})", 5) from None
                raise
        raise AssertionError("unreachable")

    app.add_middleware(GatewayMiddleware, settings=s, set_request_id=set_request_id, metrics=metrics)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        headers = {"Retry-After": str(max(1, round(exc.retry_after_s)))} if exc.retry_after_s else None
        if exc.status >= 500 and exc.status not in (503, 504):
            log.error("request %s failed: %s", request.state.request_id, exc)
        return _error(exc.status, exc.code, exc.message, request, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, "invalid_request", _validation_message(exc.errors()), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail), request)

    @app.exception_handler(Exception)
    async def _other(request: Request, exc: Exception) -> JSONResponse:
        inner = unwrap(exc)
        if isinstance(inner, ServiceError):
            return await _service_error(request, inner)
        log.exception("request %s failed", request.state.request_id)
        return _error(500, "internal_error", "the server failed on this request; the request id is in the logs",
                      request)

    published: list[dict[str, Any]] = []

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_json() -> JSONResponse:
        """The published OpenAPI (deployments/services/openapi.py), which docs/api.md is generated from."""
        if not published:
            from deployments.services.openapi import published as publish

            published.append(publish(app))
        return JSONResponse(published[0])

    @app.get("/whoami")
    async def whoami(client: ClientDep) -> dict[str, str]:
        """Which client this key acts for (a cheap check that a key works; the gateway's no-op route)."""
        return {"client": _owner(client), "key_id": client.key_id}

    # -- documents, OCR, uploads --

    async def _file_or_upload(request: Request, client: ClientIdentity) -> tuple[bytes, str | None, str | None, dict[str, str]]:
        """A request's document: a multipart `file`, or `upload_id` (form field, query or JSON) of an upload."""
        upload_id = request.query_params.get("upload_id")
        ctype = request.headers.get("content-type", "")
        if upload_id is None and ctype.startswith("application/json"):
            body = await request.body()
            try:
                upload_id = (json.loads(body) or {}).get("upload_id")
            except (ValueError, AttributeError):
                raise ServiceError(400, "bad_json", "the body is not a JSON object with upload_id") from None
            if not upload_id:
                raise ServiceError(422, "invalid_body", "upload_id: field required (or send a multipart file)")
        if upload_id is not None:
            meta, data = await call("uploads", b.uploads.read, str(upload_id), _owner(client), retry=True)
            return data, meta["filename"], meta["content_type"], {}
        return await _form_file(request, s.upload_max_bytes)

    @app.post("/documents/parse")
    async def parse_document(request: Request, client: ClientDep,
                             ocr: Literal["auto", "never", "always"] = "auto") -> Any:
        data, filename, ctype, _ = await _file_or_upload(request, client)
        return await call("documents", b.documents.parse, data, filename, ctype, ocr, hostile=True)

    @app.post("/ocr")
    async def ocr_document(request: Request, client: ClientDep) -> Any:
        data, filename, ctype, _ = await _file_or_upload(request, client)
        return await call("OCR", b.ocr.document, data, filename, ctype, hostile=True)

    @app.post("/uploads", status_code=201)
    async def create_upload(request: Request, client: ClientDep) -> Any:
        data, filename, ctype, _ = await _form_file(request, s.upload_max_bytes)
        return await call("uploads", b.uploads.put, data, filename, ctype, _owner(client))

    @app.get("/uploads/{upload_id}")
    async def get_upload(upload_id: str, client: ClientDep) -> Any:
        return await call("uploads", b.uploads.get, upload_id, _owner(client), retry=True)

    @app.get("/uploads/{upload_id}/content")
    async def get_upload_content(upload_id: str, client: ClientDep) -> Response:
        meta, data = await call("uploads", b.uploads.read, upload_id, _owner(client), retry=True)
        return Response(data, media_type=meta["content_type"], headers={"ETag": f'"{meta["sha256"]}"'})

    # -- RAG (shared collections and per-client collections) --

    async def _ingest(request: Request, client: ClientIdentity, collection: str, model: type[BaseModel],
                      rag: Any) -> Any:
        docs: list[dict[str, Any]]
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            data, filename, ctype, fields = await _form_file(request, s.upload_max_bytes)
            parsed = await call("documents", b.documents.parse, data, filename, ctype, "auto",
                                hostile=True)
            docs = [{"text": parsed["text"], "source": fields.get("source") or filename or "upload",
                     "metadata": {"content_type": parsed["content_type"]}}]
        else:
            body = await _json_body(request, model)
            given = [x is not None for x in (body.text, body.documents, body.upload_id)]
            if sum(given) != 1:
                raise ServiceError(422, "invalid_body", "send exactly one of: text, documents, upload_id "
                                                        "(or a multipart file)")
            if body.upload_id is not None:
                meta, data = await call("uploads", b.uploads.read, body.upload_id, _owner(client))
                parsed = await call("documents", b.documents.parse, data, meta["filename"], meta["content_type"],
                                    "auto", hostile=True)
                docs = [{"text": parsed["text"], "source": body.source or f"upload:{meta['id']}",
                         "metadata": {**body.metadata, "upload_id": meta["id"], "filename": meta["filename"] or ""}}]
            elif body.text is not None:
                docs = [{"text": body.text, "source": body.source or f"text:{uuid.uuid4().hex[:12]}",
                         "metadata": body.metadata}]
            else:
                docs = [{"text": d.text, "source": d.source or f"text:{uuid.uuid4().hex[:12]}",
                         "metadata": d.metadata} for d in body.documents]
        if not any(d["text"].strip() for d in docs):
            raise ServiceError(422, "no_text", "the document has no text to index")
        return await call("RAG", rag.ingest, collection, docs)

    async def _query(collection: str, body: Any, missing_ok: bool, rag: Any) -> Any:
        found = await call("RAG", rag.query, collection, body.query, body.top_k, missing_ok, retry=True)
        if not body.answer:
            return found
        if not found["results"]:
            return {**found, "answer": None, "citations": [],
                    "note": "nothing in the collection matches; no answer generated"}
        messages = llm.rag_messages(body.query, found["results"])
        if body.stream:
            if not await asyncio.to_thread(llm.llm_running):  # say so before a 200 stream starts
                raise ServiceError(503, "llm_not_running", llm.NOT_RUNNING, 30)
            return _stream_answer(found, messages)
        answer = await asyncio.wait_for(llm.complete(messages), s.llm_timeout_s)
        return {**found, "answer": answer, "citations": llm.citations(answer, found["results"])}

    def _stream_answer(found: dict[str, Any], messages: list[dict[str, str]]) -> StreamingResponse:
        """SSE: `results` (the retrieved chunks), a `delta` per piece of the answer as the LLM makes it, then
        `answer` (the whole text and its citations) and `done`; an `error` event if the LLM fails midway."""

        def event(name: str, data: Any) -> str:
            return f"event: {name}\ndata: {json.dumps(data)}\n\n"

        async def events() -> AsyncIterator[str]:
            yield event("results", found)
            parts: list[str] = []
            try:
                async for text in llm.stream(messages, timeout_s=s.llm_timeout_s):
                    parts.append(text)
                    yield event("delta", {"text": text})
                answer = "".join(parts).strip()
                if not answer:
                    raise ServiceError(503, "llm_failed", "the LLM returned an empty answer")
                yield event("answer", {"answer": answer, "citations": llm.citations(answer, found["results"])})
            except ServiceError as exc:
                yield event("error", {"code": exc.code, "message": exc.message})
            yield event("done", {})

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/rag/ingest")
    async def rag_ingest(request: Request, client: ClientDep) -> Any:
        collection = request.query_params.get("collection")
        if collection is None and not request.headers.get("content-type", "").startswith("multipart/"):
            raw = await request.body()
            try:
                collection = (json.loads(raw) or {}).get("collection", "default") if raw else "default"
            except (ValueError, AttributeError):
                raise ServiceError(400, "bad_json", "the body is not valid JSON") from None
        return await _ingest(request, client, collection_name("pub", str(collection or "default")), IngestBody,
                             b.rag)

    @app.post("/rag/query")
    async def rag_query(request: Request, client: ClientDep) -> Any:
        body = await _json_body(request, QueryBody)
        return await _query(collection_name("pub", body.collection), body, False, b.rag)

    def _own(client_id: str, client: ClientIdentity) -> str:
        import hmac

        if not hmac.compare_digest(client_id.encode(), _owner(client).encode()):
            raise ServiceError(403, "not_your_client", f"this API key acts for client {_owner(client)!r}; it "
                                                       f"cannot use the collection of {client_id!r}")
        return collection_name("client", client_id)

    @app.post("/clients/{client_id}/rag/ingest")
    async def client_rag_ingest(client_id: str, request: Request, client: ClientDep) -> Any:
        return await _ingest(request, client, _own(client_id, client), ClientIngestBody, b.client_rag)

    @app.post("/clients/{client_id}/rag/query")
    async def client_rag_query(client_id: str, request: Request, client: ClientDep) -> Any:
        collection = _own(client_id, client)
        body = await _json_body(request, ClientQueryBody)
        return await _query(collection, body, True, b.client_rag)

    # -- notes --

    @app.post("/notes", status_code=201)
    async def create_note(note: NoteIn, client: ClientDep) -> Any:
        return await call("notes", b.notes.create, _owner(client), note.title, note.body, note.tags)

    @app.get("/notes")
    async def list_notes(client: ClientDep, limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0),
                         tag: str | None = Query(None, max_length=50)) -> Any:
        return await call("notes", b.notes.list, _owner(client), limit, offset, tag, retry=True)

    @app.get("/notes/{note_id}")
    async def get_note(note_id: int, client: ClientDep) -> Any:
        return await call("notes", b.notes.get, _owner(client), note_id, retry=True)

    @app.put("/notes/{note_id}")
    async def update_note(note_id: int, patch: NotePatch, client: ClientDep) -> Any:
        if not patch.model_fields_set:
            raise ServiceError(422, "invalid_body", "send at least one of: title, body, tags")
        return await call("notes", b.notes.update, _owner(client), note_id, patch.model_dump(exclude_unset=True))

    @app.delete("/notes/{note_id}", status_code=204)
    async def delete_note(note_id: int, client: ClientDep) -> Response:
        await call("notes", b.notes.delete, _owner(client), note_id)
        return Response(status_code=204)

    @app.post("/notes/{note_id}/summarize")
    async def summarize_note(note_id: int, client: ClientDep, body: SummarizeBody | None = None) -> Any:
        return await call("notes", b.notes.summarize, _owner(client), note_id, (body or SummarizeBody()).max_words)

    # -- NER / graph --

    @app.post("/graph/extract")
    async def graph_extract(body: ExtractBody, client: ClientDep) -> Any:
        return await call("graph", b.graph.extract, _owner(client), body.text, body.source, body.write)

    @app.post("/graph/query")
    async def graph_query(body: GraphQueryBody, client: ClientDep) -> Any:
        return await call("graph", b.graph.query, _owner(client), body.entity, body.limit, retry=True)

    return app


def public_routes(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves (for the drift test)."""
    out = []
    for r in app.routes:
        for m in sorted(getattr(r, "methods", None) or []):
            out.append((m, getattr(r, "path", "")))
    return out

