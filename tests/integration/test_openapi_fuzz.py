"""Schemathesis over every operation of the coordinator's OpenAPI, three times: with no credential, with a wrong
credential of the right shape, and with the right credential of the route's declared level (`x-rma-auth`: admin
key, node token, join token, the registry's session cookie). Generated requests (valid and not) must never get a
server error and every response must match its documented schema; without the right credential every
non-public route must refuse (401/403). The services' published OpenAPI gets the no-key and wrong-key runs (its
right-key answers need the Serve backends: test_services.py). The apps and credentials are built in fixtures
(~1 s), so a missing extra fails these tests, not the collection of the whole run. Bounded: 125 examples an
operation with the right credential, 6 with none or a wrong one (70-85 s in all on a busy 2-core box)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error, response_schema_conformance
from schemathesis.python import asgi
from schemathesis.transport.prepare import get_exclude_headers

from admission.main import build_state, create_app, prepare_database
from rma_ray import credentials
from rma_ray.credentials import Kind
from tests.integration.conftest import CPU_BOX, make_settings

SESSION_COOKIE = "rma_session"
HASH_AFTER_BODY = {"/api/worker/register", "/api/worker/rejoin"}  # admission/routes/worker.py says why
RIGHT_EXAMPLES = 125  # 5x the 25 this module ran with one (always valid) credential
REFUSED_EXAMPLES = 6
# the credential a route's declared level takes (admission.security: PUBLIC, ADMIN, JOIN, NODE, SERVICE, SESSION)
KIND_OF_LEVEL = {
    "admin": Kind.ADMIN,
    "join-token": Kind.JOIN,
    "node-token": Kind.NODE,
    "admin-or-node": Kind.ADMIN,
}


@dataclass
class Fuzz:
    schema: Any
    client: Any  # schemathesis' in-process ASGI client, opened once: the app's lifespan runs once
    admin: str
    join: str
    cookie: str = ""
    node_token: str = ""

    def level(self, case: schemathesis.Case) -> str:
        level = case.operation.definition.raw.get("x-rma-auth")
        assert level, f"{case.method} {case.path} declares no x-rma-auth level"
        return str(level)

    def node(self) -> str:
        """A donor's node token, kept until a case ends that donor (unregister, abort, or a refusal such as a
        rejoin with other hardware that quarantines it): a new donor for every case would grow the lists the
        admin routes render to a thousand rows and cost the run minutes."""
        if self.node_token:
            r = self.client.get("/api/worker/me", headers={"Authorization": f"Bearer {self.node_token}"})
            me = r.json() if r.status_code == 200 else {}
            if me.get("status") in ("joining", "healthy", "warning", "offline") and me["action"] == "none":
                return self.node_token
        r = self.client.post(
            "/api/worker/register",
            json={"name": "fuzz", "capabilities": CPU_BOX},
            headers={"Authorization": f"Bearer {self.join}"},
        )
        assert r.status_code == 201, r.text
        self.node_token = str(r.json()["node_token"])
        return self.node_token

    def session_cookie(self) -> str:
        """One registry session for the run: only log-out ends it, and that route is public (sent no cookie)."""
        if self.cookie:
            return self.cookie
        r = self.client.post("/registry/login", data={"admin_key": self.admin}, allow_redirects=False)
        assert r.status_code == 303, r.text
        cookie = r.cookies[SESSION_COOKIE]
        self.client.cookies.clear()  # never sent unless a case asks for it
        self.cookie = str(cookie)
        return self.cookie

    def call(self, case: schemathesis.Case, headers: dict[str, str], cookies: dict[str, str]) -> Any:
        self.client.cookies.clear()
        return case.call_and_validate(
            session=self.client,
            headers=headers,
            cookies=cookies,
            allow_redirects=False,  # the registry page's refusal is a redirect: see it, not the log-in form
            checks=[not_a_server_error, response_schema_conformance],
        )


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzz]:
    """The coordinator app in process on SQLite, an invite, the admin key (~1 s); module-scoped."""
    tmp = tmp_path_factory.mktemp("fuzz")
    state = build_state(make_settings(f"sqlite:///{tmp / 'db'}", tmp))
    admin = prepare_database(state)
    assert admin
    app = create_app(state=state)
    try:
        with asgi.get_client(app) as client:
            r = client.post(
                "/api/invites",
                json={"uses": 10000, "ttl_s": 3600},
                headers={"Authorization": f"Bearer {admin}"},
            )
            assert r.status_code == 201, r.text
            schema = schemathesis.openapi.from_asgi(
                "/api/admin/openapi.json", app, headers={"Authorization": f"Bearer {admin}"}
            )
            yield Fuzz(schema, client, admin, r.json()["token"])
    finally:
        state.engine.dispose()


@pytest.fixture(scope="module")
def coordinator_schema(fuzz: Fuzz) -> Any:
    return fuzz.schema


schema = schemathesis.pytest.from_fixture("coordinator_schema")
_settings = {"deadline": None, "suppress_health_check": list(HealthCheck)}


def _holds_nul(case: schemathesis.Case) -> bool:
    """Whether a NUL is in the case's query or path parameters (names, values, values' items)."""

    def nul(x: Any) -> bool:
        if isinstance(x, dict):
            return any(nul(k) or nul(v) for k, v in x.items())
        if isinstance(x, list | tuple):
            return any(nul(v) for v in x)
        return "\x00" in str(x)

    return nul(case.query or {}) or nul(case.path_parameters or {})


def _assert_refused(fuzz: Fuzz, case: schemathesis.Case, response: Any) -> None:
    level = fuzz.level(case)
    if level == "public":
        return
    if response.status_code == 400 and _holds_nul(case):
        # a NUL in the path or query is refused before any route runs (admission.main.NoNul), whatever the
        # credential: nothing of the route runs, and the answer names nothing but the NUL
        assert response.json()["error"]["code"] == "invalid_request", response.text
        return
    if case.method.upper() != case.operation.method.upper():
        # schemathesis' "unsupported method" case (TRACE on a GET route): no such route, so nothing to guard
        assert response.status_code == 405, (case.method, case.path, response.status_code, response.text)
        return
    if response.status_code in (400, 422) and case.path in HASH_AFTER_BODY:
        # the join and rejoin routes check only the token's shape first, its hash in the service, after the
        # body. Every other route checks the credential first, also for a body that is not JSON (FastAPI
        # parses it before the route's dependencies run: admission.errors checks the credential then).
        assert response.json()["error"]["code"] in ("invalid_request", "bad_request"), response.text
        return
    if level == "admin-session" and case.path == "/registry" and response.status_code == 303:
        # the page itself sends a browser without a live session to the log-in form (a fragment request,
        # ?partial=true, gets the 401 the page's script acts on)
        assert response.headers["location"] == ["/registry/login"], response.headers
        return
    assert response.status_code in (401, 403), (case.method, case.path, response.status_code, response.text)


@schema.parametrize()
@settings(max_examples=REFUSED_EXAMPLES, **_settings)  # type: ignore[arg-type]
def test_no_credential_is_refused_and_never_a_server_error(fuzz: Fuzz, case: schemathesis.Case) -> None:
    response = fuzz.call(case, headers={}, cookies={})
    _assert_refused(fuzz, case, response)


@schema.parametrize()
@settings(max_examples=REFUSED_EXAMPLES, **_settings)  # type: ignore[arg-type]
def test_a_wrong_credential_of_the_right_shape_is_refused(fuzz: Fuzz, case: schemathesis.Case) -> None:
    level = fuzz.level(case)
    if level == "admin-session":
        # signed with another key: the right shape (a JWT with the right claims), not this coordinator's
        forged = jwt.encode(
            {"sub": "0" * 12, "iat": 0, "exp": 2**31, "aud": "rma-registry", "jti": "0" * 32},
            "not-the-coordinators-secret-key-at-all",
            algorithm="HS256",
        )
        response = fuzz.call(case, headers={}, cookies={SESSION_COOKIE: forged})
    else:
        kind = KIND_OF_LEVEL.get(level, Kind.ADMIN)
        unknown = credentials.mint(kind).token  # well formed, never stored
        response = fuzz.call(case, headers={"Authorization": f"Bearer {unknown}"}, cookies={})
    _assert_refused(fuzz, case, response)


@schema.parametrize()
@settings(max_examples=RIGHT_EXAMPLES, **_settings)  # type: ignore[arg-type]
def test_the_right_credential_never_gets_a_server_error(fuzz: Fuzz, case: schemathesis.Case) -> None:
    level = fuzz.level(case)
    headers: dict[str, str] = {}
    cookies: dict[str, str] = {}
    if level == "admin-session":
        cookies[SESSION_COOKIE] = fuzz.session_cookie()
    elif level == "node-token":
        headers["Authorization"] = f"Bearer {fuzz.node()}"
    elif level == "join-token":
        headers["Authorization"] = f"Bearer {fuzz.join}"
    elif level in ("admin", "admin-or-node"):
        headers["Authorization"] = f"Bearer {fuzz.admin}"
    else:
        assert level == "public", f"{case.method} {case.path}: unknown auth level {level!r}"
    response = fuzz.call(case, headers=headers, cookies=cookies)
    if "Authorization" in get_exclude_headers(case):
        # schemathesis' negative case "the security header is missing": it sends none, whatever we pass
        _assert_refused(fuzz, case, response)
    elif level != "public":
        assert response.status_code not in (401, 403), (case.method, case.path, response.text)


# -- the services' published OpenAPI (GET /api/openapi.json): its key check needs no Ray, its backends do ------


@dataclass
class ServicesFuzz:
    schema: Any
    client: Any


@pytest.fixture(scope="module")
def services(fuzz: Fuzz) -> Iterator[ServicesFuzz]:
    """The services' FastAPI app mounted at /api as Serve mounts it, with no backends (they are Serve handles:
    a request that passes the key check would need Ray), its key check reading this module's coordinator's
    real keyring (~0.5 s). Only refusals are fuzzed here; every route with every key kind against the real
    backends is test_services.py's."""
    from deployments.gateway.auth import set_verifier
    from deployments.gateway.keys import ClientKeyVerifier
    from deployments.services.api import Backends, create_api

    admin = {"Authorization": f"Bearer {fuzz.admin}"}
    r = fuzz.client.post("/api/admin/clients", json={"name": "schema-reader"}, headers=admin)
    assert r.status_code == 201, r.text
    key = r.json()["key"]

    got = fuzz.client.get("/api/clients/keyring", headers=admin)
    assert got.status_code == 200, got.text
    keyring = (
        got.json()
    )  # read once: an unknown key's look-up again must not cross threads into the coordinator

    # unknown_refresh_s=0: a made-up key is refused after one look-up, not after the second look-up a fresh key
    # may wait up to 1 s for (deployments/gateway/auth.py); with it, every wrong-key case cost ~1 s and the
    # whole run passed pytest's 600 s limit in CI
    verifier = ClientKeyVerifier(lambda: keyring, refresh_s=3600, unknown_refresh_s=0.0)
    verifier.refresh()
    set_verifier(verifier)
    app = create_api(Backends(None, None, None, None, None, None))

    async def root(scope: Any, receive: Any, send: Any) -> None:
        # Serve's proxy hands the gateway everything under /api, whatever the rest of the path holds (a
        # Starlette Mount would not match a path with a newline in it, and answer for the app)
        if scope["type"] == "http" and scope["path"].startswith("/api"):
            scope = {**scope, "path": scope["path"].removeprefix("/api") or "/"}
        await app(scope, receive, send)

    try:
        with asgi.get_client(root) as client:
            schema = schemathesis.openapi.from_asgi(
                "/api/openapi.json", root, headers={"Authorization": f"Bearer {key}"}
            )
            yield ServicesFuzz(schema, client)
    finally:
        set_verifier(None)


@pytest.fixture(scope="module")
def services_schema(services: ServicesFuzz) -> Any:
    return services.schema


services_api = schemathesis.pytest.from_fixture("services_schema")


@services_api.parametrize()
@settings(max_examples=REFUSED_EXAMPLES, **_settings)  # type: ignore[arg-type]
def test_every_services_operation_refuses_no_key_and_a_wrong_key(
    services: ServicesFuzz, case: schemathesis.Case
) -> None:
    wrong = credentials.mint(Kind.CLIENT).token
    for headers in ({}, {"Authorization": f"Bearer {wrong}"}):
        response = case.call_and_validate(
            session=services.client,
            headers=headers,
            checks=[not_a_server_error, response_schema_conformance],
        )
        if case.method.upper() != case.operation.method.upper():
            assert response.status_code == 405, (case.method, case.path, response.text)
        elif response.status_code == 404 and response.json()["error"]["message"] == "Not Found":
            # a generated path parameter that no route matches (one with a '/' in it): the router's 404,
            # before any route (and so any data) is reached
            pass
        else:
            assert response.status_code == 401, (case.method, case.path, response.status_code, response.text)
            code = response.json()["error"]["code"]
            assert code in ("missing_api_key", "invalid_api_key"), response.text
