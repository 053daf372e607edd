"""The Batch API under the client quotas: a batch item's tokens count against the key that created the batch,
as an online request's do, and an item that starts once the key's tokens for the day are spent is not run (its
error line carries the 429 an online request gets); a /v1/files upload is charged to the day's upload quota.
On the store and runner of tests/unit/test_batches.py (a real PostgreSQL, ~3 s, session-scoped; each test its
own database), the meter in this process's memory, no Ray."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from deployments.gateway.quota import Meter, set_meter
from deployments.services import batch_format as bf
from rma_ray.wire import Quota
from tests.support import Postgres
from tests.unit.test_batches import jsonl, line, lines, make_store, until

PROMPT, COMPLETION = 100, 50


class UsageModels:
    """Answers every item as the LLM does, with its usage (150 tokens); counts the calls."""

    def __init__(self) -> None:
        self.calls = 0

    async def call(self, endpoint: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.calls += 1
        usage = {
            "prompt_tokens": PROMPT,
            "completion_tokens": COMPLETION,
            "total_tokens": PROMPT + COMPLETION,
        }
        return 200, {"object": "chat.completion", "choices": [], "usage": usage}


@pytest.fixture
def meter() -> Any:
    m = Meter(None)
    set_meter(m)
    yield m
    set_meter(None)


def test_batch_items_are_charged_to_the_key_and_stop_when_its_tokens_are_spent(
    postgres: Postgres, tmp_path: Any, meter: Meter
) -> None:
    """Two items (300 tokens) spend a quota of 300: the other three are refused as an online request would be,
    without a model call; a batch made with no key (one from before) is not charged."""
    store = make_store(postgres, tmp_path, batch_concurrency=1)
    store.models = UsageModels()

    async def scenario() -> None:
        data = jsonl(*(line(f"req-{i}") for i in range(5)))
        fid = store.put_file(data, "in.jsonl", "batch", "alice")["id"]
        b = await store.create(
            "alice", fid, "/v1/chat/completions", "24h", None, "k1", Quota(tokens_per_day=300)
        )
        await store.ensure_runner()
        await until(lambda: store.get(b["id"], "alice")["status"] == bf.COMPLETED, "the batch completed")
        final = store.get(b["id"], "alice")
        assert final["request_counts"] == {"total": 5, "completed": 2, "failed": 3}
        assert store.models.calls == 2
        used = await meter.usage("k1")
        assert (used["tokens_in"], used["tokens_out"]) == (2 * PROMPT, 2 * COMPLETION)
        errors = lines(store, final["error_file_id"])
        assert len(errors) == 3
        for e in errors:  # OpenAI's error line for a request that got an HTTP error: the online 429's body
            assert e["error"] is None and e["response"]["status_code"] == 429
            err = e["response"]["body"]["error"]
            assert err["code"] == "token_quota_exceeded" and "300 of its 300 LLM tokens" in err["message"]
        # the quota spent, an old batch (no key recorded) still runs and charges no key
        fid2 = store.put_file(jsonl(line("old")), "in2.jsonl", "batch", "alice")["id"]
        old = await store.create("alice", fid2, "/v1/chat/completions", "24h")
        await until(
            lambda: store.get(old["id"], "alice")["status"] == bf.COMPLETED, "the old batch completed"
        )
        assert store.get(old["id"], "alice")["request_counts"]["completed"] == 1
        assert set(await meter.today()) == {"k1"}

    asyncio.run(scenario())


def test_a_files_upload_past_the_day_s_upload_quota_is_refused_and_not_stored(
    postgres: Postgres, tmp_path: Any, meter: Meter
) -> None:
    import openai
    from starlette.applications import Starlette
    from starlette.responses import Response

    from deployments.gateway import auth
    from deployments.gateway.keys import ClientKeyVerifier
    from deployments.services.batch_api import FILES_PREFIX, files_api
    from rma_ray import credentials
    from tests.support import ServerThread

    data = jsonl(line("a"), line("b"))
    store = make_store(postgres, tmp_path, batch_runner=False)
    key = credentials.mint(credentials.Kind.CLIENT)
    quota = {"upload_bytes_per_day": len(data) * 3 // 2}
    ring = {"keys": [{"id": key.id, "hash": key.hash, "name": "alice", "quota": quota}]}
    verifier = ClientKeyVerifier(lambda: ring, refresh_s=3600)
    verifier.refresh()
    api = files_api(store.settings, store)

    async def serve_like(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/healthz":
            await Response("ok")(scope, receive, send)
        elif scope["type"] == "http":
            await api({**scope, "root_path": FILES_PREFIX}, receive, send)
        else:
            await Starlette()(scope, receive, send)

    auth.set_verifier(verifier)
    try:
        with ServerThread(serve_like) as server:
            alice = openai.OpenAI(base_url=server.url + "/v1", api_key=key.token, max_retries=0)
            first = alice.files.create(file=("in.jsonl", data), purpose="batch")
            with pytest.raises(openai.RateLimitError) as exc:
                alice.files.create(file=("again.jsonl", data), purpose="batch")
            assert exc.value.code == "upload_quota_exceeded"
            assert (
                f"used {len(data):,} of its {quota['upload_bytes_per_day']:,} upload bytes"
                in exc.value.message
            )
            assert exc.value.response.headers["Retry-After"]
            assert [f.id for f in alice.files.list()] == [first.id]  # nothing stored
        assert asyncio.run(meter.usage(key.id))["upload_bytes"] == len(data)
    finally:
        auth.set_verifier(None)
