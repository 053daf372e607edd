"""RAG orchestration on the gateway: what a document to index is made of (text, several texts, an upload or a
multipart file, parsed by the documents service), and a query's answer (retrieval by the RAG service, then an
answer with citations from the pool's LLM, whole or streamed as SSE). The routes (`routes/rag.py`,
`routes/client_rag.py`) only pick the collection and the backend."""

from __future__ import annotations

import asyncio
import hmac
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from deployments.gateway.keys import ClientIdentity
from deployments.gateway.refusal import Refusal
from deployments.services import llm
from deployments.services.http import ApiContext, form_file, json_body, owner
from deployments.services.rag import collection_name


async def ingest(
    request: Request,
    client: ClientIdentity,
    api: ApiContext,
    collection: str,
    model: type[BaseModel],
    rag: Any,
) -> Any:
    """Index a request's document(s) into `collection` of the `rag` backend."""
    call, b = api.call, api.backends
    docs: list[dict[str, Any]]
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        data, filename, ctype, fields = await form_file(request, api.settings.upload_max_bytes)
        parsed = await call("documents", b.documents.parse, data, filename, ctype, "auto", hostile=True)
        docs = [
            {
                "text": parsed["text"],
                "source": fields.get("source") or filename or "upload",
                "metadata": {"content_type": parsed["content_type"]},
            }
        ]
    else:
        body = await json_body(request, model)
        given = [x is not None for x in (body.text, body.documents, body.upload_id)]
        if sum(given) != 1:
            raise Refusal(
                422, "invalid_body", "send exactly one of: text, documents, upload_id (or a multipart file)"
            )
        if body.upload_id is not None:
            meta, data = await call("uploads", b.uploads.read, body.upload_id, owner(client))
            parsed = await call(
                "documents",
                b.documents.parse,
                data,
                meta["filename"],
                meta["content_type"],
                "auto",
                hostile=True,
            )
            docs = [
                {
                    "text": parsed["text"],
                    "source": body.source or f"upload:{meta['id']}",
                    "metadata": {
                        **body.metadata,
                        "upload_id": meta["id"],
                        "filename": meta["filename"] or "",
                    },
                }
            ]
        elif body.text is not None:
            docs = [
                {
                    "text": body.text,
                    "source": body.source or f"text:{uuid.uuid4().hex[:12]}",
                    "metadata": body.metadata,
                }
            ]
        else:
            docs = [
                {
                    "text": d.text,
                    "source": d.source or f"text:{uuid.uuid4().hex[:12]}",
                    "metadata": d.metadata,
                }
                for d in body.documents
            ]
    if not any(d["text"].strip() for d in docs):
        raise Refusal(422, "no_text", "the document has no text to index")
    return await call("RAG", rag.ingest, collection, docs)


async def query(api: ApiContext, collection: str, body: Any, missing_ok: bool, rag: Any) -> Any:
    """The chunks that match `body.query`, and (`body.answer`) the LLM's answer with citations."""
    found = await api.call("RAG", rag.query, collection, body.query, body.top_k, missing_ok, retry=True)
    if not body.answer:
        return found
    if not found["results"]:
        return {
            **found,
            "answer": None,
            "citations": [],
            "note": "nothing in the collection matches; no answer generated",
        }
    messages = llm.rag_messages(body.query, found["results"])
    if body.stream:
        if not await asyncio.to_thread(llm.llm_running):  # say so before a 200 stream starts
            raise Refusal(503, "llm_not_running", llm.NOT_RUNNING, 30)
        return stream_answer(found, messages, api.settings.llm_timeout_s)
    answer = await asyncio.wait_for(llm.complete(messages), api.settings.llm_timeout_s)
    return {**found, "answer": answer, "citations": llm.citations(answer, found["results"])}


def stream_answer(
    found: dict[str, Any], messages: list[dict[str, str]], timeout_s: float
) -> StreamingResponse:
    """SSE: `results` (the retrieved chunks), a `delta` per piece of the answer as the LLM makes it, then
    `answer` (the whole text and its citations) and `done`; an `error` event if the LLM fails midway."""

    def event(name: str, data: Any) -> str:
        return f"event: {name}\ndata: {json.dumps(data)}\n\n"

    async def events() -> AsyncIterator[str]:
        yield event("results", found)
        parts: list[str] = []
        try:
            async for text in llm.stream(messages, timeout_s=timeout_s):
                parts.append(text)
                yield event("delta", {"text": text})
            answer = "".join(parts).strip()
            if not answer:
                raise Refusal(503, "llm_failed", "the LLM returned an empty answer")
            yield event("answer", {"answer": answer, "citations": llm.citations(answer, found["results"])})
        except Refusal as exc:
            yield event("error", {"code": exc.code, "message": exc.message})
        yield event("done", {})

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def public_collection(name: str) -> str:
    return collection_name("pub", name)


def own_collection(client_id: str, client: ClientIdentity) -> str:
    """The collection of `client_id`, which must be the client this key acts for."""
    if not hmac.compare_digest(client_id.encode(), owner(client).encode()):
        raise Refusal(
            403,
            "not_your_client",
            f"this API key acts for client {owner(client)!r}; it cannot use the collection of {client_id!r}",
        )
    return collection_name("client", client_id)
