"""The OpenAI Batch API's store and runner: the `batches` deployment of the services app, on the trusted data
tier beside the uploads volume. Files are blobs on that volume (`uploads.BlobStore`), their metadata, the
batches and one row per item in the services' Postgres (`db.BatchFile`, `db.Batch`, `db.BatchItem`). Equal
bytes are one blob: deleting a file removes it only when no other file or upload names it.

Durable queue: procrastinate (3.x) on the same Postgres. Chosen over pgqueuer because it is a plain library
(no broker, no CLI-managed schema: its schema SQL goes into the services' Alembic migration 0002, in a
schema of its own), runs its worker inside an asyncio loop we own (the replica's), gives each worker a
heartbeat and lists the jobs of a worker that stopped beating (`get_stalled_jobs`), retries with a bounded
strategy, and defers periodic tasks once per period across runners. One job per item; the item row, not
the job, is the truth:

- a job claims its item (attempts + 1, committed before the model is called); past `batch_max_attempts` the
  item gets an error line instead of another call;
- the answer is written by an upsert keyed by (batch, custom_id) that leaves a finished row alone: an item
  whose runner died after the model answered, and was run again, is still in the output once;
- a periodic sweep (every 10 s) puts the jobs of dead runners back (stalled: no heartbeat for
  `batch_stalled_s`), expires batches past their window, and finalizes a batch whose items are all finished
  (the output and error files in OpenAI's line format), so a restart of the runner, a power cut of its donor
  (Serve starts it on another: tests/e2e/test_batch_e2e.py) or a restart of the whole pool (`rma down`, `rma
  up`: tests/integration/test_batch_restart.py) resumes where it was.

Items go to the same Serve handles the online routes use (`LLMGateway.openai` of the rma-inference app,
`EmbeddingsIngress.openai` of rma-embeddings), at most `batch_concurrency` model calls at a time per runner: a
batch never holds more of the model's queue than that, so online requests keep their place. The runner works
on twice as many items as it has model calls (`ITEMS_PER_CALL_SLOT`): an item's bookkeeping (procrastinate's
fetch and finish, the claim, the output line, the finalize check: some ten Postgres round trips, slow on a
replica that runs at nice 15 beside a busy model) overlaps another item's model call instead of leaving its
slot of the model's queue empty (measured: `bench.batch`, items 0.85x of online with one item per slot)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import DateTime, and_, exists, func, literal, or_, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import SQLAlchemyError

from deployments.gateway.quota import meter as quota_meter
from deployments.gateway.refusal import Refusal, not_found, refusal_from, unwrap
from deployments.services import batch_format as bf
from deployments.services.db import (
    Batch,
    BatchFile,
    BatchItem,
    Database,
    Upload,
    file_id_time,
    store_endpoint,
)
from deployments.services.ingest import IngestJobs
from deployments.services.settings import ServicesSettings
from deployments.services.uploads import BlobStore, blob_lock, default_uploads_dir, put_locked
from rma_ray.wire import Quota

log = logging.getLogger("rma.services.batches")
QUEUE = "rma-batch"
QUEUE_SCHEMA = "procrastinate"
ITEMS_PER_CALL_SLOT = 2  # items a runner works on per model-call slot (the module docstring says why)
SWEEP_CRON = "* * * * * */10"  # every 10 s: croniter's seconds are the sixth field, the last
TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
DIED = {"ActorDiedError", "RayActorError", "ActorUnavailableError", "WorkerCrashedError"}
UNAVAILABLE = DIED | {"BackPressureError", "DeploymentUnavailableError", "TimeoutError"}


class Busy(Exception):
    """The item is running in another job whose runner beat recently: not run twice."""


class Transient(Exception):
    """The model could not be asked now (its replica is away, full or died): the item is tried again."""


def _in_ray() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def _report_queue(body: Any) -> None:
    from deployments.gateway.auth import coordinator_identity
    from rma_ray.client import AdmissionClient

    url, credential = coordinator_identity()
    with AdmissionClient(url, credential, timeout=2.0) as client:
        client.report_batch_queue(body)


def _now() -> datetime:
    return datetime.now(UTC)


def file_dict(row: BatchFile) -> dict[str, Any]:
    return bf.file_object(row.id, row.size, row.created_at, row.filename, row.purpose)


def batch_dict(row: Batch, counts: dict[str, int]) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "batch",
        "endpoint": row.endpoint,
        "errors": row.errors,
        "input_file_id": row.input_file_id,
        "completion_window": row.completion_window,
        "status": row.status,
        "output_file_id": row.output_file_id,
        "error_file_id": row.error_file_id,
        "created_at": bf.ts(row.created_at),
        "in_progress_at": bf.ts(row.in_progress_at),
        "expires_at": bf.ts(row.expires_at),
        "finalizing_at": bf.ts(row.finalizing_at),
        "completed_at": bf.ts(row.completed_at),
        "failed_at": bf.ts(row.failed_at),
        "expired_at": bf.ts(row.expired_at),
        "cancelling_at": bf.ts(row.cancelling_at),
        "cancelled_at": bf.ts(row.cancelled_at),
        "request_counts": bf.request_counts(row.total, counts),
        "metadata": row.meta,
    }


def _check_metadata(metadata: Any) -> dict[str, str] | None:
    if metadata is None:
        return None
    if (
        not isinstance(metadata, dict)
        or len(metadata) > 16
        or not all(isinstance(k, str) and len(k) <= 64 for k in metadata)
        or not all(isinstance(v, str) and len(v) <= 512 for v in metadata.values())
    ):
        raise Refusal(
            400,
            "invalid_request",
            "metadata must be at most 16 string pairs (keys up to 64, values up to 512 characters)",
            param="metadata",
        )
    return dict(metadata)


class Batches(IngestJobs):
    """The Serve deployment's class. The routes' half (files, batches) is plain methods; the runner half
    (procrastinate's worker and the sweep) starts on the replica's event loop at its first call or health
    check. The document-ingest jobs (`deployments.services.ingest`) share its queue app, runner and sweep."""

    def __init__(
        self,
        settings: dict[str, Any] | None = None,
        endpoint: Any = store_endpoint,
        models: Any = None,
        reporter: Any = "default",
        pipeline: Any = None,
    ) -> None:
        self.settings = s = ServicesSettings(**(settings or {}))
        self.blobs = BlobStore(Path(s.uploads_dir) if s.uploads_dir else default_uploads_dir())
        self.db = Database(s.database, endpoint)
        self._endpoint = endpoint
        self.models = models if models is not None else ServeModels(s.batch_item_timeout_s)
        self._app: Any = None
        self._app_generation = 0  # the Database generation (the store's address) the app was opened for
        self._runners_generation = 0  # and the one the runners were started on
        self._stale_apps: list[Any] = []
        self._item_task: Any = None
        self._runner: asyncio.Task[None] | None = None
        # the model calls in flight (batch_concurrency), for the event loop they run on
        self._call_slots: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = None
        self._open_lock = asyncio.Lock()
        self.worker_name = f"rma-batch-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        # the queue's figures go to the coordinator after each sweep (inside Ray; a test passes its own)
        self._reporter = (_report_queue if _in_ray() else None) if reporter == "default" else reporter
        self._report_failing = False
        self.pipeline = pipeline  # the ingest jobs' services (None: the services app's, by handle)

    # -- files -------------------------------------------------------------------------------------------
    def put_file(self, data: bytes, filename: str | None, purpose: str, owner: str) -> dict[str, Any]:
        s = self.settings
        if purpose != "batch":
            raise Refusal(
                400, "invalid_request", f"purpose must be 'batch' (got {purpose!r})", param="purpose"
            )
        if len(data) > s.batch_file_max_bytes:
            raise Refusal(
                413,
                "file_too_large",
                f"the file is {len(data):,} bytes; the limit is {s.batch_file_max_bytes:,}",
                param="file",
            )
        if filename and "\0" in filename:
            raise Refusal(
                400, "invalid_request", "the file's name must not contain a NUL character", param="file"
            )
        endpoint, items = bf.check_jsonl(data, s.batch_max_lines)
        with self.db.sessions().begin() as db:
            row = BatchFile.create(
                owner=owner,
                sha256=self._put_blob(db, data),
                filename=(filename or "")[:500] or None,
                purpose=purpose,
                size=len(data),
                endpoint=endpoint,
                lines=len(items),
            )
            db.add(row)
            db.flush()
            return file_dict(row)

    def _file(self, file_id: str, owner: str) -> BatchFile:
        with self.db.sessions()() as db:
            row = db.get(BatchFile, str(file_id)[:40])
        if row is None or row.owner != owner:
            raise not_found("file", file_id)
        return row

    def get_file(self, file_id: str, owner: str) -> dict[str, Any]:
        return file_dict(self._file(file_id, owner))

    def list_files(
        self,
        owner: str,
        purpose: str | None = None,
        limit: int = bf.FILES_MAX_LIMIT,
        order: str = "desc",
        after: str | None = None,
    ) -> dict[str, Any]:
        """The owner's files (inputs, and the output and error files of their batches) by created_at, OpenAI's
        list shape; at most bf.FILES_PAGE a page, the rest after the page's last id."""
        if not 1 <= limit <= bf.FILES_MAX_LIMIT:
            raise Refusal(
                400, "invalid_request", f"limit must be between 1 and {bf.FILES_MAX_LIMIT:,}", param="limit"
            )
        if order not in ("asc", "desc"):
            raise Refusal(400, "invalid_request", 'order must be "asc" or "desc"', param="order")
        key = tuple_(BatchFile.created_at, BatchFile.id)
        with self.db.sessions()() as db:
            q = select(BatchFile).where(BatchFile.owner == owner)
            if purpose:
                q = q.where(BatchFile.purpose == purpose)
            if after:
                # a file id carries its creation time: the cursor is placed by it even once that file was
                # deleted (a client deleting as it pages on), and another owner's id only says a time
                at = file_id_time(str(after))
                if at is None:
                    raise Refusal(
                        404,
                        "not_found",
                        f"no file with id {after} (the `after` cursor): list again without `after`",
                        param="after",
                    )
                mark = tuple_(literal(at, DateTime(timezone=True)), literal(str(after)))
                q = q.where(key < mark if order == "desc" else key > mark)
            by = (BatchFile.created_at, BatchFile.id)
            q = q.order_by(*(c.desc() for c in by) if order == "desc" else by)
            page = min(limit, bf.FILES_PAGE)
            rows = list(db.scalars(q.limit(page + 1)))
            return bf.list_page([file_dict(r) for r in rows[:page]], len(rows) > page)

    def delete_file(self, file_id: str, owner: str) -> dict[str, Any]:
        """The row first, in its own transaction; then the bytes, only if no file (of any owner) and no upload
        has the same SHA-256 (the volume keeps one copy of equal bytes). A file that an unfinished batch reads
        is refused (409): the row lock orders this against `_create`, which locks it too. Files written here
        and uploads take the blob's lock until their row commits (`uploads.put_locked`), so bytes that a new row
        is being written with are never unlinked."""
        with self.db.sessions().begin() as db:
            row = db.get(BatchFile, str(file_id)[:40], with_for_update=True)
            if row is None or row.owner != owner:
                raise not_found("file", file_id)
            reader = db.execute(
                select(Batch.id, Batch.status)
                .where(Batch.input_file_id == row.id, Batch.status.notin_(bf.FINAL))
                .limit(1)
            ).first()
            if reader is not None:
                raise Refusal(
                    409,
                    "file_in_use",
                    f"file {row.id} is the input of batch {reader.id}, which is {reader.status}: cancel the "
                    "batch or wait until it ends, then delete the file",
                )
            fid, sha = row.id, row.sha256
            db.delete(row)
        try:
            self._drop_blob(sha)
        except Exception as exc:  # the file is deleted; its bytes stay on the volume (equal bytes reuse them)
            log.warning(
                "file %s deleted; its bytes %s were not removed: %s", fid, sha[:12], type(exc).__name__
            )
        return bf.file_deleted(fid)

    def _put_blob(self, db: Any, data: bytes) -> str:
        return put_locked(db, self.blobs, data)

    def _drop_blob(self, sha: str) -> None:
        with self.db.sessions().begin() as db:
            db.execute(select(func.pg_advisory_xact_lock(blob_lock(sha))))
            used = db.scalar(
                select(exists().where(BatchFile.sha256 == sha) | exists().where(Upload.sha256 == sha))
            )
            if not used:
                self.blobs.path(sha).unlink(missing_ok=True)

    def read_file(self, file_id: str, owner: str) -> tuple[dict[str, Any], bytes]:
        row = self._file(file_id, owner)
        try:
            return file_dict(row), self.blobs.read(row.sha256)
        except FileNotFoundError:
            raise Refusal(
                410, "file_gone", f"the bytes of file {file_id} are no longer on this volume"
            ) from None

    # -- batches -----------------------------------------------------------------------------------------
    def _counts(self, db: Any, batch_ids: list[str]) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {b: {} for b in batch_ids}
        if batch_ids:
            q = (
                select(BatchItem.batch_id, BatchItem.status, func.count())
                .where(BatchItem.batch_id.in_(batch_ids))
                .group_by(BatchItem.batch_id, BatchItem.status)
            )
            for bid, status, n in db.execute(q):
                out[bid][status] = n
        return out

    def _batch(self, db: Any, batch_id: str, owner: str) -> Batch:
        row = db.get(Batch, str(batch_id)[:40])
        if row is None or row.owner != owner:
            raise not_found("batch", batch_id)
        return row

    def _dict(self, db: Any, row: Batch) -> dict[str, Any]:
        return batch_dict(row, self._counts(db, [row.id])[row.id])

    async def create(
        self,
        owner: str,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: dict[str, str] | None = None,
        key_id: str | None = None,
        quota: Quota | None = None,
    ) -> dict[str, Any]:
        """A batch of the owner's input file; `key_id` (the client key that asks, with its quota): the key its
        items' tokens are charged to, and refused once that key's tokens for the day are spent."""
        out, items = await asyncio.to_thread(
            self._create, owner, input_file_id, endpoint, completion_window, metadata, key_id, quota
        )
        await self._defer(out["id"], items)
        started = await asyncio.to_thread(self._start, out["id"])
        return started

    def _create(
        self,
        owner: str,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: Any,
        key_id: str | None = None,
        quota: Quota | None = None,
    ) -> tuple[dict[str, Any], list[str]]:
        s = self.settings
        if endpoint not in bf.ENDPOINTS:
            raise Refusal(
                400, "invalid_request", f"endpoint must be one of {', '.join(bf.ENDPOINTS)}", param="endpoint"
            )
        if completion_window not in bf.COMPLETION_WINDOWS:
            raise Refusal(
                400, "invalid_request", 'completion_window must be "24h"', param="completion_window"
            )
        meta = _check_metadata(metadata)
        src = self._file(input_file_id, owner)
        if src.purpose != "batch":
            raise Refusal(
                400,
                "invalid_request",
                f"file {input_file_id} is not a batch input file",
                param="input_file_id",
            )
        if src.endpoint != endpoint:
            raise Refusal(
                400,
                "invalid_request",
                f"the file's requests are for {src.endpoint}, not {endpoint}: create the batch with "
                f"endpoint {src.endpoint!r}",
                param="endpoint",
            )
        try:
            _, items = bf.check_jsonl(self.blobs.read(src.sha256), s.batch_max_lines)
        except FileNotFoundError:  # deleted since `_file` read its row
            raise not_found("file", input_file_id) from None
        with self.db.sessions().begin() as db:
            if db.get(BatchFile, src.id, with_for_update=True) is None:  # deleted meanwhile
                raise not_found("file", input_file_id)
            open_batches = db.scalar(
                select(func.count())
                .select_from(Batch)
                .where(Batch.owner == owner, Batch.status.notin_(bf.FINAL))
            )
            if open_batches >= s.batch_max_queued:
                raise Refusal(
                    429,
                    "too_many_batches",
                    f"this key has {open_batches} batches not finished; the limit is {s.batch_max_queued}: "
                    "wait for one to finish or cancel one",
                    retry_after_s=60,
                )
            waiting = db.scalar(
                select(func.count())
                .select_from(BatchItem)
                .join(Batch, Batch.id == BatchItem.batch_id)
                .where(Batch.owner == owner, BatchItem.status.in_((bf.PENDING, bf.RUNNING)))
            )
            if waiting + len(items) > s.batch_max_queued_items:
                raise Refusal(
                    429,
                    "too_many_queued_requests",
                    f"this key has {waiting:,} batch requests waiting; {len(items):,} more would pass the "
                    f"limit of {s.batch_max_queued_items:,}: wait, or send a smaller file",
                    retry_after_s=60,
                )
            now = _now()
            row = Batch(
                owner=owner,
                endpoint=endpoint,
                input_file_id=src.id,
                completion_window=completion_window,
                status=bf.VALIDATING,
                meta=meta,
                total=len(items),
                created_at=now,
                expires_at=now + timedelta(seconds=bf.COMPLETION_WINDOWS[completion_window]),
                key_id=key_id,
                quota=quota.model_dump(mode="json") if key_id and quota is not None else None,
            )
            db.add(row)
            db.flush()
            db.add_all(
                BatchItem(
                    batch_id=row.id,
                    custom_id=it.custom_id,
                    line=it.line,
                    body=it.body,
                    status=bf.PENDING,
                    attempts=0,
                )
                for it in items
            )
            db.flush()
            return batch_dict(row, {bf.PENDING: len(items)}), [it.custom_id for it in items]

    def _start(self, batch_id: str) -> dict[str, Any]:
        with self.db.sessions().begin() as db:
            row = db.get(Batch, batch_id, with_for_update=True)
            if row.status == bf.VALIDATING:
                row.status = bf.move(row.status, "start")
                row.in_progress_at = _now()
            return self._dict(db, row)

    def get(self, batch_id: str, owner: str) -> dict[str, Any]:
        with self.db.sessions()() as db:
            return self._dict(db, self._batch(db, batch_id, owner))

    def list(self, owner: str, after: str | None = None, limit: int = 20) -> dict[str, Any]:
        if not 1 <= limit <= 100:
            raise Refusal(400, "invalid_request", "limit must be between 1 and 100", param="limit")
        with self.db.sessions()() as db:
            q = select(Batch).where(Batch.owner == owner)
            if after:
                cursor = self._batch(db, after, owner)
                q = q.where(
                    (Batch.created_at < cursor.created_at)
                    | ((Batch.created_at == cursor.created_at) & (Batch.id < cursor.id))
                )
            rows = list(db.scalars(q.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit + 1)))
            page = rows[:limit]
            counts = self._counts(db, [r.id for r in page])
            return bf.list_page([batch_dict(r, counts[r.id]) for r in page], len(rows) > limit)

    async def cancel(self, batch_id: str, owner: str) -> dict[str, Any]:
        out = await asyncio.to_thread(self._cancel, batch_id, owner)
        await asyncio.to_thread(self.finalize, out["id"])
        return await asyncio.to_thread(self.get, batch_id, owner)

    def _cancel(self, batch_id: str, owner: str) -> dict[str, Any]:
        with self.db.sessions().begin() as db:
            row = self._batch(db, batch_id, owner)
            db.refresh(row, with_for_update=True)
            if row.status in (bf.CANCELLING, bf.CANCELLED):
                return self._dict(db, row)
            row.status = bf.move(row.status, "cancel")
            row.cancelling_at = _now()
            # no new item starts; those running finish and keep their answers
            db.execute(
                update(BatchItem)
                .where(BatchItem.batch_id == row.id, BatchItem.status == bf.PENDING)
                .values(status=bf.SKIPPED, updated_at=_now())
            )
            return self._dict(db, row)

    # -- the runner ----------------------------------------------------------------------------------------
    def _conninfo(self) -> tuple[int, str]:
        """The queue's conninfo and the `Database` generation it belongs to (its endpoint: one ask, one
        address for both)."""
        from psycopg.conninfo import make_conninfo

        self.db.sessions()  # the database exists and is migrated (procrastinate's schema comes with it)
        generation = self.db.generation  # first: an engine made meanwhile is newer, never older, than `ep`
        ep = self.db.endpoint
        return generation, make_conninfo(
            host=ep.host,
            port=ep.port,
            user=ep.user,
            password=ep.password,
            dbname=self.settings.database,
            options=f"-c search_path={QUEUE_SCHEMA}",
        )

    async def _open(self) -> Any:
        """The procrastinate app, opened once per address of the store: after the store moved (the
        `Database` made a new engine) a new one, the old one closed with its runners by `ensure_runner`."""
        async with self._open_lock:
            if self._app is not None and self._app_generation != self.db.generation:
                log.warning("the Postgres store moved: the batch queue reconnects")
                self._stale_apps.append(self._app)  # closed by ensure_runner (a job of its may be calling)
                self._app = None
            if self._app is None:
                import procrastinate

                self._app_generation, conninfo = await asyncio.to_thread(self._conninfo)
                app = procrastinate.App(
                    connector=procrastinate.PsycopgConnector(
                        conninfo=conninfo,
                        min_size=1,
                        max_size=ITEMS_PER_CALL_SLOT * self.settings.batch_concurrency
                        + self.settings.ingest_concurrency
                        + 4,
                    )
                )
                s = self.settings
                self._item_task = app.task(
                    name="rma.batch.item",
                    queue=QUEUE,
                    retry=procrastinate.RetryStrategy(
                        max_attempts=s.batch_max_attempts + 1, wait=3, retry_exceptions={Transient}
                    ),
                )(self.run_item)
                self._register_ingest(app)
                app.periodic(cron=SWEEP_CRON, periodic_id="sweep")(
                    app.task(name="rma.batch.sweep", queue=QUEUE, queueing_lock="rma.batch.sweep")(
                        self._sweep_job
                    )
                )
                await app.open_async()
                self._app = app
            return self._app

    async def _retire_stale(self) -> None:
        """The runners started on an app of an older address stopped, and those apps closed."""
        if self._runners_generation != self._app_generation:
            tasks = [t for t in (self._runner, self._ingest_runner) if t is not None and not t.done()]
            for task in tasks:
                task.cancel()
            if tasks:  # their jobs are aborted after 5 s; unregistering on the old address can only time out
                await asyncio.wait(tasks, timeout=6)
            for task in tasks:  # their end on the old address is expected: retrieved, not logged as lost
                if task.done() and not task.cancelled() and task.exception() is not None:
                    log.info("a batch runner on the old address ended: %r", task.exception())
            self._runner = self._ingest_runner = None  # new ones, on the new app
            self._runners_generation = self._app_generation
        while self._stale_apps:
            try:
                await self._stale_apps.pop().close_async()
            except Exception as exc:
                log.warning("the old batch queue app did not close: %s: %s", type(exc).__name__, exc)

    async def _defer(self, batch_id: str, custom_ids: list[str]) -> None:
        await self._open()
        for i in range(0, len(custom_ids), 1000):
            await self._item_task.batch_defer_async(
                *({"batch_id": batch_id, "custom_id": c} for c in custom_ids[i : i + 1000])
            )

    async def ensure_runner(self) -> None:
        if not self.settings.batch_runner:
            return
        if any(t is not None and t.done() and not t.cancelled() for t in (self._runner, self._ingest_runner)):
            self.db.connection_failed()  # a runner stopped (its connection cut?): is the store still there?
            await asyncio.to_thread(self.db.sessions)
        app = await self._open()
        await self._retire_stale()
        self._ensure_ingest_runner(app)  # its own worker: at most `ingest_concurrency` jobs at a time
        if self._runner is not None and not self._runner.done():
            return
        s = self.settings
        self._runner = asyncio.get_running_loop().create_task(
            app.run_worker_async(
                queues=[QUEUE],
                name=self.worker_name,
                concurrency=ITEMS_PER_CALL_SLOT * s.batch_concurrency,  # the model calls: _call_slots
                install_signal_handlers=False,
                update_heartbeat_interval=max(1.0, s.batch_stalled_s / 5),
                stalled_worker_timeout=s.batch_stalled_s,
                delete_jobs="successful",
                shutdown_graceful_timeout=5,  # a cancelled runner aborts its jobs after 5 s, never hangs
            )
        )
        self._runner.add_done_callback(self._runner_ended)

    def _runner_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("the batch runner stopped: %r (restarted at the next health check)", task.exception())

    async def check_health(self) -> None:
        if not os.access(self.blobs.root, os.W_OK):
            raise RuntimeError(f"uploads volume {self.blobs.root} is not writable")
        try:
            await self.ensure_runner()
        except Exception as exc:  # Postgres not there yet: the replica is fine, the runner starts later
            log.warning("batch runner not started: %s", exc)

    async def _sweep_job(self, timestamp: int) -> None:
        await self.sweep()

    async def sweep(self) -> None:
        """Jobs of dead runners back in the queue, batches past their window expired, and every batch whose
        items are all finished finalized (after a restart too)."""
        try:
            await self._sweep()
        finally:  # the figures go out even when a step of the sweep failed
            await self.report_queue()

    async def _sweep(self) -> None:
        app = await self._open()
        for job in await app.job_manager.get_stalled_jobs(
            queue=QUEUE, seconds_since_heartbeat=self.settings.batch_stalled_s
        ):
            log.warning("batch job %s stalled (its runner stopped beating): run again", job.id)
            await app.job_manager.retry_job(job)
        try:  # the ingest jobs' part never keeps the batches' part from running
            await self._ingest_sweep(app)
        except Exception as exc:
            log.warning("ingest jobs not swept: %s: %s", type(exc).__name__, exc)
        for batch_id in await asyncio.to_thread(self._expire_and_unstarted):
            await self._defer(batch_id, await asyncio.to_thread(self._pending, batch_id))
            await asyncio.to_thread(self._start, batch_id)
        for batch_id in await asyncio.to_thread(self._open_batches):
            await asyncio.to_thread(self.finalize, batch_id)

    def queue_figures(self, now: datetime | None = None) -> dict[str, Any]:
        """The durable queue's figures for the registry page, in two queries that stay on the batches'
        status index and the items' (batch_id, status) index: only items of unfinished batches or of batches
        finished in the last 10 minutes are read, never the whole history."""
        now = now or _now()
        since = now - timedelta(minutes=10)
        ended = func.coalesce(Batch.completed_at, Batch.failed_at, Batch.expired_at, Batch.cancelled_at)
        live = Batch.status.notin_(bf.FINAL)
        # throughput is what the models answered: an item failed unrun (its batch expired, no model to take
        # it) is no work done
        finished = and_(BatchItem.status == bf.DONE, BatchItem.updated_at >= since)
        pending = BatchItem.status == bf.PENDING
        with self.db.sessions()() as db:
            batches = db.scalar(select(func.count()).select_from(Batch).where(live)) or 0
            waiting, running, oldest, done = db.execute(
                select(
                    func.count().filter(pending),
                    func.count().filter(BatchItem.status == bf.RUNNING),
                    func.min(Batch.created_at).filter(pending),
                    func.count().filter(finished),
                )
                .select_from(BatchItem)
                .join(Batch, Batch.id == BatchItem.batch_id)
                .where(or_(live, ended >= since))
            ).one()
        return {
            "waiting": waiting,
            "running": running,
            "batches": batches,
            "oldest_waiting_s": None if oldest is None else max(0.0, (now - oldest).total_seconds()),
            "finished_10min": done,
            "jobs": self.ingest_queue_figures(now),
        }

    async def report_queue(self) -> None:
        """The queue's figures to the coordinator; a failure is one warning (then debug lines until a
        report goes through again), never an exception in the sweep."""
        if self._reporter is None:
            return
        try:
            from deployments.gateway.quota import replica_name
            from rma_ray.wire import BatchQueueReport

            figures = await asyncio.to_thread(self.queue_figures)
            await asyncio.to_thread(self._reporter, BatchQueueReport(replica=replica_name(), **figures))
        except Exception as exc:  # the figures' query (Postgres) or the report (the coordinator)
            (log.debug if self._report_failing else log.warning)(
                "batch queue figures not reported: %s: %s", type(exc).__name__, exc
            )
            self._report_failing = True
        else:
            self._report_failing = False

    def _expire_and_unstarted(self) -> list[str]:
        """Expires the pending and running items of batches past their window (a running item's late answer
        is then left out: `record` keeps a finished row); returns batches left in validating (their
        creator died between writing the rows and queueing their jobs)."""
        now = _now()
        with self.db.sessions().begin() as db:
            late = list(
                db.scalars(
                    select(Batch.id).where(
                        Batch.status.in_((bf.VALIDATING, bf.IN_PROGRESS)), Batch.expires_at < now
                    )
                )
            )
            for bid in late:
                err = {"code": "batch_expired", "message": "the batch expired before this request was run"}
                for item in db.scalars(
                    select(BatchItem).where(
                        BatchItem.batch_id == bid, BatchItem.status.in_((bf.PENDING, bf.RUNNING))
                    )
                ):
                    item.status = bf.ITEM_FAILED
                    item.output = bf.output_line(
                        _item_id(bid, item.custom_id), item.custom_id, None, None, "", err
                    )
            return list(
                db.scalars(
                    select(Batch.id).where(
                        Batch.status == bf.VALIDATING, Batch.created_at < now - timedelta(seconds=60)
                    )
                )
            )

    def _pending(self, batch_id: str) -> list[str]:
        with self.db.sessions()() as db:
            return list(
                db.scalars(
                    select(BatchItem.custom_id).where(
                        BatchItem.batch_id == batch_id, BatchItem.status.in_((bf.PENDING, bf.RUNNING))
                    )
                )
            )

    def _open_batches(self) -> list[str]:
        with self.db.sessions()() as db:
            return list(
                db.scalars(
                    select(Batch.id).where(Batch.status.in_((bf.IN_PROGRESS, bf.CANCELLING, bf.FINALIZING)))
                )
            )

    def claim(self, batch_id: str, custom_id: str) -> Claimed | None:
        """(endpoint, body, starts so far, the key it is charged to) of an item to run, or None (finished, or its
        batch no longer runs items). Busy when another job claimed or touched it less than `batch_stalled_s`
        ago (a second job of the same item, as the sweep's re-defer of a batch left validating makes). The
        attempt is counted when the model call starts (`start`), not here: an item claimed but still waiting
        for a model-call slot when its runner dies has not been tried."""
        with self.db.sessions().begin() as db:
            batch = db.get(Batch, batch_id)
            item = db.get(BatchItem, (batch_id, custom_id), with_for_update=True)
            if batch is None or item is None or item.status in bf.ITEM_FINAL:
                return None
            fresh = _now() - timedelta(seconds=self.settings.batch_stalled_s)
            if item.status == bf.RUNNING and item.updated_at is not None and item.updated_at > fresh:
                raise Busy(f"item {custom_id} of batch {batch_id} is running in another job")
            if batch.status not in (bf.VALIDATING, bf.IN_PROGRESS):
                item.status = bf.SKIPPED
                return None
            item.status = bf.RUNNING  # and updated_at: claimed now
            payer = None
            if batch.key_id:
                payer = (batch.key_id, Quota.model_validate(batch.quota or {}))
            return Claimed(batch.endpoint, dict(item.body), item.attempts, payer)

    def record(self, batch_id: str, custom_id: str, ok: bool, line: dict[str, Any]) -> bool:
        """The item's output line, once: an upsert on (batch, custom_id) that leaves a finished row as it is.
        True when this call wrote it."""
        now = _now()
        status = bf.DONE if ok else bf.ITEM_FAILED
        stmt = pg_insert(BatchItem).values(
            batch_id=batch_id,
            custom_id=custom_id,
            line=0,
            body={},
            status=status,
            attempts=1,
            output=line,
            updated_at=now,
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[BatchItem.batch_id, BatchItem.custom_id],
            set_={"status": status, "output": line, "updated_at": now},
            where=BatchItem.status.notin_(bf.ITEM_FINAL),
        ).returning(BatchItem.custom_id)
        with self.db.sessions().begin() as db:
            return db.execute(stmt).first() is not None

    def start(self, batch_id: str, custom_id: str, starts: int) -> bool:
        """Whether this job's model call of a claimed item may start now (it holds a slot): its batch still
        runs items, and no other job started the item since this one claimed it (`attempts` is still
        `starts`: compare and set). Counts the attempt and touches the item (claim's Busy check holds for
        another `batch_stalled_s`). An item whose batch no longer runs items is skipped, as `claim` would have
        done: a cancel stops every item whose model call had not started."""
        item = _running(batch_id, custom_id).where(BatchItem.attempts == starts)
        with self.db.sessions().begin() as db:
            batch = db.get(Batch, batch_id)
            if batch is None or batch.status not in (bf.VALIDATING, bf.IN_PROGRESS):
                db.execute(item.values(status=bf.SKIPPED))
                return False
            return bool(db.execute(item.values(attempts=starts + 1, updated_at=_now())).rowcount == 1)

    def touch(self, batch_id: str, custom_id: str, attempt: int) -> None:
        """The item is still being answered by this job (its model call is long): claim's Busy check holds."""
        with self.db.sessions().begin() as db:
            db.execute(
                _running(batch_id, custom_id).where(BatchItem.attempts == attempt).values(updated_at=_now())
            )

    def release(self, batch_id: str, custom_id: str) -> None:
        with self.db.sessions().begin() as db:
            db.execute(_running(batch_id, custom_id).values(status=bf.PENDING))

    async def run_item(self, batch_id: str, custom_id: str) -> None:
        """procrastinate's task: one item, its output line written once, then the batch finalized if it was
        the last."""
        s = self.settings
        try:
            claimed = await asyncio.to_thread(self.claim, batch_id, custom_id)
        except Busy:  # looked at again once its runner could be known dead: never left running
            await self._item_task.configure(schedule_in={"seconds": int(s.batch_stalled_s) + 1}).defer_async(
                batch_id=batch_id, custom_id=custom_id
            )
            return
        if claimed is not None:
            endpoint, body, starts, payer = claimed
            iid = _item_id(batch_id, custom_id)
            rid = uuid.uuid4().hex
            if starts >= s.batch_max_attempts:
                err = {
                    "code": "attempts_exhausted",
                    "message": f"the request was started {starts} times; its runner stopped each time",
                }
                await asyncio.to_thread(
                    self.record,
                    batch_id,
                    custom_id,
                    False,
                    bf.output_line(iid, custom_id, None, None, rid, err),
                )
            else:
                async with self._slots():
                    try:
                        go = await asyncio.to_thread(self.start, batch_id, custom_id, starts)
                    except SQLAlchemyError as exc:  # the store away for a moment: procrastinate tries again
                        raise Transient(f"the batch store did not answer: {exc}"[:300]) from None
                    if go:
                        await self._answer(batch_id, custom_id, endpoint, body, starts + 1, iid, rid, payer)
        await asyncio.to_thread(self.finalize, batch_id)

    async def _answer(
        self,
        batch_id: str,
        custom_id: str,
        endpoint: str,
        body: dict[str, Any],
        attempt: int,
        iid: str,
        rid: str,
        payer: tuple[str, Quota] | None = None,
    ) -> None:
        """Attempt `attempt` of an item: the model call (the item touched while it lasts) and its output line;
        Transient (procrastinate tries the item again) while attempts are left. With a `payer` (the batch's
        key and quota) the item is the key's as an online request is: refused with the online 429 when the
        key's tokens for the day are spent, and its answer's tokens counted."""
        s = self.settings
        m = quota_meter() if payer is not None else None
        if m is not None and payer is not None:
            try:
                await m.check_tokens(*payer)
            except Refusal as exc:
                line = bf.output_line(iid, custom_id, exc.status, _error_body(exc), rid)
                await asyncio.to_thread(self.record, batch_id, custom_id, False, line)
                return

        async def keep_touched() -> None:  # never ends in an exception: nothing reads its end
            while True:
                await asyncio.sleep(s.batch_stalled_s / 3)
                try:
                    await asyncio.to_thread(self.touch, batch_id, custom_id, attempt)
                except Exception as exc:  # the store away for a moment: the next touch may reach it
                    log.warning("batch %s item %s: could not mark it running: %s", batch_id, custom_id, exc)

        toucher = asyncio.get_running_loop().create_task(keep_touched())
        try:
            try:
                status, answer = await self.models.call(endpoint, body)
            finally:
                toucher.cancel()
        except Transient as exc:
            if attempt < s.batch_max_attempts:
                await asyncio.to_thread(self.release, batch_id, custom_id)
                raise
            err = {"code": "model_unavailable", "message": str(exc)[:500]}
            line = bf.output_line(iid, custom_id, None, None, rid, err)
            await asyncio.to_thread(self.record, batch_id, custom_id, False, line)
        except Exception as exc:  # a bug or an unforeseen error: the item still reaches a final state
            log.exception("batch %s item %s: the model call failed", batch_id, custom_id)
            err = {"code": "internal_error", "message": str(exc)[:500]}
            line = bf.output_line(iid, custom_id, None, None, rid, err)
            await asyncio.to_thread(self.record, batch_id, custom_id, False, line)
        else:
            if m is not None and payer is not None and 200 <= status < 300:
                usage = answer.get("usage") if isinstance(answer, dict) else None
                if isinstance(usage, dict):
                    tokens_in = int(usage.get("prompt_tokens") or 0)
                    tokens_out = int(usage.get("completion_tokens") or 0)
                    await m.add_tokens(payer[0], tokens_in, tokens_out)
            line = bf.output_line(iid, custom_id, status, answer, rid)
            await asyncio.to_thread(self.record, batch_id, custom_id, 200 <= status < 300, line)

    def _slots(self) -> asyncio.Semaphore:
        """The runner's model-call slots: at most `batch_concurrency` items call the model at once (one set per
        event loop: a semaphore belongs to the loop that first waits on it)."""
        loop = asyncio.get_running_loop()
        if self._call_slots is None or self._call_slots[0] is not loop:
            self._call_slots = (loop, asyncio.Semaphore(self.settings.batch_concurrency))
        return self._call_slots[1]

    def finalize(self, batch_id: str) -> None:
        """When no item of the batch is pending or running: its output and error files, and its final status
        (completed, cancelled or expired). Under the batch row's lock: one runner does it."""
        with self.db.sessions().begin() as db:
            row = db.get(Batch, batch_id, with_for_update=True)
            if row is None or row.status not in (bf.IN_PROGRESS, bf.CANCELLING, bf.FINALIZING):
                return
            left = db.scalar(
                select(func.count())
                .select_from(BatchItem)
                .where(BatchItem.batch_id == batch_id, BatchItem.status.in_((bf.PENDING, bf.RUNNING)))
            )
            if left:
                return
            now = _now()
            cancelled = row.status == bf.CANCELLING or row.cancelling_at is not None
            if row.status != bf.FINALIZING:
                row.status = bf.move(row.status, "drained")
            row.finalizing_at = row.finalizing_at or now
            done: list[dict[str, Any]] = []
            failed: list[dict[str, Any]] = []
            for status, output in db.execute(
                select(BatchItem.status, BatchItem.output)
                .where(BatchItem.batch_id == batch_id, BatchItem.status.in_((bf.DONE, bf.ITEM_FAILED)))
                .order_by(BatchItem.line)
            ):
                (done if status == bf.DONE else failed).append(output)
            for lines, attr, name in (
                (done, "output_file_id", "output"),
                (failed, "error_file_id", "errors"),
            ):
                if lines:
                    data = bf.jsonl(lines)
                    f = BatchFile.create(
                        owner=row.owner,
                        sha256=self._put_blob(db, data),
                        filename=f"{batch_id}_{name}.jsonl",
                        purpose="batch_output",
                        size=len(data),
                    )
                    db.add(f)
                    db.flush()
                    setattr(row, attr, f.id)
            if cancelled:
                row.status, row.cancelled_at = bf.CANCELLED, now
            elif row.expires_at <= now:
                row.status, row.expired_at = bf.EXPIRED, now
            else:
                row.status, row.completed_at = bf.COMPLETED, now
            log.info("batch %s %s: %d answered, %d failed", batch_id, row.status, len(done), len(failed))


