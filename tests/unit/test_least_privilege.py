"""Least privilege on the Serve side (issue 16, finding 8): the head's replicas and store supervisors use a
service credential, never pool.json's admin key; store passwords go only to trusted nodes; every deployment
that reads a store or clients' data is placed on trusted nodes only; store ports are firewalled to trusted
nodes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from rma_ray import credentials
from rma_ray.credentials import Kind, MalformedToken
from rma_ray.identity import NoIdentity, local_identity
from rma_ray.tiers import LABEL_TIER, LABEL_TRUSTED

ROOT = Path(__file__).resolve().parents[2]
# the deployments that hold a store password (Postgres, graph) or read Chroma / clients' data
STORE_READERS = ("gateway", "rag", "client_rag", "notes", "graph", "uploads")


def test_service_credentials_are_their_own_kind() -> None:
    minted = credentials.mint(Kind.SERVICE)
    assert minted.token.startswith("rma_service_")
    assert credentials.matches(credentials.parse(minted.token, Kind.SERVICE), minted.hash)
    with pytest.raises(MalformedToken, match="service credential, not a admin"):
        credentials.parse(minted.token, Kind.ADMIN)


def test_the_head_uses_its_service_credential_not_the_admin_key(tmp_path: Path) -> None:
    admin = credentials.mint(Kind.ADMIN).token
    (tmp_path / "pool.json").write_text(json.dumps({"coordinator_url": "http://h:8470", "admin_key": admin}))
    with pytest.raises(NoIdentity, match="service.json"):
        local_identity(tmp_path)  # pool.json alone is no identity for code in Ray
    service = credentials.mint(Kind.SERVICE).token
    (tmp_path / "service.json").write_text(
        json.dumps({"coordinator_url": "http://h:8470/", "service_key": service, "key_id": "x"})
    )
    ident = local_identity(tmp_path)
    assert (ident.role, ident.credential, ident.coordinator_url) == ("head", service, "http://h:8470")
    assert service not in repr(ident)
    # a donor's node credential still wins on a donor
    node = credentials.mint(Kind.NODE).token
    (tmp_path / "membership.json").write_text(
        json.dumps({"coordinator_url": "http://h:8470", "node_token": node})
    )
    assert local_identity(tmp_path).role == "donor"


def _services() -> dict[str, Any]:
    config = yaml.safe_load((ROOT / "cluster_configs" / "serve" / "rma-serve.yaml").read_text())
    app = next(a for a in config["applications"] if a["name"] == "services")
    return {d["name"]: d["ray_actor_options"].get("label_selector") or {} for d in app["deployments"]}


def test_store_readers_run_on_trusted_nodes_only() -> None:
    """The committed Serve config (equal to the code: test_cluster_configs' drift test)."""
    selectors = _services()
    for name in STORE_READERS:
        assert selectors[name].get(LABEL_TRUSTED) == "true", f"{name} may land on an untrusted node"
    # the stateless ones may use untrusted service donors
    assert selectors["ocr"] == {LABEL_TIER: "service"} and selectors["documents"] == {LABEL_TIER: "service"}


def test_embedded_default_keeps_store_readers_on_trusted_nodes(tmp_path: Path) -> None:
    from deployments.serve_config import group_apps
    from deployments.services.app import build_app
    from deployments.services.batch_api import build_batches_app, build_files_app
    from deployments.services.settings import ServicesSettings

    services, batches, files = group_apps(["services"], profile="embedded")  # the args `rma up` applies
    app = build_app(ServicesSettings(**services.args))
    seen: dict[str, dict[str, str]] = {}

    def walk(bound: Any) -> None:
        d = bound._bound_deployment
        seen[d.name] = d.ray_actor_options.get("label_selector") or {}
        for arg in (*d.init_args, *d.init_kwargs.values()):
            if hasattr(arg, "_bound_deployment"):
                walk(arg)

    walk(app)
    for name in STORE_READERS:
        assert seen[name].get(LABEL_TRUSTED) == "true", name
    assert seen["rag"][LABEL_TIER] == "in(service,head)"
    # the Batch API: its store reads Postgres and clients' files, its fronts see client keys
    walk(build_batches_app(ServicesSettings(**batches.args)))
    walk(build_files_app(ServicesSettings(**files.args)))
    for name in ("batch_store", "batches_ingress", "files_ingress"):
        assert seen[name].get(LABEL_TRUSTED) == "true", name


def test_store_credentials_go_to_trusted_nodes_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from deployments.stores import supervisor
    from deployments.stores.kinds import KINDS
    from deployments.stores.runtime import StoreError

    nodes = {
        "trusted": {"NodeID": "trusted", "Alive": True, "Labels": {LABEL_TRUSTED: "true"}, "Resources": {}},
        "head": {
            "NodeID": "head",
            "Alive": True,
            "Labels": {LABEL_TIER: "head"},
            "Resources": {supervisor.HEAD_RESOURCE: 1.0},
        },
        "untrusted": {
            "NodeID": "untrusted",
            "Alive": True,
            "Resources": {"CPU": 2.0},
            "Labels": {LABEL_TIER: "service", LABEL_TRUSTED: "false"},
        },
        "dead": {"NodeID": "dead", "Alive": False, "Labels": {LABEL_TRUSTED: "true"}, "Resources": {}},
    }
    monkeypatch.setattr(supervisor, "_ray_node", nodes.get)
    sup = object.__new__(supervisor.StoreSupervisor)  # no Ray: only what endpoint() reads
    sup.kind, sup.host, sup.port = KINDS["postgres"], "10.0.0.7", 5440
    sup.creds, sup.awaiting_restore = {"user": "rma", "password": "s3cret-pw"}, False
    sup._ready = __import__("threading").Event()
    sup._ready.set()
    for ok in ("trusted", "head"):
        assert sup.endpoint(1, ok)["password"] == "s3cret-pw"
    for bad in ("untrusted", "dead", "unknown", None):
        with pytest.raises(StoreError, match="only to trusted nodes") as exc:
            sup.endpoint(1, bad)
        assert "s3cret-pw" not in str(exc.value)


def test_store_firewall_rules_admit_trusted_addresses_only() -> None:
    import shutil
    import subprocess

    from deployments.stores import firewall, supervisor

    def n(addr: str, alive: bool = True, trusted: str | None = "true", head: bool = False) -> dict[str, Any]:
        return {
            "NodeManagerAddress": addr,
            "Alive": alive,
            "Labels": {LABEL_TRUSTED: trusted} if trusted else {},
            "Resources": {supervisor.HEAD_RESOURCE: 1.0} if head else {"CPU": 2.0},
        }

    nodes = [
        n("10.90.0.1", trusted=None, head=True),
        n("10.90.0.7"),
        n("10.90.0.9", trusted="false"),
        n("10.90.0.8", alive=False),
        n("fd00::7"),
    ]
    allowed = firewall.trusted_addresses(nodes, supervisor.node_is_trusted)
    assert allowed == ["10.90.0.1", "10.90.0.7", "fd00::7"]
    rules = firewall.render("chroma", 8010, allowed)
    assert "elements = { 10.90.0.1, 10.90.0.7 }" in rules and "elements = { fd00::7 }" in rules
    assert rules.index("ip saddr @trusted4 accept") < rules.index("tcp dport 8010 counter drop")
    assert "10.90.0.9" not in rules
    if shutil.which("nft") and __import__("os").geteuid() == 0:  # nft's own parser in check mode: no changes
        for r in (rules, firewall.render("chroma", 8010, [])):
            check = subprocess.run(["nft", "-c", "-f", "-"], input=r, text=True, capture_output=True)
            assert check.returncode == 0, check.stderr


def test_store_firewall_is_wanted_with_the_overlay_and_says_when_it_cannot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from deployments.stores import firewall

    assert not firewall.wanted(tmp_path, {})
    (tmp_path / "membership.json").write_text(json.dumps({"extra": {"overlay": {"interface": "rma-x"}}}))
    assert firewall.wanted(tmp_path, {})
    assert not firewall.wanted(tmp_path, {"RMA_STORE_FIREWALL": "off"})
    assert firewall.wanted(None, {"RMA_STORE_FIREWALL": "on"})
    (tmp_path / "membership.json").unlink()
    (tmp_path / "service.json").write_text(json.dumps({"overlay": True}))
    assert firewall.wanted(tmp_path, {})
    assert firewall.StoreFirewall("redis", 6390, False).state.startswith("off: not wanted")
    monkeypatch.setattr(firewall.os, "geteuid", lambda: 1000)
    fw = firewall.StoreFirewall("redis", 6390, True)
    with caplog.at_level("WARNING", logger="rma.stores"):
        fw.apply(["10.90.0.7"])
    assert fw.state == "off: not root" and "NOT firewalled to trusted nodes: not root" in caplog.text
