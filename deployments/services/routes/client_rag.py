"""RAG over a client's own collection (only the key of that client may use it), on the client RAG backend."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from deployments.gateway.auth import ClientDep
from deployments.services import answers
from deployments.services.http import Api, json_body
from deployments.services.schemas import ClientIngestBody, ClientQueryBody

router = APIRouter()


@router.post("/clients/{client_id}/rag/ingest")
async def client_rag_ingest(client_id: str, request: Request, client: ClientDep, api: Api) -> Any:
    collection = answers.own_collection(client_id, client)
    return await answers.ingest(request, client, api, collection, ClientIngestBody, api.backends.client_rag)


@router.post("/clients/{client_id}/rag/query")
async def client_rag_query(client_id: str, request: Request, client: ClientDep, api: Api) -> Any:
    collection = answers.own_collection(client_id, client)
    body = await json_body(request, ClientQueryBody)
    return await answers.query(api, collection, body, True, api.backends.client_rag)
