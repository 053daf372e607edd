"""The Batch API without Ray: the input file's checks and the batch's state machine (pure), then the store and
the runner (`deployments.services.batches`) on a real PostgreSQL with procrastinate's real worker, the models
replaced by an object in this process (the private server is session-scoped, ~3 s; each test its own
database)."""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass
from typing import Any

import pytest

from deployments.gateway.refusal import Refusal
from deployments.services import batch_format as bf
from tests.support import Postgres


def line(cid: str, url: str = "/v1/chat/completions", **over: Any) -> dict[str, Any]:
    return {"custom_id": cid, "method": "POST", "url": url, "body": {"messages": [{"role": "user"}]}, **over}


def jsonl(*objs: Any) -> bytes:
    return b"\n".join(o if isinstance(o, bytes) else json.dumps(o).encode() for o in objs) + b"\n"


def test_a_good_file_gives_its_endpoint_and_items_in_order() -> None:
    endpoint, items = bf.check_jsonl(jsonl(line("a"), b"", line("b")), max_lines=10)
    assert endpoint == "/v1/chat/completions"
    assert [(i.line, i.custom_id) for i in items] == [(1, "a"), (3, "b")]
    # lines end at "\n" (a "\r" before it dropped); U+2028 and U+0085 inside a string are text, not ends
    raw = json.dumps(line("c\u2028d", body={"tag": "x\u0085y"}), ensure_ascii=False).encode()
    _, items = bf.check_jsonl(raw + b"\r\n" + json.dumps(line("e")).encode() + b"\r\n", max_lines=10)
    assert [(i.line, i.custom_id) for i in items] == [(1, "c\u2028d"), (2, "e")]
    assert items[0].body == {"tag": "x\u0085y"}


@pytest.mark.parametrize(
    ("objs", "says"),
    [
        ((line("a"), b"{not json"), "line 2: not valid JSON"),
        ((line("a"), line("a")), "line 2: custom_id 'a' is also on line 1"),
        ((line("a", method="GET"),), 'line 1: method must be "POST"'),
        ((line("a", url="/v1/images"),), "line 1: url must be one of"),
        ((line("a"), line("b", url="/v1/embeddings")), "line 2: url '/v1/embeddings' differs"),
        ((line("a", body="hi"),), "line 1: body must be a JSON object"),
        ((line("a", body={"stream": True}),), "line 1: body.stream must be false"),
        ((line("", url="/v1/completions"),), "line 1: custom_id must be a non-empty string"),
        ((line("a", extra=1),), "line 1: unknown field 'extra'"),
        (([1, 2],), "line 1: a line must be a JSON object"),
        ((line("a"), line("b"), line("c")), "line 3: the file has more than 2 requests"),
        ((b"", b"  "), "the file has no requests"),
        ((line("a"), line("b\0c")), "line 2: custom_id must not contain a NUL"),
    ],
)
def test_a_bad_file_is_a_400_naming_the_line_and_the_fix(objs: tuple[Any, ...], says: str) -> None:
    with pytest.raises(Refusal) as exc:
        bf.check_jsonl(jsonl(*objs), max_lines=2)
    assert exc.value.status == 400 and exc.value.code == "invalid_batch_file"
    assert exc.value.message.startswith(says), exc.value.message


def test_the_state_machine_moves_as_openai_batches_do() -> None:
    s = bf.move(bf.VALIDATING, "start")
    assert s == bf.IN_PROGRESS
    assert bf.move(s, "cancel") == bf.CANCELLING
    assert bf.move(bf.CANCELLING, "drained") == bf.FINALIZING
    assert bf.move(bf.IN_PROGRESS, "drained") == bf.FINALIZING
    assert bf.finished_status(cancelled=False) == bf.COMPLETED
    assert bf.finished_status(cancelled=True) == bf.CANCELLED
    assert bf.move(bf.IN_PROGRESS, "expire") == bf.EXPIRED
    for final in bf.FINAL:
        with pytest.raises(Refusal) as exc:
            bf.move(final, "cancel")
        assert exc.value.status == 409 and f"a batch that is {final} cannot be cancelled" in exc.value.message
    assert bf.request_counts(5, {bf.DONE: 3, bf.ITEM_FAILED: 1, bf.SKIPPED: 1}) == {
        "total": 5,
        "completed": 3,
        "failed": 1,
    }


