"""Edge clusters from the coordinator's side: each edge's service credential, and what the core's gateway needs
to forward a request there (`EdgeRoutes`).

The edge credential is a short-lived EdDSA JWT (iss `EDGE_ISSUER`, aud `edge_audience(name)`, sub "gateway",
iat, exp, jti; a `kid` header naming the signing key) that the coordinator mints for the core's gateway and the
edge's ingress verifies against the public keys published at `jwks_path(name)`. Each edge has its own Ed25519
key pair, kept 0600 under the coordinator's data dir (`edges/<name>/`): a stolen edge credential opens that
edge only, and no edge can mint one. Rotating keeps the previous public key in the JWK set for one token
lifetime, so credentials already handed out stay good until they expire; after that only the new key verifies.

`apps`/`healthy` come from the edge's own Serve status (`GET /api/serve/applications/` on its dashboard, with
the edge's token, read from its file each time), cached for a few seconds so that every gateway replica's
refresh does not become a dashboard call.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from jwt.algorithms import OKPAlgorithm

from admission import schemas
from admission.errors import ApiError
from admission.services import reputation
from admission.state import AppState
from rma_ray.edges import (
    CORE,
    EDGE_APP_NEEDS,
    EDGE_ISSUER,
    EDGE_TOKEN_TTL_S,
    EdgeEndpoint,
    edge_audience,
)
from rma_ray.membership import write_private
from rma_ray.settings import Settings

log = logging.getLogger("rma.admission.edges")

CURRENT, PREVIOUS = "signing-key.pem", "signing-key.previous.pem"
STATUS_TTL_S = 5.0  # how long one reading of an edge's Serve status answers every gateway replica
STATUS_TIMEOUT_S = 3.0
_lock = threading.Lock()  # key files: one creation or rotation at a time in this process


def _edge(settings: Settings, name: str) -> EdgeEndpoint:
    edge = settings.edge(name)
    if edge is None:
        known = ", ".join(e.name for e in settings.edges) or "none (this pool runs without edges)"
        raise ApiError(404, "unknown_edge", f"no edge cluster {name!r}; known edges: {known}")
    return edge


def key_dir(settings: Settings, name: str) -> Path:
    return settings.data_dir / "edges" / name


def _write_key(path: Path, key: Ed25519PrivateKey) -> None:
    """Atomically, 0600 from the first byte (never world-readable, not even for a moment)."""
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_private(path, pem)


def _read_key(path: Path) -> Ed25519PrivateKey | None:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        return None
    if not isinstance(key, Ed25519PrivateKey):
        raise RuntimeError(f"{path} is not an Ed25519 key")
    return key


def _jwk(public: Ed25519PublicKey) -> dict[str, str]:
    jwk: dict[str, str] = OKPAlgorithm.to_jwk(public, as_dict=True)
    # RFC 7638 thumbprint as the key id: stable, and names nothing but the key
    canon = json.dumps({"crv": jwk["crv"], "kty": jwk["kty"], "x": jwk["x"]}, separators=(",", ":"))
    kid = base64.urlsafe_b64encode(hashlib.sha256(canon.encode()).digest()).rstrip(b"=").decode()
    return {**jwk, "kid": kid, "use": "sig", "alg": "EdDSA"}


@dataclass(frozen=True)
class EdgeKeys:
    current: Ed25519PrivateKey
    rotated_at: datetime  # when the current key was made
    previous: Ed25519PrivateKey | None  # published until `previous_valid_until`

    @property
    def previous_valid_until(self) -> datetime | None:
        if self.previous is None:
            return None
        return self.rotated_at + timedelta(seconds=EDGE_TOKEN_TTL_S)

    def published(self, now: datetime) -> list[dict[str, str]]:
        keys = [_jwk(self.current.public_key())]
        until = self.previous_valid_until
        if self.previous is not None and until is not None and now < until:
            keys.append(_jwk(self.previous.public_key()))
        return keys


def load_keys(settings: Settings, name: str) -> EdgeKeys:
    """The edge's signing keys, made on first use."""
    d = key_dir(settings, name)
    with _lock:
        current = _read_key(d / CURRENT)
        if current is None:
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            current = Ed25519PrivateKey.generate()
            _write_key(d / CURRENT, current)
        rotated_at = datetime.fromtimestamp((d / CURRENT).stat().st_mtime, UTC)
        return EdgeKeys(current, rotated_at, _read_key(d / PREVIOUS))


def jwks(settings: Settings, name: str) -> dict[str, Any]:
    """The edge's public keys as a JWK set (what PyJWT's PyJWKClient reads)."""
    _edge(settings, name)
    return {"keys": load_keys(settings, name).published(datetime.now(UTC))}


def rotate(settings: Settings, name: str) -> schemas.EdgeKeyOut:
    """A new signing key; the old one stays published for one token lifetime (credentials already out expire
    by then), any older one is gone at once."""
    _edge(settings, name)
    d = key_dir(settings, name)
    load_keys(settings, name)  # there is a current key to demote
    with _lock:
        os.replace(d / CURRENT, d / PREVIOUS)
        _write_key(d / CURRENT, Ed25519PrivateKey.generate())
    keys = load_keys(settings, name)
    assert keys.previous is not None
    return schemas.EdgeKeyOut(
        edge=name,
        current_kid=_jwk(keys.current.public_key())["kid"],
        previous_kid=_jwk(keys.previous.public_key())["kid"],
        rotated_at=keys.rotated_at,
        previous_valid_until=keys.previous_valid_until,
    )


