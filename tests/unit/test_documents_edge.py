"""OCR and parsing on an edge cluster, without Ray: the core's real services app (`create_api`, its key check,
per-client rate and `EdgeForward`) and the edge's (`create_edge_api` behind the real edge gate, real Ed25519
keys and JWKS), each with the real Documents/OCR classes in this process, served by uvicorn as Serve serves
them (the /api prefix as root_path); the routes as a stand-in coordinator answers them (module-scoped: three
servers and one OCR engine, a few seconds)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import Response

from deployments.gateway import auth, edge
from deployments.gateway.edge import EdgeRouter, coordinator_fetch
from deployments.gateway.edge_gate import EdgeCredentialVerifier, EdgeGate
from deployments.gateway.keys import ClientKeyVerifier
from deployments.services.api import Backends, create_api, create_edge_api
from deployments.services.documents import Documents
from deployments.services.edge_app import EDGE_APP, EdgeDocumentsSettings, bytes_in_body
from deployments.services.ocr import Ocr
from deployments.services.settings import ServicesSettings
from rma_ray import credentials
from rma_ray.credentials import Kind
from rma_ray.edges import SERVED_BY_HEADER
from tests import services_samples as samples
from tests.support import ServerThread, wait_for
from tests.support.edge import EDGE, SERVICE_CREDENTIAL, Coordinator, mint

PLAIN = credentials.mint(Kind.CLIENT)
SENSITIVE = credentials.mint(Kind.CLIENT)
RATER = credentials.mint(Kind.CLIENT)
KEYRING = {
    "keys": [
        {"id": PLAIN.id, "hash": PLAIN.hash, "name": "alice"},
        {"id": SENSITIVE.id, "hash": SENSITIVE.hash, "name": "bob", "sensitive": True},
        {"id": RATER.id, "hash": RATER.hash, "name": "rater"},
    ]
}
RATE = 12  # the core's per-client rate in this module: requests per minute


class Uploads:
    """The core's uploads (a store in the pool): one file, of alice's."""

    def __init__(self) -> None:
        self.reads = 0

    def read(self, upload_id: str, owner: str) -> tuple[dict[str, Any], bytes]:
        self.reads += 1
        return {"filename": "u.md", "content_type": "text/markdown"}, b"# Kept on the core\n\nbody"


class Metrics:
    """The gateway's per-route metrics (Ray's metrics API in the pool), recorded."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, int]] = []

    def observe(self, route: str, method: str, status: int, ms: float) -> None:
        self.seen.append((route, method, status))


def serve_like(app: Any) -> Any:
    """`app` as Serve hands it requests at route prefix /api (full path, /api as root_path); /healthz for the
    test server."""

    async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/healthz":
            await Response("ok")(scope, receive, send)
            return
        if scope["type"] == "http":
            scope = {**scope, "root_path": "/api"}
        await (app if scope["type"] == "http" else Starlette())(scope, receive, send)

    return wrapped


@pytest.fixture(scope="module")
def ocr() -> Ocr:
    return Ocr()


@pytest.fixture(scope="module")
def coordinator() -> Iterator[tuple[Coordinator, str]]:
    c = Coordinator()
    with ServerThread(c.app()) as server:
        yield c, server.url


@pytest.fixture(scope="module")
def edge_url(coordinator: tuple[Coordinator, str], ocr: Ocr) -> Iterator[str]:
    settings = EdgeDocumentsSettings(edge=EDGE, edge_coordinator_url=coordinator[1]).services()
    api = create_edge_api(Backends(Documents(ocr), ocr, None, None, None, None), settings)
    with ServerThread(serve_like(EdgeGate(api, EdgeCredentialVerifier(EDGE, coordinator[1])))) as server:
        yield server.url


@pytest.fixture(scope="module")
def uploads() -> Uploads:
    return Uploads()


