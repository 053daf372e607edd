"""The RAG services' embedder: the pool's one copy of the model (the `rma-embeddings` app's `Embedder`)
through a Serve handle, called from the services' sync methods (Serve runs them in threads).

Where that app is not deployed (a services app on its own, a test without it) the replica loads the same model
itself, once, and says so in its log: RAG keeps working, with a second copy of the model."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from deployments.embeddings.config import EMBEDDINGS_APP, MODEL_DEPLOYMENT

log = logging.getLogger("rma.embeddings")


def _pool_app_running() -> bool:
    from ray import serve

    apps = serve.status().applications
    return EMBEDDINGS_APP in apps and MODEL_DEPLOYMENT in apps[EMBEDDINGS_APP].deployments


class PoolEmbedder:
    """`embedder(texts) -> vectors` (lists of floats, unit length). `local` builds the in-process fallback."""

    def __init__(
        self, local: Callable[[], Callable[[list[str]], list[list[float]]]], timeout_s: float = 120
    ) -> None:
        self._local_factory, self.timeout_s = local, timeout_s
        self._lock = threading.Lock()
        self._handle: Any = None
        self._local: Callable[[list[str]], list[list[float]]] | None = None

    def _resolve(self) -> None:
        with self._lock:
            if self._handle is not None or self._local is not None:
                return
            try:
                running = _pool_app_running()
            except Exception as exc:  # not inside a Ray cluster (unit tests, benches)
                log.info("no Serve here (%s): the embedding model runs in this process", type(exc).__name__)
                running = False
            if running:
                from ray import serve

                self._handle = serve.get_deployment_handle(MODEL_DEPLOYMENT, app_name=EMBEDDINGS_APP)
            else:
                log.warning(
                    "the %s app is not deployed: this replica loads its own copy of the embedding model",
                    EMBEDDINGS_APP,
                )
                self._local = self._local_factory()

    @property
    def shared(self) -> bool:
        self._resolve()
        return self._handle is not None

    def __call__(self, texts: list[str]) -> list[list[float]]:
        self._resolve()
        if self._local is not None:
            return self._local(texts)
        if not texts:
            return []
        # truncate: RAG chunks are cut by characters; what passes the model's window is cut as before
        out = self._handle.embed.remote({"input": list(texts), "truncate": True}).result(
            timeout_s=self.timeout_s
        )
        return [v.tolist() for v in out["vectors"]]