def mint(settings: Settings, name: str, now: float | None = None) -> tuple[str, datetime]:
    """An edge credential for the core's gateway: (JWT, expiry). It names no client and no client key."""
    keys = load_keys(settings, name)
    iat = int(now if now is not None else time.time())
    exp = iat + EDGE_TOKEN_TTL_S
    claims = {
        "iss": EDGE_ISSUER,
        "aud": edge_audience(name),
        "sub": "gateway",
        "iat": iat,
        "exp": exp,
        "jti": secrets.token_hex(16),
    }
    kid = _jwk(keys.current.public_key())["kid"]
    token = jwt.encode(claims, keys.current, algorithm="EdDSA", headers={"kid": kid})
    return token, datetime.fromtimestamp(exp, UTC)


def parse_serve_status(body: dict[str, Any]) -> dict[str, int]:
    """application -> replicas that can serve it now: the fewest RUNNING replicas over its deployments (a
    request needs every deployment of the app) and over the apps it calls (`EDGE_APP_NEEDS`), 0 for an app
    that failed or is being deleted."""
    apps: dict[str, int] = {}
    for name, app in (body.get("applications") or {}).items():
        deployments = (app or {}).get("deployments") or {}
        if app.get("status") in ("DEPLOY_FAILED", "DELETING") or not deployments:
            apps[name] = 0
            continue
        apps[name] = min(
            sum(1 for r in (d or {}).get("replicas") or [] if r.get("state") == "RUNNING")
            for d in deployments.values()
        )
    for name, needs in EDGE_APP_NEEDS.items():  # an app that calls another app answers only while it runs
        if name in apps:
            apps[name] = min([apps[name], *(apps.get(n, 0) for n in needs)])
    return apps


@dataclass
class _Reading:
    at: float
    apps: dict[str, int]
    healthy: bool


class EdgeStatusCache:
    """The last reading of each edge's Serve status, at most STATUS_TTL_S old."""

    def __init__(self, ttl_s: float = STATUS_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._readings: dict[str, _Reading] = {}
        self._fetching: dict[str, threading.Lock] = {}  # one per edge: one dashboard call at a time

    def _fresh(self, name: str) -> _Reading | None:
        with self._lock:
            reading = self._readings.get(name)
        return reading if reading is not None and time.monotonic() - reading.at <= self.ttl_s else None

    def get(self, edge: EdgeEndpoint) -> tuple[dict[str, int], bool]:
        """Single-flight per edge: concurrent callers that find the reading stale wait for one dashboard call
        (up to STATUS_TIMEOUT_S) and share its answer, instead of one call each."""
        reading = self._fresh(edge.name)
        if reading is None:
            with self._lock:
                fetching = self._fetching.setdefault(edge.name, threading.Lock())
            with fetching:
                reading = self._fresh(edge.name)  # another caller read it while this one waited
                if reading is None:
                    apps, healthy = read_serve_status(edge)
                    reading = _Reading(time.monotonic(), apps, healthy)
                    with self._lock:
                        self._readings[edge.name] = reading
        return dict(reading.apps), reading.healthy


def read_serve_status(edge: EdgeEndpoint) -> tuple[dict[str, int], bool]:
    """(apps, healthy) from the edge's dashboard; an edge that does not answer is unhealthy with no apps."""
    token = edge.token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        r = httpx.get(
            edge.dashboard_url.rstrip("/") + "/api/serve/applications/",
            headers=headers,
            timeout=STATUS_TIMEOUT_S,
        )
        r.raise_for_status()
        return parse_serve_status(r.json()), True
    except (httpx.HTTPError, ValueError, AttributeError, TypeError) as exc:
        log.warning("edge %s: no Serve status from its dashboard: %s", edge.name, type(exc).__name__)
        return {}, False


def routes(state: AppState) -> schemas.EdgeRoutes:
    """Every edge not quarantined, with a fresh credential and its Serve status, and the spot-check rate."""
    if state.edge_status is None:
        state.edge_status = EdgeStatusCache()
    with state.sessions() as session:
        quarantined = reputation.quarantined(session)
    out = []
    for edge in state.settings.edges:
        if edge.name in quarantined:  # failed its spot-checks: the core serves its share until trusted again
            continue
        token, expires_at = mint(state.settings, edge.name)
        apps, healthy = state.edge_status.get(edge)
        out.append(
            schemas.EdgeRoute(
                name=edge.name,
                serve_url=edge.serve_url,
                token=token,
                expires_at=expires_at,
                apps=apps,
                healthy=healthy,
            )
        )
    return schemas.EdgeRoutes(
        edges=out,
        spot_check_rate=state.settings.spot_check_rate,
        quarantined=sorted(q for q in quarantined if state.settings.edge(q) is not None),
    )


@dataclass
class ClusterView:
    """One cluster on the registry page: its donors, what its reconciler last saw, and (edges) its apps."""

    name: str
    workers: list[schemas.WorkerOut]
    view: Any  # admission.services.reconcile.RayView, or None where no dashboard is wired
    apps: dict[str, int] | None  # None for the core (its apps are the Requests section's)
    healthy: bool


def clusters_view(state: AppState, workers: list[schemas.WorkerOut]) -> list[ClusterView] | None:
    """A section per cluster where the pool has edges; None (the page as it always was) where it has none."""
    settings = state.settings
    if not settings.edges:
        return None
    if state.edge_status is None:
        state.edge_status = EdgeStatusCache()
    views = state.reconciler.views if state.reconciler is not None else {}
    out = [ClusterView(CORE, [w for w in workers if w.cluster == CORE], views.get(CORE), None, True)]
    for edge in settings.edges:
        apps, healthy = state.edge_status.get(edge)
        mine = [w for w in workers if w.cluster == edge.name]
        out.append(ClusterView(edge.name, mine, views.get(edge.name), apps, healthy))
    return out
