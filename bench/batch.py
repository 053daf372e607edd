"""Batch API figures: the same chat prompts sent online at 8 concurrent and run as one batch, in one run.

`rma up` of the embedded default with the LLM and the services (Postgres for the batch store; free ports, its
own data dir and HOME), a client key from the coordinator, then, in order: the prompts online (8 in flight,
the official `openai` client's requests through httpx), the same prompts as one batch (`/v1/files` +
`/v1/batches`, polled until completed), and online again (so drift shows). Every request asks for a fixed
number of tokens (`ignore_eos`, vLLM's extra field, which the batch body carries through), so both paths
generate the same work. Prints one JSON line: tokens/s of each (completion tokens over wall time, the batch
from create to completed as the client sees it), and the batch's ratio to the online mean; asserts nothing.

Then online latency under a batch (the issue's "online p99 while a batch runs vs without"): `--probes` short
chats (16 tokens, 2 in flight: an interactive client) alone, then the same while a batch of twice the prompts
runs (cancelled once the probes are done); p50 / p99 of each, and the ratio of the p99s.

The batch runner's in-flight bound is `RMA_SERVICES_BATCH_CONCURRENCY` (default 4: batches leave room for
online traffic); `--batch-concurrency 8` (the default here) compares like with like.

    flock /tmp/rma-heavy.lock .venv/bin/python -m bench.batch [--prompts 64] [--tokens 32]
                                                      [--batch-concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.pool_down import up_argv
from tests.support import GiveUp, wait_for

FINAL = ("completed", "failed", "cancelled", "expired")


def up(root: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    # --no-edge: the core's own LLM replica serves both paths
    argv = up_argv("llm,services", "postgres,redis", "--no-edge")
    log = root / "up.log"
    proc = subprocess.Popen(argv, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)

    def started() -> bool:
        if proc.poll() is not None:
            raise GiveUp(f"rma up exited {proc.returncode}: {log.read_text()[-3000:]}")
        return "stop with Ctrl-C or `rma down`" in log.read_text(errors="replace")

    wait_for(started, timeout=1500, interval=2, what="rma up to finish starting")
    return proc


def body(model: str, i: int, tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": f"Write about the number {i}."}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "temperature": 0,
    }


async def online(base: str, key: str, bodies: list[dict[str, Any]], concurrency: int) -> float:
    sem = asyncio.Semaphore(concurrency)
    tokens = 0
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=600) as c:

        async def one(b: dict[str, Any]) -> None:
            nonlocal tokens
            async with sem:
                r = await c.post("/chat/completions", json=b)
                r.raise_for_status()
                tokens += r.json()["usage"]["completion_tokens"]

        t0 = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        return tokens / (time.perf_counter() - t0)


async def probes(base: str, key: str, bodies: list[dict[str, Any]], concurrency: int) -> list[float]:
    """Each request's latency (s), `concurrency` in flight."""
    sem = asyncio.Semaphore(concurrency)
    out: list[float] = []
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=600) as c:

        async def one(b: dict[str, Any]) -> None:
            async with sem:
                t0 = time.perf_counter()
                r = await c.post("/chat/completions", json=b)
                r.raise_for_status()
                out.append(time.perf_counter() - t0)

        await asyncio.gather(*(one(b) for b in bodies))
    return out


def quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def done_items(b: Any) -> int:
    return int(b.request_counts.completed) if b.request_counts else 0


def start_batch(client: Any, bodies: list[dict[str, Any]]) -> Any:
    data = "".join(
        json.dumps({"custom_id": f"b{i}", "method": "POST", "url": "/v1/chat/completions", "body": b}) + "\n"
        for i, b in enumerate(bodies)
    ).encode()
    f = client.files.create(file=("bench.jsonl", data), purpose="batch")
    return client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")