# -- the store and the runner on a real Postgres, procrastinate's worker in this process ---------------------


@dataclass
class Endpoint:
    host: str
    port: int
    user: str = "rma"
    password: str = ""
    database: str = "postgres"


class FakeModels:
    """Answers like the online route: a 400 for a body that asks for it, else an echo; `gate` holds calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.gate: asyncio.Event | None = None

    async def call(self, endpoint: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.calls.append(body["tag"])
        if self.gate is not None:
            await self.gate.wait()
        if body.get("bad"):
            return 400, {"error": {"message": "bad request", "code": "invalid_request"}}
        return 200, {"object": "chat.completion", "echo": body["tag"]}


def make_store(postgres: Postgres, tmp_path: Any, **settings: Any) -> Any:
    from deployments.services.batches import Batches

    s = {
        "database": f"t_{uuid.uuid4().hex[:12]}",
        "uploads_dir": str(tmp_path / "blobs"),
        "batch_concurrency": 2,
        **settings,
    }
    store = Batches(s, endpoint=lambda _store: Endpoint(postgres.host, postgres.port), models=FakeModels())
    return store


def upload(store: Any, n: int, owner: str = "alice", bad: frozenset[int] = frozenset()) -> str:
    data = jsonl(
        *(
            {
                "custom_id": f"req-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"tag": f"req-{i}", **({"bad": True} if i in bad else {})},
            }
            for i in range(n)
        )
    )
    f = store.put_file(data, "in.jsonl", "batch", owner)
    assert f["object"] == "file" and f["purpose"] == "batch" and f["bytes"] == len(data)
    return str(f["id"])


async def until(predicate: Any, what: str, timeout: float = 30) -> Any:
    try:
        async with asyncio.timeout(timeout):
            while not (out := await asyncio.to_thread(predicate)):
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"waited {timeout} s for {what}") from None
    return out


def lines(store: Any, file_id: str | None, owner: str = "alice") -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(x) for x in store.read_file(file_id, owner)[1].splitlines()]


def test_a_batch_runs_every_item_once_and_writes_openai_output_and_error_files(
    postgres: Postgres, tmp_path: Any
) -> None:
    store = make_store(postgres, tmp_path)

    async def scenario() -> None:
        fid = upload(store, 12, bad={4})
        b = await store.create("alice", fid, "/v1/chat/completions", "24h", {"job": "nightly"})
        assert b["status"] == bf.IN_PROGRESS and b["request_counts"]["total"] == 12
        await store.ensure_runner()
        done = await until(lambda: store.get(b["id"], "alice")["status"] == bf.COMPLETED, "completed")
        assert done
        final = store.get(b["id"], "alice")
        assert final["request_counts"] == {"total": 12, "completed": 11, "failed": 1}
        assert final["metadata"] == {"job": "nightly"} and final["completed_at"] >= final["in_progress_at"]
        out, err = lines(store, final["output_file_id"]), lines(store, final["error_file_id"])
        assert sorted(x["custom_id"] for x in out) == sorted(f"req-{i}" for i in range(12) if i != 4)
        assert [x["custom_id"] for x in err] == ["req-4"]
        one = out[0]
        assert set(one) == {"id", "custom_id", "response", "error"} and one["error"] is None
        assert one["response"]["status_code"] == 200 and one["response"]["body"]["echo"] == one["custom_id"]
        assert err[0]["response"]["status_code"] == 400
        assert sorted(store.models.calls) == sorted(f"req-{i}" for i in range(12))  # each model call once
        # written once: a late second answer for a finished item changes nothing
        assert store.record(b["id"], "req-0", True, {"late": True}) is False
        # another client's key: the batch and its files do not exist
        for call in (
            lambda: store.get(b["id"], "bob"),
            lambda: store.get_file(fid, "bob"),
            lambda: store.read_file(final["output_file_id"], "bob"),
        ):
            with pytest.raises(Refusal) as exc:
                call()
            assert exc.value.status == 404
        page = store.list("alice", limit=1)
        assert page["object"] == "list" and page["data"][0]["id"] == b["id"] and page["has_more"] is False
        assert store.list("bob")["data"] == []

    asyncio.run(scenario())


def test_cancel_stops_new_items_and_a_client_has_a_limit_of_unfinished_batches(
    postgres: Postgres, tmp_path: Any
) -> None:
    store = make_store(postgres, tmp_path, batch_max_attempts=2, batch_max_queued=2)

    async def scenario() -> None:
        try:
            store.models.gate = asyncio.Event()
            b = await store.create("alice", upload(store, 10), "/v1/chat/completions", "24h")
            await store.ensure_runner()
            await until(
                lambda: len(store.models.calls) == 2, "two items in flight (the runner's concurrency)"
            )
            c = await store.cancel(b["id"], "alice")
            assert c["status"] == bf.CANCELLING and c["cancelling_at"]
            store.models.gate.set()
            await until(lambda: store.get(b["id"], "alice")["status"] == bf.CANCELLED, "cancelled")
            final = store.get(b["id"], "alice")
            assert final["request_counts"] == {"total": 10, "completed": 2, "failed": 0}
            assert len(lines(store, final["output_file_id"])) == 2 and len(store.models.calls) == 2
            with pytest.raises(Refusal) as exc:
                await store.cancel(b["id"], "bob")
            assert exc.value.status == 404

            # per-client limit: two unfinished batches at most
            store.models.gate = asyncio.Event()
            await store.create("alice", upload(store, 1), "/v1/chat/completions", "24h")
            await store.create("alice", upload(store, 1), "/v1/chat/completions", "24h")
            with pytest.raises(Refusal) as exc:
                await store.create("alice", upload(store, 1), "/v1/chat/completions", "24h")
            assert exc.value.status == 429 and "limit is 2" in exc.value.message
            store.models.gate.set()
        finally:  # a failed assertion must not leave the runner waiting on the gate
            if store.models.gate is not None:
                store.models.gate.set()

    asyncio.run(scenario())


def age(store: Any, batch_id: str) -> None:
    """The batch's items last touched long ago (their runner silent past `batch_stalled_s`)."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import update

    from deployments.services.db import BatchItem

    with store.db.sessions().begin() as db:
        db.execute(
            update(BatchItem)
            .where(BatchItem.batch_id == batch_id)
            .values(updated_at=datetime.now(UTC) - timedelta(hours=1))
        )


