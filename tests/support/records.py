"""1,000 acknowledged records per store kind, and counting them back: what the store durability tests and
`bench.stores` write before a kill and read after it. Endpoints are `deployments.stores.kinds.Endpoint` or dicts
of its fields. Run as a module on a donor host (netns), endpoints JSON on stdin (passwords never on a command line):

    python -m tests.support.records write|count < endpoints.json      # prints {"<store>": n, ...}
"""

from __future__ import annotations

import json
import sys
from typing import Any

from deployments.stores.kinds import Endpoint

N = 1000


def _ep(ep: Any) -> Endpoint:
    return ep if isinstance(ep, Endpoint) else Endpoint(**ep)


def write_1000(store: str, ep: Any) -> int:
    """Write N records, each acknowledged by the store; returns how many were acknowledged."""
    ep = _ep(ep)
    if store == "redis":
        import redis

        r = redis.Redis(host=ep.host, port=ep.port, password=ep.password)
        return sum(1 for i in range(N) if r.set(f"rec:{i}", f"v{i}"))
    if store == "postgres":
        import psycopg

        n = 0
        with psycopg.connect(ep.url(), autocommit=True) as c:
            c.execute("CREATE TABLE IF NOT EXISTS recs (id int PRIMARY KEY, v text)")
            for i in range(N):  # autocommit: each INSERT is committed when it returns
                c.execute("INSERT INTO recs VALUES (%s, %s) ON CONFLICT DO NOTHING", (i, f"v{i}"))
                n += 1
        return n
    if store == "chroma":
        import chromadb

        col = chromadb.HttpClient(host=ep.host, port=ep.port).get_or_create_collection(
            "recs", embedding_function=None
        )
        for s in range(
            0, N, 100
        ):  # explicit embeddings: no embedding model is loaded (none may be downloaded)
            col.upsert(
                ids=[f"r{i}" for i in range(s, s + 100)],
                documents=[f"v{i}" for i in range(s, s + 100)],
                embeddings=[[float(i % 5), 1.0] for i in range(s, s + 100)],
            )
        return N
    if store == "graph":
        from neo4j import GraphDatabase

        with (
            GraphDatabase.driver(ep.url(), auth=(ep.user, ep.password)) as d,
            d.session(database=ep.database) as s,
        ):
            s.run("UNWIND range(0, $n - 1) AS i MERGE (r:Rec {id: i})", n=N).consume()
        return N
    raise ValueError(f"unknown store {store!r}")


def count(store: str, ep: Any) -> int:
    """How many of the N records read back intact."""
    ep = _ep(ep)
    if store == "redis":
        import redis

        r = redis.Redis(host=ep.host, port=ep.port, password=ep.password)
        return sum(1 for i in range(N) if r.get(f"rec:{i}") == f"v{i}".encode())
    if store == "postgres":
        import psycopg

        with psycopg.connect(ep.url()) as c:
            return int(c.execute("SELECT count(*) FROM recs WHERE v = 'v' || id").fetchone()[0])  # type: ignore[index]
    if store == "chroma":
        import chromadb

        col = chromadb.HttpClient(host=ep.host, port=ep.port).get_collection("recs")
        got = col.get(ids=[f"r{i}" for i in range(N)], include=["documents"])
        return sum(1 for i, d in zip(got["ids"], got["documents"] or [], strict=False) if d == f"v{i[1:]}")
    if store == "graph":
        from neo4j import GraphDatabase

        with (
            GraphDatabase.driver(ep.url(), auth=(ep.user, ep.password)) as d,
            d.session(database=ep.database) as s,
        ):
            q = "MATCH (r:Rec) WHERE r.id >= 0 AND r.id < $n RETURN count(DISTINCT r.id) AS n"
            return int(s.run(q, n=N).single()["n"])  # type: ignore[index]
    raise ValueError(f"unknown store {store!r}")


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("write", "count"):
        print("usage: python -m tests.support.records write|count < endpoints.json", file=sys.stderr)
        return 2
    eps = json.load(sys.stdin)
    do = write_1000 if argv[0] == "write" else count
    print(json.dumps({store: do(store, ep) for store, ep in eps.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
