"""The env a Ray node starts with (`RayNode.start`): every task and actor on the node inherits it, so the
secrets RMA_* settings carry stay out (the agent's RMA_JOIN_TOKEN above all: the rma-node image passes it in
the env), and what the node's apps read (paths, model settings, limits counted in tokens) stays in. A stand-in
`ray` (no Ray here) writes the env it got."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from rma_ray import raynode
from rma_ray.raynode import NodeSpec, RayNode

SECRETS = {
    "RMA_JOIN_TOKEN": "rma_join_abc_secret",
    "RMA_ADMIN_KEY": "rma_admin_abc_secret",
    "RMA_SECRET_KEY": "cookie-signing-secret",
    "RMA_DATABASE_URL": "postgresql://rma:hunter2@db/rma",
    "RMA_LLM_HF_TOKEN": "hf_secret",
    "RMA_SERVICES_POSTGRES_PASSWORD": "hunter2",
    "rma_join_token": "rma_join_def_secret",  # the settings read names case-insensitively
}
KEPT = {
    "RMA_DATA_DIR": "/var/lib/rma",
    "RMA_JOIN_TOKEN_FILE": "/run/secrets/join",
    "RMA_KEYRING_CREDENTIAL_FILE": "/var/lib/rma/service.json",
    "RMA_EMBEDDINGS_TOKEN_IDS": "cl100k_base",
    "RMA_CLIENT_TOKENS_PER_DAY": "100000",
    "RMA_OVERLAY_HUB_PUBLIC_KEY": "cHVibGlj",
    "RMA_LLM_MODEL": "Qwen/Qwen2.5-0.5B-Instruct",
    "HF_HOME": "/var/cache/hf",
}

FAKE_RAY = """\
#!{py}
import json, os
with open({out!r}, "w") as f:
    json.dump(dict(os.environ), f)
"""


def test_the_ray_node_gets_no_rma_secret_but_everything_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, ray = tmp_path / "env.json", tmp_path / "ray"
    ray.write_text(FAKE_RAY.format(py=sys.executable, out=str(out)))
    ray.chmod(0o755)
    monkeypatch.setattr(raynode, "ray_executable", lambda: str(ray))
    for k, v in {**SECRETS, **KEPT}.items():
        monkeypatch.setenv(k, v)
    spec = NodeSpec(
        "127.0.0.1",
        tmp_path / "token",
        tmp_path / "ray-tmp",
        {},
        address="127.0.0.1:6380",
        env={"RMA_NODE_GIVEN_TOKEN": "set-by-name"},  # what the caller sets by name is the caller's word
    )
    node = RayNode(spec, tmp_path / "node.log")
    node.start()
    try:
        assert node.proc is not None
        assert node.proc.wait(timeout=30) == 0, (tmp_path / "node.log").read_text()
    finally:
        node.kill()
    env = json.loads(out.read_text())
    assert not set(SECRETS) & set(env), sorted(set(SECRETS) & set(env))
    assert not [k for k, v in env.items() if v in SECRETS.values()]
    assert {k: env.get(k) for k in KEPT} == KEPT
    assert env["RMA_NODE_GIVEN_TOKEN"] == "set-by-name"
    assert env["RAY_AUTH_TOKEN_PATH"] == str(tmp_path / "token") and env["PATH"]


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("RMA_JOIN_TOKEN", True),
        ("RMA_ADMIN_KEY", True),
        ("Rma_Secret_Key", True),
        ("RMA_DATABASE_URL", True),
        ("RMA_JOIN_TOKEN_FILE", False),
        ("RMA_OVERLAY_HUB_PUBLIC_KEY", False),
        ("RMA_EMBEDDINGS_TOKEN_IDS", False),
        ("HF_TOKEN", False),  # not ours: a model download on the node may need it
        ("RAY_AUTH_TOKEN_PATH", False),
    ],
)
def test_which_names_are_secret_settings(name: str, secret: bool) -> None:
    assert raynode.is_secret_setting(name) is secret