def test_an_item_claimed_past_its_attempts_gets_an_error_line_not_a_call(
    postgres: Postgres, tmp_path: Any
) -> None:
    store = make_store(postgres, tmp_path, batch_max_attempts=2, batch_runner=False)

    async def scenario() -> None:
        b = await store.create("alice", upload(store, 1), "/v1/chat/completions", "24h")
        # two runners died mid-item (each claimed and started it, neither wrote its answer)
        assert store.claim(b["id"], "req-0")[2] == 0 and store.start(b["id"], "req-0", 0)
        await store.run_item(b["id"], "req-0")  # started just now: another job's, not run twice
        assert store.models.calls == [] and store.get(b["id"], "alice")["status"] == bf.IN_PROGRESS
        age(store, b["id"])
        assert store.claim(b["id"], "req-0")[2] == 1 and store.start(b["id"], "req-0", 1)
        age(store, b["id"])
        await store.run_item(b["id"], "req-0")  # the third start: no model call, an error line
        final = store.get(b["id"], "alice")
        assert final["status"] == bf.COMPLETED and store.models.calls == []
        (err,) = lines(store, final["error_file_id"])
        assert err["response"] is None and err["error"]["code"] == "attempts_exhausted"

    asyncio.run(scenario())


def test_an_item_is_started_once_however_many_jobs_claim_it(postgres: Postgres, tmp_path: Any) -> None:
    """A claimed item may wait for a model-call slot; a second job of it (the sweep's re-defer, a stalled-job
    retry) claims it once the first looks silent. Only one of them starts the model call; a long call keeps
    the item touched, so no other job claims it meanwhile."""
    from deployments.services.batches import Busy

    store = make_store(postgres, tmp_path, batch_runner=False)

    async def scenario() -> None:
        b = await store.create("alice", upload(store, 1), "/v1/chat/completions", "24h")
        first = store.claim(b["id"], "req-0")[2]
        with pytest.raises(Busy):
            store.claim(b["id"], "req-0")  # claimed just now
        age(store, b["id"])  # the first job waits for a slot past batch_stalled_s
        second = store.claim(b["id"], "req-0")[2]
        assert first == second == 0
        assert store.start(b["id"], "req-0", first) is True
        assert store.start(b["id"], "req-0", second) is False  # started since its claim: no second call
        age(store, b["id"])
        store.touch(b["id"], "req-0", 1)  # the first job's call goes on
        with pytest.raises(Busy):
            store.claim(b["id"], "req-0")

    asyncio.run(scenario())


