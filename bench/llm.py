"""LLM figures: the pool's authenticated path against vLLM's own OpenAI server, same model, same box, one run.

Starts the pool of tests/integration/test_llm.py (token-auth Ray head, a 2-CPU service node hosting the CPU LLM,
a coordinator issuing a client key, Serve, both LLM apps) and measures, through the pool's /v1 route with the
client key (client -> Serve's HAProxy -> the LLM replica: client-key check, vLLM's OpenAI app, vLLM's engine;
deployments/llm/app.py, direct shape):
  - engine cold start: serve.run to RUNNING (`deploy`), model conversion (`prepare`, cached after the first run);
  - time to first token and decode tokens/s for one request at a time, and aggregate tokens/s for 8 at once
    (fixed-length outputs: `ignore_eos`, so both sides generate the same number of tokens);
  - RSS of the LLM replica (Serve actor + vLLM engine process).
Beside it, vLLM's own `vllm.entrypoints.openai.api_server` on the same converted model with the same engine
settings, outside Ray. Requests alternate between the two (A/B per round) so that other load on the machine drifts
over both alike; each side is idle while the other is measured. Prints a table with pool/vLLM ratios and the load
average; asserts nothing.

Beside both, one column more: a Ray driver calling the LLMServer replica straight through a Serve handle (no HTTP,
no proxy, no ingress), so the table shows where the pool's overhead lies (`--no-handle` skips it).

    .venv/bin/python -m bench.llm [--tokens 128] [--single 3] [--rounds 3] [--stream-batching-ms N]
                                  [--threads-bind nobind|auto|0-1] [--ingress direct|proxied] [--executor uni|mp]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

import httpx
import psutil

from deployments.llm.config import LLMSettings
from tests.integration.test_llm import MODEL, MODEL_CACHE, Pool, start_pool, vllm_processes
from tests.support import free_port, wait_for

PROMPT = "Write a short story about a lighthouse keeper and a storm."


async def one(client: Any, model: str, tokens: int) -> tuple[float, int, float]:
    """(time to first token s, completion tokens, total s) for one streamed chat completion."""
    t0 = time.perf_counter()
    ttft, n = None, 0
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = 0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            chunks += 1
            if ttft is None:
                ttft = time.perf_counter() - t0
        if chunk.usage:
            n = chunk.usage.completion_tokens
    return (ttft or 0.0), (n or chunks), time.perf_counter() - t0


# One round of the same measurement from a Ray driver straight to the LLMServer replica through a Serve handle
# (no HTTP, no proxy, no ingress): what ray.serve.llm's replica costs by itself. Prints one JSON line.
HANDLE_ROUND = """
import asyncio, json, sys, time
import ray
ray.init(namespace="rma", logging_level="ERROR", log_to_driver=False)
from ray import serve
from ray.llm._internal.serve.core.configs.openai_api_models import ChatCompletionRequest

model, tokens, single, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
h = serve.get_deployment_handle("LLMServer:" + model.replace("/", "--").replace(".", "_"),
                                app_name="rma-llm").options(stream=True)

async def one(n):
    req = ChatCompletionRequest(model=model, messages=[{"role": "user", "content": prompt}], max_tokens=n,
                                temperature=0, stream=True, stream_options={"include_usage": True}, ignore_eos=True)
    t0, ttft, done = time.perf_counter(), None, 0
    async for batch in h.chat.remote(req, None):
        for item in (batch if isinstance(batch, list) else [batch]):
            for line in str(item).splitlines():
                if not line.startswith("data: {"):
                    continue
                d = json.loads(line[6:])
                if ttft is None and d.get("choices") and (d["choices"][0].get("delta") or {}).get("content"):
                    ttft = time.perf_counter() - t0
                if d.get("usage"):
                    done = d["usage"]["completion_tokens"]
    return ttft or 0.0, done, time.perf_counter() - t0

async def main():
    await one(8)
    singles = [await one(tokens) for _ in range(single)]
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(tokens) for _ in range(8)))
    return {"singles": singles, "conc": sum(r[1] for r in results) / (time.perf_counter() - t0)}

