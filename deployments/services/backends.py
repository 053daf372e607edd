"""One calling convention for the services' collaborators: `await backend.method(...)`, whether the other side
is a Serve deployment (a DeploymentHandle, in production) or an object in this process (unit tests, benches).

Errors raised by the other side come back as themselves: Ray wraps a remote exception, `unwrap` takes the
Refusal (with its status and message) back out, so the gateway answers with what the service said."""

from __future__ import annotations

import asyncio
import functools
import inspect
from dataclasses import dataclass
from typing import Any

from deployments.gateway.refusal import Refusal, unwrap


class RemoteBackend:
    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._handle, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

            try:
                return await method.remote(*args, **kwargs)
            except (BackPressureError, DeploymentUnavailableError):
                raise
            except Exception as exc:
                inner = unwrap(exc)
                if isinstance(inner, (Refusal, BackPressureError, DeploymentUnavailableError)):
                    raise inner from None
                raise

        return call


class LocalBackend:
    def __init__(self, obj: Any) -> None:
        self._obj = obj

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._obj, name)
        if inspect.iscoroutinefunction(attr):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.to_thread(functools.partial(attr, *args, **kwargs))

        return call


def as_backend(obj: Any) -> Any:
    if obj is None or isinstance(obj, (RemoteBackend, LocalBackend)):
        return obj
    try:
        from ray.serve.handle import DeploymentHandle

        if isinstance(obj, DeploymentHandle):
            return RemoteBackend(obj)
    except ImportError:
        pass
    return LocalBackend(obj)


@dataclass
class Backends:
    """The gateway's collaborators, one per service (a Serve handle, or an object in this process)."""

    documents: Any
    ocr: Any
    uploads: Any
    notes: Any
    rag: Any
    graph: Any
    client_rag: Any = None  # clients' own collections (trusted nodes); the shared RAG deployment when absent

    def __post_init__(self) -> None:
        if self.client_rag is None:
            self.client_rag = self.rag
        for name in ("documents", "ocr", "uploads", "notes", "rag", "graph", "client_rag"):
            setattr(self, name, as_backend(getattr(self, name)))