def test_the_sweep_runs_every_ten_seconds() -> None:
    from datetime import datetime

    from croniter import croniter

    from deployments.services.batches import SWEEP_CRON

    it = croniter(SWEEP_CRON, datetime(2026, 1, 1, 0, 1, 3))
    assert [it.get_next(datetime).second for _ in range(3)] == [10, 20, 30]


def test_a_runner_that_died_mid_item_is_replaced_and_the_item_is_in_the_output_once(
    postgres: Postgres, tmp_path: Any
) -> None:
    """A runner's process killed while it ran an item: its worker stops beating, its job stays `doing`; the
    sweep of a live runner puts the job back, the item runs again and is written once."""
    import psycopg

    from deployments.services.db import BatchItem

    store = make_store(postgres, tmp_path, batch_stalled_s=2)

    async def scenario() -> None:
        store.settings.batch_runner = False  # jobs queued, no worker yet
        b = await store.create("alice", upload(store, 6), "/v1/chat/completions", "24h")
        assert store.claim(b["id"], "req-3")[2] == 0  # the dead runner had started req-3 ...
        assert store.start(b["id"], "req-3", 0)
        conninfo = f"host={postgres.host} port={postgres.port} user=rma dbname={store.settings.database}"
        with psycopg.connect(conninfo, autocommit=True) as c:  # ... as worker 'dead', silent for an hour
            c.execute("SET search_path TO procrastinate")
            wid = c.execute(
                "INSERT INTO procrastinate_workers (last_heartbeat) "
                "VALUES (now() - interval '1 hour') RETURNING id"
            ).fetchone()[0]
            c.execute(
                "UPDATE procrastinate_jobs SET status = 'doing', worker_id = %s "
                "WHERE args->>'custom_id' = 'req-3'",
                (wid,),
            )
        store.settings.batch_runner = True
        await store.ensure_runner()
        # the periodic sweep (every 10 s) finds the job of the silent worker and puts it back
        await until(
            lambda: store.get(b["id"], "alice")["status"] == bf.COMPLETED, "the batch to complete", 60
        )
        assert sorted(store.models.calls) == [
            f"req-{i}" for i in range(6)
        ]  # req-3 asked once, by the live one
        with store.db.sessions()() as db:
            assert db.get(BatchItem, (b["id"], "req-3")).attempts == 2
        final = store.get(b["id"], "alice")
        out = lines(store, final["output_file_id"])
        assert sorted(x["custom_id"] for x in out) == [f"req-{i}" for i in range(6)]
        assert final["request_counts"] == {"total": 6, "completed": 6, "failed": 0}

    asyncio.run(scenario())