@pytest.fixture(scope="module")
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture(scope="module")
def core(ocr: Ocr, uploads: Uploads, metrics: Metrics) -> Iterator[str]:
    verifier = ClientKeyVerifier(lambda: KEYRING, refresh_s=3600, max_stale_s=3600)
    verifier.refresh()
    auth.set_verifier(verifier)
    settings = ServicesSettings(upload_max_bytes=2**20, client_rate=f"{RATE}/minute")
    api = create_api(Backends(Documents(ocr), ocr, uploads, None, None, None), settings, metrics=metrics)
    try:
        with ServerThread(serve_like(api)) as server:
            yield server.url
    finally:
        auth.set_verifier(None)


@pytest.fixture
def router(coordinator: tuple[Coordinator, str], edge_url: str) -> Iterator[EdgeRouter]:
    coord, url = coordinator
    coord.route(edge_url, {EDGE_APP: 1})
    r = EdgeRouter(coordinator_fetch(url, SERVICE_CREDENTIAL), read_timeout_s=30, total_timeout_s=60)
    assert r.refresh()
    edge.set_router(r)
    try:
        yield r
    finally:
        edge.set_router(None, disabled=True)


def parse(url: str, key: credentials.Minted, data: bytes, name: str, **kw: Any) -> httpx.Response:
    return httpx.post(
        url + "/api/documents/parse",
        files={"file": (name, data, "application/octet-stream")},
        headers={"Authorization": f"Bearer {key.token}"},
        timeout=60,
        **kw,
    )


@pytest.mark.parametrize(
    ("ctype", "query", "forwardable"),
    [
        (b"multipart/form-data; boundary=x", b"", True),
        (b"multipart/form-data; boundary=x", b"ocr=always", True),
        (b"multipart/form-data; boundary=x", b"upload_id=u1", False),  # bytes only the core holds
        (b"multipart/form-data; boundary=x", b"ocr=auto&upload_id=", False),
        (b"application/json", b"", False),  # {"upload_id": ...}
        (None, b"", False),
    ],
)
def test_only_a_file_in_the_body_may_leave_the_core(
    ctype: bytes | None, query: bytes, forwardable: bool
) -> None:
    headers = [(b"content-type", ctype)] if ctype else []
    assert bytes_in_body({"headers": headers, "query_string": query}) is forwardable


def test_a_file_is_read_on_the_edge_as_the_core_reads_it(
    router: EdgeRouter, core: str, metrics: Metrics
) -> None:
    """The same bytes from a plain client (to the edge) and a sensitive one (never leaves the core)."""
    pdf, image = samples.pdf(["Parsed at the edge"]), samples.text_image(["Edge reads this"])
    answers = {}
    for key in (PLAIN, SENSITIVE):
        answers[key.id] = (
            parse(core, key, pdf, "r.pdf"),
            httpx.post(
                core + "/api/ocr",
                files={"file": ("scan.png", image, "image/png")},
                headers={"Authorization": f"Bearer {key.token}"},
                timeout=60,
            ),
        )
    for on_edge, on_core in zip(answers[PLAIN.id], answers[SENSITIVE.id], strict=True):
        assert on_edge.status_code == on_core.status_code == 200, on_edge.text + on_core.text
        assert on_edge.headers[SERVED_BY_HEADER] == f"edge:{EDGE}", on_edge.headers
        assert on_core.headers[SERVED_BY_HEADER] == "core"
        assert on_edge.json() == on_core.json()
    parsed, read = answers[PLAIN.id]
    assert parsed.json()["text"] == "Parsed at the edge" and "Edge reads this" in read.json()["text"]
    assert router.counts[(EDGE, EDGE_APP, "forwarded")] == 2
    # each counted under its route, wherever it was served (recorded once the answer is sent: wait for it)
    wait_for(lambda: metrics.seen[-4:] == [("/documents/parse", "POST", 200), ("/ocr", "POST", 200)] * 2,
             timeout=10, interval=0.05, what="the four answers in the services' metrics")  # fmt: skip
    assert metrics.seen[-4:] == [("/documents/parse", "POST", 200), ("/ocr", "POST", 200)] * 2


