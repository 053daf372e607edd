"""Uploads: a client's files kept for later (parse, OCR, RAG ingest by `upload_id`), readable only by that
client."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from deployments.gateway import quota
from deployments.gateway.auth import ClientDep
from deployments.services.http import Api, form_file, owner

router = APIRouter()


@router.post("/uploads", status_code=201)
async def create_upload(request: Request, client: ClientDep, api: Api) -> Any:
    data, filename, ctype, _ = await form_file(request, api.settings.upload_max_bytes)
    m = quota.meter()
    if m is not None:  # the day's upload quota (429 past it), and the key's usage
        await m.charge_upload(client.key_id, client.quota, len(data))
    return await api.call("uploads", api.backends.uploads.put, data, filename, ctype, owner(client))


@router.get("/uploads/{upload_id}")
async def get_upload(upload_id: str, client: ClientDep, api: Api) -> Any:
    return await api.call("uploads", api.backends.uploads.get, upload_id, owner(client), retry=True)


@router.get("/uploads/{upload_id}/content")
async def get_upload_content(upload_id: str, client: ClientDep, api: Api) -> Response:
    meta, data = await api.call("uploads", api.backends.uploads.read, upload_id, owner(client), retry=True)
    return Response(data, media_type=meta["content_type"], headers={"ETag": f'"{meta["sha256"]}"'})