print(json.dumps(asyncio.run(main())))
"""


def cpu_snapshot(roots: dict[str, int]) -> dict[int, tuple[str, float]]:
    """CPU seconds so far of every process, grouped: each root's process tree (a Ray node, vLLM's server), its vLLM
    engine core apart, this bench (the client), and everything else on the box."""
    group: dict[int, str] = {os.getpid(): "bench client"}
    for label, pid in roots.items():
        try:
            tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            continue
        for p in tree:
            try:
                engine = "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline()[:1])
            except psutil.Error:
                continue
            group[p.pid] = f"{label}: vLLM engine core" if engine else f"{label}: the rest"
    out = {}
    for p in psutil.process_iter():
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        out[p.pid] = (group.get(p.pid, "other processes"), t.user + t.system)
    return out


def cpu_used(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    used: dict[str, float] = {}
    for pid, (group, t) in after.items():
        used[group] = used.get(group, 0.0) + max(0.0, t - before.get(pid, (group, 0.0))[1])
    return used


async def measure(
    targets: dict[str, tuple[str, str]],
    model: str,
    tokens: int,
    single: int,
    rounds: int,
    handle_round: Any = None,
    roots: dict[str, int] | None = None,
) -> dict[str, dict[str, float]]:
    """Interleaved A/B/A/B over the targets (name -> (base_url, api_key)), so that other load on the machine
    drifts over both sides alike. `handle_round()`, when given, measures the "handle" target (a Ray driver straight
    to the replica) once per round, in the same turn order."""
    import openai

    clients = {
        name: openai.AsyncOpenAI(base_url=url, api_key=key, timeout=600, max_retries=0)
        for name, (url, key) in targets.items()
    }
    names = [*targets, *(["handle"] if handle_round else [])]
    singles: dict[str, list[tuple[float, int, float]]] = {name: [] for name in names}
    conc: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, dict[str, float]] = {
        name: {} for name in clients
    }  # CPU-seconds per group, concurrent phase
    wall: dict[str, float] = {name: 0.0 for name in clients}
    for client in clients.values():
        await one(client, model, 8)  # warm-up: connections, first-request paths
    for _ in range(rounds):
        for name, client in clients.items():
            singles[name] += [await one(client, model, tokens) for _ in range(single)]
        for name, client in clients.items():
            before, t0 = cpu_snapshot(roots or {}), time.perf_counter()
            results = await asyncio.gather(*(one(client, model, tokens) for _ in range(8)))
            took = time.perf_counter() - t0
            for group, secs in cpu_used(before, cpu_snapshot(roots or {})).items():
                cpu[name][group] = cpu[name].get(group, 0.0) + secs
            wall[name] += took
            conc[name].append(sum(r[1] for r in results) / took)
        if handle_round:
            try:
                out = await asyncio.to_thread(handle_round)
                singles["handle"] += [tuple(r) for r in out["singles"]]
                conc["handle"].append(out["conc"])
            except Exception as exc:  # the breakdown column is optional: keep the pool/vLLM figures
                print(f"  handle round failed: {str(exc)[-300:]}", flush=True)
        print(
            f"  round {len(conc['pool'])}/{rounds}: 8 concurrent tok/s "
            + ", ".join(f"{n} {c[-1]:.0f}" for n, c in conc.items() if c),
            flush=True,
        )
    for client in clients.values():
        await client.close()
    print(
        f"\nCPU used while 8 requests ran at once (cores busy on average; the box has {psutil.cpu_count()}):"
    )
    groups = sorted(
        {g for c in cpu.values() for g in c}, key=lambda g: -max(c.get(g, 0) for c in cpu.values())
    )
    print(f"  {'process':28s} " + " ".join(f"{n:>8s}" for n in cpu))
    for g in groups:
        print(
            f"  {g:28s} "
            + " ".join(f"{cpu[n].get(g, 0.0) / wall[n]:8.2f}" if wall[n] else "       -" for n in cpu)
        )
    print(
        f"  {'all':28s} "
        + " ".join(f"{sum(cpu[n].values()) / wall[n]:8.2f}" if wall[n] else "       -" for n in cpu)
    )
    return {
        name: {
            "ttft_ms": 1000 * median(r[0] for r in singles[name]),
            "single_tok_s": median(r[1] / r[2] for r in singles[name]),
            "conc8_tok_s": median(conc[name]),
        }
        for name in names
        if conc[name]
    }


def rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def replica_pids(pool: Pool) -> list[int]:
    node = psutil.Process(pool.nodes["llm"].pid)  # type: ignore[arg-type]
    pids = [p.pid for p in vllm_processes(node.pid)]
    for p in node.children(recursive=True):
        try:
            if "LLMServer" in " ".join(p.cmdline()[:1]) or "LLMServer" in p.name():
                pids.append(p.pid)
        except psutil.Error:
            continue
    return sorted(set(pids))


def vllm_server(port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    args = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(MODEL_CACHE),
        "--served-model-name",
        MODEL,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "2048",
        "--max-num-seqs",
        "16",
        "--dtype",
        "bfloat16",
        "--enforce-eager",
    ]
    with open(log, "ab") as f:
        return subprocess.Popen(args, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def stop_tree(proc: subprocess.Popen[bytes]) -> None:
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.Error:
        return
    for p in tree:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(tree, timeout=20)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.llm")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--single", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--stream-batching-ms",
        type=float,
        default=None,
        help="RMA_LLM_STREAM_BATCHING_MS for the pool's LLM replica (default: ray.serve.llm's 50)",
    )
    ap.add_argument(
        "--threads-bind",
        default=None,
        help="RMA_LLM_CPU_THREADS_BIND for the pool's replica (default: the pool's, 'nobind'; 'auto' is "
        "what ray.serve.llm + vllm-cpu do when left alone)",
    )
    ap.add_argument(
        "--ingress",
        choices=("direct", "proxied"),
        default=None,
        help="RMA_LLM_INGRESS for the pool (default: direct, the replica answers HTTP itself)",
    )
    ap.add_argument(
        "--executor",
        choices=("uni", "mp"),
        default=None,
        help="RMA_LLM_CPU_EXECUTOR (default uni; mp is what ray.serve.llm does when left alone)",
    )
    ap.add_argument(
        "--coalesce-ms",
        type=float,
        default=None,
        help="RMA_LLM_STREAM_COALESCE_MS: the direct shape writes a stream at most once per this many ms",
    )
    ap.add_argument(
        "--no-handle", action="store_true", help="skip the Serve-handle column (no HTTP, no ingress)"
    )
    args = ap.parse_args()
    # a SIGTERM (timeout, Ctrl-C from a wrapper) unwinds through the finally blocks: Serve, nodes, vLLM stop
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    llm_env = (
        {"RMA_LLM_STREAM_BATCHING_MS": str(args.stream_batching_ms)}
        if args.stream_batching_ms is not None
        else {}
    )
    if args.threads_bind is not None:
        llm_env["RMA_LLM_CPU_THREADS_BIND"] = args.threads_bind
    if args.ingress is not None:
        llm_env["RMA_LLM_INGRESS"] = args.ingress
    if args.coalesce_ms is not None:
        llm_env["RMA_LLM_STREAM_COALESCE_MS"] = str(args.coalesce_ms)
    if args.executor is not None:
        llm_env["RMA_LLM_CPU_EXECUTOR"] = args.executor

    steps: dict[str, float] = {}
    t0 = time.monotonic()
    last = [t0]

    def say(step: str) -> None:
        now = time.monotonic()
        steps[step] = now - last[0]
        last[0] = now
        print(f"  {step:10s} {steps[step]:6.1f} s", flush=True)

    root = Path(tempfile.mkdtemp(prefix="rma-bench-llm-"))
    load_before = os.getloadavg()[0]
    print("starting the pool (head, LLM node, Serve, LLM apps) ...", flush=True)
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="rma-bench-vllm-", suffix=".log")[1])
    proc = None
    with start_pool(root, say, llm_env) as pool:
        try:
            key = pool.client_key("bench")["key"]
            wait_for(
                lambda: (
                    httpx.get(
                        pool.serve_url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30
                    ).status_code
                    == 200
                ),
                timeout=60,
                what="the key to be accepted",
            )
            rss_pool = rss_mib(replica_pids(pool))
            ready_s = pool.deploy_info["ready_s"]
            print("starting vLLM's own OpenAI server on the same model (outside Ray) ...", flush=True)
            started = time.monotonic()
            proc = vllm_server(port, log)
            wait_for(
                lambda: httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).status_code == 200,
                timeout=900,
                interval=0.5,
                what=f"vLLM's server (log: {log})",
            )
            vllm_ready = time.monotonic() - started
            rss_vllm = rss_mib(
                [proc.pid, *[p.pid for p in psutil.Process(proc.pid).children(recursive=True)]]
            )
            print("measuring, interleaved: pool's authenticated /v1 route, vLLM's own server ...", flush=True)

            def handle_round() -> dict[str, Any]:
                out = pool.run(
                    ["-c", HANDLE_ROUND, MODEL, str(args.tokens), str(args.single), PROMPT], timeout=400
                )
                return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]

            figs = asyncio.run(
                measure(
                    {"pool": (pool.serve_url + "/v1", key), "vllm": (f"http://127.0.0.1:{port}/v1", "none")},
                    MODEL,
                    args.tokens,
                    args.single,
                    args.rounds,
                    None if args.no_handle else handle_round,
                    {
                        "pool LLM node": pool.nodes["llm"].pid,
                        "pool head": pool.nodes["head"].pid,
                        "vLLM server": proc.pid,
                    },
                )
            )
            pool_fig, vllm_fig, handle_fig = figs["pool"], figs["vllm"], figs.get("handle")
        finally:
            if proc is not None:
                stop_tree(proc)
            log.unlink(missing_ok=True)
            pool.run(
                ["-m", "deployments", "down", "--stores", "none", "--apps", "llm", "--address", pool.address],
                timeout=300,
            )
    shutil.rmtree(root, ignore_errors=True)

    print()
    print(
        f"LLM bench: {MODEL} on vllm-cpu, {args.tokens} tokens per request, load avg {load_before:.1f} -> "
        f"{os.getloadavg()[0]:.1f} (2-core box shared with other work)"
    )
    batching = "ray.serve.llm's 50" if args.stream_batching_ms is None else f"{args.stream_batching_ms:g}"
    defaults = LLMSettings()
    print(
        f"pool: ingress {args.ingress or 'direct'}, vllm-cpu executor {args.executor or defaults.cpu_executor}, "
        f"thread binding {args.threads_bind or defaults.cpu_threads_bind}, stream coalescing "
        f"{args.coalesce_ms if args.coalesce_ms is not None else defaults.stream_coalesce_ms:g} ms, "
        f"stream batching (handle and proxied paths) {batching} ms"
    )
    print(
        f"{'figure':34s} {'pool (auth /v1)':>16s} {'vLLM server':>12s} {'pool/vLLM':>10s}"
        + (f" {'replica via handle':>19s} {'handle/vLLM':>11s}" if handle_fig else "")
    )
    rows = [
        ("time to first token, ms (median)", "ttft_ms", False),
        ("tokens/s, one request", "single_tok_s", True),
        ("tokens/s, 8 concurrent", "conc8_tok_s", True),
    ]
    for label, k, higher in rows:
        ratio = pool_fig[k] / vllm_fig[k] if vllm_fig[k] else float("nan")
        line = f"{label:34s} {pool_fig[k]:16.1f} {vllm_fig[k]:12.1f} {ratio:9.2f}x"
        if handle_fig:
            line += f" {handle_fig[k]:19.1f} {handle_fig[k] / vllm_fig[k] if vllm_fig[k] else float('nan'):10.2f}x"
        print(line + ("" if higher else " (lower is better)"))
    if handle_fig:
        print(
            "(replica via handle: a Ray driver calling the LLMServer replica through a Serve handle, no HTTP, "
            "no Serve proxy, no ingress: pool minus handle is what the HTTP side costs)"
        )
    print(f"{'cold start to ready, s':34s} {ready_s:16.1f} {vllm_ready:12.1f}")
    print(f"{'replica RSS, MiB':34s} {rss_pool:16.0f} {rss_vllm:12.0f}")
    print("pool steps (s): " + ", ".join(f"{k} {v:.1f}" for k, v in steps.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
