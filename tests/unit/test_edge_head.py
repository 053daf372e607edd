"""The edge head's parts that need no Ray (issue 17): what its processes inherit, what the coordinator is told,
how `rma up` and `rma rotate-cluster-token --edge` choose, and how the supervisor treats an edge. The Ray-facing
steps are stood in; tests/integration/test_edge_head.py runs the real thing."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from rma_ray import cli, poolinfo, raynode
from rma_ray.edges import EdgeEndpoint, EdgeSpec
from rma_ray.head import EdgeHead, Pool, UpError, UpOptions, edge_app_env, own_dir, root_dir, signal_rotate
from rma_ray.raynode import NodeSpec, kill_user_processes, private_temp_dir, ray_env, user_env

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chowns to root and another user")


def make_pool(tmp_path: Path, *edges: EdgeSpec, apps: tuple[str, ...] = ()) -> tuple[Pool, list[str]]:
    said: list[str] = []
    opts = UpOptions(
        data_dir=tmp_path / "data",
        node_ip="127.0.0.1",
        coordinator_host="127.0.0.1",
        edges=edges,
        apps=apps,
        stores=(),
    )
    pool = Pool(opts, said.append)
    pool.stop_event.wait = lambda timeout=None: pool.stop_event.is_set()  # type: ignore[method-assign]
    return pool, said


def test_an_edge_child_inherits_no_core_secret(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for k, v in {
        "RMA_ADMIN_KEY": "rma_admin_x",
        "RMA_DATA_DIR": "/var/lib/rma",
        "RMA_RAY_AUTH_TOKEN_FILE": "/var/lib/rma/cluster_token",
        "RAY_AUTH_TOKEN": "core-token",
        "RAY_AUTH_TOKEN_PATH": "/var/lib/rma/cluster_token",
        "RAY_ADDRESS": "10.0.0.1:6380",
        "PATH": "/usr/bin",
        # the operator's other secrets: an allowlist keeps out what no denylist named
        "HF_TOKEN": "hf_x",
        "AWS_SECRET_ACCESS_KEY": "aws_x",
        "PGPASSWORD": "pg_x",
        "SOME_VENDOR_CREDENTIAL": "x",
        "LC_ALL": "C.UTF-8",
        "HF_HUB_OFFLINE": "1",
    }.items():
        monkeypatch.setenv(k, v)
    edge_token = tmp_path / "edge" / "cluster_token"
    env = ray_env(edge_token, base=user_env("rma-edge", tmp_path / "edge"))
    assert not [k for k in env if k.startswith("RMA_")]
    assert "RAY_AUTH_TOKEN" not in env and "RAY_ADDRESS" not in env
    assert not {"HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "PGPASSWORD", "SOME_VENDOR_CREDENTIAL"} & set(env)
    assert (env["LC_ALL"], env["HF_HUB_OFFLINE"]) == ("C.UTF-8", "1")
    assert env["RAY_AUTH_TOKEN_PATH"] == str(edge_token) and env["RAY_AUTH_MODE"] == "token"
    assert (env["HOME"], env["USER"], env["PATH"]) == (str(tmp_path / "edge"), "rma-edge", "/usr/bin")
    # the core's own children keep today's env
    assert ray_env(tmp_path / "core")["RMA_ADMIN_KEY"] == "rma_admin_x"


def test_the_edge_head_is_a_control_plane_of_its_own(tmp_path: Path) -> None:
    pool, _ = make_pool(tmp_path, EdgeSpec())
    edge = pool.edges["edge"]
    assert edge.ray_address == "127.0.0.1:6480" and edge.serve_url == "http://127.0.0.1:8030"
    assert edge.dir == EdgeSpec().data_dir(tmp_path / "data") and edge.token_file.parent == edge.dir
    assert edge.home == edge.dir / "home" and edge.token_file.name == "cluster_token"  # tests/e2e/edge_bed.py
    # 107-byte socket paths: HAProxy's below a node id (56) and a socket name
    assert len(str(edge.haproxy_dir)) + 1 + 56 + len("/metrics.sock") < 107
    spec = NodeSpec(
        node_ip="127.0.0.1",
        token_file=edge.token_file,
        temp_dir=tmp_path,
        labels={},
        head=True,
        num_cpus=0,
        extra_args=EdgeSpec().ports.argv(),
    )
    argv = spec.argv()
    assert argv[argv.index("--num-cpus") + 1] == "0" and "--node-manager-port" in argv


def test_the_coordinator_is_told_of_each_edge(tmp_path: Path) -> None:
    pool, _ = make_pool(tmp_path, EdgeSpec(), EdgeSpec(name="eu", ports=EdgeSpec().ports.shifted(1)))
    edges = [EdgeEndpoint.model_validate(e) for e in json.loads(pool.coordinator_env()["RMA_EDGES"])]
    assert [e.name for e in edges] == ["edge", "eu"]
    assert edges[1].ray_address == "127.0.0.1:6490" and edges[1].token_file == pool.edges["eu"].token_file
    assert "token" not in json.dumps([e.model_dump(mode="json", exclude={"token_file"}) for e in edges])
    plain, _ = make_pool(tmp_path)
    assert json.loads(plain.coordinator_env()["RMA_EDGES"]) == []  # --no-edge: one cluster, as today


@pytest.mark.parametrize(
    ("edges", "euid", "message"),
    [
        ((EdgeSpec(),), 1000, "edge clusters need root"),
        ((EdgeSpec(name="Core!"),), 0, "edge name 'Core!'"),
        ((EdgeSpec(name="core"),), 0, "not 'core'"),
        ((EdgeSpec(), EdgeSpec()), 0, "two edges share a name"),
    ],
)
def test_rma_up_refuses_an_edge_it_cannot_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, edges: tuple[EdgeSpec, ...], euid: int, message: str
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: euid)
    pool, _ = make_pool(tmp_path, *edges)
    with pytest.raises(UpError, match=message) as exc:
        pool._check_edges()
    if euid:
        assert "--no-edge" in str(exc.value)


def test_a_no_edge_pool_checks_nothing_of_edges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    pool, _ = make_pool(tmp_path)
    pool._check_edges()  # not root, no edge: today's pool
    assert UpOptions(data_dir=tmp_path, node_ip="x", coordinator_host="x").edges == ()


def test_own_dir_refuses_a_link_someone_left(tmp_path: Path) -> None:
    import pwd

    me = pwd.getpwuid(os.getuid())
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "edge").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UpError, match="not the edge's directory"):
        own_dir(tmp_path / "edge", me)
    own_dir(tmp_path / "fresh", me)
    own_dir(tmp_path / "fresh", me)  # there already (another `rma up` made it first): no FileExistsError
    assert oct((tmp_path / "fresh").stat().st_mode & 0o777) == "0o700"


def test_each_edge_has_a_user_of_its_own() -> None:
    assert EdgeSpec().user == "rma-edge" and EdgeSpec(name="eu").user == "rma-edge-eu"
    assert EdgeSpec(name="e" * 16).user == "rma-edge-" + "e" * 16 and len(EdgeSpec(name="e" * 16).user) <= 32
    assert EdgeSpec(name="eu", user="someone").user == "someone"


@needs_root
def test_the_edge_dir_is_roots_and_no_link_there_reaches_root(tmp_path: Path) -> None:
    """The token is root's to write, in root's dir; the edge user's link in its place is neither followed by
    root's writes nor read by the coordinator (EdgeEndpoint.token)."""
    pool, _ = make_pool(tmp_path, EdgeSpec(user="nobody"))
    edge = pool.edges["edge"]
    pw = pwd.getpwnam("nobody")
    secret = tmp_path / "pool.json"
    secret.write_text("rma_admin_secret")
    try:
        root_dir(edge.dir)
        own_dir(edge.home, pw)
        edge._write_token(keep=True)
        for path, mode, owner in ((edge.dir, 0o755, (0, 0)), (edge.token_file, 0o640, (0, pw.pw_gid))):
            st = path.lstat()
            assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, *owner), path
        home = edge.home.lstat()
        assert (stat.S_IMODE(home.st_mode), home.st_uid) == (0o700, pw.pw_uid)
        token = edge.endpoint().token()
        assert token and len(token) == 64
        edge._write_token(keep=True)  # kept across restarts
        assert edge.endpoint().token() == token
        # a link where the token was (as the edge's user could make in a dir of its own)
        edge.token_file.unlink()
        edge.token_file.symlink_to(secret)
        assert edge.endpoint().token() is None
        with pytest.raises(UpError, match="not a regular file"):
            edge._write_token(keep=True)
        edge._write_token(keep=False)  # a rotation replaces the link; it never writes through it
        assert secret.read_text() == "rma_admin_secret" and secret.stat().st_uid == 0
        assert not edge.token_file.is_symlink() and edge.endpoint().token() not in (None, token)
        # an edge dir that is the edge user's (as an older `rma up` made it), or a link: refused
        os.chown(edge.dir, pw.pw_uid, pw.pw_gid)
        with pytest.raises(UpError, match="not the edge's directory"):
            root_dir(edge.dir)
    finally:
        shutil.rmtree(edge.dir, ignore_errors=True)
    edge.dir.symlink_to(tmp_path)
    try:
        with pytest.raises(UpError, match="not the edge's directory"):
            root_dir(edge.dir)
    finally:
        edge.dir.unlink()


