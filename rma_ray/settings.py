"""Settings for every side of the pool, from `RMA_*` environment variables (one pydantic-settings class).

Secrets never come from a command line. The coordinator refuses to start with an empty or well-known secret
unless `RMA_DEV=1`; when no secret is given at all it generates one and keeps it, mode 0600, in the data dir.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from rma_ray.edges import CORE, EdgeEndpoint

WEAK_SECRETS = {"", "changeme", "change-me", "secret", "password", "dev", "test", "admin", "default", "rma"}


def default_data_dir() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "rma"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RMA_", extra="ignore")

    dev: bool = Field(
        default=False, description="allow weak secrets and plain HTTP cookies (never in production)"
    )
    data_dir: Path = Field(default_factory=default_data_dir)

    # coordinator
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default SQLite in the data dir"
    )
    secret_key: SecretStr | None = Field(default=None, description="signs registry session cookies")
    admin_key: SecretStr | None = Field(default=None, description="an admin key to accept (for automation)")
    public_url: str | None = Field(default=None, description="the coordinator's URL as donors see it")
    heartbeat_interval_s: int = Field(default=3, ge=1, le=3600, description="offline after 2.5 intervals")
    heartbeat_flush_s: float = Field(default=1.0, gt=0, le=60)
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    register_rate: str = Field(default="20/minute", description="per-IP limit on POST /api/worker/register")
    auth_failure_rate: str = Field(
        default="30/minute",
        description="failed authentications per IP and per "
        "credential id (a valid credential is never refused for others' failures)",
    )
    trusted_proxies: str = Field(
        default="127.0.0.1",
        description="comma-separated addresses/CIDRs whose "
        "X-Forwarded-For/-Proto (and client_ip_header) are believed; '' trusts none",
    )
    client_ip_header: str | None = Field(
        default=None,
        description="a header a trusted proxy sets to the client "
        "IP (Fly.io: Fly-Client-IP); read only from a trusted_proxies peer",
    )
    invite_default_ttl_s: int = Field(default=15 * 60, ge=10)
    invite_max_ttl_s: int = Field(default=30 * 24 * 3600, ge=60)
    session_ttl_s: int = Field(default=12 * 3600, ge=60)
    auto_migrate: bool = True

    # the Ray head this coordinator admits donors into (set by `rma up`; absent for a coordinator alone)
    ray_address: str | None = None
    admit_without_ray: bool = Field(
        default=False,
        description="admit donors with no Ray head (registry "
        "tests only); by default such a join is "
        "refused, its token unspent",
    )
    donor_kit: bool = Field(
        default=False,
        description="serve the donor install line (/donor/*): on only beside the Ray head (`rma up` sets it), "
        "since the kit pins this machine's Python and Ray",
    )
    ray_auth_token_file: Path | None = None
    ray_dashboard_url: str | None = None
    reconcile_interval_s: float = Field(default=2.0, gt=0, le=600)
    # the edge clusters beside the core (set by `rma up`: a JSON list of EdgeEndpoint); none: one cluster
    edges: list[EdgeEndpoint] = Field(
        default_factory=list,
        description="edge clusters for untrusted donors (JSON list of {name, ray_address, dashboard_url, "
        "serve_url, token_file}); untrusted invites admit into one of them",
    )
    reconcile_registered_address: bool = Field(
        default=True,
        description="hold a donor without an overlay address to the address it registered from "
        "(turn off where a proxy or NAT between donors and coordinator hides it)",
    )
    # client quotas: the defaults every client key gets (None: no limit); `rma clients quota` overrides them
    # per key. The keyring carries each key's effective quota to every gateway and ingress replica.
    client_requests_per_minute: int | None = Field(
        default=None, ge=1, description="requests per client key in any 60 s, across all replicas"
    )
    client_tokens_per_day: int | None = Field(
        default=None, ge=1, description="LLM tokens (prompt + completion) per client key per UTC day"
    )
    client_upload_bytes_per_day: int | None = Field(
        default=None, ge=1, description="uploaded bytes per client key per UTC day"
    )
    usage_retention_days: int = Field(default=90, ge=1, le=3650, description="per-day client usage rows kept")
    metrics_interval_s: float = Field(default=10.0, gt=0, le=600, description="Serve metrics scrape period")
    metrics_retention_h: int = Field(
        default=48, ge=25, le=24 * 90, description="per-minute request rollups kept"
    )
    # the contribution ledger (admission.services.contributions): per-minute rows become per-hour ones after
    # contribution_minutes_h and go after contribution_retention_d; credits = sum of weight x amount
    contribution_minutes_h: int = Field(
        default=48, ge=1, le=24 * 90, description="donor contributions kept per minute, then per hour"
    )
    contribution_retention_d: int = Field(
        default=90, ge=1, le=3650, description="donor contributions kept (days)"
    )
    credit_per_cpu_hour: float = Field(default=1.0, ge=0, description="credits for one CPU-hour of pool work")
    credit_per_gpu_hour: float = Field(
        default=10.0, ge=0, description="credits for one GPU-hour of pool work"
    )
    credit_per_1k_requests: float = Field(
        default=1.0, ge=0, description="credits for a thousand requests served by a donor's replicas"
    )
    credit_per_1k_tokens: float = Field(
        default=0.1, ge=0, description="credits for a thousand LLM tokens generated on a donor's node"
    )
    # a client key linked to a donor (`rma clients create NAME --donor ID`, `rma clients link`) gets the default
    # quotas times this factor while its donor is not revoked and earned at least the credits below in 7 days
    client_donor_quota_factor: float = Field(
        default=2.0,
        ge=1,
        le=1000,
        description="default quotas x this for a key whose donor gives to the pool",
    )
    client_donor_min_credits_7d: float = Field(
        default=1.0, ge=0, description="credits a linked donor must have earned in the last 7 days"
    )

    # spot-checks of edge answers (admission.services.reputation): the core's gateways re-check this fraction
    # of edge answers on core replicas and report each verdict; an edge whose decayed pass rate falls below
    # spot_check_quarantine_below, after spot_check_min_checks checks, is left out of the edge routes
    spot_check_rate: float = Field(
        default=0.02, ge=0.0, le=1.0, description="fraction of edge answers the core re-checks"
    )
    spot_check_min_checks: int = Field(
        default=20, ge=1, le=100_000, description="checks of an edge before any verdict on it"
    )
    spot_check_quarantine_below: float = Field(
        default=0.8, ge=0.0, le=1.0, description="an edge's decayed pass rate under this quarantines it"
    )
    spot_check_half_life: float = Field(
        default=50.0,
        gt=0,
        le=1_000_000,
        description="checks after which a verdict counts half (the pass rate's decay, counted in checks)",
    )
    spot_check_samples_kept: int = Field(
        default=20, ge=0, le=1000, description="failing samples kept per edge for review (oldest dropped)"
    )
    spot_check_retention_h: int = Field(
        default=48, ge=1, le=24 * 90, description="passed checks kept (hours); failures stay, bounded"
    )

    # the WireGuard overlay (set by `rma up --overlay`; see rma_ray/overlay.py). With a hub interface on this
    # machine the coordinator hands each donor an overlay address and adds/removes its peer on the hub itself.
    overlay_subnet: str = Field(default="10.88.0.0/16", description="donor addresses come from here")
    overlay_hub_interface: str | None = Field(default=None, description="the hub's WireGuard interface, here")
    overlay_hub_public_key: str | None = None
    overlay_hub_endpoint: str | None = Field(default=None, description="host:port donors dial (UDP)")
    overlay_keepalive_s: int = Field(default=25, ge=1, le=120, description="under the NAT's UDP timeout")
    overlay_mtu: int = Field(default=1280, ge=1280, le=9000)

    @property
    def overlay_enabled(self) -> bool:
        return bool(self.overlay_hub_interface and self.overlay_hub_public_key and self.overlay_hub_endpoint)

    # data stores on this node (root: a system path the stores' own users, e.g. `postgres`, can traverse)
    stores_dir: Path | None = None

    @property
    def resolved_stores_dir(self) -> Path:
        if self.stores_dir is not None:
            return self.stores_dir
        return Path("/var/lib/rma/stores") if os.geteuid() == 0 else self.data_dir / "stores"

    # client side (CLI, agent)
    coordinator_url: str = "http://127.0.0.1:8470"

    @field_validator("trusted_proxies")
    @classmethod
    def _proxy_networks(cls, value: str) -> str:
        import ipaddress

        for item in filter(None, (s.strip() for s in value.split(","))):
            if item == "*":
                raise ValueError(
                    "'*' lets every client choose its own IP (and lock out anyone else's); "
                    "list the proxy's addresses or CIDR networks"
                )
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or CIDR network") from None
        return value

    @field_validator("edges")
    @classmethod
    def _unique_edges(cls, value: list[EdgeEndpoint]) -> list[EdgeEndpoint]:
        names = [e.name for e in value]
        if CORE in names or len(set(names)) != len(names):
            raise ValueError(f"edge names must be unique and not {CORE!r}; got {names}")
        return value

    def edge(self, name: str) -> EdgeEndpoint | None:
        return next((e for e in self.edges if e.name == name), None)

    @property
    def clusters(self) -> list[str]:
        """Every cluster this coordinator admits into: the core, then the edges."""
        return [CORE, *(e.name for e in self.edges)]

    def cluster_address(self, cluster: str = CORE) -> str | None:
        """The GCS address donors of `cluster` join (None: no such cluster wired)."""
        if cluster == CORE:
            return self.ray_address
        edge = self.edge(cluster)
        return edge.ray_address if edge else None

    def cluster_token_file(self, cluster: str = CORE) -> Path | None:
        if cluster == CORE:
            return self.ray_auth_token_file
        edge = self.edge(cluster)
        return edge.token_file if edge else None

    def cluster_token(self, cluster: str = CORE) -> str | None:
        """The cluster's current token, read each time (a rotation replaces the file); never logged."""
        if cluster == CORE:
            return self.ray_auth_token()
        edge = self.edge(cluster)
        return edge.token() if edge else None

    def cluster_dashboard(self, cluster: str = CORE) -> str | None:
        if cluster == CORE:
            return self.ray_dashboard_url
        edge = self.edge(cluster)
        return edge.dashboard_url if edge else None

    @model_validator(mode="after")
    def _refuse_weak(self) -> Self:
        for name in ("secret_key", "admin_key"):
            value: SecretStr | None = getattr(self, name)
            weak = value is not None and value.get_secret_value().strip().lower() in WEAK_SECRETS
            if weak and not self.dev:
                raise ValueError(
                    f"RMA_{name.upper()} is empty or a well-known default; set a real secret "
                    f"(or unset it to have one generated), or RMA_DEV=1 for a throw-away dev setup"
                )
        return self

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'coordinator.db'}"

    def resolved_secret_key(self) -> str:
        """The cookie-signing secret: given, or generated once and kept 0600 in the data dir."""
        if self.secret_key is not None:
            return self.secret_key.get_secret_value()
        return read_or_create_secret(self.data_dir / "secret_key")

    def cluster_epoch(self, cluster: str = CORE) -> str:
        """A short fingerprint of a cluster's current token: donors compare it to notice a rotation."""
        from rma_ray.credentials import fingerprint

        return fingerprint(self.cluster_token(cluster))

    def ray_auth_token(self) -> str | None:
        if self.ray_auth_token_file and self.ray_auth_token_file.exists():
            return self.ray_auth_token_file.read_text().strip() or None
        return None


def read_or_create_secret(path: Path, nbytes: int = 32) -> str:
    """Read a secret file, creating it (mode 0600, atomically) if absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    value = secrets.token_hex(nbytes)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


def check_overlay_subnet(value: str) -> None:
    """An overlay subnet `rma up --overlay` can hand donor addresses from; ValueError says what is wrong."""
    import ipaddress

    try:
        net = ipaddress.ip_network(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a network; use e.g. 10.88.0.0/16") from None
    if not net.is_private or net.version != 4 or net.prefixlen > 28:
        raise ValueError(f"{value}: use a private IPv4 network of /28 or larger")
