"""The gateway's FastAPI app without Ray: every route needs a client key, every response has a request id, bad
input is a 4xx in the `{"error": {...}}` shape, a key reaches only its own client's RAG collection. Backends are
the real service classes in this process where a test needs them (documents + OCR), absent elsewhere."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from deployments.gateway.auth import set_verifier
from deployments.gateway.keys import ClientKeyVerifier
from deployments.services.api import Backends, create_api, public_routes
from deployments.services.documents import Documents
from deployments.services.ocr import Ocr
from deployments.services.settings import ServicesSettings
from rma_ray import credentials
from tests import services_samples as samples

ALICE = credentials.mint(credentials.Kind.CLIENT)
BOB = credentials.mint(credentials.Kind.CLIENT)


class RecordingRag:
    """Stands in for the RAG deployment (Chroma and the embedding model are tested in integration): records
    which collection each call reached."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def ingest(self, collection: str, docs: list[dict[str, Any]]) -> dict[str, Any]:
        self.calls.append(("ingest", collection))
        return {"collection": collection, "chunks": len(docs), "sources": []}

    def query(self, collection: str, query: str, top_k: int, missing_ok: bool) -> dict[str, Any]:
        self.calls.append(("query", collection))
        return {
            "collection": collection,
            "results": [{"text": "t", "score": 0.9, "source": "s", "chunk": 0, "metadata": {}}],
        }


@pytest.fixture(scope="module")
def ocr() -> Ocr:
    return Ocr()


@pytest.fixture
def rag() -> RecordingRag:
    return RecordingRag()


@pytest.fixture
def client(ocr: Ocr, rag: RecordingRag) -> Iterator[TestClient]:
    ring = {
        "keys": [
            {"id": ALICE.id, "hash": ALICE.hash, "name": "alice"},
            {"id": BOB.id, "hash": BOB.hash, "name": "bob"},
        ]
    }
    verifier = ClientKeyVerifier(lambda: ring, refresh_s=3600)
    verifier.refresh()
    set_verifier(verifier)
    settings = ServicesSettings(upload_max_bytes=64 * 1024)
    app = create_api(Backends(Documents(ocr), ocr, None, None, rag, None), settings)
    try:
        with TestClient(app, raise_server_exceptions=False) as c:
            yield c
    finally:
        set_verifier(None)


def auth(key: credentials.Minted = ALICE) -> dict[str, str]:
    return {"Authorization": f"Bearer {key.token}"}


def test_every_route_refuses_a_request_without_a_key(client: TestClient) -> None:
    routes = [(m, p) for m, p in public_routes(client.app) if p != "/openapi.json" and m != "HEAD"]
    assert len(routes) >= 17
    for method, path in routes:
        url = re.sub(r"\{[^}]+\}", "1", path)
        r = client.request(method, url)
        assert r.status_code == 401, (method, path, r.text)
        assert r.json()["error"]["code"] == "missing_api_key" and r.headers["www-authenticate"] == "Bearer"
        assert r.headers["x-request-id"]
        bad = client.request(method, url, headers={"Authorization": "Bearer rma_client_nope_nope"})
        assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"


def test_request_id_is_echoed_or_made(client: TestClient) -> None:
    r = client.post("/graph/query", json={}, headers={**auth(), "X-Request-ID": "req-42"})
    assert r.status_code == 422 and r.headers["x-request-id"] == "req-42"
    assert r.json()["error"]["request_id"] == "req-42"
    r = client.post("/graph/query", json={}, headers=auth())
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])


def test_parse_a_pdf_and_a_docx_over_http(client: TestClient) -> None:
    r = client.post(
        "/documents/parse",
        headers=auth(),
        files={"file": ("r.pdf", samples.pdf(["Hello from page one"]), "application/pdf")},
    )
    assert r.status_code == 200, r.text
    assert r.json()["pages"][0]["text"] == "Hello from page one"
    r = client.post(
        "/documents/parse",
        headers=auth(),
        files={"file": ("m.docx", samples.docx(["Docx body"]), "application/octet-stream")},
    )
    assert r.status_code == 200 and r.json()["text"] == "Docx body"


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"json": {"x": 1}}, 422, "invalid_body"),
        ({"content": b"raw", "headers": {"Content-Type": "application/pdf"}}, 415, "multipart_required"),
        ({"files": {"other": ("a.txt", b"x", "text/plain")}}, 400, "missing_file"),
        ({"files": {"file": ("a.pdf", b"not a pdf", "application/pdf")}}, 415, "type_mismatch"),
        ({"files": {"file": ("a.txt", b"x" * (64 * 1024 + 1), "text/plain")}}, 413, "file_too_large"),
        ({"content": b"x" * (200 * 1024), "headers": {"Content-Type": "text/plain"}}, 413, "body_too_large"),
    ],
)
def test_bad_uploads_are_clear_4xx(
    client: TestClient, kwargs: dict[str, Any], status: int, code: str
) -> None:
    headers = {**auth(), **kwargs.pop("headers", {})}
    r = client.post("/documents/parse", headers=headers, **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("path", "body", "fragment"),
    [
        ("/graph/extract", {}, "text"),
        ("/graph/extract", {"text": "x", "bogus": 1}, "bogus"),
        ("/graph/query", {"entity": "   "}, "entity"),
        ("/rag/query", {"query": "q", "top_k": 0}, "top_k"),
        ("/rag/query", {"query": "q", "collection": "../etc"}, "collection"),
        ("/rag/ingest", {"text": "a", "documents": [{"text": "b"}]}, "exactly one"),
        ("/notes", {"title": ""}, "title"),
    ],
)
def test_bad_json_is_a_422_that_names_the_field(
    client: TestClient, path: str, body: dict[str, Any], fragment: str
) -> None:
    r = client.post(path, json=body, headers=auth())
    assert r.status_code in (400, 422), r.text
    assert fragment in r.json()["error"]["message"]


