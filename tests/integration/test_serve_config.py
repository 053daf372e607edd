"""The generated Serve config (cluster_configs/serve/rma-serve.yaml) applied to a real token-auth Ray head the way
KubeRay's RayService applies `serveConfigV2`: `PUT /api/serve/applications/` on the dashboard with the cluster
token. Serve's controller imports the builders the file names (`deployments.serve_config:<builder>`), calls them
with the file's `args` and applies the file's deployment options over the code's.

Applied: the apps that run on a CPU-only box in seconds, exactly as in the file: `rma-inference` and the `rma-vision`
front (its backend is looked up per request: without one it answers 503). Left out: `rma-llm` and
`rma-vision-backend` (vLLM on a GPU), and `services` (its models take minutes to load here;
tests/integration/test_services.py covers the app itself). The file's HTTP port (8000) is replaced by a free port.
A real coordinator issues the client key the replicas check.

Module-scoped: Ray head + Serve + one light app, ~30-45 s on an idle 2-core box.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from admission.main import build_state, create_app, prepare_database
from rma_ray.membership import write_private
from rma_ray.net import local_ip_towards
from rma_ray.raynode import NodeSpec, RayNode, short_temp_dir
from rma_ray.settings import read_or_create_secret
from tests.integration.conftest import make_settings
from tests.support import ServerThread, free_port, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
SERVE_FILE = ROOT / "cluster_configs" / "serve" / "rma-serve.yaml"
APPLIED = ("rma-inference", "rma-vision")


@dataclass
class Head:
    dashboard: str
    serve_url: str
    token: str
    config: dict[str, Any]
    client_key: str

    def api(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return httpx.request(
            method, self.dashboard + path, timeout=60, headers={"Authorization": f"Bearer {self.token}"}, **kw
        )

    def apps(self) -> dict[str, Any]:
        r = self.api("GET", "/api/serve/applications/")
        assert r.status_code == 200, r.text
        return r.json().get("applications") or {}


def file_config(ip: str, port: int, apps: tuple[str, ...] = APPLIED) -> dict[str, Any]:
    config = yaml.safe_load(SERVE_FILE.read_text())
    config["applications"] = [a for a in config["applications"] if a["name"] in apps]
    assert [a["name"] for a in config["applications"]] == list(apps)
    config["http_options"] = {**config["http_options"], "host": ip, "port": port}
    return config


def _settled(head: Head, names: tuple[str, ...]) -> dict[str, Any] | None:
    """The apps once each is RUNNING or has failed; None while any is still on its way."""
    apps = head.apps()
    if all(apps.get(n, {}).get("status") in ("RUNNING", "DEPLOY_FAILED", "UNHEALTHY") for n in names):
        return apps
    return None


def wait_running(head: Head, names: tuple[str, ...] = APPLIED, timeout: float = 300) -> None:
    apps = wait_for(lambda: _settled(head, names), timeout=timeout, interval=1, what=f"Serve apps {names}")
    for name in names:
        app = apps[name]
        if app["status"] != "RUNNING":
            why = {d: v.get("message", "")[-1500:] for d, v in app.get("deployments", {}).items()}
            raise AssertionError(f"{name}: {app['status']}: {app.get('message', '')[-1500:]} {why}")


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Head]:
    """Coordinator + token-auth Ray head; the Serve config applied through the dashboard's REST API."""
    root = tmp_path_factory.mktemp("serve-config")
    token_file = root / "cluster_token"
    token = read_or_create_secret(token_file)
    ip = local_ip_towards("192.0.2.1")
    state = build_state(make_settings(f"sqlite:///{root / 'coordinator.db'}", root / "coordinator"))
    admin_key = prepare_database(state)
    assert admin_key
    coordinator = ServerThread(create_app(state=state), host=ip).__enter__()
    cred = root / "keyring_credential"
    write_private(cred, admin_key + "\n")
    dash_port = free_port(ip)
    node = RayNode(
        NodeSpec(
            node_ip=ip,
            token_file=token_file,
            head=True,
            temp_dir=short_temp_dir(f"it-sc-{os.getpid()}"),
            labels={"rma.io/tier": "head", "rma.io/trusted": "true"},
            gcs_port=free_port(ip),
            dashboard_port=dash_port,
            num_cpus=1,
            drain_timeout_s=2,
            env={
                "RMA_COORDINATOR_URL": coordinator.url,
                "RMA_KEYRING_CREDENTIAL_FILE": str(cred),
                "RMA_KEYRING_REFRESH_S": "1",
                "HOME": str(root / "home"),
                "RMA_DATA_DIR": str(root / "head"),
            },
        ),
        root / "head.log",
    )
    h: Head | None = None
    try:
        node.start()
        node.wait_started(120)
        r = httpx.post(
            coordinator.url + "/api/admin/clients",
            json={"name": "serve-config-tests"},
            timeout=30,
            headers={"Authorization": f"Bearer {admin_key}"},
        )
        assert r.status_code == 201, r.text
        serve_port = free_port(ip)
        h = Head(
            f"http://{ip}:{dash_port}",
            f"http://{ip}:{serve_port}",
            token,
            file_config(ip, serve_port),
            r.json()["key"],
        )
        wait_for(
            lambda: h.api("GET", "/api/serve/applications/").status_code == 200,
            timeout=60,
            what="the dashboard's Serve API",
        )
        r = h.api("PUT", "/api/serve/applications/", json=h.config)
        assert r.status_code == 200, r.text
        wait_running(h)
        yield h
    finally:
        if h is not None:
            try:
                h.api("DELETE", "/api/serve/applications/")
            except httpx.HTTPError as exc:  # keep tearing down
                print(f"serve shutdown failed: {exc}")
        node.stop_all(grace=5)  # a discarded cluster, as `rma down` stops one: nothing on it needs draining
        shutil.rmtree(node.spec.temp_dir, ignore_errors=True)
        coordinator.__exit__(None, None, None)
        state.engine.dispose()