def batch(base: str, key: str, bodies: list[dict[str, Any]]) -> tuple[float, dict[str, int], dict[str, int]]:
    """tokens/s of one batch as its client sees it, its request counts, and where its time went (whole seconds,
    the Batch object's own timestamps: created -> in_progress (queued), -> finalizing (the items),
    -> completed (the output file))."""
    from openai import OpenAI

    client = OpenAI(base_url=base, api_key=key, timeout=600)
    t0 = time.perf_counter()
    b = start_batch(client, bodies)
    done = wait_for(
        lambda: (x := client.batches.retrieve(b.id)).status in FINAL and x,
        timeout=3600,
        interval=0.5,
        what="the batch to finish",
    )
    wall = time.perf_counter() - t0
    out = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    tokens = sum(x["response"]["body"]["usage"]["completion_tokens"] for x in out)
    phases = {
        "queued_s": (done.in_progress_at or 0) - done.created_at,
        "items_s": (done.finalizing_at or 0) - (done.in_progress_at or 0),
        "finalizing_s": (done.completed_at or 0) - (done.finalizing_at or 0),
        "client_wall_s": round(wall, 1),
    }
    return tokens / wall, done.request_counts.model_dump(), phases


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.batch")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8, help="online requests in flight")
    ap.add_argument("--batch-concurrency", type=int, default=8, help="the batch runner's items in flight")
    ap.add_argument("--probes", type=int, default=48, help="online latency probes, alone then beside a batch")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="rma-batch-bench-"))
    env = {
        **os.environ,
        "HOME": str(root / "home"),
        "RMA_DATA_DIR": str(root / "data"),
        "COLUMNS": "200",
        "RMA_SERVICES_BATCH_CONCURRENCY": str(args.batch_concurrency),
    }
    proc = up(root, env)
    try:
        from rma_ray import poolinfo

        info = poolinfo.read(root / "data")
        admin = httpx.Client(
            base_url=str(info.coordinator_url),
            headers={"Authorization": f"Bearer {info.admin_key}"},
            timeout=60,
        )
        key = admin.post("/api/admin/clients", json={"name": "bench-batch"}).json()["key"]
        base = str(info.serve_url).rstrip("/") + "/v1"
        wait_for(
            lambda: (
                httpx.get(base + "/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
            ),
            timeout=120,
            what="the new key to be accepted",
        )
        model = httpx.get(base + "/models", headers={"Authorization": f"Bearer {key}"}).json()["data"][0][
            "id"
        ]
        bodies = [body(model, i, args.tokens) for i in range(args.prompts)]
        asyncio.run(online(base, key, bodies[:8], args.concurrency))  # warm-up
        batch(base, key, bodies[:8])  # warm-up too: the runner's first batch opens its pool and handles
        first = asyncio.run(online(base, key, bodies, args.concurrency))
        batch_tps, counts, phases = batch(base, key, bodies)
        second = asyncio.run(online(base, key, bodies, args.concurrency))
        probe_bodies = [body(model, 1000 + i, 16) for i in range(args.probes)]
        alone = asyncio.run(probes(base, key, probe_bodies, 2))
        from openai import OpenAI

        oai = OpenAI(base_url=base, api_key=key, timeout=600)
        running = start_batch(oai, [body(model, 2000 + i, args.tokens) for i in range(2 * args.prompts)])
        wait_for(
            lambda: done_items(oai.batches.retrieve(running.id)) > 0,
            timeout=600,
            interval=0.2,
            what="the batch's first item",
        )
        beside = asyncio.run(probes(base, key, probe_bodies, 2))
        still = oai.batches.retrieve(running.id)
        oai.batches.cancel(running.id)
        load = os.getloadavg()
    finally:
        subprocess.run(
            [sys.executable, "-m", "rma_ray.cli", "down"], env=env, capture_output=True, timeout=900
        )
        if proc.poll() is None:
            proc.kill()
    print(
        json.dumps(
            {
                "prompts": args.prompts,
                "tokens_each": args.tokens,
                "online_concurrency": args.concurrency,
                "batch_concurrency": args.batch_concurrency,
                "online_tok_s": [round(first, 1), round(second, 1)],
                "batch_tok_s": round(batch_tps, 1),
                "batch_vs_online": round(batch_tps / ((first + second) / 2), 2),
                "request_counts": counts,
                "batch_phases": phases,
                "probe_ms_alone": {
                    "p50": round(1000 * quantile(alone, 0.5)),
                    "p99": round(1000 * quantile(alone, 0.99)),
                },
                "probe_ms_beside_batch": {
                    "p50": round(1000 * quantile(beside, 0.5)),
                    "p99": round(1000 * quantile(beside, 0.99)),
                },
                "p99_beside_vs_alone": round(quantile(beside, 0.99) / quantile(alone, 0.99), 2),
                "batch_items_done_when_probes_ended": done_items(still),
                "batch_items": 2 * args.prompts,
                "load": [round(x, 1) for x in load],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
