"""Strangers can donate (issue 17): an untrusted donor joins the edge cluster, never the core; what it can run
reaches nothing of the core; clients' requests are served by its replicas through the core's gateway with the
edge credential (never the client key); sensitive clients never leave the core; losing, revoking or rotating
the edge leaves the core serving, with its Serve apps untouched; an edge donor that tampers with its sampler is
caught by the core's spot-checks and its edge quarantined (issue 20).

One pool for the module (tests/e2e/edge_bed.py): `rma up` with its edge on a bed of its own, the LLM app on both
clusters, one untrusted donor (edge), then (last) a tampered one on the bed's other host. Embeddings forwarded
to an edge: tests/integration/test_edge_serve.py; the edge head's own restart after a SIGKILL and rotation
without Serve traffic: tests/integration/test_edge_head.py. What reaches the edge replica is the edge credential
and no client header: asserted from inside an edge app in tests/unit/test_edge_router.py; here, the edge refuses
the client's key outright (so what it accepted was not the key)."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import signal
import socket
import subprocess
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import httpx
import psutil
import pytest

from deployments.gateway.spotcheck import GREEDY_THRESHOLD
from tests.e2e.conftest import PY, Donor
from tests.e2e.edge_bed import SERVED_BY_HEADER, EdgePool, start_edge_pool
from tests.support import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.ray, pytest.mark.llm]

EDGE = "edge:edge"
# The core re-checks every edge answer (`spot_check_rate` 1, not 2%): the tampered donor's test then has a bound
# that does not depend on chance. Only LLM answers of 16 tokens or more get a verdict and the tests before it
# ask for 12 at most, so the edge has no verdict before that test (each check still costs the core a prefill).
SETTINGS = {"RMA_SPOT_CHECK_RATE": "1"}


@pytest.fixture(scope="module")
def edge_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EdgePool]:
    from tests.e2e.netns import available

    reason = available()
    if reason:
        pytest.skip(f"network namespaces unavailable: {reason}")
    root = tmp_path_factory.mktemp("edgepool")
    with start_edge_pool(root, settings=SETTINGS) as pool:
        yield pool


@pytest.fixture(scope="module")
def edge_donor(edge_pool: EdgePool) -> Donor:
    donor = edge_pool.join(
        edge_pool.invite(trusted=False, tier="service"), "--cpus", "3", "--overcommit-cpus", timeout=180
    )
    wait_for(
        lambda: edge_pool.running_replicas("rma-llm", "edge") > 0,
        timeout=900,
        interval=2,
        what="the edge's LLM replica on the edge donor",
    )
    # the core's gateways learn of it on their next fetch of the edge routes (deployments/gateway/edge.py)
    key = edge_pool.client_key("edge-probe")
    wait_for(
        lambda: _chat(edge_pool, key, max_tokens=1).headers.get(SERVED_BY_HEADER) == EDGE,
        timeout=120,
        interval=1,
        what="the core's gateway to forward to the edge",
    )
    return donor


def _donor_driver(pool: EdgePool, donor: Donor, address: str, script: str) -> Any:
    """A Ray driver on the donor's host with the token the donor was given (what a hostile donor has)."""
    token_file = donor.data_dir / "cluster_token"
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_file),
        "HOME": str(donor.data_dir.parent / "drv-home"),
    }
    prog = f"import json, os, ray\nADDRESS = {address!r}\n" + textwrap.dedent(script)
    return donor.host.run([PY, "-c", prog], env=env, timeout=120)


