"""Schemathesis over the whole OpenAPI: generated requests (valid and not) against the real app must never
get a server error, and documented responses must match their schemas. Bounded: ~25 examples an operation."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error, response_schema_conformance

from admission.main import build_state, create_app, prepare_database
from tests.integration.conftest import CPU_BOX, make_settings

_tmp = Path(tempfile.mkdtemp(prefix="rma-fuzz-"))
atexit.register(shutil.rmtree, _tmp, True)
_state = build_state(make_settings(f"sqlite:///{_tmp / 'db'}", _tmp))
_admin = prepare_database(_state)
_app = create_app(state=_state)

with TestClient(_app) as _c:
    _h = {"Authorization": f"Bearer {_admin}"}
    _join = _c.post("/api/invites", json={"uses": 10000, "ttl_s": 3600}, headers=_h).json()["token"]
    _node = _c.post(
        "/api/worker/register",
        json={"name": "fuzz", "capabilities": CPU_BOX},
        headers={"Authorization": f"Bearer {_join}"},
    ).json()["node_token"]

schema = schemathesis.openapi.from_asgi(
    "/api/admin/openapi.json",
    _app,  # the schema is for admins only
    headers={"Authorization": f"Bearer {_admin}"},
)


def _credential(path: str) -> str:
    if path == "/api/worker/register":
        return _join
    if path.startswith("/api/worker/"):
        return _node
    return _admin  # type: ignore[return-value]


@schema.exclude(path="/api/worker/unregister").parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: schemathesis.Case) -> None:
    case.call_and_validate(
        headers={"Authorization": f"Bearer {_credential(case.path)}"},
        checks=[not_a_server_error, response_schema_conformance],
    )
