"""The OpenAI Batch API's HTTP side: two Serve apps, `rma-files` at /v1/files, `rma-batches` at /v1/batches.

Why two apps of their own: Serve routes a request to the app with the longest matching route prefix, and one
app has one prefix. /v1 belongs to the LLM app, whose ingress is vLLM's own OpenAI app behind the key gate
(`deployments.llm.gate`): adding routes there would put the Batch API inside the LLM replica, restarted with
the model and placed on GPU nodes. The embeddings already sit at /v1/embeddings the same way. So each prefix
gets a thin ingress on trusted nodes (it sees client keys): the key check (`deployments.gateway.auth`),
OpenAI's error shape, the body limit, then one call to the `batch_store` deployment
(`deployments.services.batches`, trusted data tier, beside the uploads volume), which lives in the
rma-batches app; the files ingress reaches it by name. Both are deployed with the services (`rma up --apps
services`), with the services' settings.

Ownership is the services' rule: another client's file or batch is a 404, as if it never existed."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from deployments.gateway import quota
from deployments.gateway.asgi import PrefixIsRoot, body_limit
from deployments.gateway.auth import ClientDep, current_client
from deployments.gateway.refusal import install_refusals
from deployments.services import batch_format as bf
from deployments.services.backends import as_backend
from deployments.services.http import BackendCaller, form_file, json_body, owner
from deployments.services.settings import ServicesSettings

FILES_APP, FILES_PREFIX = "rma-files", "/v1/files"
BATCHES_APP, BATCHES_PREFIX = "rma-batches", "/v1/batches"
STORE_DEPLOYMENT = "batch_store"


class CreateBatch(BaseModel):
    """POST /v1/batches (OpenAI's fields; others the client may add are ignored)."""

    model_config = ConfigDict(extra="ignore")
    input_file_id: str = Field(min_length=1, max_length=100)
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, Any] | None = None


class _Store:
    """The store's handle, found by name on first use (the files app reaches the rma-batches app's)."""

    def __init__(self, store: Any, settings: ServicesSettings) -> None:
        self._store = as_backend(store) if store is not None else None
        self.call = BackendCaller(settings)

    @property
    def store(self) -> Any:
        if self._store is None:
            self._store = as_backend(serve.get_deployment_handle(STORE_DEPLOYMENT, app_name=BATCHES_APP))
        return self._store


def _app(settings: ServicesSettings, max_body: int) -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, dependencies=[Depends(current_client)])
    install_refusals(app, "openai", catch_all=True)
    app.add_middleware(PrefixIsRoot)  # POST /v1/files itself, not a 307 to /v1/files/
    app.add_middleware(body_limit, max_bytes=max_body, shape="openai")
    return app


def files_api(settings: ServicesSettings, store: Any = None) -> FastAPI:
    s, st = settings, _Store(store, settings)
    files = _app(s, s.batch_file_max_bytes + 64 * 1024)

    @files.post("/")
    async def create_file(request: Request, client: ClientDep) -> Any:
        data, filename, _, fields = await form_file(request, s.batch_file_max_bytes)
        purpose = fields.get("purpose", "")
        m = quota.meter()
        if m is not None:  # the day's upload quota (429 past it, nothing stored), and the key's usage
            await m.charge_upload(client.key_id, client.quota, len(data))
        return await st.call("batch store", st.store.put_file, data, filename, purpose, owner(client))

    @files.get("/")
    async def list_files(
        client: ClientDep,
        purpose: str | None = Query(default=None, max_length=40),
        limit: int = Query(default=bf.FILES_MAX_LIMIT, ge=1, le=bf.FILES_MAX_LIMIT),
        order: Literal["asc", "desc"] = "desc",
        after: str | None = Query(default=None, max_length=100),
    ) -> Any:
        return await st.call(
            "batch store", st.store.list_files, owner(client), purpose, limit, order, after, retry=True
        )

    @files.get("/{file_id}")
    async def get_file(file_id: str, client: ClientDep) -> Any:
        return await st.call("batch store", st.store.get_file, file_id, owner(client), retry=True)

    @files.delete("/{file_id}")
    async def delete_file(file_id: str, client: ClientDep) -> Any:
        return await st.call("batch store", st.store.delete_file, file_id, owner(client))

    @files.get("/{file_id}/content")
    async def get_file_content(file_id: str, client: ClientDep) -> Response:
        _, data = await st.call("batch store", st.store.read_file, file_id, owner(client), retry=True)
        return Response(data, media_type="application/octet-stream")

    return files


