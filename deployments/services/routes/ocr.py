"""POST /ocr: a scanned document or image (multipart, or an upload's id) -> its text, by the OCR service."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from deployments.gateway.auth import ClientDep
from deployments.services.http import Api, file_or_upload

router = APIRouter()


@router.post("/ocr")
async def ocr_document(request: Request, client: ClientDep, api: Api) -> Any:
    data, filename, ctype, _ = await file_or_upload(request, client, api)
    return await api.call("OCR", api.backends.ocr.document, data, filename, ctype, hostile=True)