def test_an_upload_id_is_read_on_the_core(router: EdgeRouter, core: str, uploads: Uploads) -> None:
    before = uploads.reads
    for kw in ({"params": {"upload_id": "u1"}}, {"json": {"upload_id": "u1"}}):
        r = httpx.post(
            core + "/api/documents/parse",
            headers={"Authorization": f"Bearer {PLAIN.token}"},
            timeout=60,
            **kw,
        )
        assert r.status_code == 200, r.text
        assert r.headers[SERVED_BY_HEADER] == "core" and r.json()["text"] == "Kept on the core\nbody"
    assert uploads.reads == before + 2 and not router.counts


def test_the_edge_app_takes_bytes_and_the_edge_credential_only(
    coordinator: tuple[Coordinator, str], edge_url: str
) -> None:
    token = mint(coordinator[0].key)
    r = httpx.post(
        edge_url + "/api/documents/parse",
        params={"upload_id": "u1"},
        files={"file": ("a.txt", b"x", "text/plain")},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "upload_id_not_served_here"
    assert "multipart" in r.json()["error"]["message"]
    r = parse(edge_url, PLAIN, b"a client key is no edge credential", "a.txt")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_edge_credential"
    for path in ("/api/notes", "/api/uploads", "/api/whoami"):  # nothing that reads or writes client data
        r = httpx.get(edge_url + path, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert r.status_code == 404, (path, r.text)


def test_no_running_edge_app_means_the_core(
    router: EdgeRouter, coordinator: tuple[Coordinator, str], edge_url: str, core: str
) -> None:
    coordinator[0].route(edge_url, {EDGE_APP: 0, "rma-llm": 1})
    assert router.refresh()
    r = parse(core, PLAIN, b"served at home", "a.txt")
    assert (
        r.status_code == 200
        and r.headers[SERVED_BY_HEADER] == "core"
        and r.json()["text"] == "served at home"
    )
    assert not router.counts


def test_a_forwarded_request_counts_against_the_clients_rate_once(router: EdgeRouter, core: str) -> None:
    """The core checks the client's rate before forwarding (the edge has no client to limit), once."""
    answers = [parse(core, RATER, b"count me", "a.txt") for _ in range(RATE + 1)]
    assert [r.status_code for r in answers] == [200] * RATE + [429], answers[-1].text
    assert answers[-1].json()["error"]["code"] == "rate_limited" and answers[-1].headers["retry-after"]
    assert router.counts[(EDGE, EDGE_APP, "forwarded")] == RATE


def test_documents_is_an_edge_app_at_the_services_prefix_and_no_core_app() -> None:
    from deployments import serve_config

    (spec,) = serve_config.group_apps(["documents"], "edge", EDGE, "http://10.0.0.1:8470")
    assert (spec.name, spec.route_prefix, spec.builder) == (EDGE_APP, "/api", "documents_app")
    assert spec.args["edge"] == EDGE and spec.args["edge_coordinator_url"] == "http://10.0.0.1:8470"
    with pytest.raises(ValueError, match="unknown app documents"):
        serve_config.group_apps(["documents"], "embedded")  # the core's OCR and parsing are the services'
    assert EDGE_APP not in {a.name for a in serve_config.apps()}


def test_the_edge_documents_app_takes_the_core_services_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """A file the core would take (an operator's larger body limit, a longer time limit) the edge takes too:
    else a plain client's forwarded 40 MB PDF is a 413 that a sensitive client's is not."""
    from deployments.serve_config import edge_apps

    monkeypatch.setenv("RMA_SERVICES_UPLOAD_MAX_BYTES", "100000000")
    monkeypatch.setenv("RMA_SERVICES_REQUEST_TIMEOUT_S", "300")
    (spec,) = edge_apps("west", "http://coordinator:8470", {"documents_app"})
    assert spec.args["upload_max_bytes"] == 100000000 and spec.args["request_timeout_s"] == 300
    assert spec.args["edge"] == "west"
