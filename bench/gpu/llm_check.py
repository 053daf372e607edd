"""GPU check for the LLM and vision tier, for a GPU machine with CUDA torch + transformers but no Ray, no vLLM, no
internet, and at most 64 MiB of files brought along (this repo's rma_ray/, deployments/__init__.py,
deployments/llm/catalog.py and deployments/vision/{__init__,request}.py are enough: well under 1 MiB).

Prints a table, in a few minutes:
  1. the capabilities probe (rma_ray.capabilities: NVML, and a local Ollama server with its vision models) and the
     tier it qualifies for (rma_ray.tiers), with the Ray labels admission would give it;
  2. the catalog models the LLM and the vision deployments would serve on that GPU (deployments.llm.catalog);
  3. what of the LLM path runs without vLLM: the embedded model's architecture (SmolLM2-135M: Llama, 30 layers,
     hidden 576, 9 heads / 3 KV heads, vocab 49152) built by transformers with RANDOM weights (the 98 MB GGUF does
     not fit the 64 MiB allowance), greedy decoding of fixed-length outputs: tokens/s for 1 and 8 sequences, time
     to first token, peak GPU memory;
  4. what of the vision path runs: a test image checked by the route's own request code
     (deployments.vision.request), preprocessed by transformers' CLIPImageProcessor (336 px, as llava-1.5), and a
     LLaVA-architecture model (CLIP ViT-L/14-336 vision tower, the 576 image tokens it gives, a projector, the
     SmolLM2 text model) with RANDOM weights: image-to-first-token time and decode tokens/s.
These measure the compute path, not answers. Without CUDA (`--device cpu`, or auto on a machine without a GPU) it
runs the same steps with reduced sizes (4 layers, fewer tokens) as a smoke check that the script works.

    python bench/gpu/llm_check.py [--tokens 128] [--device auto|cuda|cpu]    (from anywhere: it finds the repo)
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def row(label: str, value: object) -> None:
    print(f"  {label:40s} {value}", flush=True)


def probe_section() -> int:
    print("capabilities and tier")
    try:
        from rma_ray.capabilities import probe
        from rma_ray.tiers import checks, choose, eligible, node_labels

        caps = probe()
        row(
            "GPUs",
            ", ".join(f"{g.name} ({g.memory_mb} MiB, cc {g.compute_capability})" for g in caps.gpus)
            or "none",
        )
        row("CPU cores / RAM MiB", f"{caps.cpu_cores} / {caps.ram_mb}")
        for c in checks(caps):
            row(f"tier {c.tier}", ("yes: " if c.ok else "no: ") + c.reason)
        row(
            "local Ollama",
            f"{caps.ollama.url}: models {caps.ollama.models or 'none'}, vision "
            f"{caps.ollama.vision_models or 'none'}"
            if caps.ollama
            else "none answered",
        )
        tiers = eligible(caps)
        if tiers:
            row("Ray labels at admission", node_labels(choose(tiers), "<id>", False, caps))
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
        from deployments.llm.catalog import NoModelFits, choose, choose_vision

        e = choose(gpu_mb)
        row(
            "chat model for this GPU",
            f"{e.model_id} ({e.source}, max_model_len {e.max_model_len}, {e.quantization})",
        )
        try:
            v = choose_vision(gpu_mb)
            row("vision model (RMA_VISION_BACKEND=vllm)", f"{v.model_id} ({v.source})")
        except NoModelFits as exc:
            row("vision model (RMA_VISION_BACKEND=vllm)", str(exc))
    except Exception as exc:
        row("catalog", f"unavailable: {exc}")


class Runner:
    """Where and how big: the real sizes on CUDA, reduced ones on CPU (a smoke check, not a figure)."""

    def __init__(self, device: str) -> None:
        import torch

        self.torch = torch
        self.cuda = device == "cuda"
        self.device = torch.device(device)
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.layers = None if self.cuda else 4  # None: the real depth

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def timed(self, fn: Any) -> tuple[Any, float]:
        self.sync()
        t0 = time.perf_counter()
        with self.torch.no_grad():
            out = fn()
        self.sync()
        return out, time.perf_counter() - t0

    def peak(self) -> str:
        if not self.cuda:
            return "n/a on CPU"
        return f"{self.torch.cuda.max_memory_allocated() / 2**20:.0f}"


def smollm2_config(layers: int | None) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers or 30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def decode_section(r: Runner, tokens: int) -> None:
    print(
        f"embedded model architecture on {r.device} (transformers, random weights"
        f"{'' if r.cuda else ', 4 layers: CPU smoke check'})"
    )
    from transformers import LlamaForCausalLM

    r.torch.manual_seed(0)
    model = LlamaForCausalLM(smollm2_config(r.layers)).to(r.device, dtype=r.dtype).eval()
    prompt = r.torch.randint(100, 49000, (1, 32), device=r.device)

    def gen(batch: int, n: int) -> Any:
        ids = prompt.repeat(batch, 1)
        return model.generate(
            ids,
            attention_mask=r.torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )

    r.timed(lambda: gen(1, 2))  # warm-up (kernels, allocator)
    _, ttft = r.timed(lambda: gen(1, 1))
    _, t1 = r.timed(lambda: gen(1, tokens))
    _, t8 = r.timed(lambda: gen(8, tokens))
    row("time to first token, ms", f"{ttft * 1000:.1f}")
    row(f"tokens/s, 1 sequence ({tokens} tokens)", f"{tokens / t1:.0f}")
    row(f"tokens/s, 8 sequences ({tokens} tokens)", f"{8 * tokens / t8:.0f}")
    row("peak GPU memory, MiB", r.peak())


def test_image() -> tuple[bytes, Any]:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (640, 480), (240, 240, 240))
    draw = ImageDraw.Draw(img)
    draw.rectangle((80, 60, 300, 300), fill=(220, 30, 30))
    draw.ellipse((360, 180, 580, 420), fill=(30, 60, 220))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue(), img


def vision_section(r: Runner, tokens: int) -> None:
    print(
        f"vision path on {r.device} (route checks, CLIP preprocessing, LLaVA architecture with random weights"
        f"{'' if r.cuda else ', 4+4 layers: CPU smoke check'})"
    )
    data, img = test_image()
    try:
        import base64
        import json

        from deployments.vision.request import Limits, from_json

        body = json.dumps(
            {
                "image": base64.b64encode(data).decode(),
                "prompt": "What shapes are in the picture?",
                "max_tokens": tokens,
            }
        ).encode()
        (inp, secs) = (lambda t0: (from_json(body, Limits()), time.perf_counter() - t0))(time.perf_counter())
        row(
            "route request check (JSON, base64 JPEG)",
            f"{inp.mime} {inp.width}x{inp.height}, {secs * 1000:.1f} ms",
        )
    except Exception as exc:  # no pydantic/Pillow in this environment
        row("route request check", f"unavailable: {exc}")

    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    t0 = time.perf_counter()
    pixels = processor(images=img, return_tensors="pt")["pixel_values"]
    row("CLIP preprocessing (640x480 -> 336x336), ms", f"{(time.perf_counter() - t0) * 1000:.1f}")

    text = smollm2_config(r.layers)
    image_token = text.vocab_size - 1
    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=r.layers or 24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token,
        image_seq_length=576,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    r.torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).to(r.device, dtype=r.dtype).eval()
    n_image = (336 // 14) ** 2  # 576 patch features, CLS dropped ("default")
    prompt = r.torch.randint(100, 49000, (1, 16))
    ids = r.torch.cat([r.torch.tensor([[1]]), r.torch.full((1, n_image), image_token), prompt], dim=1).to(
        r.device
    )
    pixel_values = pixels.to(r.device, dtype=r.dtype)

    def gen(n: int) -> Any:
        return model.generate(
            input_ids=ids,
            pixel_values=pixel_values,
            attention_mask=r.torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )

    r.timed(lambda: gen(2))  # warm-up
    ttft = min(r.timed(lambda: gen(1))[1] for _ in range(2))
    runs = [r.timed(lambda: gen(tokens)) for _ in range(2)]
    assert runs[0][0].shape[1] == ids.shape[1] + tokens
    total = min(t for _, t in runs)
    row(
        "params (vision tower + projector + text)",
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f} M",
    )
    row("image + prompt to first token, ms", f"{ttft * 1000:.1f}  ({ids.shape[1]} input tokens)")
    row(f"request with {tokens} tokens, ms", f"{total * 1000:.1f}")
    decode = (tokens - 1) / (total - ttft) if total > ttft * 1.05 else None
    row("decode tokens/s after the first", f"{decode:.0f}" if decode else "n/a (too few tokens to tell)")
    row("peak GPU memory, MiB", r.peak())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--tokens", type=int, default=None, help="tokens per sequence (default 128 on CUDA, 8 on CPU)"
    )
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    args = ap.parse_args()
    t0 = time.perf_counter()
    gpu_mb = probe_section()
    catalog_section(gpu_mb)
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device visible to torch", file=sys.stderr)
        return 1
    tokens = args.tokens or (128 if device == "cuda" else 8)
    r = Runner(device)
    row("torch / device", f"{torch.__version__} / {torch.cuda.get_device_name(0) if r.cuda else 'CPU'}")
    for section in (decode_section, vision_section):
        try:
            section(r, tokens)
        except Exception as exc:  # one section failing still prints the others
            row(f"{section.__name__}", f"FAILED: {type(exc).__name__}: {str(exc)[:300]}")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