def test_untrusted_donor_joins_the_edge_and_only_the_edge(edge_pool: EdgePool, edge_donor: Donor) -> None:
    w = edge_pool.worker(edge_donor.worker_id)
    assert (w["cluster"], w["trusted"]) == ("edge", False)
    edge_ids = {n["node_id"] for n in edge_pool.edge_nodes() if n["state"] == "ALIVE"}
    assert w["ray_node_id"] in edge_ids
    assert w["ray_node_id"] not in {n["node_id"] for n in edge_pool.ray_nodes()}  # not a core node
    # what the donor was handed is the edge's token, not the core's
    given = (edge_donor.data_dir / "cluster_token").read_text().strip()
    assert given == edge_pool.edge_token_file.read_text().strip()
    assert given != edge_pool.core_token()

    seen = _donor_driver(
        edge_pool,
        edge_donor,
        edge_pool.edge["ray_address"],
        """
        ray.init(address=ADDRESS, logging_level="ERROR", log_to_driver=False)
        print(json.dumps([n["NodeID"] for n in ray.nodes() if n["Alive"]]))
        """,
    )
    assert seen.returncode == 0, seen.stderr[-3000:]
    assert set(json.loads(seen.stdout.strip().splitlines()[-1])) == edge_ids

    core = _donor_driver(
        edge_pool,
        edge_donor,
        edge_pool.info["ray_address"],
        """
        try:
            ray.init(address=ADDRESS, logging_level="ERROR", log_to_driver=False)
            print(json.dumps({"connected": [n["NodeID"] for n in ray.nodes()]}))
        except Exception as exc:
            print(json.dumps({"refused": f"{type(exc).__name__}: {exc}"[:500]}))
        """,
    )
    out = (
        json.loads(core.stdout.strip().splitlines()[-1]) if core.stdout.strip() else {"refused": core.stderr}
    )
    assert "refused" in out, f"the edge token opened the core cluster: {out}"


HOSTILE = """
import pwd
ray.init(address=ADDRESS, logging_level="ERROR", log_to_driver=False)
CORE = %r

@ray.remote(num_cpus=0, label_selector={"rma.io/tier": "head"})
def snoop():
    out = {"user": pwd.getpwuid(os.getuid()).pw_name, "reads": {}}
    for name in ("pool.json", "cluster_token", "service.json", "coordinator"):
        path = os.path.join(CORE, name)
        try:
            if os.path.isdir(path):
                os.listdir(path)
            else:
                open(path).read()
            out["reads"][name] = "read"
        except Exception as exc:
            out["reads"][name] = type(exc).__name__
    try:
        os.listdir(CORE)
        out["reads"]["<data dir>"] = "read"
    except Exception as exc:
        out["reads"]["<data dir>"] = type(exc).__name__
    return out

found = ray.get(snoop.remote(), timeout=60)
actors = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
try:
    ray.get_actor("rma-store-postgres", namespace="rma")
    store = "found"
except ValueError:
    store = "none"
print(json.dumps({**found, "actors": actors, "store": store}))
"""


