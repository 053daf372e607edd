"""Credentials: `rma_<kind>_<id>_<secret>`, shown once, stored only as a hash.

The secret is 256 random bits, so a fast hash (SHA-256) is the right tool: a slow KDF protects low-entropy
passwords, and would cap heartbeats at a few hundred per second. Look-ups go by id; the hash is compared in
constant time; only `display()` (prefix and id) may reach a log.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from enum import StrEnum


class Kind(StrEnum):
    JOIN = "join"
    NODE = "node"
    CLIENT = "client"
    ADMIN = "admin"
    # the head's own services (Serve replicas, store supervisors): read the keyring and report stores, nothing
    # else; never the admin key (least privilege: code in Ray on the head is not the operator)
    SERVICE = "service"


_ID_BYTES = 6  # 12 hex chars: unique enough for a registry, short enough to type
_SECRET_BYTES = 32
_TOKEN_RE = re.compile(r"^rma_(join|node|client|admin|service)_([0-9a-f]{12})_([0-9a-f]{64})$")


class MalformedToken(ValueError):
    """The string is not a credential of the expected kind."""


@dataclass(frozen=True)
class Minted:
    kind: Kind
    id: str
    token: str  # the whole credential: give it to its owner once, never store it
    hash: str

    def display(self) -> str:
        return display(self.kind, self.id)


@dataclass(frozen=True)
class Parsed:
    kind: Kind
    id: str
    secret: str

    def display(self) -> str:
        return display(self.kind, self.id)


def new_id() -> str:
    return secrets.token_hex(_ID_BYTES)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def mint(kind: Kind, id_: str | None = None) -> Minted:
    id_ = id_ or new_id()
    secret = secrets.token_hex(_SECRET_BYTES)
    return Minted(kind=kind, id=id_, token=f"rma_{kind}_{id_}_{secret}", hash=hash_secret(secret))


def parse(token: str, kind: Kind) -> Parsed:
    """Split a credential; raise MalformedToken (never echoing the secret) if it is not of `kind`."""
    m = _TOKEN_RE.match(token.strip()) if token else None
    if not m:
        raise MalformedToken(f"not an RMA {kind} credential (expected rma_{kind}_<id>_<secret>)")
    if m.group(1) != kind:
        raise MalformedToken(f"this is an RMA {m.group(1)} credential, not a {kind} credential")
    return Parsed(kind=kind, id=m.group(2), secret=m.group(3))


def matches(parsed: Parsed, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(parsed.secret), stored_hash)


def display(kind: str, id_: str) -> str:
    return f"rma_{kind}_{id_}_…"


def fingerprint(token: str | None) -> str:
    """A short, non-reversible fingerprint of a shared secret (the Ray cluster token): the coordinator sends
    it with every heartbeat reply and the agent keeps its own, so a donor notices a rotation. "" for none."""
    return hashlib.sha256(token.encode()).hexdigest()[:12] if token else ""
