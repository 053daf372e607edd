"""The quota meter (deployments.gateway.quota) on a real Redis server, without Ray: two meters stand for two
gateway replicas; Redis stopped mid-run and started again (~2 s in all). The same code on a real pool:
test_services.py (quota_checks)."""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from deployments.gateway.quota import Meter, redis_connect
from deployments.gateway.refusal import Refusal
from rma_ray.wire import Quota
from tests.support import free_port, wait_for

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server")
PASSWORD = "quota-test-password"


class RedisServer:
    def __init__(self, root: Path) -> None:
        self.port = free_port("127.0.0.1")
        self.conf = root / "redis.conf"
        # the password in a 0600 config file, never on a command line
        self.conf.write_text(
            f'bind 127.0.0.1\nport {self.port}\ndir {root}\nrequirepass {PASSWORD}\nsave ""\nappendonly yes\n'
        )
        self.conf.chmod(0o600)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen(["redis-server", str(self.conf)], stdout=subprocess.DEVNULL)

        def up() -> bool:
            with redis.Redis(port=self.port, password=PASSWORD, socket_timeout=1) as r:
                return bool(r.ping())

        wait_for(up, timeout=20, interval=0.05, what="redis-server to answer PING")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=20)
            self.proc = None


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    s = RedisServer(tmp_path)
    s.start()
    try:
        yield s
    finally:
        s.stop()


def test_shared_limit_counters_and_fail_open(server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    ep = SimpleNamespace(host="127.0.0.1", port=server.port, password=PASSWORD)
    now = [1_800_000_000.0]  # 2027-01-15 08:00 UTC, a fixed day for the counters

    def replica() -> Meter:
        return Meter(redis_connect(lambda: ep), retry_s=1.0, clock=lambda: now[0])

    async def go() -> None:
        a, b = replica(), replica()
        q = Quota(requests_per_minute=3, tokens_per_day=100)
        await a.admit("k", q)
        await b.admit("k", q)
        await a.admit("k", q)
        with pytest.raises(Refusal) as err:  # the 4th, on the other replica: the window is shared
            await b.admit("k", q)
        assert (
            err.value.code == "rate_limited" and (err.value.headers() or {})["X-RateLimit-Remaining"] == "0"
        )
        await a.add_tokens("k", 30, 20)
        await a.flush()  # what replica a counted reaches Redis within flush_s
        await b.charge_upload("k", q, 123)
        assert await b.usage("k") == {"requests": 4, "tokens_in": 30, "tokens_out": 20, "upload_bytes": 123}
        assert (await a.remaining("k", q))["tokens_today"] == 50
        assert a.state() == {"shared": True, "per_replica_since": None, "error": None}
        assert await a.today() == {"k": await a.usage("k")}

        server.stop()  # Redis gone: served from this replica's memory, said once
        await a.admit("j", q)
        await a.admit("j", q)
        assert a.state()["shared"] is False and a.state()["error"]
        assert (await a.usage("j"))["requests"] == 2

        server.start()
        now[0] += 2  # past retry_s: the meter tries Redis again, and adds what it counted meanwhile
        await a.admit("j", q)
        assert a.state()["shared"] is True
        await a.flush()  # the flush that follows (every flush_s) adds what a counted while Redis was down
        assert (await b.usage("j"))["requests"] == 3

    with caplog.at_level(logging.WARNING, "rma.quota"):
        asyncio.run(go())
    said = [r.getMessage() for r in caplog.records]
    assert len([m for m in said if "fall back" in m]) == 1 and any("shared again" in m for m in said)
    assert all(PASSWORD not in m for m in said)  # the store's password never in the log