def test_the_dashboard_refuses_the_config_without_the_cluster_token(head: Head) -> None:
    r = httpx.put(head.dashboard + "/api/serve/applications/", json=head.config, timeout=30)
    assert r.status_code in (401, 403), r.text


def test_serve_runs_the_apps_as_the_file_says(head: Head) -> None:
    apps = head.apps()
    for entry in head.config["applications"]:
        app = apps[entry["name"]]
        assert app["route_prefix"] == entry["route_prefix"]
        assert app["deployed_app_config"]["import_path"] == entry["import_path"]
        for dep in entry["deployments"]:
            live = app["deployments"][dep["name"]]
            assert live["status"] == "HEALTHY", live
            assert live["deployment_config"]["max_ongoing_requests"] == dep["max_ongoing_requests"]


def test_the_routes_check_client_keys_and_say_what_is_missing(head: Head) -> None:
    body = {"prompt": "hello", "max_tokens": 4}
    r = httpx.post(head.serve_url + "/api/inference/llm", json=body, timeout=60)
    assert r.status_code == 401, r.text
    r = httpx.post(
        head.serve_url + "/api/inference/llm",
        json=body,
        timeout=60,
        headers={"Authorization": f"Bearer {head.client_key}"},
    )
    # the key is good; the LLM app (vLLM on a gpu node) is not part of what this box runs
    assert r.status_code == 503 and r.json()["error"]["code"] == "llm_unavailable", r.text

    import io

    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(png, format="PNG")
    files, data = {"image": ("red.png", png.getvalue(), "image/png")}, {"prompt": "What colour is this?"}
    r = httpx.post(head.serve_url + "/api/inference/vision", files=files, data=data, timeout=60)
    assert r.status_code == 401, r.text
    r = httpx.post(
        head.serve_url + "/api/inference/vision",
        files=files,
        data=data,
        timeout=60,
        headers={"Authorization": f"Bearer {head.client_key}"},
    )
    # no backend app: the front says so at once
    assert r.status_code == 503 and r.json()["error"]["code"] == "vision_not_available", r.text


def test_the_files_options_override_the_codes(head: Head) -> None:
    """What an operator edits in the file is what Serve runs (here: LLMGateway's max_ongoing_requests)."""
    config = copy.deepcopy(head.config)
    gateway = next(
        d for a in config["applications"] if a["name"] == "rma-inference" for d in a["deployments"]
    )
    gateway["max_ongoing_requests"] = 7
    try:
        assert head.api("PUT", "/api/serve/applications/", json=config).status_code == 200
        wait_for(
            lambda: (
                head.apps()["rma-inference"]["deployments"][gateway["name"]]["deployment_config"][
                    "max_ongoing_requests"
                ]
                == 7
            ),
            timeout=120,
            interval=1,
            what="the overridden option",
        )
    finally:
        assert head.api("PUT", "/api/serve/applications/", json=head.config).status_code == 200
        wait_running(head)


def test_bad_builder_args_fail_the_app_with_the_reason(head: Head) -> None:
    config = copy.deepcopy(head.config)
    bad = copy.deepcopy(next(a for a in config["applications"] if a["name"] == "rma-inference"))
    bad.update(name="rma-inference-bad", route_prefix="/bad", args={"model": "x"})
    config["applications"].append(bad)
    try:
        assert head.api("PUT", "/api/serve/applications/", json=config).status_code == 200
        app = wait_for(
            lambda: (a := head.apps().get("rma-inference-bad")) and a["status"] == "DEPLOY_FAILED" and a,
            timeout=120,
            interval=1,
            what="the bad app to fail",
        )
        assert "takes no args" in app["message"]
    finally:
        assert head.api("PUT", "/api/serve/applications/", json=head.config).status_code == 200
        wait_for(
            lambda: "rma-inference-bad" not in head.apps(), timeout=120, interval=1, what="the bad app gone"
        )
