"""NER into the graph store, and queries of an entity's neighbourhood, by the graph service."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from deployments.gateway.auth import ClientDep
from deployments.services.http import Api, owner
from deployments.services.schemas import ExtractBody, GraphQueryBody

router = APIRouter()


@router.post("/graph/extract")
async def graph_extract(body: ExtractBody, client: ClientDep, api: Api) -> Any:
    return await api.call(
        "graph", api.backends.graph.extract, owner(client), body.text, body.source, body.write
    )


@router.post("/graph/query")
async def graph_query(body: GraphQueryBody, client: ClientDep, api: Api) -> Any:
    return await api.call(
        "graph", api.backends.graph.query, owner(client), body.entity, body.limit, retry=True
    )