def test_a_hostile_edge_donor_reads_nothing_of_the_core(edge_pool: EdgePool, edge_donor: Donor) -> None:
    core_dir = str(edge_pool.root / "head")
    r = _donor_driver(edge_pool, edge_donor, edge_pool.edge["ray_address"], HOSTILE % core_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["user"] == edge_pool.edge["user"] == "rma-edge"  # ran on the edge head, as the edge's user
    assert out["reads"] == {
        "pool.json": "PermissionError",
        "cluster_token": "PermissionError",
        "service.json": "PermissionError",
        "coordinator": "PermissionError",
        "<data dir>": "PermissionError",
    }
    assert not [a for a in out["actors"] if a.startswith("rma-store-")]
    assert out["store"] == "none"


PROBE = (
    "import json, socket, sys\n"
    "def ok(h, p):\n"
    "    try:\n"
    "        socket.create_connection((h, p), timeout=2).close(); return True\n"
    "    except OSError:\n"
    "        return False\n"
    "print(json.dumps([ok(h, p) for h, p in json.loads(sys.argv[1])]))\n"
)


def _probe_as(user: str, targets: list[tuple[str, int]]) -> list[bool]:
    r = subprocess.run(
        ["runuser", "-u", user, "--", PY, "-c", PROBE, json.dumps(targets)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def _core_listener(pool: EdgePool) -> tuple[str, int] | None:
    """A port the core head's processes listen on outside every port known up front (Ray's random ones: the
    edge guard adds them as they appear), with an address to reach it on; None if Ray opened none."""
    from rma_ray.overlay import RayPorts

    urls = (pool.info["ray_address"], pool.info["ray_dashboard_url"], pool.info["coordinator_url"])
    static = {int(u.rsplit(":", 1)[1]) for u in (*urls, pool.info["serve_url"])}
    static |= {int(e) for e in RayPorts().firewalled() if "-" not in e}
    head = psutil.Process(pool.info["head_pid"])
    for proc in [head, *head.children(recursive=True)]:
        try:
            conns = proc.net_connections(kind="tcp")
        except psutil.Error:
            continue
        for c in conns:
            port = c.laddr.port if c.laddr else 0
            if c.status != psutil.CONN_LISTEN or port in static or 10002 <= port <= 19999:
                continue
            if ":" in c.laddr.ip and c.laddr.ip not in ("::", "::1"):
                continue
            host = {"0.0.0.0": "127.0.0.1", "::": "127.0.0.1", "::1": "::1"}.get(c.laddr.ip, c.laddr.ip)
            return host, port
    return None


def test_edge_user_code_on_the_head_reaches_its_edge_but_no_core_port(edge_pool: EdgePool) -> None:
    """Without the overlay, `rma up`'s edge guard (an nft output chain of its own) keeps what the edge's user
    runs on the head (an edge donor's Ray task) off the core's ports on the head's addresses, loopback
    included; its own ports and the coordinator stay reachable, and root (the core) reaches everything."""
    from rma_ray.overlay import edge_guard_table

    table = edge_guard_table(edge_pool.root / "head")
    listed = subprocess.run(["nft", "list", "table", "inet", table], capture_output=True, text=True)
    assert listed.returncode == 0, f"no edge guard table {table}: {listed.stderr}"
    assert "chain input" not in listed.stdout  # donors on the LAN reach the head as before

    user = edge_pool.edge["user"]
    edge_gcs = edge_pool.edge["ray_address"].rsplit(":", 1)
    coordinator = edge_pool.info["coordinator_url"].split("//", 1)[1].rsplit(":", 1)
    core_gcs = edge_pool.info["ray_address"].rsplit(":", 1)
    dashboard = edge_pool.info["ray_dashboard_url"].split("//", 1)[1].rsplit(":", 1)
    # a throwaway listener of root's on loopback in Ray's worker range: the core's, denied up front
    lo = socket.socket()
    lo.bind(("127.0.0.1", _free_in_workers()))
    lo.listen()
    try:
        targets = [
            (edge_gcs[0], int(edge_gcs[1])),  # its own GCS
            (coordinator[0], int(coordinator[1])),  # the coordinator (its ingress fetches the public keys)
            (core_gcs[0], int(core_gcs[1])),  # the core's GCS
            ("127.0.0.1", int(core_gcs[1])),  # the same on loopback
            (dashboard[0], int(dashboard[1])),  # the core's dashboard
            ("127.0.0.1", lo.getsockname()[1]),  # a core worker's port on loopback
        ]
        assert _probe_as(user, targets) == [True, True, False, False, False, False]
        assert _probe_as("root", targets[2:]) == [True, True, True, True]  # the core still reaches them
        found = _core_listener(edge_pool)
        if found is not None:  # one of Ray's random ports of the core head, added by the supervisor
            wait_for(
                lambda: _probe_as(user, [found]) == [False],
                timeout=15,
                interval=1,
                what=f"the edge guard to cover the core head's port {found}",
            )
            assert _probe_as("root", [found]) == [True]
    finally:
        lo.close()


def _free_in_workers() -> int:
    """A port in Ray's default worker range (10002-19999) free on loopback now."""
    for port in range(19999, 10002, -7):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port in 10002-19999")


def _chat(pool: EdgePool, key: str, **kw: Any) -> httpx.Response:
    body = {
        "model": pool.info.get("llm_model") or _model(pool, key),
        "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 4,
        **kw,
    }
    return httpx.post(
        pool.info["serve_url"] + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=120,
    )


_MODELS: dict[str, str] = {}


def _model(pool: EdgePool, key: str) -> str:
    if "chat" not in _MODELS:
        r = httpx.get(
            pool.info["serve_url"] + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30
        )
        r.raise_for_status()
        _MODELS["chat"] = next(m["id"] for m in r.json()["data"] if m.get("kind", "chat") == "chat")
    return _MODELS["chat"]


def test_chat_is_served_by_the_edge_with_the_official_client(edge_pool: EdgePool, edge_donor: Donor) -> None:
    import openai

    key = edge_pool.client_key("edge-chat")
    client = openai.OpenAI(base_url=edge_pool.info["serve_url"] + "/v1", api_key=key, max_retries=0)
    model = _model(edge_pool, key)
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Say hi."}], max_tokens=8
    )
    assert raw.headers.get(SERVED_BY_HEADER) == EDGE
    assert raw.parse().choices[0].message.content is not None
    with client.chat.completions.with_streaming_response.create(
        model=model, messages=[{"role": "user", "content": "Count to five."}], max_tokens=12, stream=True
    ) as stream:
        assert stream.headers.get(SERVED_BY_HEADER) == EDGE
        chunks = [c for c in stream.parse() if c.choices]
    assert len(chunks) >= 2
    # the edge takes no client key: what reached its replica above was the edge credential
    direct = httpx.post(
        edge_pool.edge["serve_url"] + "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert direct.status_code == 401, direct.text


def _counted(pool: EdgePool) -> tuple[dict[str, int], datetime]:
    """Requests each cluster's Serve ingress served in the last 24 h, as the registry counts them, and when the
    collector last read them."""
    out, at = {}, None
    for cluster in ("core", "edge"):
        r = pool.admin("GET", "/api/admin/metrics", params={"cluster": cluster, "step_s": 3600})
        assert r.status_code == 200, r.text
        m = r.json()
        out[cluster], at = sum(m["series"]["requests"]), m["collector"]["at"]
    assert at, "the collector has not read Serve's metrics yet"
    return out, datetime.fromisoformat(at)


def _settled(pool: EdgePool) -> dict[str, int]:
    """The registry's counts once two collector passes 25 s apart agree: Ray exports a process' counters every
    10 s and the collector reads them every 10 s, so whatever was served before is all counted."""

    def agree() -> dict[str, int] | None:
        first, at = _counted(pool)

        def later() -> dict[str, int] | None:
            counts, read_at = _counted(pool)
            return counts if read_at >= at + timedelta(seconds=25) else None

        again = wait_for(later, timeout=120, interval=2, what="a collector pass 25 s later")
        return first if again == first else None

    return wait_for(agree, timeout=300, interval=0.1, what="the registry's request counts to settle")


def test_a_sensitive_client_never_reaches_the_edge(edge_pool: EdgePool, edge_donor: Donor) -> None:
    plain, sensitive = edge_pool.client_key("edge-plain"), edge_pool.client_key("edge-secret", sensitive=True)
    assert _chat(edge_pool, plain).headers.get(SERVED_BY_HEADER) == EDGE  # the edge is there and taking work
    t0 = time.monotonic()
    before = _settled(edge_pool)
    settled_s = time.monotonic() - t0
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        answers = list(ex.map(lambda _i: _chat(edge_pool, sensitive, max_tokens=1), range(50)))
    assert [r.status_code for r in answers] == [200] * 50
    assert {r.headers.get(SERVED_BY_HEADER) for r in answers} == {"core"}
    # the registry's request figures per cluster: the 50 under the core's ingress, none under the edge's. A
    # plain request sent after them is the edge's marker: once it is counted, so is anything the 50 did there
    assert _chat(edge_pool, plain, max_tokens=1).headers.get(SERVED_BY_HEADER) == EDGE
    t0 = time.monotonic()

    def counted_after() -> dict[str, int] | None:
        counts = _counted(edge_pool)[0]
        return counts if counts["edge"] > before["edge"] and counts["core"] >= before["core"] + 51 else None

    after = wait_for(
        counted_after,
        timeout=120,
        interval=2,
        what="the 51 requests in the core's figures and the marker in the edge's",
    )
    print(
        f"\nrequests per cluster before {before}, after {after}; settling {settled_s:.0f} s, "
        f"counted {time.monotonic() - t0:.0f} s after the marker"
    )
    assert after["edge"] == before["edge"] + 1, (before, after)
    assert after["core"] >= before["core"] + 51, (before, after)


def _load(pool: EdgePool, key: str, stop: threading.Event, log: list[dict[str, Any]]) -> None:
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            r = _chat(pool, key, max_tokens=2)
            log.append(
                {
                    "t": t0,
                    "s": time.monotonic() - t0,
                    "status": r.status_code,
                    "by": r.headers.get(SERVED_BY_HEADER),
                    "retry_after": r.headers.get("retry-after"),
                }
            )
        except httpx.HTTPError as exc:
            log.append({"t": t0, "s": time.monotonic() - t0, "status": 0, "by": None, "error": repr(exc)})


def _under_load(
    pool: EdgePool, key: str, act: Any, after_s: float = 20
) -> tuple[list[dict[str, Any]], float]:
    stop, log = threading.Event(), []  # type: ignore[var-annotated]
    threads = [threading.Thread(target=_load, args=(pool, key, stop, log), daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(log) >= 8, timeout=120, what="the load to start")
        at = time.monotonic()
        act()
        wait_for(lambda: time.monotonic() - at > after_s, timeout=after_s + 5, interval=0.5, what="load")
    finally:
        stop.set()
        for t in threads:
            t.join(150)
    return log, at


def _no_hang_no_error(log: list[dict[str, Any]], at: float) -> None:
    bad = [
        {**e, "sent_after_act_s": round(e["t"] - at, 2)}
        for e in log
        if e["status"] not in (200, 503) or (e["status"] == 503 and not e["retry_after"])
    ]
    assert not bad, (len(bad), bad[:8])
    assert max(e["s"] for e in log) < 120


def test_losing_the_edge_leaves_the_core_serving_untouched(edge_pool: EdgePool, edge_donor: Donor) -> None:
    key = edge_pool.client_key("edge-load")
    core_before = edge_pool.replica_ids("core")
    head_pid = edge_pool.refresh_info()["head_pid"]

    def power_cut() -> None:
        for pid in edge_donor.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    log, cut_at = _under_load(edge_pool, key, power_cut)
    _no_hang_no_error(log, cut_at)
    assert any(e["by"] == EDGE for e in log if e["t"] < cut_at)
    after = sorted(
        e["t"] + e["s"] for e in log if e["t"] > cut_at and e["by"] == "core" and e["status"] == 200
    )
    assert after, "nothing was served by the core after the edge donor died"
    print(f"\nedge loss -> first request served by the core: {after[0] - cut_at:.2f} s")
    assert edge_pool.replica_ids("core") == core_before  # the core's apps were not redeployed
    assert edge_pool.refresh_info()["head_pid"] == head_pid


def test_revoke_and_rotate_the_edge_under_load(edge_pool: EdgePool, edge_donor: Donor) -> None:
    key = edge_pool.client_key("edge-rotate")
    core_before = edge_pool.replica_ids("core")
    head_pid = edge_pool.refresh_info()["head_pid"]
    old_edge_token = edge_pool.edge_token_file.read_text().strip()

    def revoke_and_rotate() -> None:
        r = edge_pool.rma("donors", "revoke", edge_donor.worker_id)
        assert r.returncode == 0, r.stdout + r.stderr
        r = edge_pool.rma("rotate-cluster-token", "--edge", "edge", timeout=400)
        assert r.returncode == 0, r.stdout + r.stderr

    log, at = _under_load(edge_pool, key, revoke_and_rotate, after_s=5)
    _no_hang_no_error(log, at)
    assert edge_pool.edge_token_file.read_text().strip() != old_edge_token
    assert edge_pool.replica_ids("core") == core_before
    assert edge_pool.refresh_info()["head_pid"] == head_pid
    assert edge_pool.worker(edge_donor.worker_id)["status"] == "revoked"


# A dishonest donor's tamper, all of it on its own host: a directory on the PYTHONPATH it starts `rma join` with.
# Every Python process of the node inherits it (its raylet, Ray's workers, the Serve replica, vLLM's engine
# process) and runs sitecustomize.py at start; once one of them imports vLLM's sampling parameters, every request
# is sampled at temperature 2 whatever the client asked (greedy included). A marker per process it tampered in.
TAMPER = """
import importlib.abc, importlib.util, os, sys

HERE = os.path.dirname(os.path.abspath(__file__))


def tamper(module):
    honest = module.SamplingParams.from_optional

    def from_optional(*args, **kwargs):
        kwargs.update(temperature=2.0, top_p=1.0, top_k=0, min_p=0.0)
        return honest(*args, **kwargs)

    module.SamplingParams.from_optional = staticmethod(from_optional)
    open(os.path.join(HERE, f"tampered-{os.getpid()}"), "w").close()


class Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "vllm.sampling_params":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            tamper(module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, Hook())
"""
REFRESH_S = 10.0  # the core's gateways fetch the edge routes this often (deployments/gateway/edge.py)
QUEUE = (
    8  # samples a gateway's event loop holds for checking (SpotChecker.queue_size): verdicts behind answers
)


def _ask(pool: EdgePool, key: str, prompt: str) -> dict[str, Any]:
    """One greedy chat request long enough to be judged (32 tokens; a verdict needs 16), its body as sent
    (the spot-check keeps its hash) and what the client got."""
    body = json.dumps(
        {
            "model": _model(pool, key),
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 32,
            "temperature": 0,
        }
    ).encode()
    t0 = time.monotonic()
    r = httpx.post(
        pool.info["serve_url"] + "/v1/chat/completions",
        content=body,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return {
        "t": t0,
        "by": r.headers.get(SERVED_BY_HEADER),
        "sha256": hashlib.sha256(body).hexdigest(),
        "content": r.content,
        "text": r.json()["choices"][0]["message"]["content"],
    }


def _spot_checks(pool: EdgePool) -> dict[str, Any]:
    r = pool.admin("GET", "/api/admin/spot-checks", params={"failures": 100})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_a_tampered_edge_donor_is_quarantined(edge_pool: EdgePool) -> None:
    """A donor that joins the edge with a tampered sampler (TAMPER: its own environment, no hook of the
    product) answers from the same model but not as the model would: the core's gateways check every edge
    answer (SETTINGS), each check fails, and at the pool's `spot_check_min_checks` checks the coordinator
    quarantines the edge. The bound: the edge answers at most min_checks judged requests plus those whose
    checks were still queued when the verdict came (QUEUE), and no request sent more than one routes refresh
    (REFRESH_S) after the quarantine was seen. The admin sees the reason and the failing samples; each sample
    is byte for byte the answer its client got (the check read a copy and changed nothing); then the core serves
    every request. Last in the module: the edge stays quarantined."""
    # the edge's other donors leave (the tampered one must be the edge's only replica host)
    left = [d for d in edge_pool.donors if d.proc.poll() is None]
    for d in left:
        d.proc.send_signal(signal.SIGINT)
        d.proc.wait(60)
    if left:
        wait_for(
            lambda: edge_pool.running_replicas("rma-llm", "edge") == 0,
            timeout=120,
            interval=1,
            what="the edge's LLM replica to go with its donors",
        )
    spot = _spot_checks(edge_pool)
    assert spot["rate"] == 1.0
    assert [(e["edge"], e["checks"], e["quarantined"]) for e in spot["edges"]] == [("edge", 0, False)]
    min_checks = spot["min_checks"]

    tamper = edge_pool.root / "tamper"
    tamper.mkdir()
    (tamper / "sitecustomize.py").write_text(TAMPER)
    path = os.pathsep.join(p for p in (str(tamper), os.environ.get("PYTHONPATH", "")) if p)
    donor = edge_pool.join(
        edge_pool.invite(trusted=False, tier="service"),
        "--cpus",
        "3",
        "--overcommit-cpus",
        timeout=180,
        env={"PYTHONPATH": path},
    )
    assert edge_pool.worker(donor.worker_id)["cluster"] == "edge"
    wait_for(
        lambda: edge_pool.running_replicas("rma-llm", "edge") > 0,
        timeout=900,
        interval=2,
        what="the edge's LLM replica on the tampered donor",
    )
    plain, sensitive = (
        edge_pool.client_key("tampered-plain"),
        edge_pool.client_key("tampered-core", sensitive=True),
    )
    prompt = "List the days of the week."
    # the core's gateways fetch the edge's routes every REFRESH_S: until one has seen the edge serve again, an
    # answer carries no served-by header at all (no edge known: the app answers as it always has)
    core = wait_for(
        lambda: (a := _ask(edge_pool, sensitive, prompt))["by"] is not None and a,
        timeout=6 * REFRESH_S,
        interval=1,
        what="the core's gateway to know the edge (its answers then say who served them)",
    )
    assert core["by"] == "core"
    answers: list[dict[str, Any]] = []

    def by_edge() -> dict[str, Any] | None:
        answers.append(_ask(edge_pool, plain, prompt))
        return answers[-1] if answers[-1]["by"] == EDGE else None

    first = wait_for(by_edge, timeout=120, interval=0.5, what="the core's gateway to forward to the edge")
    # the tamper is active: greedy, the edge's answer is not the model's (the core's), and it ran on the donor
    assert first["text"] != core["text"], (first["text"], core["text"])
    assert list(tamper.glob("tampered-*"))

    def quarantined() -> dict[str, Any] | None:
        answers.append(_ask(edge_pool, plain, f"Write one sentence about the number {len(answers)}."))
        edge = _spot_checks(edge_pool)["edges"][0]
        return edge if edge["quarantined"] else None

    edge = wait_for(quarantined, timeout=600, interval=0, what="the edge to be quarantined")
    seen = time.monotonic()
    before = sum(a["by"] == EDGE for a in answers)

    def by_core() -> bool:
        answers.append(_ask(edge_pool, plain, f"Write one sentence about the number {len(answers)}."))
        return bool(answers[-1]["by"] == "core")

    wait_for(by_core, timeout=REFRESH_S + 120, interval=0, what="the core to serve the edge's share")
    for _ in range(5):
        assert by_core(), "the quarantined edge served a request after the core had taken over"
    edge_answers = [a for a in answers if a["by"] == EDGE]
    late = [round(a["t"] - seen, 1) for a in edge_answers if a["t"] > seen + REFRESH_S + 5]
    print(
        f"\ntampered edge: quarantine seen after {before} of its answers ({min_checks} checks to a verdict), "
        f"{len(edge_answers)} in all ({len(edge_answers) - before} more before the gateways' next routes fetch)"
    )
    assert not late, f"edge answers to requests sent this long (s) after the quarantine: {late}"
    assert min_checks <= before <= min_checks + QUEUE, before

    # what the admin sees: why, and the failing samples (each one a client's answer as that client got it)
    assert edge["checks"] == edge["failures"] >= min_checks
    assert edge["pass_rate"] == 0.0
    assert f"{min_checks} of {min_checks} checks failed" in edge["reason"], edge["reason"]
    assert edge["samples_kept"] == len(edge["recent_failures"]) >= min(min_checks, 20)
    sent = {a["sha256"]: a["content"] for a in edge_answers}
    for failure in edge["recent_failures"]:
        assert (failure["kind"], failure["path"]) == ("llm", "/v1/chat/completions")
        # greedy requests: judged by the share of the model's first-choice tokens (spotcheck.greedy_share)
        assert failure["score"] < failure["threshold"] == GREEDY_THRESHOLD
        sample = failure["sample"]
        got = sent[failure["request_sha256"]]
        assert sample["edge_answer"] == got[:4096].decode("utf-8", errors="replace")
        assert json.loads(sample["core_answer"])["tokens"] >= 16
    # ... and which donor gave them: the edge head's HAProxy named its replica's address (rma_ray.upstream),
    # the coordinator the donor registered there; that donor is quarantined on its own record too (drained)
    assert {f["donor"] for f in edge["recent_failures"]} == {donor.worker_id}
    assert {f["upstream"].rpartition(":")[0] for f in edge["recent_failures"]} == {donor.host.ip}
    (named,) = [d for d in edge["donors"] if d["id"] == donor.worker_id]
    assert named["checks"] == named["failures"] >= min_checks and named["quarantined"], named
