"""Who this machine is to the coordinator, for code that runs inside Ray on it (store supervisors, Serve
replicas): a donor has its node credential in `membership.json`; the head has a service credential
(`rma_service_`: read the keyring, report stores, nothing else) in `service.json`, minted by `rma up` on each
start. Never the admin key in `pool.json`: code in Ray on the head is not the operator. Both files are 0600 in
the data dir that the agent or `rma up` passes to Ray as `RMA_DATA_DIR`. Nothing here logs the credential."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rma_ray.settings import Settings

SERVICE_FILE = "service.json"  # {"coordinator_url", "service_key", "key_id"}


@dataclass(frozen=True)
class LocalIdentity:
    coordinator_url: str
    credential: str
    role: str  # "donor" or "head"

    def __repr__(self) -> str:  # never print the credential
        return f"LocalIdentity(coordinator_url={self.coordinator_url!r}, role={self.role!r})"


class NoIdentity(Exception):
    pass


def service_file(data_dir: Path) -> Path:
    return data_dir / SERVICE_FILE


def local_identity(data_dir: Path | None = None) -> LocalIdentity:
    """The coordinator URL and the credential this node may use (raises NoIdentity with what to do)."""
    d = data_dir or Settings().data_dir
    for name, key, role in (
        ("membership.json", "node_token", "donor"),
        (SERVICE_FILE, "service_key", "head"),
    ):
        p = d / name
        try:
            info = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if info.get(key) and info.get("coordinator_url"):
            return LocalIdentity(info["coordinator_url"].rstrip("/"), info[key], role)
    raise NoIdentity(
        f"no membership.json or {SERVICE_FILE} under {d}: this node has not joined a pool "
        f"(run `rma join` or `rma up`, or set RMA_DATA_DIR)"
    )