def test_the_core_heads_temp_dir_is_under_a_private_parent() -> None:
    temp = private_temp_dir()
    try:
        assert temp.parent.parent == Path("/tmp") and len(str(temp)) <= len("/tmp/rma-head-12345678")
        st = temp.parent.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o700, os.getuid()) and not temp.exists()
    finally:
        shutil.rmtree(temp.parent)


@needs_root
def test_stopping_an_edge_kills_what_escaped_its_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process of the edge's user outside the node's tree (setsid, reparented to init) is killed too. Only
    our own stray is shown to it here: other processes of that user on this machine are not ours."""
    with pytest.raises(ValueError):
        kill_user_processes(0)
    pw = pwd.getpwnam("nobody")
    stray = subprocess.Popen(
        ["sleep", "600"], user=pw.pw_uid, group=pw.pw_gid, extra_groups=[], start_new_session=True
    )
    try:
        real_iter = raynode.psutil.process_iter
        monkeypatch.setattr(
            raynode.psutil,
            "process_iter",
            lambda attrs=None: [p for p in real_iter(attrs) if p.pid == stray.pid],
        )
        assert kill_user_processes(pw.pw_uid) == [stray.pid]
        stray.wait(10)  # gone (a `sleep 600`; psutil may have reaped it already: no exit code to assert)
        assert not raynode.psutil.pid_exists(stray.pid)
        assert kill_user_processes(pw.pw_uid) == []  # the zombie, then nothing, is not waited on
    finally:
        stray.kill()
        stray.wait()


def test_the_edges_apps_get_the_operators_model_settings_but_no_path_or_secret() -> None:
    environ = {
        "RMA_LLM_MODEL": "Qwen/Qwen2.5-0.5B-Instruct",
        "RMA_LLM_MAX_MODEL_LEN": "4096",
        "RMA_EMBEDDINGS_MODEL": "BAAI/bge-small-en-v1.5",
        "RMA_LLM_MODEL_DIR": "/var/lib/rma/models",
        "RMA_LLM_CACHE_PATH": "/root/.cache",
        "RMA_EMBEDDINGS_CONFIG_FILE": "/etc/rma/e.json",
        "RMA_LLM_API_KEY": "sk-x",
        "RMA_LLM_HF_TOKEN": "hf_x",
        "RMA_EMBEDDINGS_SECRET": "x",
        "RMA_LLM_DB_PASSWORD": "x",
        "RMA_ADMIN_KEY": "rma_admin_x",
        "RMA_DATA_DIR": "/var/lib/rma",
        "HF_TOKEN": "hf_x",
        "RMA_SERVICES_UPLOAD_MAX_BYTES": "100000000",  # the documents app takes the core's body limit
        "RMA_SERVICES_POSTGRES_PASSWORD": "x",
        "RMA_SERVICES_BLOB_DIR": "/var/lib/rma/blobs",
        "RMA_VISION_MODEL": "llava:7b",
        "RMA_VISION_MAX_IMAGE_BYTES": "2000000",
        "RMA_VISION_OLLAMA_HOST": "http://ops:hunter2@10.0.0.7:11434",  # the operator's Ollama, maybe a password
        "RMA_VISION_EDGE": "e1",  # an edge identity: the edge's deploy sets its own
        "RMA_LLM_EDGE_COORDINATOR_URL": "http://x",
        # the settings read names case-insensitively: so does the filter
        "RMA_LLM_api_key": "sk-y",
        "rma_llm_model_dir": "/var/lib/rma/models",
        "Rma_Vision_Ollama_Host": "http://ops:hunter2@10.0.0.7:11434",
        "rma_embeddings_batch_size": "16",
    }
    assert edge_app_env(environ) == {
        "rma_embeddings_batch_size": "16",
        "RMA_LLM_MODEL": "Qwen/Qwen2.5-0.5B-Instruct",
        "RMA_LLM_MAX_MODEL_LEN": "4096",
        "RMA_EMBEDDINGS_MODEL": "BAAI/bge-small-en-v1.5",
        "RMA_SERVICES_UPLOAD_MAX_BYTES": "100000000",
        "RMA_VISION_MODEL": "llava:7b",
        "RMA_VISION_MAX_IMAGE_BYTES": "2000000",
    }


def test_an_edge_rotation_whose_restart_fails_is_no_success(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import httpx

    import rma_ray.head

    pool, said = make_pool(tmp_path, EdgeSpec())
    edge = pool.edges["edge"]
    monkeypatch.setattr(edge, "stop", lambda: None)
    monkeypatch.setattr(edge, "new_token", lambda: None)

    def failed_start(e: EdgeHead, deploy: bool = True) -> bool:
        e.error = "the edge head 'edge' did not start: port in use"
        return False

    class NoCoordinator:
        def __init__(self, *_: Any) -> None:
            raise httpx.ConnectError("no coordinator here")

    monkeypatch.setattr(pool, "start_edge", failed_start)
    monkeypatch.setattr(rma_ray.head, "AdmissionClient", NoCoordinator)
    with pytest.raises(UpError, match="did not start again with its new token: .*port in use"):
        pool.rotate_edge("edge")
    assert edge.token_rotated_at is None
    # the supervisor says so and goes on (the core serves; watch_edges tries the edge again)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "rotate-request").write_text(json.dumps({"edge": "edge"}))
    monkeypatch.setattr(pool, "watch_edges", lambda: None)
    pool.rotate_event.set()
    import threading

    threading.Timer(0.05, pool.stop_event.set).start()
    assert pool.supervise() is True
    assert any("rotation failed" in line for line in said)


def stand_in_child(edge: EdgeHead, script: str) -> None:
    edge._child = lambda args, **kw: {  # type: ignore[method-assign]
        "args": [sys.executable, "-c", script],
        "env": dict(os.environ),
    }


def test_edge_apps_are_reported_and_a_failing_child_leaves_them_failed(tmp_path: Path) -> None:
    pool, said = make_pool(tmp_path, EdgeSpec(), apps=("llm", "embeddings", "services"))
    edge = pool.edges["edge"]
    # stateless compute only, no client data on an edge: the services' OCR and parsing (`documents`), not
    # the services themselves
    assert edge.apps_wanted == ("llm", "embeddings", "documents")
    (tmp_path / "data" / "logs").mkdir(parents=True)
    stand_in_child(edge, 'print(\'{"app": "llm", "status": "running", "ready_s": 1.0}\')')
    pool.deploy_edge(edge)  # in a thread: `rma up` and the supervision do not wait for an edge donor
    assert edge.deploying is not None
    edge.deploying.join(60)
    assert poolinfo.read(pool.o.data_dir).edges["edge"].apps == edge.apps  # type: ignore[index]
    assert edge.apps["llm"] == {"status": "running", "ready_s": 1.0}
    assert edge.apps["embeddings"]["status"] == "failed"
    # a `python -m deployments` without the edge profile: argparse's exit 2, never an exception
    stand_in_child(edge, "import sys; sys.exit(2)")
    edge.deploy("http://127.0.0.1:8470")
    assert {a: v["status"] for a, v in edge.apps.items()} == {
        "llm": "failed",
        "embeddings": "failed",
        "documents": "failed",
    }
    assert "exit code 2" in edge.apps["llm"]["error"]
    assert any("did not all start" in line for line in said)


class StandInNode:
    def __init__(self, alive: bool) -> None:
        self.alive, self.pid, self.killed = alive, 4242, False

    def track(self) -> None:
        pass

    def running(self) -> bool:
        return self.alive

    def kill(self) -> None:
        self.killed = True


def test_the_supervisor_restarts_a_dead_edge_and_the_core_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool, said = make_pool(tmp_path, EdgeSpec())
    edge = pool.edges["edge"]
    dead = StandInNode(alive=False)
    edge.node = dead  # type: ignore[assignment]
    starts: list[bool] = []

    def start_edge(e: EdgeHead, deploy: bool = True) -> bool:
        starts.append(deploy)
        return True

    monkeypatch.setattr(pool, "start_edge", start_edge)
    pool.watch_edges()
    assert edge.restarting is not None
    edge.restarting.join(5)
    assert starts == [True] and dead.killed
    assert any("the edge head 'edge' stopped; restarting it" in line for line in said)
    # a start that failed is tried again only after EDGE_RETRY_S
    edge.retry_at = float("inf")
    pool.watch_edges()
    edge.restarting.join(5)
    assert starts == [True]


def test_an_edge_restart_runs_beside_the_supervision_and_close_cuts_it_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    pool, _ = make_pool(tmp_path, EdgeSpec())
    edge = pool.edges["edge"]
    dead = StandInNode(alive=False)
    edge.node = dead  # type: ignore[assignment]
    release, entered = threading.Event(), threading.Event()
    starts: list[bool] = []

    def slow_start(e: EdgeHead, deploy: bool = True) -> bool:  # a head start takes 30-60 s for real
        starts.append(deploy)
        entered.set()
        release.wait(10)
        return True

    monkeypatch.setattr(pool, "start_edge", slow_start)
    pool.watch_edges()  # returns while the restart is in flight
    assert entered.wait(5) and edge.restarting is not None and edge.restarting.is_alive()
    pool.watch_edges()  # the next round leaves the restart in flight alone
    assert starts == [True]
    stopped: list[str] = []
    monkeypatch.setattr(edge, "stop", lambda: stopped.append("stop"))
    monkeypatch.setattr(edge, "kill_user_processes", lambda: release.set())  # what ends serve_admin for real
    edge.close()
    assert edge.closed and stopped == ["stop"] and not edge.restarting.is_alive()
    pool.watch_edges()  # a closed edge is never restarted
    assert starts == [True]


def test_a_closed_edge_starts_no_node(tmp_path: Path) -> None:
    pool, _ = make_pool(tmp_path, EdgeSpec())
    edge = pool.edges["edge"]
    edge.closed = True
    with pytest.raises(UpError, match="the pool is stopping"):
        edge.start()
    assert edge.node is None


def test_a_rotation_request_for_an_edge_rotates_only_that_edge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool, _ = make_pool(tmp_path, EdgeSpec())
    (tmp_path / "data").mkdir()
    calls: list[str] = []
    monkeypatch.setattr(pool, "rotate", lambda: calls.append("core"))
    monkeypatch.setattr(pool, "rotate_edge", lambda name: calls.append(name))
    monkeypatch.setattr(pool, "watch_edges", lambda: None)
    for request in ({"edge": "edge"}, None):
        if request:
            (tmp_path / "data" / "rotate-request").write_text(json.dumps(request))
        pool.rotate_event.set()
        pool.stop_event.clear()
        import threading

        threading.Timer(0.05, pool.stop_event.set).start()
        assert pool.supervise() is True
    assert calls == ["edge", "core"]
    assert not (tmp_path / "data" / "rotate-request").exists()


def test_rotating_an_unknown_edge_names_the_known_ones(tmp_path: Path) -> None:
    info = poolinfo.PoolInfo(
        supervisor_pid=os.getpid(),
        edges={
            "edge": poolinfo.EdgeInfo(
                ray_address="a:1", dashboard_url="http://a:2", serve_url="http://a:3", data_dir="/d", user="u"
            )
        },
    )
    poolinfo.write(tmp_path, info)
    with pytest.raises(UpError, match=r"no such edge \(edges: edge\)"):
        signal_rotate(tmp_path, edge="eu")
    poolinfo.write(tmp_path, info.model_copy(update={"edges": None}))
    with pytest.raises(UpError, match="--no-edge"):
        signal_rotate(tmp_path, edge="edge")


def test_rma_down_leaves_no_edge_pid_in_pool_json() -> None:
    edge = poolinfo.EdgeInfo(
        ray_address="a:1",
        dashboard_url="d",
        serve_url="s",
        data_dir="/d",
        user="u",
        head_pid=7,
        token_rotated_at=1.0,
    )
    after = poolinfo.PoolInfo(head_pid=1, edges={"edge": edge}).without_processes()
    assert (
        after.edges and after.edges["edge"].head_pid is None and after.edges["edge"].token_rotated_at == 1.0
    )


def test_an_edge_runs_the_edge_apps_of_the_core_apps_or_those_asked_for(tmp_path: Path) -> None:
    for apps, wanted in [
        (("llm", "services"), ("llm", "documents")),  # documents: the services' OCR and parsing
        (("embeddings", "vision"), ("embeddings",)),  # vision goes to an edge only when named (below)
        ((), ()),
    ]:
        pool, _ = make_pool(tmp_path, EdgeSpec(), apps=apps)
        assert pool.edges["edge"].apps_wanted == wanted
    opts = UpOptions(
        data_dir=tmp_path / "data",
        node_ip="127.0.0.1",
        coordinator_host="127.0.0.1",
        edges=(EdgeSpec(),),
        apps=("llm", "services"),
        edge_apps=("documents",),
        stores=(),
    )
    assert Pool(opts, lambda _: None).edges["edge"].apps_wanted == ("documents",)


def test_rma_up_edge_apps_are_edge_apps_whose_core_app_runs() -> None:
    for args, why in [
        (["--edge-apps", "services"], "unknown edge app services"),
        (["--apps", "llm", "--edge-apps", "documents"], "--apps must name services too"),
    ]:
        r = CliRunner().invoke(cli.app, ["up", "--node-ip-address", "127.0.0.1", *args])
        assert r.exit_code != 0 and why in str(r.exception), r.output


def test_the_cli_starts_one_edge_by_default_and_none_with_no_edge(monkeypatch: pytest.MonkeyPatch) -> None:
    """`rma up` builds the options (the pool itself is stood in: it stops at its first step)."""
    import rma_ray.head
    import rma_ray.logs

    seen: list[tuple[EdgeSpec, ...]] = []

    class StandInPool:
        def __init__(self, opts: UpOptions, say: Any) -> None:
            seen.append(opts.edges)
            self.stop_event = self.rotate_event = None

        def up(self) -> None:
            raise UpError("stood in")

        def down(self) -> None:
            pass

    monkeypatch.setattr(rma_ray.head, "Pool", StandInPool)
    monkeypatch.setattr(rma_ray.logs, "configure", lambda *_: None)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        for args in (
            [],
            ["--no-edge"],
            ["--edge-name", "edge", "--edge-name", "eu"],
            ["--overlay"],  # the edge by default with the overlay too: its own hub, subnet and firewall
            ["--overlay", "--no-edge"],
        ):
            r = CliRunner().invoke(cli.app, ["up", "--node-ip-address", "127.0.0.1", *args])
            assert r.exit_code != 0 and "stood in" in r.output + str(r.exception), r.output
        r = CliRunner().invoke(cli.app, ["up", "--edge-name", "eu", "--edge-name", "eu"])
        assert "a name of its own" in str(r.exception)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    assert seen[:2] == [(EdgeSpec(),), ()]
    assert seen[3:5] == [(EdgeSpec(),), ()]
    # a second edge: its own ports, overlay subnet and hub port, apart from the first's
    first, second = seen[2]
    assert (first, second.name) == (EdgeSpec(), "eu")
    assert second.ports == EdgeSpec().ports.shifted(1) and second.overlay_subnet == "10.90.0.0/16"
    assert (first.overlay_port, second.overlay_port) == (51821, 51822)
    r = CliRunner().invoke(cli.app, ["up", "--overlay", "--overlay-subnet", "10.0.0.0/8"])
    assert r.exit_code != 0 and "overlaps the subnet 10.89.0.0/16" in str(r.exception), r.output


def test_edges_on_one_machine_share_no_port() -> None:
    """Up to four edges beside the core head (--edge-name): every single port apart, none inside any edge's
    worker range (a Ray client port once landed on the next edge's first worker port)."""
    layouts = [EdgeSpec().ports.shifted(i) for i in range(4)]
    singles = [
        getattr(p, f)
        for p in layouts
        for f in p.__dataclass_fields__
        if f not in ("min_worker", "max_worker")
    ]
    assert len(set(singles)) == len(singles)
    for p in layouts:
        assert not [port for port in singles if p.min_worker <= port <= p.max_worker]
    ranges = sorted((p.min_worker, p.max_worker) for p in layouts)
    assert all(a[1] < b[0] for a, b in zip(ranges, ranges[1:], strict=False))


def test_no_edge_port_is_a_store_or_core_default(tmp_path: Path) -> None:
    """The edge's Serve binds every address under the overlay: a store on its port could not start (chroma's
    default once was the edge's Serve port). `rma up` refuses a clash it is asked for, before anything runs."""
    from rma_ray.poolinfo import STORE_NAMES

    def options(**kw: Any) -> UpOptions:
        return UpOptions(tmp_path / "data", "127.0.0.1", "127.0.0.1", apps=(), edges=(EdgeSpec(),), **kw)

    pool = Pool(options(stores=STORE_NAMES), lambda _: None)
    taken = set(pool.store_ports()) | {8000, 8265, 6380, 8470}
    assert {8010, 5440, 6390, 7697, 7698} <= set(pool.store_ports())
    for i in range(4):
        p = EdgeSpec().ports.shifted(i)
        singles = {getattr(p, f) for f in p.__dataclass_fields__ if f not in ("min_worker", "max_worker")}
        assert not singles & taken and not [t for t in taken if p.min_worker <= t <= p.max_worker]
    moved = Pool(options(stores=("chroma",), store_ports={"chroma": 8030}), lambda _: None)
    with pytest.raises(UpError, match="port 8030 is both the edge edge's Serve and the chroma store's"):
        moved._check_ports()


def test_rma_up_takes_down_what_it_started_whatever_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not only an UpError: any exception after the hubs started still runs pool.down() (hubs, nft tables)."""
    import rma_ray.head
    import rma_ray.logs

    downs: list[bool] = []

    class Failing:
        def __init__(self, opts: UpOptions, say: Any) -> None:
            self.stop_event = self.rotate_event = None

        def up(self) -> None:
            raise RuntimeError("boom\nsecond line")

        def down(self) -> None:
            downs.append(True)

    monkeypatch.setattr(rma_ray.head, "Pool", Failing)
    monkeypatch.setattr(rma_ray.logs, "configure", lambda *_: None)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        r = CliRunner().invoke(cli.app, ["up", "--node-ip-address", "127.0.0.1", "--no-edge"])
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    assert downs == [True] and r.exit_code != 0
    assert "rma up failed: RuntimeError: boom" in r.output + str(r.exception)
    assert "second line" not in r.output + str(r.exception)


def test_rma_up_returns_once_the_core_runs_and_starts_the_edge_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 18's warm start: the edge head, its Serve and its apps start after the core's apps run, in a thread
    `rma up` does not wait for; pool.json (and `rma status`) says the edge is starting until its head runs. The
    Ray-facing steps are stood in (tests/integration/test_edge_head.py starts the real edge)."""
    import threading

    import rma_ray.head
    from rma_ray.cli.donor import head_view

    pool, _ = make_pool(tmp_path, EdgeSpec())
    edge = pool.edges["edge"]
    order: list[str] = []
    for step in (
        "_check_edges",
        "_check_ports",
        "start_hub",
        "start_edge_guard",
        "start_head",
        "start_serve",
        "start_coordinator",
        "guard_ports",
        "write_service_credential",
    ):
        monkeypatch.setattr(pool, step, lambda *_, step=step: order.append(step))
    monkeypatch.setattr(edge, "prepare", lambda: None)
    monkeypatch.setattr(edge, "start_hub", lambda: None)

    class Coordinator:  # what `rma up` asks the coordinator: one printed invite
        def __init__(self, *_: object) -> None:
            pass

        def __enter__(self) -> Coordinator:
            return self

        def __exit__(self, *_: object) -> None:
            pass

        def create_invite(self, **_: object) -> dict[str, str]:
            return {"token": "invite", "expires_at": "later"}

    monkeypatch.setattr(rma_ray.head, "AdmissionClient", Coordinator)

    def core_apps(info: poolinfo.PoolInfo) -> None:
        order.append("core apps")
        info.apps = {"llm": {"status": "running"}}
        pool.write(info)

    release = threading.Event()

    def start_edge(e: EdgeHead, deploy: bool = True) -> bool:
        order.append(f"edge start (deploy={deploy})")
        assert release.wait(10)
        e.node = StandInNode(alive=True)  # type: ignore[assignment]
        pool.write_edges()
        return True

    monkeypatch.setattr(pool, "start_deployments", core_apps)
    monkeypatch.setattr(pool, "start_edge", start_edge)
    info = pool.up()  # returns while the edge start waits on `release`
    assert edge.restarting is not None and edge.restarting.is_alive()
    assert order.index("core apps") < order.index("guard_ports") < order.index("edge start (deploy=True)")
    assert info["apps"] == {"llm": {"status": "running"}}
    assert info["edges"]["edge"].get("head_pid") is None and info["edges"]["edge"].get("error") is None
    monkeypatch.setattr(poolinfo.PoolInfo, "supervisor_running", lambda self: True)
    assert head_view(poolinfo.read(pool.o.data_dir))["cluster edge"].endswith(", starting")
    pool.watch_edges()  # the supervision leaves the start in flight alone
    release.set()
    edge.restarting.join(10)
    assert order.count("edge start (deploy=True)") == 1
    running = poolinfo.read(pool.o.data_dir)
    assert running.edges and running.edges["edge"].head_pid == StandInNode(alive=True).pid
    assert head_view(running)["cluster edge"].endswith(f"head pid {running.edges['edge'].head_pid}")


def test_an_edge_start_that_raises_is_said_kept_and_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool, said = make_pool(tmp_path, EdgeSpec())
    edge = pool.edges["edge"]
    poolinfo.write(pool.o.data_dir, poolinfo.PoolInfo(supervisor_pid=os.getpid()))

    def broken(e: EdgeHead, deploy: bool = True) -> bool:
        raise RuntimeError("no such thing")

    monkeypatch.setattr(pool, "start_edge", broken)
    pool._start_edge_quietly(edge)
    assert edge.error == "the edge head 'edge' did not start: no such thing" and edge.retry_at > 0
    assert any("did not start: no such thing" in line for line in said)
    kept = poolinfo.read(pool.o.data_dir)
    assert kept.edges and kept.edges["edge"].error == edge.error
