"""Client usage and quotas, at the one place every ingress passes (`deployments.gateway.auth.current_client`):
each request with a valid client key is counted once, and checked against the key's quota (the keyring carries
each key's effective quota: `rma_ray.wire.Quota`).

- requests per minute: the `limits` library's moving window (exactly N in any 60 s), its counter in the pool's
  Redis store, so the limit holds across every gateway and ingress replica;
- LLM tokens (in + out) and upload bytes per UTC day: counters per key per day in a Redis hash
  (`rma:usage:<day>:<key id>`, kept 35 days). A replica counts in memory and adds its counts to Redis every
  second (one pipeline for all keys, reading the totals back), so counting costs a request no round trip; the
  day's quotas are checked against those totals (up to a second old across replicas; uploads are checked
  against Redis of now). A key at its day's quota gets 429 until UTC midnight. Tokens are added once the LLM
  has answered (`CountTokens`; a batch item's by the batch runner, `Meter.add_tokens`, to the key that created
  the batch, and an item that starts past the quota is refused: `Meter.check_tokens`), so the request that
  crosses the quota is served and the next one is refused.

A refusal is a 429 with `Retry-After` and `X-RateLimit-Limit`, `X-RateLimit-Remaining`, `X-RateLimit-Reset`
(seconds until the window frees a request).

Fail open: when Redis cannot be reached (or its endpoint not yet found), the replica counts in its own memory
(the same quotas, per replica: a client may get up to N times its quota across N replicas), says so once in
the log, in `/api/usage` and in its report to the coordinator (the registry page shows it), tries Redis again
every `retry_s`, and adds what it counted meanwhile to the shared counters once Redis is back. Only the
per-minute limit takes a Redis round trip per request, and only for a key that has one.

The core's re-run of a sampled edge answer (`deployments.gateway.spotcheck`) is never counted: its ASGI scope
carries `SPOT_CHECK` (`CountTokens` passes it through) and it runs with `spot_checking` set (the meter counts
nothing in that context: no request, no tokens, no upload bytes).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta
from typing import Any

from deployments.gateway.refusal import Refusal

log = logging.getLogger("rma.quota")
DAY_TTL_S = 35 * 86400
FIELDS = ("requests", "tokens_in", "tokens_out", "upload_bytes")
PREFIX = "rma:usage"
METER_ENV = "RMA_METER"  # "off": no counting and no quotas in this process (a bench's baseline)
REPORT_ENV = "RMA_USAGE_REPORT_S"  # how often a replica reports the day's usage to the coordinator
# ASGI scope flag: the core's re-run of an edge answer, never the client's usage
SPOT_CHECK = "rma.spot_check"
# set (in its own task) while the core re-runs an edge answer: the meter counts nothing of that run
spot_checking: ContextVar[bool] = ContextVar("rma_spot_checking", default=False)


def day_of(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d")


def seconds_to_midnight(now: float) -> int:
    t = datetime.fromtimestamp(now, UTC)
    midnight = (t + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1, math.ceil((midnight - t).total_seconds()))


def usage_key(day: str, key_id: str) -> str:
    return f"{PREFIX}:{day}:{key_id}"


def limited(code: str, message: str, limit: int, remaining: int, reset_s: int) -> Refusal:
    """The 429: Retry-After and the X-RateLimit-* headers (reset: seconds until a request is allowed)."""
    reset_s = max(1, reset_s)
    return Refusal(
        429,
        code,
        message,
        reset_s,
        headers={
            "X-RateLimit-Limit": str(limit),
            "X-RateLimit-Remaining": str(max(0, remaining)),
            "X-RateLimit-Reset": str(reset_s),
        },
    )


def day_refusal(code: str, what: str, used: int, limit: int, now: float) -> Refusal:
    reset = seconds_to_midnight(now)
    return limited(
        code,
        f"this API key used {used:,} of its {limit:,} {what} for today (UTC); the quota resets in {reset} s "
        f"(ask the pool's admin for a larger quota: `rma clients quota`)",
        limit,
        limit - used,
        reset,
    )


class StorageDown(Exception):
    """The shared store failed: the caller counts in memory instead."""


class Meter:
    """Counts and limits per client key. `connect()` returns the async Redis client of the pool's store (a
    `redis.asyncio.Redis`); None: never shared (tests, a pool without Redis). All methods run on the
    replica's event loop."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[Any]] | None,
        *,
        retry_s: float = 5.0,
        clock: Callable[[], float] = time.time,
        reporter: Callable[[Any], None] | None = None,
        report_every_s: float = 30.0,
        flush_s: float = 1.0,
    ) -> None:
        from limits.aio.storage import MemoryStorage
        from limits.aio.strategies import MovingWindowRateLimiter

        self._connect, self.retry_s, self.clock = connect, retry_s, clock
        self._redis: Any = None
        self._shared_limiter: Any = None
        self._memory_limiter = MovingWindowRateLimiter(MemoryStorage())
        self.down_since: float | None = None if connect is not None else clock()
        self.error: str | None = None if connect is not None else "no shared store configured"
        self._next_try = 0.0
        self._connecting: asyncio.Lock | None = None
        self._reporter, self.report_every_s = reporter, report_every_s
        self._report_task: asyncio.Task[None] | None = None
        # counted here and not yet added to the shared counters: (day, key id) -> field -> n. Added every
        # `flush_s` (one pipeline for every key), so that counting costs a request no round trip; kept while
        # the store is down, and added once it is back
        self.pending: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: dict.fromkeys(FIELDS, 0))
        # the shared counters as the last flush read them, for the keys this replica counted
        self.seen: dict[tuple[str, str], dict[str, int]] = {}
        self.flush_s = flush_s
        self._flusher: asyncio.Task[None] | None = None

    @property
    def shared(self) -> bool:
        return self._redis is not None and self.down_since is None

    def state(self) -> dict[str, Any]:
        since = None if self.down_since is None else datetime.fromtimestamp(self.down_since, UTC).isoformat()
        return {"shared": self.shared, "per_replica_since": since, "error": self.error}

    async def _store(self) -> Any:
        """The shared store's client, or None while it is down (retried every `retry_s`)."""
        if self._connect is None:
            return None
        if self._redis is not None and self.down_since is None:
            return self._redis
        if self.down_since is not None and self.clock() < self._next_try:
            return None
        # the first connection: every request waits for it (none is let through on this replica's memory)
        self._connecting = self._connecting or asyncio.Lock()
        async with self._connecting:
            if self._redis is not None and self.down_since is None:
                return self._redis
            if self.down_since is not None and self.clock() < self._next_try:
                return None
            self._next_try = self.clock() + self.retry_s
            try:  # the endpoint asked again: a store restarted elsewhere has a new address
                redis = await self._connect()
                await redis.ping()
            except Exception as exc:
                self._down(exc)
                return None
            from limits.aio.storage import RedisStorage
            from limits.aio.strategies import MovingWindowRateLimiter

            storage = RedisStorage(
                "async+redis://", implementation="redispy", connection_pool=redis.connection_pool
            )
            self._shared_limiter = MovingWindowRateLimiter(storage)
            old, self._redis = self._redis, redis
            if old is not None:
                try:
                    await old.aclose()
                except Exception:  # a client of a store that is gone
                    pass
            if self.down_since is not None and self.error != "no shared store configured":
                log.warning("client quotas are shared again (Redis is back)")
            self.down_since, self.error = None, None
            return redis

    def _down(self, exc: BaseException) -> None:
        if self.down_since is None:
            log.warning(
                "client quotas fall back to this replica's memory (Redis unreachable: %s: %s); retrying every "
                "%g s",
                type(exc).__name__,
                exc,
                self.retry_s,
            )
            self.down_since = self.clock()
            self._next_try = self.clock() + self.retry_s
        self.error = f"{type(exc).__name__}: {exc}"[:500]

    async def flush(self) -> None:
        """Add what this replica counted to the shared counters and read them back (one pipeline)."""
        redis = await self._store()
        if redis is None or not self.pending:
            return
        batch, self.pending = self.pending, defaultdict(lambda: dict.fromkeys(FIELDS, 0))
        try:
            pipe = redis.pipeline(transaction=False)
            for (day, key_id), counts in batch.items():
                for field, n in counts.items():
                    if n:
                        pipe.hincrby(usage_key(day, key_id), field, n)
                pipe.expire(usage_key(day, key_id), DAY_TTL_S)
                pipe.hgetall(usage_key(day, key_id))
            out = await pipe.execute()
        except Exception as exc:  # not added: counted again with what comes next
            for k, counts in batch.items():
                for field, n in counts.items():
                    self.pending[k][field] += n
            self._down(exc)
            return
        rows = [r for r in out if isinstance(r, dict)]
        today = day_of(self.clock())
        self.seen = {k: v for k, v in self.seen.items() if k[0] == today}
        for k, row in zip(batch, rows, strict=True):
            if k[0] == today:
                self.seen[k] = _ints(row)

    async def _flush_loop(self) -> None:
        while True:  # the replica's lifetime: a periodic flush, not a wait for a condition
            await asyncio.sleep(self.flush_s)
            try:
                await self.flush()
            except Exception:
                log.exception("adding the usage counters to Redis failed")

    def _count(self, key_id: str, add: Mapping[str, int]) -> dict[str, int]:
        """Add to today's counters of `key_id`; its counters now, as far as this replica knows (the shared
        ones as of the last flush, up to `flush_s` old, plus what it counted since)."""
        k = (day_of(self.clock()), key_id)
        mine = self.pending[k]
        for field, n in add.items():
            mine[field] += n
        shared = self.seen.get(k)
        return {f: mine[f] + (shared[f] if shared else 0) for f in FIELDS}

    async def _rate(self, item: Any, key_id: str) -> tuple[bool, Any]:
        redis = await self._store()
        if redis is not None:
            try:
                ok = await self._shared_limiter.hit(item, "rpm", key_id)
                stats = None if ok else await self._shared_limiter.get_window_stats(item, "rpm", key_id)
                return ok, stats
            except Exception as exc:
                self._down(exc)
        ok = await self._memory_limiter.hit(item, "rpm", key_id)
        stats = None if ok else await self._memory_limiter.get_window_stats(item, "rpm", key_id)
        return ok, stats

    def _ensure_tasks(self) -> None:
        if self._connect is not None and self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())
        if self._reporter is not None and self._report_task is None:
            self._report_task = asyncio.get_running_loop().create_task(self._report_loop())

    async def _report_loop(self) -> None:
        first = True
        while True:  # the replica's lifetime: a periodic report, not a wait for a condition
            await asyncio.sleep(min(1.0, self.report_every_s) if first else self.report_every_s)
            first = False
            try:
                await self.report_once()
            except Exception as exc:  # the coordinator away: the counters stay in Redis; next time
                log.warning("usage report to the coordinator failed: %s: %s", type(exc).__name__, exc)

    async def report_once(self) -> None:
        """The day's usage of every key (the shared counters; this replica's while Redis is down) and this
        replica's quota state, to the coordinator."""
        from rma_ray.wire import REPORT_KEYS, Usage, UsageReport

        usage = sorted((await self.today()).items())
        for start in range(0, max(1, len(usage)), REPORT_KEYS):  # one report even with no usage: the state
            body = UsageReport(
                replica=replica_name(),
                day=day_of(self.clock()),
                shared=self.shared,
                error=self.error,
                usage={k: Usage(**v) for k, v in usage[start : start + REPORT_KEYS]},
            )
            if self._reporter is not None:
                await asyncio.to_thread(self._reporter, body)

    async def admit(self, key_id: str, quota: Any) -> None:
        """One request of `key_id`: counted, then checked against its quota (`rma_ray.wire.Quota`); a Refusal
        (429) when it is over. A refused request is counted too (the client sent it)."""
        if spot_checking.get():
            return
        self._ensure_tasks()
        rpm = quota.requests_per_minute
        if rpm:
            from limits import RateLimitItemPerMinute

            ok, stats = await self._rate(RateLimitItemPerMinute(rpm), key_id)
            if not ok:
                self._count(key_id, {"requests": 1})
                reset = max(1, math.ceil(stats.reset_time - time.time()))  # the limits library's clock
                raise limited(
                    "rate_limited",
                    f"this API key sent {rpm} requests in the last minute (its quota); retry in {reset} s",
                    rpm,
                    stats.remaining,
                    reset,
                )
        used = self._count(key_id, {"requests": 1})
        if quota.tokens_per_day:
            tokens = used["tokens_in"] + used["tokens_out"]
            if tokens >= quota.tokens_per_day:
                raise day_refusal(
                    "token_quota_exceeded", "LLM tokens", tokens, quota.tokens_per_day, self.clock()
                )

    async def charge_upload(self, key_id: str, quota: Any, size: int) -> None:
        """An upload of `size` bytes: refused (429) when it would take the key past its day's upload quota,
        else counted. Checked against the shared counters of now (a flush before and after: uploads are few
        and each is a large request already)."""
        if spot_checking.get():
            return
        limit = quota.upload_bytes_per_day
        if limit:
            self._count(key_id, {})
            await self.flush()
            used = self._count(key_id, {})["upload_bytes"]
            if used + size > limit:
                raise day_refusal("upload_quota_exceeded", "upload bytes", used, limit, self.clock())
        self._count(key_id, {"upload_bytes": size})
        await self.flush()

    async def add_tokens(self, key_id: str, tokens_in: int, tokens_out: int) -> None:
        if (tokens_in or tokens_out) and not spot_checking.get():
            if self._connect is not None and self._flusher is None:  # a process that admits no requests
                self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())
            self._count(key_id, {"tokens_in": tokens_in, "tokens_out": tokens_out})

    async def check_tokens(self, key_id: str, quota: Any) -> None:
        """Work the key asked for earlier (a batch item) and runs now: refused (the 429 `admit` gives) when the
        key's tokens for today are spent; counts no request. Checked against the shared counters of now."""
        if spot_checking.get() or not quota.tokens_per_day:
            return
        used = await self.usage(key_id)
        tokens = used["tokens_in"] + used["tokens_out"]
        if tokens >= quota.tokens_per_day:
            raise day_refusal(
                "token_quota_exceeded", "LLM tokens", tokens, quota.tokens_per_day, self.clock()
            )

    async def usage(self, key_id: str) -> dict[str, int]:
        """Today's counters of `key_id`: the shared ones after this replica's flush (other replicas add theirs
        within `flush_s`); this replica's own while the store is down."""
        self._count(key_id, {})
        await self.flush()
        return self._count(key_id, {})

    def _local_today(self) -> dict[str, dict[str, int]]:
        day = day_of(self.clock())
        keys = {k for d, k in (*self.pending, *self.seen) if d == day}
        return {k: self._count(k, {}) for k in keys}

    async def today(self) -> dict[str, dict[str, int]]:
        """Today's counters of every key (for the report to the coordinator)."""
        day = day_of(self.clock())
        await self.flush()
        redis = await self._store()
        if redis is None:
            return self._local_today()
        try:
            keys = [k async for k in redis.scan_iter(match=usage_key(day, "*"), count=1000)]
            pipe = redis.pipeline(transaction=False)
            for k in keys:
                pipe.hgetall(k)
            rows = await pipe.execute()
        except Exception as exc:
            self._down(exc)
            return self._local_today()
        return {_text(k).rsplit(":", 1)[1]: _ints(r) for k, r in zip(keys, rows, strict=True)}

    async def remaining(self, key_id: str, quota: Any) -> dict[str, int | None]:
        """What the key may still use: requests this minute, tokens and upload bytes today (None: no limit)."""
        out: dict[str, int | None] = dict.fromkeys(
            ("requests_this_minute", "tokens_today", "upload_bytes_today")
        )
        used = await self.usage(key_id)
        if quota.requests_per_minute:
            from limits import RateLimitItemPerMinute

            item = RateLimitItemPerMinute(quota.requests_per_minute)
            limiter = self._memory_limiter
            if await self._store() is not None:
                limiter = self._shared_limiter
            try:
                out["requests_this_minute"] = (await limiter.get_window_stats(item, "rpm", key_id)).remaining
            except Exception as exc:
                self._down(exc)
        if quota.tokens_per_day:
            out["tokens_today"] = max(0, quota.tokens_per_day - used["tokens_in"] - used["tokens_out"])
        if quota.upload_bytes_per_day:
            out["upload_bytes_today"] = max(0, quota.upload_bytes_per_day - used["upload_bytes"])
        return out