class Claimed(NamedTuple):
    endpoint: str
    body: dict[str, Any]
    starts: int
    payer: tuple[str, Quota] | None  # the batch's key and its quota: charged for the item's tokens


def _error_body(refusal: Refusal) -> dict[str, Any]:
    """The body the online route answers a refusal with (OpenAI's shape)."""
    error = {"message": refusal.message, "type": "invalid_request_error", "param": refusal.param}
    return {"error": {**error, "code": refusal.code}}


def _running(batch_id: str, custom_id: str) -> Any:
    """An UPDATE of the item, if it is still running (claimed, not yet answered)."""
    return update(BatchItem).where(
        BatchItem.batch_id == batch_id, BatchItem.custom_id == custom_id, BatchItem.status == bf.RUNNING
    )


def _item_id(batch_id: str, custom_id: str) -> str:
    return "batch_req_" + hashlib.sha256(f"{batch_id}\0{custom_id}".encode()).hexdigest()[:24]


class ServeModels:
    """The models through the online routes' Serve handles: chat and completions through the rma-inference
    app's `LLMGateway.openai`, embeddings through rma-embeddings' `EmbeddingsIngress.openai`. (status, body)
    of an answer or of a refusal the online route would give; Transient when the model is away."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._handles: dict[str, Any] = {}

    def _handle(self, endpoint: str) -> Any:
        from ray import serve

        if endpoint not in self._handles:
            if endpoint == "/v1/embeddings":
                from deployments.embeddings.config import EMBEDDINGS_APP, INGRESS_DEPLOYMENT

                app, name = EMBEDDINGS_APP, INGRESS_DEPLOYMENT
            else:
                from deployments.llm.config import GATEWAY_DEPLOYMENT, INFERENCE_APP

                app, name = INFERENCE_APP, GATEWAY_DEPLOYMENT
            apps = serve.status().applications
            if app not in apps or name not in apps[app].deployments:
                raise Transient(f"{endpoint} is not served in this pool now (no {app} app)")
            self._handles[endpoint] = serve.get_deployment_handle(name, app_name=app)
        return self._handles[endpoint]

    async def call(self, endpoint: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        handle = await asyncio.to_thread(self._handle, endpoint)
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s):
                if endpoint == "/v1/embeddings":
                    out = await handle.openai.remote(body)
                else:
                    out = await handle.openai.remote(endpoint, body)
            return 200, out
        except Exception as exc:
            refusal = refusal_from(exc)
            if refusal is not None:
                if refusal.status in TRANSIENT_STATUS:
                    raise Transient(f"{refusal.status} {refusal.code}: {refusal.message}") from None
                return refusal.status, _error_body(refusal)
            name = type(unwrap(exc)).__name__
            if isinstance(exc, TimeoutError) or name in UNAVAILABLE:
                if name in DIED or name == "DeploymentUnavailableError":
                    self._handles.pop(endpoint, None)
                raise Transient(
                    f"the model did not answer ({name} after {time.perf_counter() - t0:.0f} s)"
                ) from None
            raise
