"""POST /documents/parse: a file (multipart, or an upload's id) -> its text, by the documents service."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request

from deployments.gateway.auth import ClientDep
from deployments.services.http import Api, file_or_upload

router = APIRouter()


@router.post("/documents/parse")
async def parse_document(
    request: Request, client: ClientDep, api: Api, ocr: Literal["auto", "never", "always"] = "auto"
) -> Any:
    data, filename, ctype, _ = await file_or_upload(request, client, api)
    return await api.call("documents", api.backends.documents.parse, data, filename, ctype, ocr, hostile=True)
