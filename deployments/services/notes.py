"""Notes in Postgres (SQLAlchemy), one owner per note (the client its key acts for). Every note is indexed in its
owner's RAG collection (source `note:<id>`), so a client's RAG query finds its notes; summaries go through the LLM."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from deployments.gateway.refusal import not_found
from deployments.services import llm
from deployments.services.backends import as_backend
from deployments.services.db import Database, Note, store_endpoint
from deployments.services.rag import collection_name
from deployments.services.settings import ServicesSettings


def _source(note_id: int) -> str:
    return f"note:{note_id}"


class Notes:
    """The Serve deployment's class."""

    def __init__(
        self, settings: dict[str, Any] | None = None, rag: Any = None, endpoint: Any = store_endpoint
    ) -> None:
        self.settings = ServicesSettings(**(settings or {}))
        self.db = Database(self.settings.database, endpoint)
        self.rag = as_backend(rag)

    async def _index(self, owner: str, note: dict[str, Any]) -> None:
        if self.rag is None:
            return
        await self.rag.ingest(
            collection_name("client", owner),
            [
                {
                    "text": f"{note['title']}\n\n{note['body']}",
                    "source": _source(note["id"]),
                    "metadata": {"kind": "note", "title": note["title"]},
                }
            ],
        )

    def _create(self, owner: str, title: str, body: str, tags: list[str]) -> dict[str, Any]:
        with self.db.sessions().begin() as s:
            row = Note(owner=owner, title=title, body=body, tags=tags)
            s.add(row)
            s.flush()
            return row.as_dict()

    async def create(self, owner: str, title: str, body: str, tags: list[str]) -> dict[str, Any]:
        import asyncio

        note = await asyncio.to_thread(self._create, owner, title, body, tags)
        await self._index(owner, note)
        return note

    def list(self, owner: str, limit: int = 50, offset: int = 0, tag: str | None = None) -> dict[str, Any]:
        """Newest first. A tag filter reads the owner's notes and filters here (tags are JSON, portable)."""
        with self.db.sessions()() as s:
            q = select(Note).where(Note.owner == owner).order_by(Note.id.desc())
            if tag is None:
                total = s.scalar(select(func.count()).select_from(Note).where(Note.owner == owner)) or 0
                rows = s.scalars(q.limit(limit).offset(offset)).all()
                return {"total": total, "notes": [r.as_dict() for r in rows]}
            tagged = [r.as_dict() for r in s.scalars(q).all() if tag in (r.tags or [])]
        return {"total": len(tagged), "notes": tagged[offset : offset + limit]}

    def get(self, owner: str, note_id: int) -> dict[str, Any]:
        with self.db.sessions()() as s:
            row = s.get(Note, note_id)
            if row is None or row.owner != owner:
                raise not_found("note", note_id)
            return row.as_dict()

    def _update(self, owner: str, note_id: int, changes: dict[str, Any]) -> dict[str, Any]:
        with self.db.sessions().begin() as s:
            row = s.get(Note, note_id, with_for_update=True)
            if row is None or row.owner != owner:
                raise not_found("note", note_id)
            for key in ("title", "body", "tags"):
                if changes.get(key) is not None:
                    setattr(row, key, changes[key])
            s.flush()
            return row.as_dict()

    async def update(self, owner: str, note_id: int, changes: dict[str, Any]) -> dict[str, Any]:
        import asyncio

        note = await asyncio.to_thread(self._update, owner, note_id, changes)
        await self._index(owner, note)
        return note

    def _delete(self, owner: str, note_id: int) -> None:
        with self.db.sessions().begin() as s:
            row = s.get(Note, note_id)
            if row is None or row.owner != owner:
                raise not_found("note", note_id)
            s.delete(row)

    async def delete(self, owner: str, note_id: int) -> None:
        import asyncio

        await asyncio.to_thread(self._delete, owner, note_id)
        if self.rag is not None:
            await self.rag.delete_source(collection_name("client", owner), _source(note_id))

    async def summarize(self, owner: str, note_id: int, max_words: int = 80) -> dict[str, Any]:
        import asyncio

        note = await asyncio.to_thread(self.get, owner, note_id)
        summary = await llm.complete(
            [
                {
                    "role": "system",
                    "content": f"Summarize the user's note in at most {max_words} words. Use only what "
                    f"the note says.",
                },
                {"role": "user", "content": f"Title: {note['title']}\n\n{note['body']}"},
            ],
            max_tokens=max(32, max_words * 2),
        )
        return {"id": note_id, "summary": summary}

    def check_health(self) -> None:
        return None
