"""Per-client entity graphs on the real graph store (ArcadeDB over Bolt, with the `neo4j` driver Neo4j also
speaks): two clients extract text naming the same entities and each sees only its own graph. The store runs as
a child process here (the supervisor's process runtime, no Ray); the routes pass the caller's client as the
owner (tests/integration/test_services.py covers them over HTTP)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deployments.gateway.refusal import Refusal
from deployments.services.graph import Graph
from deployments.stores.kinds import KINDS, Endpoint, credentials
from deployments.stores.runtime import ProcessRuntime
from tests.support import free_port, wait_for


@pytest.fixture(scope="module")
def graph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Graph]:
    """ArcadeDB with its Bolt plugin (~15-30 s to start on 2 busy cores) and the service class on it."""
    kind = KINDS["graph"]
    try:
        kind._home()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    volume: Path = tmp_path_factory.mktemp("graph")
    creds = credentials(volume)
    rt = ProcessRuntime(kind, volume, "127.0.0.1", free_port(span=2), creds)  # Bolt and HTTP
    rt.start()
    ep: Endpoint = kind.endpoint(rt.host, rt.port, creds)

    def ready() -> bool:
        assert rt.alive(), (volume / "graph.log").read_text(errors="replace")[-2000:]
        try:
            return bool(kind.ready(ep))
        except Exception:
            return False

    try:
        try:
            wait_for(ready, timeout=180, interval=0.5, what="ArcadeDB to answer over Bolt")
        except TimeoutError as exc:  # say why: the server's own log
            log = volume / "graph.log"
            raise TimeoutError(
                f"{exc}; graph.log: {log.read_text(errors='replace')[-3000:] if log.exists() else '-'}"
            ) from None
        g = Graph(endpoint=lambda _: ep)
        yield g
        if g._driver is not None:
            g._driver.close()
    finally:
        rt.stop()


def run(g: Graph, cypher: str, **params: Any) -> list[dict[str, Any]]:
    with g._session() as s:
        return [r.data() for r in s.run(cypher, **params)]


def neighbours(g: Graph, owner: str, entity: str) -> dict[str, int]:
    return {n["name"]: n["weight"] for n in g.query(owner, entity)["neighbours"]}


def test_two_clients_have_disjoint_graphs(graph: Graph) -> None:
    graph.extract("alice", "Ada Lovelace met Charles Babbage in London.")
    graph.extract("bob", "Ada Lovelace moved to Paris. Ada Lovelace met Charles Babbage in Paris.")
    assert neighbours(graph, "alice", "ada lovelace") == {"Charles Babbage": 1, "London": 1}
    assert neighbours(graph, "bob", "ada lovelace") == {"Charles Babbage": 1, "Paris": 2}
    # bob writing the same pair again changes bob's count only; alice's stays where her text put it
    for _ in range(3):
        graph.extract("bob", "Ada Lovelace met Charles Babbage in London.")
    assert neighbours(graph, "alice", "ada lovelace") == {"Charles Babbage": 1, "London": 1}
    assert neighbours(graph, "bob", "Ada Lovelace")["London"] == 3
    assert neighbours(graph, "bob", "Ada Lovelace")["Charles Babbage"] == 4
    # an entity only alice's text named is unknown to carol, and the refusal does not say it exists elsewhere
    with pytest.raises(Refusal) as err:
        graph.query("carol", "Ada Lovelace")
    assert err.value.status == 404 and "your graph" in err.value.message
    # in the store: one node per (owner, entity), edges only between one owner's nodes, every edge owned
    rows = run(
        graph,
        "MATCH (n:Entity) WHERE n.name = 'Ada Lovelace' RETURN n.owner AS owner, n.mentions AS mentions",
    )
    assert sorted((r["owner"], r["mentions"]) for r in rows) == [("alice", 1), ("bob", 5)]
    cross = run(
        graph,
        "MATCH (a:Entity)-[r:CO_OCCURS]->(b:Entity) "
        "WHERE a.owner <> b.owner OR r.owner <> a.owner RETURN count(r) AS n",
    )
    assert cross[0]["n"] == 0


def test_nodes_without_an_owner_are_seen_by_no_client(graph: Graph) -> None:
    run(
        graph,
        "CREATE (:Entity {key: 'PERSON:grace hopper', name: 'Grace Hopper', label: 'PERSON', mentions: 9})",
    )
    for owner in ("alice", "bob"):
        with pytest.raises(Refusal) as err:
            graph.query(owner, "Grace Hopper")
        assert err.value.status == 404
    graph.extract("alice", "Grace Hopper worked at Harvard.")
    assert neighbours(graph, "alice", "grace hopper") == {"Harvard": 1}
    rows = run(
        graph, "MATCH (n:Entity) WHERE n.name = 'Grace Hopper' AND n.owner IS NULL RETURN n.mentions AS m"
    )
    assert [r["m"] for r in rows] == [9]  # the legacy node is left alone, not merged into alice's


def test_an_empty_owner_is_refused(graph: Graph) -> None:
    for call in (
        lambda: graph.extract("", "Ada Lovelace met Charles Babbage."),
        lambda: graph.query(" ", "Ada"),
    ):
        with pytest.raises(Refusal) as err:
            call()
        assert err.value.status == 401


def counts(g: Graph, owner: str, a: str, b: str) -> tuple[list[int], list[int]]:
    """The owner's `mentions` of entities named `a` and the count of its CO_OCCURS edges between `a` and `b`."""
    mentions = run(
        g, "MATCH (n:Entity {owner: $owner}) WHERE n.name = $a RETURN n.mentions AS m", owner=owner, a=a
    )
    edges = run(
        g,
        "MATCH (x:Entity {owner: $owner})-[r:CO_OCCURS {owner: $owner}]-(y:Entity {owner: $owner}) "
        "WHERE x.name = $a AND y.name = $b RETURN r.count AS c",
        owner=owner,
        a=a,
        b=b,
    )
    return [r["m"] for r in mentions], [r["c"] for r in edges]


