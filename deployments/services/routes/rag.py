"""RAG over the shared collections: ingest a document, query with an answer
(`deployments.services.answers`)."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request

from deployments.gateway.auth import ClientDep
from deployments.gateway.refusal import Refusal
from deployments.services import answers
from deployments.services.http import Api, json_body
from deployments.services.schemas import IngestBody, QueryBody

router = APIRouter()


@router.post("/rag/ingest")
async def rag_ingest(request: Request, client: ClientDep, api: Api) -> Any:
    collection = request.query_params.get("collection")
    if collection is None and not request.headers.get("content-type", "").startswith("multipart/"):
        raw = await request.body()
        try:
            collection = (json.loads(raw) or {}).get("collection", "default") if raw else "default"
        except (ValueError, AttributeError):
            raise Refusal(400, "bad_json", "the body is not valid JSON") from None
    return await answers.ingest(
        request,
        client,
        api,
        answers.public_collection(str(collection or "default")),
        IngestBody,
        api.backends.rag,
    )


@router.post("/rag/query")
async def rag_query(request: Request, client: ClientDep, api: Api) -> Any:
    body = await json_body(request, QueryBody)
    return await answers.query(api, answers.public_collection(body.collection), body, False, api.backends.rag)
