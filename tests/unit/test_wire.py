"""The donor wire typed on both ends (rma_ray/wire.py): the client sends the coordinator's own request models
and parses replies into its reply models. httpx's MockTransport stands in for the coordinator (the real one is
in tests/integration/test_admission_api.py and test_rejoin.py); no Ray."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from rma_ray import credentials, wire
from rma_ray.capabilities import Capabilities
from rma_ray.client import AdmissionClient, AdmissionError
from rma_ray.settings import Settings

CAPS = Capabilities.model_validate(
    {"cpu_cores": 2, "ram_mb": 24105, "disk_free_gb": 70.0, "os": "Linux", "hostname": "donor", "gpus": []}
)
REPLY = {
    "worker_id": "a1b2c3d4e5f6",
    "tier": "service",
    "tier_number": 2,
    "trusted": False,
    "labels": {"rma.io/tier": "service"},
    "heartbeat_interval_s": 3,
    "node_token": "rma_node_x",
    "ray": {"address": "10.0.0.1:6380", "auth_token": "t"},
    "overlay": None,
    "added_later": 1,
}


def client_answering(reply: object, seen: list[httpx.Request]) -> AdmissionClient:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(201, json=reply)

    return AdmissionClient("http://coordinator", transport=httpx.MockTransport(handler))


def test_register_sends_the_request_model_and_parses_the_reply() -> None:
    seen: list[httpx.Request] = []
    with client_answering(REPLY, seen) as client:
        reg = client.register("rma_join_x", "donor", CAPS)
    assert isinstance(reg, wire.RegisterResponse)
    assert reg.ray is not None and reg.ray.address == "10.0.0.1:6380"
    assert reg.tier == "service" and reg.node_token == "rma_node_x"  # an unknown reply field is ignored
    body = json.loads(seen[0].content)
    assert "overlay" not in body  # a pool without an overlay: left out, as before
    assert wire.RegisterRequest.model_validate(body).capabilities == CAPS  # what the coordinator validates
    assert seen[0].headers["authorization"] == "Bearer rma_join_x"


def test_a_reply_of_another_shape_is_one_line() -> None:
    with client_answering({"worker_id": "w", "ray": "not an object"}, []) as client:
        with pytest.raises(AdmissionError) as refused:
            client.rejoin("rma_node_x", "donor", CAPS)
    assert "unexpected RejoinResponse" in str(refused.value) and "\n" not in str(refused.value)


def test_heartbeat_sends_the_beat_and_reads_action_and_cluster() -> None:
    seen: list[httpx.Request] = []
    with client_answering({"action": "drain", "cluster": "abc"}, seen) as client:
        reply = client.heartbeat("rma_node_x", wire.HeartbeatRequest(status="draining", current_load=0.5))
    assert (reply.action, reply.cluster) == ("drain", "abc")
    assert wire.HeartbeatRequest.model_validate_json(seen[0].content).status == "draining"


def test_one_cluster_token_fingerprint(tmp_path: Path) -> None:
    """The coordinator's epoch and the agent's copy come from the same function, so they agree by design."""
    token_file = tmp_path / "cluster_token"
    token_file.write_text("s3cret-token\n")
    epoch = Settings(ray_auth_token_file=token_file).cluster_epoch()
    assert epoch == credentials.fingerprint("s3cret-token") and len(epoch) == 12 and "s3cret" not in epoch
    assert credentials.fingerprint(None) == credentials.fingerprint("") == ""
