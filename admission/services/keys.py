"""Admin keys, client API keys and service credentials: minted here, shown once, kept as hashes.

Client keys are checked on the Serve side by `deployments.gateway.keys.ClientKeyVerifier`, which pulls the keyring
(ids and hashes of live keys) instead of calling the coordinator per request. Service credentials
(`rma_service_`) are what `rma up` gives the head's Serve replicas and store supervisors: they read the
keyring and report stores, and no admin route accepts them.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, TypeVar

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from admission import schemas
from admission.errors import ApiError
from admission.models import AdminKey, ClientKey, ServiceKey, Worker, utcnow
from admission.services import audit
from rma_ray import credentials
from rma_ray.credentials import Kind, MalformedToken
from rma_ray.settings import Settings

QUOTA_FIELDS = ("requests_per_minute", "tokens_per_day", "upload_bytes_per_day")

Model = type[AdminKey] | type[ClientKey] | type[ServiceKey]
K = TypeVar("K", AdminKey, ClientKey, ServiceKey)
KINDS: dict[Model, Kind] = {AdminKey: Kind.ADMIN, ClientKey: Kind.CLIENT, ServiceKey: Kind.SERVICE}


def overrides(row: ClientKey) -> schemas.Quota:
    return schemas.Quota(**{f: getattr(row, f"quota_{f}") for f in QUOTA_FIELDS})


def effective_quota(row: ClientKey, settings: Settings | None, bonus: bool = False) -> schemas.Quota:
    """The key's quota: its overrides, else the coordinator's defaults (`client_*` settings); with `bonus` (the
    key's donor gives to the pool) the defaults times `client_donor_quota_factor` (an override is the admin's
    word and stays as set; no limit stays no limit)."""
    own = overrides(row)
    factor = settings.client_donor_quota_factor if bonus and settings is not None else 1.0
    out: dict[str, int | None] = {}
    for f in QUOTA_FIELDS:
        given, default = getattr(own, f), getattr(settings, f"client_{f}", None)
        if given is not None or default is None:
            out[f] = given
        else:  # the bonus never takes a default past what a quota may be
            out[f] = min(int(default * factor), _quota_bound(f))
    return schemas.Quota(**out)


def _quota_bound(field: str) -> int:
    for meta in schemas.Quota.model_fields[field].metadata:
        if getattr(meta, "le", None) is not None:
            return int(meta.le)
    return 2**62


def giving_donors(session: Session, settings: Settings | None, donor_ids: set[str]) -> set[str]:
    """Those of `donor_ids` that earn their clients' bonus: not revoked, gone or quarantined, and at least
    `client_donor_min_credits_7d` credits in the last 7 days (admission.services.contributions)."""
    if not donor_ids or settings is None:
        return set()
    from admission.services import contributions

    live = set(
        session.scalars(
            select(Worker.id).where(
                Worker.id.in_(donor_ids),
                Worker.revoked_at.is_(None),
                Worker.left_at.is_(None),
                (Worker.quarantine_reason.is_(None)) | (Worker.quarantine_reason == ""),
            )
        )
    )
    if not live:
        return set()
    w = contributions.weights(settings)
    given = contributions.totals(session, utcnow() - timedelta(days=7), worker_ids=live)
    return {
        wid
        for wid in live
        if contributions.credits(given.get(wid, contributions.Amounts()), w)
        >= settings.client_donor_min_credits_7d
    }


def _out(
    row: AdminKey | ClientKey | ServiceKey, settings: Settings | None = None, giving: set[str] | None = None
) -> schemas.KeyOut:
    client: dict[str, Any] = {}
    if isinstance(row, ClientKey):
        bonus = row.donor_id is not None and row.donor_id in (giving or set())
        client = {
            "sensitive": bool(row.sensitive),
            "quota": effective_quota(row, settings, bonus),
            "quota_overrides": overrides(row),
            "donor_id": row.donor_id,
            "donor_bonus": bonus,
        }
    return schemas.KeyOut(
        id=row.id, name=row.name, created_at=row.created_at, revoked_at=row.revoked_at, **client
    )


def _client_out(session: Session, row: ClientKey, settings: Settings | None) -> schemas.KeyOut:
    """One client key's view, its donor's bonus looked up."""
    return _out(row, settings, giving_donors(session, settings, {row.donor_id} if row.donor_id else set()))


def _linkable_donor(session: Session, donor_id: str) -> str:
    """A donor a client key may be linked to: registered, neither revoked nor gone."""
    worker = session.get(Worker, donor_id)
    if worker is None:
        raise ApiError(404, "unknown_donor", f"no donor {donor_id}; `rma donors list` shows them")
    if worker.revoked_at is not None:
        raise ApiError(409, "donor_revoked", f"donor {donor_id} is revoked; link the key to a live donor")
    if worker.left_at is not None:
        raise ApiError(409, "donor_left", f"donor {donor_id} has left the pool; link the key to a live donor")
    return worker.id


def create(
    session: Session,
    model: Model,
    name: str,
    actor: str,
    ip: str,
    sensitive: bool = False,
    donor_id: str | None = None,
    quota: schemas.Quota | None = None,
) -> schemas.KeyCreated:
    """`sensitive` (client keys only): the client's requests are never forwarded to an edge cluster;
    `donor_id` (client keys only): the donor it belongs to (a larger default quota while the donor gives);
    `quota` (client keys only): its overrides, set in the same transaction (the key never runs unmetered)."""
    kind = KINDS[model]
    minted = credentials.mint(kind)
    row = model(id=minted.id, name=name, key_hash=minted.hash, created_at=utcnow())
    extra: dict[str, object] = {}
    if isinstance(row, ClientKey):
        row.sensitive = sensitive
        if sensitive:
            extra["sensitive"] = True
        if donor_id is not None:
            row.donor_id = extra["donor_id"] = _linkable_donor(session, donor_id)
        for f in QUOTA_FIELDS:
            if quota is not None and getattr(quota, f) is not None:
                setattr(row, f"quota_{f}", getattr(quota, f))
                extra[f] = getattr(quota, f)
    session.add(row)
    audit.record(session, actor, f"{kind}_key.create", minted.id, ip, name=name, **extra)
    session.flush()
    return schemas.KeyCreated(
        id=row.id,
        name=row.name,
        key=minted.token,
        created_at=row.created_at,
        sensitive=bool(row.sensitive) if isinstance(row, ClientKey) else None,
        donor_id=row.donor_id if isinstance(row, ClientKey) else None,
    )


def list_all(session: Session, model: type[K], settings: Settings | None = None) -> list[schemas.KeyOut]:
    rows = list(session.scalars(select(model).order_by(model.created_at)))
    linked = {r.donor_id for r in rows if isinstance(r, ClientKey) and r.donor_id and r.revoked_at is None}
    giving = giving_donors(session, settings, linked)
    return [_out(r, settings, giving) for r in rows]


def link_donor(
    session: Session, key_id: str, donor_id: str | None, settings: Settings, actor: str, ip: str
) -> schemas.KeyOut:
    """`rma clients link`: the donor a client key belongs to (None: none). The gateway replicas see the
    quota that follows with their next keyring refresh (10 s)."""
    row = _live_client(session, key_id)
    row.donor_id = _linkable_donor(session, donor_id) if donor_id is not None else None
    audit.record(session, actor, "client_key.donor", key_id, ip, donor_id=row.donor_id)
    session.flush()
    return _client_out(session, row, settings)


def _live_client(session: Session, key_id: str) -> ClientKey:
    row = session.get(ClientKey, key_id)
    if row is None:
        raise ApiError(404, "not_found", f"no client key {key_id}; `rma clients list` shows them")
    if row.revoked_at is not None:
        raise ApiError(409, "revoked", f"client key {key_id} is revoked; its quota no longer matters")
    return row


def set_quota(
    session: Session, key_id: str, patch: schemas.QuotaPatch, settings: Settings, actor: str, ip: str
) -> schemas.KeyOut:
    """`rma clients quota`: the given overrides replace the key's (after `reset`, which drops them all).
    The gateway replicas see it with their next keyring refresh (10 s)."""
    row = _live_client(session, key_id)
    given = {f: getattr(patch, f) for f in QUOTA_FIELDS if getattr(patch, f) is not None}
    if not given and not patch.reset:
        raise ApiError(
            422,
            "nothing_to_change",
            "give at least one of requests_per_minute, tokens_per_day, upload_bytes_per_day, or reset",
        )
    if patch.reset:
        for f in QUOTA_FIELDS:
            setattr(row, f"quota_{f}", None)
    for f, v in given.items():
        setattr(row, f"quota_{f}", v)
    audit.record(session, actor, "client_key.quota", key_id, ip, reset=patch.reset, **given)
    session.flush()
    return _client_out(session, row, settings)


def revoke(session: Session, model: type[K], key_id: str, actor: str, ip: str) -> schemas.KeyOut:
    kind = KINDS[model]
    row = session.get(model, key_id)
    if row is None:
        raise ApiError(404, "not_found", f"no {kind} key {key_id}")
    if row.revoked_at is None and model is AdminKey:
        active = _lock_active_admin_keys(session)
        if row.id not in active:  # another request revoked it meanwhile (committed while this one waited)
            session.refresh(row)
        elif len(active) <= 1:
            raise ApiError(
                409, "last_admin_key", "this is the last active admin key; create another one first"
            )
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        audit.record(session, actor, f"{kind}_key.revoke", key_id, ip)
    return _out(row)


def _lock_active_admin_keys(session: Session) -> list[str]:
    """The active admin keys' ids, their rows locked until this transaction ends (PostgreSQL: FOR UPDATE), so
    that two revokes of the last two keys at once cannot both see two: the second waits for the first's commit,
    finds the first's key revoked (PostgreSQL re-reads a locked row that changed) and is refused. SQLite needs
    no lock: its writers run one at a time from BEGIN IMMEDIATE (admission/db.py)."""
    return list(
        session.scalars(
            select(AdminKey.id).where(AdminKey.revoked_at.is_(None)).order_by(AdminKey.id).with_for_update()
        )
    )


def active_admin_keys(session: Session) -> int:
    return (
        session.scalar(select(func.count()).select_from(AdminKey).where(AdminKey.revoked_at.is_(None))) or 0
    )


def ensure_admin_key(session: Session, given: str | None) -> str | None:
    """Bootstrap: accept RMA_ADMIN_KEY if given; else mint the first admin key when there is none.

    Returns a newly minted key (to print once) or None.
    """
    if given:
        try:
            parsed = credentials.parse(given, Kind.ADMIN)
        except MalformedToken as exc:
            raise ValueError(f"RMA_ADMIN_KEY: {exc}; `rma admission create-admin-key` mints one") from None
        row = session.get(AdminKey, parsed.id)
        if row is None:
            session.add(
                AdminKey(
                    id=parsed.id,
                    name="RMA_ADMIN_KEY",
                    key_hash=credentials.hash_secret(parsed.secret),
                    created_at=utcnow(),
                )
            )
            audit.record(session, "system", "admin_key.import", parsed.id)
        elif not credentials.matches(parsed, row.key_hash) or row.revoked_at is not None:
            raise ValueError("RMA_ADMIN_KEY does not match the stored (or a revoked) admin key with that id")
        return None
    if active_admin_keys(session) == 0:
        return create(session, AdminKey, "first admin key", "system", "").key
    return None


def keyring(session: Session, settings: Settings | None = None) -> schemas.KeyringOut:
    """Live client keys with their effective quotas (the replicas enforce them without asking again)."""
    rows = list(
        session.scalars(select(ClientKey).where(ClientKey.revoked_at.is_(None)).order_by(ClientKey.id))
    )
    giving = giving_donors(session, settings, {r.donor_id for r in rows if r.donor_id})
    return schemas.KeyringOut(
        generated_at=utcnow(),
        keys=[
            schemas.KeyringEntry(
                id=r.id,
                hash=r.key_hash,
                name=r.name,
                sensitive=bool(r.sensitive),
                quota=effective_quota(r, settings, r.donor_id in giving),
            )
            for r in rows
        ],
    )