def batches_api(settings: ServicesSettings, store: Any = None) -> FastAPI:
    s, st = settings, _Store(store, settings)
    batches = _app(s, 64 * 1024)

    @batches.post("/")
    async def create_batch(request: Request, client: ClientDep) -> Any:
        body = await json_body(request, CreateBatch)
        return await st.call(
            "batch store",
            st.store.create,
            owner(client),
            body.input_file_id,
            body.endpoint,
            body.completion_window,
            body.metadata,
            client.key_id,  # its items' tokens count against this key's day, as its online requests' do
            client.quota,
        )

    @batches.get("/")
    async def list_batches(
        client: ClientDep, after: str | None = None, limit: int = Query(default=20, ge=1, le=100)
    ) -> Any:
        return await st.call("batch store", st.store.list, owner(client), after, limit, retry=True)

    @batches.get("/{batch_id}")
    async def get_batch(batch_id: str, client: ClientDep) -> Any:
        return await st.call("batch store", st.store.get, batch_id, owner(client), retry=True)

    @batches.post("/{batch_id}/cancel")
    async def cancel_batch(batch_id: str, client: ClientDep) -> Any:
        return await st.call("batch store", st.store.cancel, batch_id, owner(client), retry=True)

    return batches


@serve.ingress()
class FilesIngress:
    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = ServicesSettings(**settings)

    def __serve_build_asgi_app__(self) -> Any:
        return files_api(self.settings)


@serve.ingress()
class BatchesIngress:
    def __init__(self, settings: dict[str, Any], store: Any) -> None:
        self.settings, self.store = ServicesSettings(**settings), store

    def __serve_build_asgi_app__(self) -> Any:
        return batches_api(self.settings, self.store)


def _ingress_options(name: str, s: ServicesSettings) -> dict[str, Any]:
    from deployments.services.app import OFFLINE_ENV

    actor: dict[str, Any] = {
        "num_cpus": 0,
        "runtime_env": {"env_vars": {**OFFLINE_ENV, **s.replica_env, **s.ingress_env}},
    }
    if s.client_data_selector:
        actor["label_selector"] = dict(s.client_data_selector)
    return {
        "name": name,
        "ray_actor_options": actor,
        "max_ongoing_requests": 128,
        "num_replicas": 1,
        "health_check_period_s": 10,
        "health_check_timeout_s": 30,
        "logging_config": {"enable_access_log": s.access_log},
    }


def build_files_app(settings: ServicesSettings) -> Any:
    return (
        serve.deployment(FilesIngress)
        .options(**_ingress_options("files_ingress", settings))
        .bind(settings.model_dump(mode="json"))
    )


def build_batches_app(settings: ServicesSettings) -> Any:
    from deployments.services.app import _options
    from deployments.services.batches import Batches

    cfg = settings.model_dump(mode="json")
    store_opts = _options(STORE_DEPLOYMENT, settings.batches, settings.data_selector, settings)
    store_opts.pop("autoscaling_config")
    store_opts["num_replicas"] = 1  # beside its volume; Serve replaces it when it dies, and it resumes
    store = serve.deployment(Batches).options(**store_opts).bind(cfg)
    return (
        serve.deployment(BatchesIngress)
        .options(**_ingress_options("batches_ingress", settings))
        .bind(cfg, store)
    )
