"""The Serve side's one kit (deployments/gateway): apps build on it and never on each other, and its one refusal
answers in both shapes (pool for /api, OpenAI for /v1)."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel

from deployments.gateway.refusal import Refusal, UnknownKey, install_refusals, refusal_from
from tests.support import parse_python

ROOT = Path(__file__).resolve().parents[2]
APPS = ("embeddings", "llm", "services", "vision")
# the modules of an app that other apps must not import (its Serve applications and their plumbing)
APP_MODULES = {"app", "api", "server", "openai", "inference", "gate", "models", "http", "routes", "answers"}


class Body(BaseModel):
    n: int


def _imports(file: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(parse_python(file.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


@pytest.mark.parametrize("app", APPS)
def test_no_app_imports_another_app(app: str) -> None:
    bad = []
    for file in sorted((ROOT / "deployments" / app).rglob("*.py")):
        for name in _imports(file):
            parts = name.split(".")
            if (
                len(parts) >= 3
                and parts[0] == "deployments"
                and parts[1] in APPS
                and parts[1] != app
                and parts[2] in APP_MODULES
            ):
                bad.append(f"{file.relative_to(ROOT)} imports {name}: use deployments.gateway")
    assert not bad, "\n".join(bad)


def test_the_llm_replica_class_does_not_import_the_llm_app_back() -> None:
    assert not {
        n for n in _imports(ROOT / "deployments/llm/server.py") if n.startswith("deployments.llm.app")
    }


def test_a_refusal_crosses_ray_as_itself() -> None:
    for exc in (Refusal(503, "overloaded", "at capacity", 5.0, "input"), UnknownKey()):
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is type(exc) and vars(back) == vars(exc)

    class RayTaskError(Exception):  # Ray re-raises a replica's error wrapped, with the original as `.cause`
        cause = Refusal(404, "not_found", "no note with id 7")

    assert vars(refusal_from(RayTaskError())) == vars(RayTaskError.cause)
    assert refusal_from(ValueError("no refusal")) is None


@pytest.mark.parametrize("shape", ["pool", "openai"])
def test_one_installer_answers_in_the_app_s_shape(shape: str) -> None:
    app = FastAPI()
    install_refusals(app, shape)  # type: ignore[arg-type]

    @app.post("/busy")
    async def busy() -> None:
        raise Refusal(503, "overloaded", "at capacity; retry shortly", 2.4)

    @app.post("/key")
    async def key() -> None:
        raise UnknownKey()

    @app.post("/body")
    async def body(b: Body) -> None:
        return None

    c = TestClient(app)
    busy_r, key_r, body_r = c.post("/busy"), c.post("/key"), c.post("/body", json={"n": "x"})
    assert (busy_r.status_code, busy_r.headers["retry-after"]) == (503, "2")
    assert (key_r.status_code, key_r.headers["www-authenticate"]) == (401, "Bearer")
    assert body_r.status_code == 422 and body_r.json()["error"]["message"].startswith("n: ")
    if shape == "pool":
        assert busy_r.json() == {"error": {"code": "overloaded", "message": "at capacity; retry shortly"}}
    else:
        assert busy_r.json() == {
            "error": {
                "message": "at capacity; retry shortly",
                "type": "server_error",
                "param": None,
                "code": "overloaded",
            }
        }
        assert key_r.json()["error"]["type"] == "authentication_error"
        assert body_r.json()["error"]["type"] == "invalid_request_error"


def test_the_openai_app_answers_a_malformed_body_with_400_as_openai_does() -> None:
    """ray.serve.llm's own validation handler (400 `invalid_parameter`, OpenAI's status) wins over the kit's
    422: the official client raises BadRequestError for a malformed request, as against OpenAI."""
    from fastapi.testclient import TestClient
    from pydantic import BaseModel

    from deployments.llm.openai import openai_fastapi_app

    app = openai_fastapi_app()

    class Body(BaseModel):
        model: str
        max_tokens: int

    @app.post("/echo")
    async def echo(body: Body) -> dict[str, object]:
        return body.model_dump()

    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/echo", json={"model": "m", "max_tokens": "many"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_parameter", r.text
