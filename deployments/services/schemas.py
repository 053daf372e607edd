"""The services' request bodies (wire shapes), checked by pydantic before a route calls a backend. The ones a
route reads by hand (a body that may also be a multipart file) are named in `openapi.ROUTES`
(`body_model`)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class IngestDoc(Strict):
    text: str = Field(min_length=1, max_length=5_000_000)
    source: str | None = Field(default=None, max_length=500)
    metadata: dict[str, str | int | float | bool] = Field(default_factory=dict)


class ClientIngestBody(Strict):
    # exactly one of text, documents, upload_id (or a multipart file instead): checked by the route
    text: str | None = Field(default=None, min_length=1, max_length=5_000_000)
    source: str | None = Field(default=None, max_length=500)
    metadata: dict[str, str | int | float | bool] = Field(default_factory=dict)
    documents: list[IngestDoc] | None = Field(default=None, min_length=1, max_length=1000)
    upload_id: str | None = None


class IngestBody(ClientIngestBody):
    collection: str = "default"


class ClientQueryBody(Strict):
    query: str = Field(min_length=1, max_length=4000)
    top_k: int = Field(default=5, ge=1, le=50)
    answer: bool = True
    stream: bool = False


class QueryBody(ClientQueryBody):
    collection: str = "default"


class NoteIn(Strict):
    title: str = Field(min_length=1, max_length=300)
    body: str = Field(default="", max_length=1_000_000)
    tags: list[Annotated[str, Field(min_length=1, max_length=50)]] = Field(
        default_factory=list, max_length=50
    )


class NotePatch(Strict):
    title: str | None = Field(default=None, min_length=1, max_length=300)
    body: str | None = Field(default=None, max_length=1_000_000)
    tags: list[Annotated[str, Field(min_length=1, max_length=50)]] | None = Field(default=None, max_length=50)


class SummarizeBody(Strict):
    max_words: int = Field(default=80, ge=10, le=500)


class ExtractBody(Strict):
    text: str = Field(min_length=1, max_length=100_000)
    source: str | None = Field(default=None, max_length=500)
    write: bool = True


class GraphQueryBody(Strict):
    entity: str = Field(min_length=1, max_length=300)
    limit: int = Field(default=25, ge=1, le=500)

    @field_validator("entity")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        return v
