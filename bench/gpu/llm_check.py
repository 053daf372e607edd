"""GPU check for the LLM tier, for a GPU machine with CUDA torch + transformers but no Ray, no vLLM, no internet,
and at most 64 MiB of files brought along (this repo's rma_ray/ and deployments/llm/catalog.py are enough).

Prints a table, in a few minutes:
  1. the capabilities probe (rma_ray.capabilities, NVML) and the tier it qualifies for (rma_ray.tiers);
  2. the catalog model the LLM deployment would serve on that GPU (deployments.llm.catalog.choose);
  3. what of the LLM path runs without vLLM: the embedded model's architecture (SmolLM2-135M: Llama, 30 layers,
     hidden 576, 9 heads / 3 KV heads, vocab 49152) built by transformers with RANDOM weights on the GPU (the 98 MB
     GGUF does not fit the 64 MiB allowance), greedy decoding of fixed-length outputs: tokens/s for 1 and for 8
     sequences, time to first token, peak GPU memory. This measures the compute path, not answers.

    python bench/gpu/llm_check.py [--tokens 128]       (from the repo root; PYTHONPATH=. is set by the script itself)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def row(label: str, value: object) -> None:
    print(f"  {label:38s} {value}")


def probe_section() -> int:
    print("capabilities and tier")
    try:
        from rma_ray.capabilities import probe
        from rma_ray.tiers import checks

        caps = probe()
        row("GPUs", ", ".join(f"{g.name} ({g.memory_mb} MiB, cc {g.compute_capability})" for g in caps.gpus) or "none")
        row("CPU cores / RAM MiB", f"{caps.cpu_cores} / {caps.ram_mb}")
        for c in checks(caps):
            row(f"tier {c.tier}", ("yes: " if c.ok else "no: ") + c.reason)
        return caps.gpu_memory_mb
    except Exception as exc:  # a trimmed environment (no psutil/pydantic/NVML): fall back to torch's view
        row("probe", f"unavailable: {exc}")
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(0).total_memory // 2**20)
        return 0


def catalog_section(gpu_mb: int) -> None:
    print("catalog choice")
    try:
        from deployments.llm.catalog import choose

        e = choose(gpu_mb)
        row("model for this GPU", f"{e.model_id} ({e.source}, max_model_len {e.max_model_len}, {e.quantization})")
    except Exception as exc:
        row("catalog", f"unavailable: {exc}")


def decode_section(tokens: int) -> None:
    print("embedded model architecture on the GPU (transformers, random weights)")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if not torch.cuda.is_available():
        row("CUDA", "not available: skipped")
        return
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      rope_theta=100000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to("cuda", dtype=torch.bfloat16).eval()
    prompt = torch.randint(100, 49000, (1, 32), device="cuda")

    def gen(batch: int) -> tuple[float, float]:
        ids = prompt.repeat(batch, 1)
        kw = {"attention_mask": torch.ones_like(ids), "pad_token_id": 0, "do_sample": False}
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        torch.cuda.synchronize()
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **kw)
        torch.cuda.synchronize()
        return ttft, batch * tokens / (time.perf_counter() - t0)

    gen(1)  # warm-up (kernels, allocator)
    ttft1, tps1 = gen(1)
    _, tps8 = gen(8)
    row("time to first token, ms", f"{ttft1 * 1000:.1f}")
    row(f"tokens/s, 1 sequence ({tokens} tokens)", f"{tps1:.0f}")
    row(f"tokens/s, 8 sequences ({tokens} tokens)", f"{tps8:.0f}")
    row("peak GPU memory, MiB", f"{torch.cuda.max_memory_allocated() / 2**20:.0f}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    t0 = time.perf_counter()
    gpu_mb = probe_section()
    catalog_section(gpu_mb)
    decode_section(args.tokens)
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
