"""Edge figures (issue 17): the same model served through the core's gateway by an edge replica vs by a core
replica, same box, same run; the time from losing the edge to the first request the core serves; the RSS of the
edge head.

Starts the pool of tests/e2e/test_edge.py (`rma up` with its edge on a network-namespace bed, the LLM app on
both clusters, one untrusted donor in the edge) and measures, through the core's /v1 with two client keys:
  - a plain key: the gateway (the core's LLM ingress) forwards to the edge replica (`x-rma-served-by: edge:…`);
  - a `sensitive` key: never sent to an edge, served by the core's own replica;
time to first token and aggregate tokens/s of 8 concurrent streamed chats (`ignore_eos`, fixed length), rounds
alternating A/B so that drift on the shared box falls on both alike. Then 8 clients loop while every process of
the edge donor's host is SIGKILLed: the first request the core serves after the kill is the figure. Prints a
table; asserts nothing.

The two replicas do not run on equal machines here: the core replica on the head (the root namespace), the edge
replica on a namespace host of the same 2-core box; both compete for the same two cores with everything else, so
read the ratio as "what the extra hop costs", not as hardware.

    .venv/bin/python -m bench.edge [--tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import tempfile
import threading
import time
from pathlib import Path
from statistics import median
from typing import Any

import httpx
import psutil

from rma_ray.edges import SERVED_BY_HEADER
from tests.e2e.edge_bed import EdgePool, start_edge_pool
from tests.support import wait_for

PROMPT = "Write a short story about a lighthouse keeper and a storm."


async def one(client: Any, model: str, tokens: int) -> tuple[float, int, str]:
    t0 = time.perf_counter()
    ttft, n = None, 0
    async with client.chat.completions.with_streaming_response.create(
        model=model,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    ) as resp:
        by = resp.headers.get(SERVED_BY_HEADER, "?")
        async for chunk in await resp.parse():
            if chunk.choices and chunk.choices[0].delta.content and ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.usage:
                n = chunk.usage.completion_tokens
    return ttft or 0.0, n, by


async def round_(url: str, key: str, model: str, tokens: int) -> dict[str, Any]:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=300)
    await one(client, model, 4)  # warm the path
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(client, model, tokens) for _ in range(8)))
    wall = time.perf_counter() - t0
    await client.close()
    return {
        "tok_s": sum(r[1] for r in results) / wall,
        "ttft": median(r[0] for r in results),
        "by": sorted({r[2] for r in results}),
    }


def loss_to_core(pool: EdgePool, key: str, model: str, donor: Any) -> float:
    """8 clients loop; every process of the edge donor's host is SIGKILLed; seconds to the first core answer."""
    stop, served = threading.Event(), []  # type: ignore[var-annotated]

    def loop() -> None:
        with httpx.Client(timeout=120) as c:
            while not stop.is_set():
                r = c.post(
                    pool.info["serve_url"] + "/v1/chat/completions",
                    json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                    headers={"Authorization": f"Bearer {key}"},
                )
                served.append((time.monotonic(), r.status_code, r.headers.get(SERVED_BY_HEADER)))

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    wait_for(lambda: len(served) >= 8, timeout=120, what="load")
    cut = time.monotonic()
    for pid in donor.pids():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    first = wait_for(
        lambda: next((t for t, s, by in list(served) if t > cut and s == 200 and by == "core"), None),
        timeout=120,
        interval=0.05,
        what="a request served by the core",
    )
    stop.set()
    for t in threads:
        t.join(150)
    return first - cut


def edge_head_rss(pool: EdgePool) -> float:
    """MiB: every process the edge's system user runs on this machine (its GCS, raylet, dashboard, Serve)."""
    user = pool.edge["user"]
    total = 0
    for p in psutil.process_iter(["username", "memory_info"]):
        if p.info["username"] == user and p.info["memory_info"]:
            total += p.info["memory_info"].rss
    return total / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="rma-bench-edge-"))
    with start_edge_pool(root, n_hosts=2, apps="llm") as pool:
        rss_idle = edge_head_rss(pool)
        donor = pool.join(
            pool.invite(trusted=False, tier="service"), "--cpus", "3", "--overcommit-cpus", timeout=180
        )
        wait_for(
            lambda: pool.running_replicas("rma-llm", "edge") > 0, timeout=900, interval=2, what="edge LLM"
        )
        plain, sensitive = pool.client_key("bench-edge"), pool.client_key("bench-core", sensitive=True)
        r = httpx.get(pool.info["serve_url"] + "/v1/models", headers={"Authorization": f"Bearer {plain}"})
        model = next(m["id"] for m in r.json()["data"] if m.get("kind", "chat") == "chat")
        rows: dict[str, list[dict[str, Any]]] = {"edge": [], "core": []}
        for i in range(args.rounds):
            for side in ("edge", "core") if i % 2 == 0 else ("core", "edge"):
                key = plain if side == "edge" else sensitive
                rows[side].append(asyncio.run(round_(pool.info["serve_url"], key, model, args.tokens)))
        loss = loss_to_core(pool, plain, model, donor)
        rss = edge_head_rss(pool)
    e_tok, c_tok = median(r["tok_s"] for r in rows["edge"]), median(r["tok_s"] for r in rows["core"])
    e_ttft, c_ttft = median(r["ttft"] for r in rows["edge"]), median(r["ttft"] for r in rows["core"])
    print(f"\nedge bench: {args.rounds} rounds x 8 concurrent streamed chats of {args.tokens} tokens")
    print(
        f"served by: edge rounds {sorted({b for r in rows['edge'] for b in r['by']})}, "
        f"core rounds {sorted({b for r in rows['core'] for b in r['by']})}"
    )
    print("| path | tokens/s (8 concurrent) | TTFT median |")
    print("| --- | --- | --- |")
    print(f"| core gateway -> edge replica | {e_tok:.1f} | {e_ttft * 1000:.0f} ms |")
    print(f"| core gateway -> core replica | {c_tok:.1f} | {c_ttft * 1000:.0f} ms |")
    print(f"| edge / core | {e_tok / c_tok:.2f}x | {e_ttft / c_ttft:.2f}x |")
    print(f"edge loss -> first request served by the core: {loss:.2f} s")
    print(
        f"RSS of every process of the edge user (Ray head, dashboard, Serve, idle workers): {rss_idle:.0f} MiB "
        f"after rma up, {rss:.0f} MiB at the end"
    )
    print(f"load average: {os.getloadavg()}")


if __name__ == "__main__":
    main()