class CountTokens:
    """ASGI middleware on an LLM ingress: the tokens of each answer, added to its client key's counters once
    the answer is sent. A JSON reply's `usage`; a stream's final usage chunk. A streamed chat or completions
    request is sent on with `stream_options.include_usage` set (`ask_usage`), so that its prompt and
    completion tokens are known; when the client did not ask for that chunk it is taken out of the stream
    (`DropUsage`): the client gets the bytes it would have got. With no usage chunk (an upstream that sends
    none) the content, tool-call argument and reasoning deltas are counted as completion tokens (vLLM sends
    one token per chunk; the prompt's tokens are then not known). The client is the one the key check put in
    the request's state: a refused request counts no tokens."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope.get(SPOT_CHECK):
            await self.app(scope, receive, send)
            return
        tally = Tally()
        strip = False
        if scope.get("path", "").endswith(USAGE_PATHS):
            scope, receive, strip = await ask_usage(scope, receive)
        dropper = DropUsage(send) if strip else None

        async def counting(message: dict[str, Any]) -> None:
            tally.see(message)
            if dropper is not None:
                await dropper(message)
            else:
                await send(message)

        try:
            await self.app(scope, receive, counting)
        finally:
            client = (scope.get("state") or {}).get("client")
            m = meter()
            key_id, quota_of = getattr(client, "key_id", None), getattr(client, "quota", None)
            if m is not None and key_id and quota_of is not None and tally.ok:
                tokens_in, tokens_out = tally.tokens()
                try:
                    await m.add_tokens(key_id, tokens_in, tokens_out)
                except Exception:  # counting must never fail an answer already sent
                    log.exception("counting the tokens of a reply failed")


# the OpenAI routes whose streamed answers end in a usage chunk when `stream_options.include_usage` is set
USAGE_PATHS = ("/chat/completions", "/completions")
ASK_USAGE_MAX_BYTES = 1 << 24  # a larger body is passed on as it came (the body limit refuses it anyway)


async def ask_usage(scope: dict[str, Any], receive: Any) -> tuple[dict[str, Any], Any, bool]:
    """A streamed request's body with `stream_options.include_usage` set: (scope with its content-length,
    receive that replays the body, whether the client had not asked for the usage chunk). Any other body is
    replayed as it came."""
    import json

    chunks: list[bytes] = []
    size, more, last = 0, True, None
    while more:
        message = await receive()
        if message["type"] != "http.request":  # the client went away: the app sees it as it would
            last = message
            break
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        more = message.get("more_body", False)
        if size > ASK_USAGE_MAX_BYTES:
            break
    body, strip = b"".join(chunks), False
    if not more and last is None:
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if isinstance(data, dict) and data.get("stream") is True:
            options = data.get("stream_options")
            if options is None or isinstance(options, dict):
                if not (options or {}).get("include_usage"):
                    data["stream_options"] = {**(options or {}), "include_usage": True}
                    body, strip = json.dumps(data).encode(), True
                    headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
                    scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
    replay: list[dict[str, Any]] = [{"type": "http.request", "body": body, "more_body": more}]
    if last is not None:
        replay.append(last)

    async def replayed() -> dict[str, Any]:
        return replay.pop(0) if replay else await receive()

    return scope, replayed, strip


class DropUsage:
    """An ASGI `send` that takes the usage chunk (`"choices":[]` and a `usage` object) out of a streamed
    answer, and sends every other byte as it came. Events are sent whole (one split across messages waits for
    its end), so the usage chunk is known before any of its bytes go out."""

    def __init__(self, send: Any) -> None:
        self.send = send
        self.stream = False
        self.rest = b""

    async def __call__(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            ctype = dict(message.get("headers") or []).get(b"content-type", b"")
            self.stream = message.get("status") == 200 and ctype.startswith(b"text/event-stream")
            await self.send(message)
            return
        if not self.stream or message["type"] != "http.response.body":
            await self.send(message)
            return
        data = self.rest + message.get("body", b"")
        end = data.rfind(b"\n\n") + 2 if b"\n\n" in data else 0
        whole, self.rest = data[:end], data[end:]
        if not message.get("more_body", False):
            whole, self.rest = data, b""
        # "A\n\nU\n\nB\n\n" -> [A, U, B, ""] -> "A\n\nB\n\n": the usage event goes with its separator
        out = b"\n\n".join(e for e in whole.split(b"\n\n") if not _usage_event(e))
        await self.send({**message, "body": out})


def _usage_event(event: bytes) -> bool:
    import json

    if not event.startswith(b"data: {") or b'"usage"' not in event:
        return False
    try:
        data = json.loads(event[6:])
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("choices") == [] and isinstance(data.get("usage"), dict)


# the deltas that carry generated tokens: text, tool-call arguments, reasoning (vLLM's and OpenAI's names)
DELTA_KEYS = (b'"content":"', b'"text":"', b'"arguments":"', b'"reasoning_content":"', b'"reasoning":"')


class Tally:
    """The token counts of one response, from its ASGI messages."""

    def __init__(self) -> None:
        self.ok = False
        self.stream = False
        self.body = bytearray()
        self.rest = b""
        self.usage: dict[str, Any] | None = None
        self.chunks = 0

    def see(self, message: dict[str, Any]) -> None:
        import json

        if message["type"] == "http.response.start":
            self.ok = message["status"] == 200
            ctype = dict(message.get("headers") or []).get(b"content-type", b"")
            self.stream = ctype.startswith(b"text/event-stream")
            return
        if not self.ok or message["type"] != "http.response.body":
            return
        data = message.get("body", b"")
        if not self.stream:
            if len(self.body) < 1 << 24:
                self.body += data
            return
        lines = (self.rest + data).split(b"\n")
        self.rest = lines.pop()
        for line in lines:
            if not line.startswith(b"data: {"):
                continue
            if b'"usage":{' in line or b'"usage": {' in line:
                try:
                    self.usage = json.loads(line[6:]).get("usage") or self.usage
                except ValueError:
                    pass
            elif any(k in line and k + b'"' not in line for k in DELTA_KEYS):
                self.chunks += 1

    def tokens(self) -> tuple[int, int]:
        import json

        usage = self.usage
        if not self.stream:
            try:
                usage = json.loads(bytes(self.body)).get("usage")
            except (ValueError, AttributeError):
                usage = None
        if isinstance(usage, dict):
            return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        return 0, self.chunks


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _ints(row: Mapping[Any, Any]) -> dict[str, int]:
    got = {_text(k): int(v) for k, v in row.items()}
    return {f: got.get(f, 0) for f in FIELDS}


def redis_connect(endpoint: Callable[[], Any]) -> Callable[[], Awaitable[Any]]:
    """A `connect` for `Meter`: the pool's Redis store, its endpoint asked of the store's supervisor (a Ray
    call: in a thread), short timeouts (a dead Redis must not hold requests up: they fall back instead)."""

    async def connect() -> Any:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        ep = await asyncio.to_thread(endpoint)
        return aioredis.Redis(
            host=ep.host,
            port=ep.port,
            password=ep.password,
            socket_timeout=0.5,
            socket_connect_timeout=0.5,
            retry=Retry(NoBackoff(), 0),  # no retries: a failed command falls back at once
        )

    return connect


def replica_name() -> str:
    """This Serve replica's id (deployment and replica), else host and process."""
    try:
        from ray import serve

        rid = serve.get_replica_context().replica_id
        return f"{rid.deployment_id.app_name}/{rid.deployment_id.name}#{rid.unique_id}"
    except Exception:
        import socket

        return f"{socket.gethostname()}:{os.getpid()}"


def _report(body: Any) -> None:
    from deployments.gateway.auth import coordinator_identity
    from rma_ray.client import AdmissionClient

    url, credential = coordinator_identity()
    with AdmissionClient(url, credential, timeout=5.0) as client:
        client.report_usage(body)


def _store_endpoint() -> Any:
    from deployments.stores import supervisor

    return supervisor.endpoint("redis", timeout=5.0)


_lock = threading.Lock()
_meter: Meter | None = None
_off = False


def _in_ray() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def meter() -> Meter | None:
    """This process's meter (built on first use; the pool's Redis store inside a Ray worker, this process's
    memory outside one); None when metering is off (`RMA_METER=off`)."""
    global _meter, _off
    with _lock:
        if _meter is None and not _off:
            if os.environ.get(METER_ENV, "").lower() == "off":
                _off = True
            else:
                ray = _in_ray()
                _meter = Meter(
                    redis_connect(_store_endpoint) if ray else None,
                    reporter=_report if ray else None,
                    report_every_s=float(os.environ.get(REPORT_ENV, "30")),
                )
        return _meter


def set_meter(m: Meter | None) -> None:
    """For tests: use this meter (None: build the default one on next use)."""
    global _meter, _off
    with _lock:
        _meter, _off = m, False
