"""The services' published OpenAPI and docs/api.md: the doc is what the code generates, every route is
described (a body example that the route's own model accepts, its error codes), and the schema is served only
with a key."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from deployments.gateway.auth import set_verifier
from deployments.gateway.keys import ClientKeyVerifier
from deployments.services import openapi
from deployments.services import schemas as services_schemas
from deployments.services.api import Backends, create_api
from rma_ray import credentials

KEY = credentials.mint(credentials.Kind.CLIENT)


@pytest.fixture(scope="module")
def app() -> object:
    return create_api(Backends(None, None, None, None, None, None))


def test_docs_api_md_is_what_the_code_generates() -> None:
    assert openapi.DOC.read_text() == openapi.generate(), f"docs/api.md is stale: run `{openapi.REGENERATE}`"


def test_every_route_is_described_with_its_errors_and_an_example(app: object) -> None:
    served = {
        (m, r.path)
        for r in app.routes
        for m in (getattr(r, "methods", None) or ())  # type: ignore[attr-defined]
        if getattr(r, "include_in_schema", False) and m != "HEAD"
    }
    assert served == set(openapi.ROUTES), (
        "describe every route of deployments/services/routes/ in openapi.ROUTES"
    )
    schema = openapi.published(app)
    for path, ops in schema["paths"].items():
        assert path.startswith("/api/")
        for method, op in ops.items():
            codes = {int(s) for s in op["responses"]}
            assert {401, 429, 503} <= codes, (method, path)
            for status, resp in op["responses"].items():
                if int(status) >= 400:
                    assert resp["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/Error"
                    }
            doc = openapi.ROUTES[(method.upper(), path.removeprefix("/api"))]
            body = op.get("requestBody", {}).get("content", {})
            if "application/json" in body:
                assert doc.example is not None, f"{method} {path}: add an example body"
            if doc.body_model:  # the example is one the route's own model accepts
                getattr(services_schemas, doc.body_model).model_validate(doc.example)


def test_examples_of_fastapi_parsed_bodies_validate_against_their_schema(app: object) -> None:
    import jsonschema

    schema = openapi.published(app)
    for ops in schema["paths"].values():
        for op in ops.values():
            json_body = op.get("requestBody", {}).get("content", {}).get("application/json")
            if json_body and "example" in json_body:
                jsonschema.validate(
                    json_body["example"], {**json_body["schema"], "components": schema["components"]}
                )


def test_the_schema_is_served_only_with_a_key(app: object) -> None:
    ring = {"keys": [{"id": KEY.id, "hash": KEY.hash, "name": "alice"}]}
    verifier = ClientKeyVerifier(lambda: ring, refresh_s=3600)
    verifier.refresh()
    set_verifier(verifier)
    try:
        with TestClient(app, raise_server_exceptions=False) as c:  # type: ignore[arg-type]
            assert c.get("/openapi.json").status_code == 401
            bad = c.get("/openapi.json", headers={"Authorization": "Bearer rma_client_nope_nope"})
            assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
            r = c.get("/openapi.json", headers={"Authorization": f"Bearer {KEY.token}"})
            assert r.status_code == 200
            assert r.json() == openapi.published(app)
            assert c.get("/docs").status_code == 404  # no docs UI
    finally:
        set_verifier(None)