def test_a_piece_written_twice_is_counted_once_per_owner(graph: Graph) -> None:
    text = "Marie Curie met Pierre Curie in Warsaw."
    first = graph.extract("alice", text, "upload:1", True, "ingest:j1:0")
    assert first["written"] is True and first["already_written"] is False
    names = {e["name"] for e in first["entities"]}
    assert {"Marie Curie", "Pierre Curie"} <= names, first
    again = graph.extract("alice", text, "upload:1", True, "ingest:j1:0")
    # the same answer, computed from the text, but nothing written: the counts already hold this piece
    assert again["written"] is False and again["already_written"] is True
    assert (again["entities"], again["relations"]) == (first["entities"], first["relations"])
    assert counts(graph, "alice", "Marie Curie", "Pierre Curie") == ([1], [1])
    # another piece adds
    graph.extract("alice", text, "upload:1", True, "ingest:j1:1")
    assert counts(graph, "alice", "Marie Curie", "Pierre Curie") == ([2], [2])
    # another owner's same key is its own: counted in bob's graph, alice's unchanged
    assert graph.extract("bob", text, "upload:1", True, "ingest:j1:0")["written"] is True
    assert counts(graph, "bob", "Marie Curie", "Pierre Curie") == ([1], [1])
    assert counts(graph, "alice", "Marie Curie", "Pierre Curie") == ([2], [2])
    # an extract without a key (the online route) is counted every time, and answers as before
    online = graph.extract("alice", text)
    assert online["written"] is True and "already_written" not in online
    assert counts(graph, "alice", "Marie Curie", "Pierre Curie") == ([3], [3])
    # the markers are in the store, one per (owner, key), and no query shows them
    marks = run(
        graph,
        "MATCH (m:GraphPiece) WHERE m.key STARTS WITH 'ingest:j1:' RETURN m.owner AS owner, m.key AS key",
    )
    assert sorted((m["owner"], m["key"]) for m in marks) == [
        ("alice", "ingest:j1:0"),
        ("alice", "ingest:j1:1"),
        ("bob", "ingest:j1:0"),
    ]
    got = graph.query("alice", "Marie Curie")
    assert {n["name"] for n in got["neighbours"]} <= names and got["neighbours"]
    assert not {n["label"] for n in got["neighbours"]} - {e["label"] for e in first["entities"]}
    for key in ("ingest:j1:0", "GraphPiece"):
        with pytest.raises(Refusal) as err:
            graph.query("alice", key)
        assert err.value.status == 404


def test_writers_of_one_piece_at_once_count_it_once(graph: Graph, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runners of the same piece at once (one thought dead, still running): both transactions have written
    before either commits; one commits, the other fails on the marker's constraint, is run again and finds the
    marker. The piece is counted once."""
    text = "Niels Bohr lectured in Copenhagen."
    write, both_written = Graph._write, threading.Barrier(2)
    attempts: list[bool] = []

    def held(tx: Any, *args: Any) -> bool:
        written = write(tx, *args)
        attempts.append(written)
        if len(attempts) <= 2:  # each runner's first transaction waits, uncommitted, for the other's
            both_written.wait(30)
        return written

    monkeypatch.setattr(Graph, "_write", staticmethod(held))
    out: list[dict[str, Any]] = []
    threads = [
        threading.Thread(target=lambda: out.append(graph.extract("carol", text, None, True, "ingest:j2:0")))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(o["written"] for o in out) == [False, True], out
    # ArcadeDB: both first transactions wrote, the loser's commit was refused, its second run found the marker
    assert attempts == [True, True, False]
    assert counts(graph, "carol", "Niels Bohr", "Copenhagen") == ([1], [1])


def test_a_bad_piece_key_is_refused(graph: Graph) -> None:
    for piece in ("", "k" * 201):
        with pytest.raises(Refusal) as err:
            graph.extract("alice", "Ada Lovelace met Charles Babbage.", None, True, piece)
        assert err.value.status == 400 and "piece key" in err.value.message