def test_an_unexpected_model_error_and_an_expired_running_item_both_reach_a_final_state(
    postgres: Postgres, tmp_path: Any
) -> None:
    from sqlalchemy import update

    from deployments.services.db import Batch

    store = make_store(postgres, tmp_path, batch_runner=False)

    async def boom(endpoint: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        raise RuntimeError("the handle broke")

    async def scenario() -> None:
        with pytest.raises(Refusal) as exc:
            store.put_file(jsonl(line("x")), "in\0.jsonl", "batch", "alice")
        assert exc.value.status == 400 and "NUL" in exc.value.message
        b = await store.create("alice", upload(store, 2), "/v1/chat/completions", "24h")
        store.models.call = boom
        await store.run_item(b["id"], "req-0")  # no exception escapes: the item has an error line
        # req-1 was claimed by a runner that never answers; then the batch's window passes
        assert store.claim(b["id"], "req-1") is not None
        with store.db.sessions().begin() as db:
            db.execute(update(Batch).where(Batch.id == b["id"]).values(expires_at=Batch.created_at))
        store._expire_and_unstarted()
        store.finalize(b["id"])
        final = store.get(b["id"], "alice")
        assert final["status"] == bf.EXPIRED and final["output_file_id"] is None
        err = {x["custom_id"]: x["error"] for x in lines(store, final["error_file_id"])}
        assert err["req-0"] == {"code": "internal_error", "message": "the handle broke"}
        assert err["req-1"]["code"] == "batch_expired"

    asyncio.run(scenario())


# -- the Files API: list, delete ------------------------------------------------------------------------------


def sha_of(store: Any, file_id: str) -> str:
    from deployments.services.db import BatchFile

    with store.db.sessions()() as db:
        return str(db.get(BatchFile, file_id).sha256)


def test_files_are_listed_per_owner_in_order_and_a_delete_keeps_bytes_another_file_or_upload_has(
    postgres: Postgres, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deployments.services.db import Upload

    store = make_store(postgres, tmp_path, batch_runner=False)

    def ids(**query: Any) -> list[str]:
        return [f["id"] for f in store.list_files("alice", **query)["data"]]

    def refused(call: Any) -> Refusal:
        with pytest.raises(Refusal) as exc:
            call()
        return exc.value

    async def scenario() -> None:
        f1, f2, f3 = upload(store, 2), upload(store, 3), upload(store, 3)  # f2 and f3: the same bytes
        bobs = upload(store, 1, owner="bob")
        b = await store.create("alice", f1, "/v1/chat/completions", "24h")
        gone = refused(lambda: store.delete_file(f1, "alice"))  # its batch would fail
        assert gone.status == 409 and b["id"] in gone.message and "in_progress" in gone.message
        for cid in ("req-0", "req-1"):
            await store.run_item(b["id"], cid)
        out = store.get(b["id"], "alice")["output_file_id"]
        assert store.get(b["id"], "alice")["status"] == bf.COMPLETED

        page = store.list_files("alice")
        assert set(page) == {"object", "data", "first_id", "last_id", "has_more"}
        assert page["object"] == "list" and page["has_more"] is False
        assert [f["id"] for f in page["data"]] == [out, f3, f2, f1]  # newest first, outputs are the owner's
        assert (page["first_id"], page["last_id"]) == (out, f1)
        assert page["data"][0]["purpose"] == "batch_output" and page["data"][0]["object"] == "file"
        assert ids(order="asc") == [f1, f2, f3, out]
        assert ids(purpose="batch") == [f3, f2, f1] and ids(purpose="batch_output") == [out]
        assert ids(purpose="fine-tune") == []
        two = store.list_files("alice", limit=2)
        assert [f["id"] for f in two["data"]] == [out, f3] and two["has_more"] is True
        assert ids(after=f3) == [f2, f1] and ids(after=f1, order="asc", limit=1) == [f2]
        monkeypatch.setattr(bf, "FILES_PAGE", 3)  # a page is bounded whatever the limit
        assert len(store.list_files("alice")["data"]) == 3 and store.list_files("alice")["has_more"]
        assert [f["id"] for f in store.list_files("bob")["data"]] == [bobs]
        assert store.list_files("bob", after=f1)["data"] == []  # another's id only places a time
        assert refused(lambda: store.list_files("alice", after="file-nope")).status == 404
        assert refused(lambda: store.list_files("alice", limit=0)).status == 400
        assert "order must be" in refused(lambda: store.list_files("alice", order="up")).message

        # the finished batch's input goes; its output stays
        assert refused(lambda: store.delete_file(f1, "bob")).status == 404
        sha1 = sha_of(store, f1)
        assert store.delete_file(f1, "alice") == {"id": f1, "object": "file", "deleted": True}
        for call in (lambda: store.get_file(f1, "alice"), lambda: store.read_file(f1, "alice")):
            assert refused(call).status == 404
        assert refused(lambda: store.delete_file(f1, "alice")).status == 404
        assert not store.blobs.path(sha1).exists()
        assert [x["custom_id"] for x in lines(store, out)] == ["req-0", "req-1"]

        # f2 and f3 share one blob; an upload of the same bytes keeps it too
        sha = sha_of(store, f2)
        store.delete_file(f2, "alice")
        assert store.blobs.path(sha).exists() and store.read_file(f3, "alice")[1]
        # a deleted file's id still places a list's cursor (a client deleting as it pages on)
        assert ids(after=f2, order="asc") == [f3, out] and ids(after=f2) == []
        with store.db.sessions().begin() as db:
            db.add(Upload(sha256=sha, owner="carol", content_type="application/jsonl", size=1))
        store.delete_file(f3, "alice")
        assert store.blobs.path(sha).exists()
        with store.db.sessions().begin() as db:
            db.query(Upload).filter(Upload.sha256 == sha).delete()
        f4 = upload(store, 3)  # the same bytes once more: the last reference, then none
        store.delete_file(f4, "alice")
        assert not store.blobs.path(sha).exists()
        assert ids() == [out]

    asyncio.run(scenario())


def test_the_official_openai_client_lists_retrieves_and_deletes_files_over_http(
    postgres: Postgres, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import openai
    from starlette.applications import Starlette
    from starlette.responses import Response

    from deployments.gateway import auth
    from deployments.gateway.keys import ClientKeyVerifier
    from deployments.services.batch_api import FILES_PREFIX, files_api
    from rma_ray import credentials
    from tests.support import ServerThread

    store = make_store(postgres, tmp_path, batch_runner=False)
    keys = {name: credentials.mint(credentials.Kind.CLIENT) for name in ("alice", "bob")}
    ring = {"keys": [{"id": k.id, "hash": k.hash, "name": name} for name, k in keys.items()]}
    verifier = ClientKeyVerifier(lambda: ring, refresh_s=3600)
    verifier.refresh()
    api = files_api(store.settings, store)

    async def serve_like(scope: dict[str, Any], receive: Any, send: Any) -> None:
        """As Serve hands the app requests: the full path, the route prefix as root_path."""
        if scope["type"] == "http" and scope["path"] == "/healthz":
            await Response("ok")(scope, receive, send)
        elif scope["type"] == "http":
            await api({**scope, "root_path": FILES_PREFIX}, receive, send)
        else:
            await Starlette()(scope, receive, send)

    auth.set_verifier(verifier)
    try:
        with ServerThread(serve_like) as server:
            alice, bob = (
                openai.OpenAI(base_url=server.url + "/v1", api_key=keys[name].token, max_retries=0)
                for name in ("alice", "bob")
            )
            data = jsonl(line("a"), line("b"))
            made = [alice.files.create(file=(f"in{i}.jsonl", data), purpose="batch") for i in range(3)]
            assert made[0].purpose == "batch" and made[0].bytes == len(data)
            listed = alice.files.list()
            assert [f.id for f in listed.data] == [f.id for f in reversed(made)] and not listed.has_more
            assert [f.id for f in alice.files.list(purpose="batch", order="asc")] == [f.id for f in made]
            assert alice.files.list(purpose="batch_output").data == []
            monkeypatch.setattr(bf, "FILES_PAGE", 2)  # the client follows has_more with `after`
            assert [f.id for f in alice.files.list()] == [f.id for f in reversed(made)]
            got = alice.files.retrieve(made[1].id)
            assert (got.filename, got.status, got.object) == ("in1.jsonl", "processed", "file")
            assert bob.files.list().data == []
            with pytest.raises(openai.NotFoundError):
                bob.files.delete(made[1].id)
            deleted = alice.files.delete(made[1].id)
            assert (deleted.id, deleted.deleted, deleted.object) == (made[1].id, True, "file")
            for gone in (alice.files.retrieve, alice.files.content, alice.files.delete):
                with pytest.raises(openai.NotFoundError):
                    gone(made[1].id)
            assert alice.files.content(made[2].id).content == data  # the same bytes, still there
            with pytest.raises(openai.UnprocessableEntityError):
                alice.files.list(order="sideways")  # type: ignore[arg-type]
            # the usual clean-up loop: deleting as the client pages on (pages of 2, `after` a deleted id)
            more = [alice.files.create(file=(f"m{i}.jsonl", data), purpose="batch") for i in range(3)]
            for f in alice.files.list():
                alice.files.delete(f.id)
            assert alice.files.list().data == [] and len(more) == 3
    finally:
        auth.set_verifier(None)


def test_the_queue_figures_count_items_by_state_and_age_the_oldest_waiting_batch(
    postgres: Postgres, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The registry page's figures, from the real tables (no runner: rows written as the runner would)."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import update

    from deployments.services.db import Batch, BatchItem

    now = datetime.now(UTC)
    reports: list[Any] = []
    store = make_store(postgres, tmp_path)
    store._reporter = reports.append
    no_jobs = {"queued": 0, "running": 0, "oldest_queued_s": None, "succeeded_10min": 0, "failed_10min": 0,
               "pages_10min": 0}  # fmt: skip
    assert store.queue_figures(now) == {
        "waiting": 0, "running": 0, "batches": 0, "oldest_waiting_s": None, "finished_10min": 0, "jobs": no_jobs
    }  # fmt: skip

    def batch(n: int, created: datetime, status: str = bf.IN_PROGRESS) -> str:
        out, _ = store._create("alice", upload(store, n), "/v1/chat/completions", "24h", None)
        with store.db.sessions().begin() as db:
            db.execute(update(Batch).where(Batch.id == out["id"]).values(status=status, created_at=created))
        return str(out["id"])

    def items(bid: str, status: str, ids: range, at: datetime) -> None:
        with store.db.sessions().begin() as db:
            db.execute(
                update(BatchItem)
                .where(BatchItem.batch_id == bid, BatchItem.custom_id.in_([f"req-{i}" for i in ids]))
                .values(status=status, updated_at=at)
            )

    old = batch(5, now - timedelta(minutes=3))  # 2 waiting, 1 running, 1 done now, 1 failed an hour ago
    items(old, bf.RUNNING, range(2, 3), now)
    items(old, bf.DONE, range(3, 4), now - timedelta(minutes=2))
    items(old, bf.ITEM_FAILED, range(4, 5), now - timedelta(hours=1))
    new = batch(2, now - timedelta(seconds=30), bf.VALIDATING)  # 2 waiting, a younger batch
    ended = batch(4, now - timedelta(hours=2), bf.COMPLETED)  # finished 5 min ago: its answers count
    items(ended, bf.DONE, range(3), now - timedelta(minutes=5))
    items(ended, bf.ITEM_FAILED, range(3, 4), now - timedelta(minutes=5))  # failed (unrun): not throughput
    with store.db.sessions().begin() as db:
        db.execute(update(Batch).where(Batch.id == ended).values(completed_at=now - timedelta(minutes=5)))
    gone = batch(4, now - timedelta(days=2), bf.COMPLETED)  # finished long ago: left out
    items(gone, bf.DONE, range(4), now - timedelta(days=1))
    with store.db.sessions().begin() as db:
        db.execute(update(Batch).where(Batch.id == gone).values(completed_at=now - timedelta(days=1)))

    got = store.queue_figures(now)
    assert got["oldest_waiting_s"] == pytest.approx(180, abs=1)
    assert {k: v for k, v in got.items() if k != "oldest_waiting_s"} == {
        "waiting": 4, "running": 1, "batches": 2, "finished_10min": 4, "jobs": no_jobs
    }  # fmt: skip
    assert new

    # the sweep's report: the figures with this replica's name; a failing coordinator is one warning
    asyncio.run(store.report_queue())
    assert reports[-1].waiting == 4 and reports[-1].replica

    def down(body: Any) -> None:
        raise ConnectionError("connection refused")

    store._reporter = down
    with caplog.at_level("DEBUG", logger="rma.services.batches"):
        asyncio.run(store.report_queue())
        asyncio.run(store.report_queue())
    said = [r.levelname for r in caplog.records if "batch queue figures not reported" in r.getMessage()]
    assert said == ["WARNING", "DEBUG"]
