"""Drift guard: every route declares its auth level, and every route that is not public refuses a caller
without credentials. A new route without a declared level fails here."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from admission.main import create_app
from tests.integration.conftest import make_settings

LEVELS = {"public", "admin", "join-token", "node-token", "admin-or-node", "admin-session"}
EXPECTED_PUBLIC = {
    "/healthz",
    "/metrics",
    "/registry/login",
    "/registry/logout",
    "/api/edges/{name}/jwks.json",
    # the donor kit: nothing secret, and a donor has no credential before it joins (SECURITY.md)
    "/donor/install.sh",
    "/donor/constraints.txt",
    "/donor/versions.json",
    "/donor/{filename}",
}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    tmp = tmp_path_factory.mktemp("routes")
    app = create_app(make_settings(f"sqlite:///{tmp / 'db.sqlite'}", tmp))
    with TestClient(app) as c:
        yield c  # type: ignore[misc]


def _walk(routes: list, prefix: str = "") -> list[tuple[str, APIRoute]]:  # type: ignore[type-arg]
    found = []
    for r in routes:
        if isinstance(r, APIRoute):
            found.append((prefix + r.path, r))
        elif hasattr(r, "original_router"):  # FastAPI >= 0.16x keeps included routers as a node
            found += _walk(r.original_router.routes, prefix + r.include_context.prefix)
    return found


def api_routes(client: TestClient) -> list[APIRoute]:
    routes = _walk(client.app.routes)  # type: ignore[attr-defined]
    assert len(routes) >= 25
    return [r for _, r in routes]


def test_every_route_declares_an_auth_level(client: TestClient) -> None:
    missing = [
        f"{sorted(r.methods)} {r.path}"
        for r in api_routes(client)
        if (r.openapi_extra or {}).get("x-rma-auth") not in LEVELS
    ]
    assert missing == [], f"routes without a declared auth level: {missing}"


def test_public_routes_are_the_expected_few(client: TestClient) -> None:
    public = {r.path for r in api_routes(client) if r.openapi_extra["x-rma-auth"] == "public"}
    assert public == EXPECTED_PUBLIC


def test_non_public_routes_refuse_anonymous_callers(client: TestClient) -> None:
    checked = 0
    for route in api_routes(client):
        level = route.openapi_extra["x-rma-auth"]  # type: ignore[index]
        if level == "public":
            continue
        path = re.sub(r"\{[^}]+\}", "abc123abc123", route.path)
        for method in route.methods:
            r = client.request(method, path, json={}, follow_redirects=False)
            if level == "admin-session":
                assert (
                    r.status_code in (303, 401)
                    and r.headers.get("location", "/registry/login") == "/registry/login"
                )
            else:
                assert r.status_code == 401, (
                    f"{method} {route.path} answered {r.status_code} without credentials"
                )
                assert "error" in r.json()
            checked += 1
    assert checked >= 20


def test_openapi_documents_the_levels(client: TestClient) -> None:
    spec = client.app.openapi()  # type: ignore[attr-defined]  # served to admins only (/api/admin/openapi.json)
    for path, ops in spec["paths"].items():
        for op in ops.values():
            assert op.get("x-rma-auth") in LEVELS, path


def test_a_coordinator_away_from_its_head_serves_no_donor_kit_and_says_why(
    client: TestClient, tmp_path: Path
) -> None:
    """Not `rma up`'s own (RMA_DONOR_KIT off): /donor/* is a 404 that says so, and install.sh a script that
    prints it and fails (`curl -fsSL ... | sh` drops an error body)."""
    r = client.get("/donor/versions.json")
    assert r.status_code == 404 and "served by `rma up` coordinators only" in r.json()["error"]["message"]
    r = client.get("/donor/install.sh")
    assert r.status_code == 200
    (tmp_path / "install.sh").write_text(r.text)
    res = subprocess.run(["sh", str(tmp_path / "install.sh")], capture_output=True, text=True)
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.startswith(
        "rma install: error: the install line is served by `rma up` coordinators only"
    )
