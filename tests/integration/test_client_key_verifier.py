"""The Serve-side verifier against a real coordinator: no round-trip per request, revocation within 30 s."""

from __future__ import annotations

from deployments.gateway.keys import ClientKeyVerifier
from deployments.gateway.refusal import Refusal
from tests.integration.conftest import Coordinator
from tests.support import wait_for


def test_revoked_client_key_stops_working_within_refresh(coordinator: Coordinator) -> None:
    key = coordinator.admin("POST", "/api/admin/clients", json={"name": "app"}).json()
    other = coordinator.admin("POST", "/api/admin/clients", json={"name": "other"}).json()
    node = coordinator.join()["node_token"]  # the Serve side authenticates as a node
    verifier = ClientKeyVerifier.from_coordinator(
        coordinator.url, node, refresh_s=1.0, max_stale_s=30
    ).start()
    try:
        assert verifier.verify(f"Bearer {key['key']}").key_id == key["id"]
        coordinator.admin("POST", f"/api/admin/clients/{key['id']}/revoke")

        def rejected() -> bool:
            try:
                verifier.verify(f"Bearer {key['key']}")
                return False
            except Refusal as exc:
                return exc.status == 401

        wait_for(rejected, timeout=30, what="the revoked key to be refused")
        assert verifier.verify(f"Bearer {other['key']}").key_id == other["id"]
    finally:
        verifier.stop()


def test_verifying_needs_no_coordinator_round_trip(coordinator: Coordinator) -> None:
    key = coordinator.admin("POST", "/api/admin/clients", json={"name": "app"}).json()
    calls = 0
    from rma_ray.client import AdmissionClient

    client = AdmissionClient(coordinator.url, coordinator.admin_key)

    def fetch() -> dict:  # type: ignore[type-arg]
        nonlocal calls
        calls += 1
        return client.keyring()

    verifier = ClientKeyVerifier(fetch, refresh_s=3600)
    verifier.refresh()
    for _ in range(1000):
        verifier.verify(f"Bearer {key['key']}")
    assert calls == 1
