"""Notes: a client's notes (CRUD, tags) and their summaries by the pool's LLM, by the notes service."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import Response

from deployments.gateway.auth import ClientDep
from deployments.gateway.refusal import Refusal
from deployments.services.http import Api, owner
from deployments.services.schemas import NoteIn, NotePatch, SummarizeBody

router = APIRouter()


@router.post("/notes", status_code=201)
async def create_note(note: NoteIn, client: ClientDep, api: Api) -> Any:
    return await api.call("notes", api.backends.notes.create, owner(client), note.title, note.body, note.tags)


@router.get("/notes")
async def list_notes(
    client: ClientDep,
    api: Api,
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0),
    tag: str | None = Query(None, max_length=50),
) -> Any:
    return await api.call("notes", api.backends.notes.list, owner(client), limit, offset, tag, retry=True)


@router.get("/notes/{note_id}")
async def get_note(note_id: int, client: ClientDep, api: Api) -> Any:
    return await api.call("notes", api.backends.notes.get, owner(client), note_id, retry=True)


@router.put("/notes/{note_id}")
async def update_note(note_id: int, patch: NotePatch, client: ClientDep, api: Api) -> Any:
    if not patch.model_fields_set:
        raise Refusal(422, "invalid_body", "send at least one of: title, body, tags")
    return await api.call(
        "notes", api.backends.notes.update, owner(client), note_id, patch.model_dump(exclude_unset=True)
    )


@router.delete("/notes/{note_id}", status_code=204)
async def delete_note(note_id: int, client: ClientDep, api: Api) -> Response:
    await api.call("notes", api.backends.notes.delete, owner(client), note_id)
    return Response(status_code=204)


@router.post("/notes/{note_id}/summarize")
async def summarize_note(note_id: int, client: ClientDep, api: Api, body: SummarizeBody | None = None) -> Any:
    return await api.call(
        "notes", api.backends.notes.summarize, owner(client), note_id, (body or SummarizeBody()).max_words
    )
