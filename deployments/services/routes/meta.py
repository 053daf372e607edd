"""The gateway's own routes: who a key acts for, its usage and quota, and the published OpenAPI (behind the
key like every route)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from deployments.gateway import quota
from deployments.gateway.auth import ClientDep
from deployments.services.http import owner

router = APIRouter()


@router.get("/openapi.json", include_in_schema=False)
async def openapi_json(request: Request) -> JSONResponse:
    """The published OpenAPI (deployments/services/openapi.py), which docs/api.md is generated from."""
    published = request.app.state.published
    if not published:
        from deployments.services.openapi import published as publish

        published.append(publish(request.app))
    return JSONResponse(published[0])


@router.get("/whoami")
async def whoami(client: ClientDep) -> dict[str, str]:
    """Which client this key acts for (a cheap check that a key works; the gateway's no-op route)."""
    return {"client": owner(client), "key_id": client.key_id}


@router.get("/usage")
async def usage(client: ClientDep) -> dict[str, Any]:
    """This key's usage today (UTC), its quota and what is left of it.

    The usage includes this request. `quotas.shared` false: the pool's Redis is unreachable and each replica
    counts on its own (the limits then hold per replica)."""
    m = quota.meter()
    if m is None:
        return {"client": owner(client), "key_id": client.key_id, "metered": False}
    return {
        "client": owner(client),
        "key_id": client.key_id,
        "metered": True,
        "day": quota.day_of(m.clock()),
        "usage": await m.usage(client.key_id),
        "quota": client.quota.model_dump(),
        "remaining": await m.remaining(client.key_id, client.quota),
        "quotas": m.state(),
    }