def test_not_json_and_unknown_routes(client: TestClient) -> None:
    r = client.post("/rag/query", content=b"{nope", headers={**auth(), "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_json"
    r = client.get("/notes/not-a-number", headers=auth())
    assert r.status_code == 422 and "note_id" in r.json()["error"]["message"]


def test_a_key_reaches_only_its_own_clients_collection(client: TestClient, rag: RecordingRag) -> None:
    r = client.post("/clients/alice/rag/ingest", json={"text": "alice's secret"}, headers=auth(ALICE))
    assert r.status_code == 200 and r.json()["collection"] == "client-alice"
    for path, body in (
        ("/clients/alice/rag/query", {"query": "secret", "answer": False}),
        ("/clients/alice/rag/ingest", {"text": "bob writes"}),
    ):
        r = client.post(path, json=body, headers=auth(BOB))
        assert r.status_code == 403 and r.json()["error"]["code"] == "not_your_client"
    # the shared routes can never name a client collection: their names live under pub-
    r = client.post(
        "/rag/query",
        json={"query": "secret", "collection": "client-alice", "answer": False},
        headers=auth(BOB),
    )
    assert r.status_code == 200 and r.json()["collection"] == "pub-client-alice"
    assert ("query", "client-alice") not in rag.calls and ("ingest", "client-alice") in rag.calls


def test_an_answer_without_an_llm_is_a_503_that_says_so(client: TestClient) -> None:
    r = client.post("/rag/query", json={"query": "q"}, headers=auth())
    assert r.status_code == 503 and r.json()["error"]["code"] == "llm_not_running"
    assert "LLM is not running" in r.json()["error"]["message"] and int(r.headers["retry-after"]) > 0


def test_a_client_past_its_rate_gets_429_with_retry_after(client: TestClient) -> None:
    app = create_api(Backends(None, None, None, None, None, None), ServicesSettings(client_rate="3/minute"))
    with TestClient(app) as c:
        assert [c.get("/whoami", headers=auth()).status_code for _ in range(3)] == [200, 200, 200]
        r = c.get("/whoami", headers=auth())
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert c.get("/whoami", headers=auth(BOB)).json() == {"client": "bob", "key_id": BOB.id}  # per key


class DyingOnceNotes:
    """Stands in for the notes deployment: its first call of each method fails the way a Serve handle call fails
    when the replica it reached dies (Ray's own ActorDiedError); calls after that answer."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def _call(self, method: str) -> int:
        from ray.exceptions import ActorDiedError

        self.calls[method] = self.calls.get(method, 0) + 1
        if self.calls[method] == 1:
            raise ActorDiedError()
        return self.calls[method]

    def get(self, owner: str, note_id: int) -> dict[str, Any]:
        return {"id": note_id, "owner": owner, "attempt": self._call("get")}

    def create(self, owner: str, title: str, body: str, tags: list[str]) -> dict[str, Any]:
        return {"id": 1, "title": title, "attempt": self._call("create")}


class CountingMetrics:
    def __init__(self) -> None:
        self.retries: list[str] = []

    def retried(self, service: str) -> None:
        self.retries.append(service)

    def observe(self, *_: Any) -> None:
        pass


def test_an_idempotent_call_is_retried_once_when_its_replica_died_and_a_post_is_not() -> None:
    ring = {"keys": [{"id": ALICE.id, "hash": ALICE.hash, "name": "alice"}]}
    verifier = ClientKeyVerifier(lambda: ring, refresh_s=3600)
    verifier.refresh()
    set_verifier(verifier)
    notes, metrics = DyingOnceNotes(), CountingMetrics()
    app = create_api(Backends(None, None, None, notes, None, None), ServicesSettings(), metrics=metrics)
    try:
        with TestClient(app, raise_server_exceptions=False) as c:
            r = c.get("/notes/7", headers=auth())
            assert r.status_code == 200 and r.json()["attempt"] == 2
            assert metrics.retries == ["notes"]
            r = c.post("/notes", json={"title": "once"}, headers=auth())
            assert r.status_code == 503 and r.json()["error"]["code"] == "service_unavailable"
            assert "ActorDiedError" in r.json()["error"]["message"] and r.headers["retry-after"]
            assert notes.calls["create"] == 1 and metrics.retries == ["notes"]
    finally:
        set_verifier(None)
