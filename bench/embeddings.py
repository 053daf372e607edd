"""Embedding figures: inputs embedded per second through the pool's POST /v1/embeddings (client key, Serve's
HAProxy, the key-gated ingress, a handle call into the batched Embedder replica) against the same model called
in this process, same box, one run.

Starts the pool of tests/integration/test_llm.py (token-auth Ray head, a service node, a coordinator issuing a
client key, Serve; its LLM apps are deleted again before measuring, so that only the embedding model runs),
deploys the rma-embeddings app as `rma up` does, and measures, in rounds that alternate the two sides:
  - in process: EmbeddingModel.embed_many, one input per call (1) and 16 inputs per call (what batching at
  best
    reaches for 16 concurrent single-input requests);
  - HTTP: the official `openai` AsyncOpenAI client, one input per request, 1 and 16 requests in flight
  (Serve's
    @serve.batch gathers the concurrent ones into one forward pass).
Both sides use the same torch thread count (`--threads`). Prints a table and one JSON line; asserts nothing.

    flock /tmp/rma-heavy.lock .venv/bin/python -m bench.embeddings [--seconds 8] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

TEXTS = [
    f"Request {i}: the refund for order {1000 + i} was sent to the customer's bank on Monday."
    for i in range(64)
]


def in_process(model: Any, per_call: int, seconds: float) -> float:
    done, i, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        batch = [TEXTS[(i + k) % len(TEXTS)] for k in range(per_call)]
        model.embed_many([{"input": batch}])
        done += per_call
        i += per_call
    return done / (time.perf_counter() - t0)


async def over_http(client: Any, model: str, concurrent: int, seconds: float) -> float:
    done = 0
    stop = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        nonlocal done
        i = w
        while time.perf_counter() < stop:
            await client.embeddings.create(model=model, input=TEXTS[i % len(TEXTS)], encoding_format="float")
            done += 1
            i += concurrent

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrent)))
    return done / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.embeddings")
    ap.add_argument("--seconds", type=float, default=8.0, help="per case and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads, in process and in the replica")
    args = ap.parse_args()

    import httpx
    import openai
    import torch

    from deployments.embeddings.config import DEFAULT_MODEL, EmbeddingSettings
    from deployments.embeddings.model import EmbeddingModel
    from tests.integration.test_llm import start_pool
    from tests.support import wait_for

    torch.set_num_threads(args.threads)
    local = EmbeddingModel(EmbeddingSettings(cpu_threads=args.threads))
    with tempfile.TemporaryDirectory(prefix="bench-emb-") as tmp, start_pool(Path(tmp)) as pool:
        pool.run(
            ["-m", "deployments", "down", "--stores", "none", "--apps", "llm", "--address", pool.address],
            timeout=300,
        )
        env = {"RMA_EMBEDDINGS_CPU_THREADS": str(args.threads)}
        t0 = time.monotonic()
        pool.run(
            [
                "-m",
                "deployments",
                "up",
                "--stores",
                "none",
                "--apps",
                "embeddings",
                "--address",
                pool.address,
            ],
            timeout=400,
            extra_env=env,
        )
        ready_s = time.monotonic() - t0
        key = pool.client_key("bench")["key"]
        wait_for(
            lambda: (
                httpx.post(
                    pool.serve_url + "/v1/embeddings",
                    json={"model": DEFAULT_MODEL, "input": "hi"},
                    headers={"Authorization": f"Bearer {key}"},
                    timeout=30,
                ).status_code
                == 200
            ),
            timeout=120,
            interval=0.5,
            what="/v1/embeddings to answer",
        )
        cases: dict[str, list[float]] = {
            "in-process, 1 per call": [],
            "HTTP, 1 in flight": [],
            "in-process, 16 per call": [],
            "HTTP, 16 in flight": [],
        }

        async def measure() -> None:
            # one event loop for every HTTP case: the client's pooled connections belong to it
            client = openai.AsyncOpenAI(
                base_url=pool.serve_url + "/v1",
                api_key=key,
                max_retries=0,
                timeout=120,
                http_client=openai.DefaultAsyncHttpxClient(
                    limits=httpx.Limits(max_connections=64, max_keepalive_connections=64)
                ),
            )
            await over_http(client, DEFAULT_MODEL, 16, 1.0)  # warm the connections and the replica
            for _ in range(args.rounds):
                # in process: the loop is idle meanwhile (no HTTP case runs)
                cases["in-process, 1 per call"].append(in_process(local, 1, args.seconds))
                cases["HTTP, 1 in flight"].append(await over_http(client, DEFAULT_MODEL, 1, args.seconds))
                cases["in-process, 16 per call"].append(in_process(local, 16, args.seconds))
                cases["HTTP, 16 in flight"].append(await over_http(client, DEFAULT_MODEL, 16, args.seconds))
            await client.close()

        asyncio.run(measure())
        load = os.getloadavg()
    med = {k: median(v) for k, v in cases.items()}
    print(
        f"\nembeddings/s ({DEFAULT_MODEL}, one ~20-token input per request, torch threads {args.threads}, "
        f"{args.rounds} rounds x {args.seconds:g} s, median; load avg {load[0]:.1f})"
    )
    print(f"{'case':28} {'emb/s':>9}  rounds")
    for k, v in cases.items():
        print(f"{k:28} {med[k]:9.1f}  {', '.join(f'{x:.1f}' for x in v)}")
    r1 = med["HTTP, 1 in flight"] / med["in-process, 1 per call"]
    r16 = med["HTTP, 16 in flight"] / med["in-process, 16 per call"]
    print(
        f"HTTP/in-process: 1 concurrent {r1:.2f}x, 16 concurrent {r16:.2f}x (vs 16 per call); "
        f"HTTP 16 vs 1 in flight {med['HTTP, 16 in flight'] / med['HTTP, 1 in flight']:.2f}x; "
        f"app ready in {ready_s:.1f} s"
    )
    print(
        json.dumps(
            {
                "median_emb_per_s": {k: round(v, 1) for k, v in med.items()},
                "ratio_1": round(r1, 3),
                "ratio_16": round(r16, 3),
                "ready_s": round(ready_s, 1),
                "load1": round(load[0], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
