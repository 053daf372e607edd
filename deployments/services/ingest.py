"""Document-ingest jobs (`POST /api/jobs/ingest`): one job runs parse -> OCR where needed -> chunk, embed and
index -> entities over one stored file, durably, in the Batch API's runner (`deployments.services.batches`:
the same procrastinate app on the services' Postgres, the same replica, the same 10 s sweep).

- The file is stored first (an upload: a blob on the uploads volume, its row in Postgres) in the transaction
  that writes the job's row (`db.IngestJob`), so a job never names bytes that are not there.
- Jobs run on a queue of their own (`rma-ingest`) in a worker of their own: at most `ingest_concurrency` jobs
  at a time per runner, so the parse, OCR, embedding and NER replicas keep most of their room for online calls.
- Each step's result is checkpointed in Postgres before the next starts: the pages' text after parsing
  (`db.IngestPage`), each OCR'd page as it is read, the chunk count after indexing, each piece of text sent to
  the graph. A job whose runner died is put back by the sweep (procrastinate's stalled jobs) and resumes at the
  step (and page, and piece) it was in. Steps are idempotent: chunks get ids derived from their source
  (`rag._ids`), so indexing again replaces them; each graph write names its piece (`_piece_key`), so a piece
  interrupted between its write and its checkpoint, sent again, is not counted again in the graph's mention
  and co-occurrence counts (`graph.py`), and the job's result counts each piece once.
- OCR is sent each scanned page as a PDF of its own, cut out of the file in this replica's sandbox
  (`documents.cut_pdf_pages`), not the whole file once per page; a file that cannot be cut is sent whole, and
  so is a page whose cut saves nothing, every page past the cuts' memory budget, and a cut page OCR refuses
  (so that the refusal names the job's page).
- Bounded: a job is started at most `ingest_max_attempts` times (its runner died, a service was away); then
  it is `failed` with the error. A file the services refuse (unreadable, too many pages) fails it at once.
- Cancel stops a running job at the next step boundary (or OCR page); a queued one at once.

`IngestJobs` is a mixin of `Batches` (the rma-batches app's `batch_store` deployment): the gateway reaches
these methods through that deployment's handle; the runner reaches the services app's documents, OCR, RAG and
graph deployments through theirs (`ServePipeline`)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from deployments.gateway.refusal import Refusal, not_found, unwrap, validation_message
from deployments.services import sandbox
from deployments.services.db import IngestJob, IngestPage, Upload
from deployments.services.documents import IMAGES, PDF, cut_pdf_pages, detect
from deployments.services.rag import chunk_text, collection_name
from deployments.services.uploads import UPLOAD_ID, put_locked

log = logging.getLogger("rma.services.ingest")

QUEUE = "rma-ingest"
TASK = "rma.ingest.job"
QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
FORGET_EVERY_S = 600.0  # how often the sweep deletes jobs past `ingest_keep_days`
FORGET_BATCH = 500  # jobs deleted per clean-up
FINAL = (SUCCEEDED, FAILED, CANCELLED)
STATES = (QUEUED, RUNNING, *FINAL)
PENDING, DONE, SKIPPED = "pending", "done", "skipped"
STEPS = ("parse", "ocr", "index", "entities")
CUT_PAGES = 20  # scanned pages cut out of the PDF per sandbox call (each call ships the file to the child)
GRAPH_PIECE = 50_000  # characters per graph call (the graph service takes at most 100,000)
MAX_TEXT = 5_000_000  # characters: the online routes' limit on a text (`schemas.py`)
MAX_ENTITIES = 5_000  # distinct entities kept in a job's result (the graph has them all)
SERVICES_APP = "services"
OWNER_LOCK = 0x1A6E57  # the advisory locks' first key: an owner's job creates
TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
UNAVAILABLE = {
    "ActorDiedError",
    "RayActorError",
    "ActorUnavailableError",
    "WorkerCrashedError",
    "BackPressureError",
    "DeploymentUnavailableError",
    "TimeoutError",
}

CRASHED = {"ActorDiedError", "RayActorError", "WorkerCrashedError", "TimeoutError"}
HOSTILE = {"documents", "ocr"}  # the services that parse the caller's bytes


class Unavailable(Exception):
    """A service the step needs could not be asked now (away, full, died under the call): the job is started
    again later, within its attempts."""


def _db_errors() -> tuple[type[BaseException], ...]:
    """The database being away (down, restarting, a connection cut): the job is tried again, not failed."""
    import psycopg

    return (OperationalError, DBAPIError, psycopg.OperationalError)


class RagTarget(BaseModel):
    model_config = ConfigDict(extra="forbid")
    collection: str = Field(min_length=1, max_length=60)


class Options(BaseModel):
    """What a job does besides parsing: `ocr` ("auto": pages without a text layer; "always"; "never"), `rag`
    ({"collection": NAME}: a shared collection, as /api/rag; "client": the caller's own; absent: no indexing),
    `graph` (entity extraction into the caller's graph)."""

    model_config = ConfigDict(extra="forbid")
    ocr: Literal["auto", "always", "never"] = "auto"
    rag: Literal["client"] | RagTarget | None = None
    graph: bool = False


def check_options(raw: Any) -> Options:
    if not isinstance(raw, dict):
        raise Refusal(422, "invalid_body", "the body must be a JSON object")
    try:
        opts = Options.model_validate(raw)
    except ValidationError as exc:
        raise Refusal(
            422,
            "invalid_options",
            validation_message(exc.errors())
            + ' (options: ocr "auto"|"always"|"never", rag {"collection": NAME} or "client", graph true|false)',
        ) from None
    if isinstance(opts.rag, RagTarget):
        collection_name("pub", opts.rag.collection)  # 400 bad_collection naming the rule
    return opts


def request_hash(file_sha: str | None, upload_id: str | None, opts: Options) -> str:
    """What an Idempotency-Key is bound to: the document (its bytes' hash, or the upload's id) and the
    options."""
    body = {"file": file_sha, "upload_id": upload_id, "options": opts.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _now() -> datetime:
    return datetime.now(UTC)


def _ts(at: datetime | None) -> str | None:
    return at.isoformat() if at else None


def initial_steps(opts: Options) -> list[dict[str, Any]]:
    wanted = {"parse": True, "ocr": True, "index": opts.rag is not None, "entities": opts.graph}
    return [
        {"name": n, "state": PENDING if wanted[n] else SKIPPED, "done": 0, "total": 0 if n == "ocr" else 1}
        for n in STEPS
    ]


def job_dict(row: IngestJob) -> dict[str, Any]:
    result = {k: v for k, v in (row.result or {}).items() if not k.startswith("_")}
    result.setdefault("errors", [])
    return {
        "id": row.id,
        "object": "ingest.job",
        "state": row.state,
        "upload_id": row.upload_id,
        "filename": row.filename,
        "content_type": row.content_type,
        "options": row.options,
        "steps": row.steps,
        "result": result,
        "error": row.error,
        "attempts": row.attempts,
        "cancel_requested": row.cancel_requested,
        "revision": row.revision,
        "created_at": _ts(row.created_at),
        "started_at": _ts(row.started_at),
        "finished_at": _ts(row.finished_at),
    }


def _step(row: IngestJob, name: str) -> dict[str, Any]:
    return next(s for s in row.steps if s["name"] == name)


def _set_step(row: IngestJob, name: str, **fields: Any) -> None:
    """Steps are a JSON list: a new list, so SQLAlchemy sees the change."""
    row.steps = [{**s, **fields} if s["name"] == name else dict(s) for s in row.steps]
    row.revision += 1


def check_text_size(chars: int) -> None:
    if chars > MAX_TEXT:
        raise Refusal(
            413,
            "text_too_large",
            f"the document's text is {chars:,} characters; a job reads at most {MAX_TEXT:,} "
            "(the limit of a text on the online routes): split the document and send the parts",
        )


def _merge_result(row: IngestJob, **fields: Any) -> None:
    row.result = {**(row.result or {}), **fields}


class ServePipeline:
    """The services the steps call: the services app's deployments through their handles (found by name on
    first use), or objects given (tests, benches). Each call has a time limit; a service that is away, full or
    died under the call is `Unavailable` (the job is tried again); a refusal of the file itself is kept."""

    NAMES = ("documents", "ocr", "rag", "client_rag", "graph")

    def __init__(self, timeout_s: float, **given: Any) -> None:
        from deployments.services.backends import as_backend

        self.timeout_s = timeout_s
        self._backends = {k: as_backend(v) for k, v in given.items() if v is not None}
        self._given = set(self._backends)

    def _backend(self, name: str) -> Any:
        if name not in self._backends:
            from ray import serve

            from deployments.services.backends import as_backend

            self._backends[name] = as_backend(serve.get_deployment_handle(name, app_name=SERVICES_APP))
        return self._backends[name]

    async def call(self, name: str, method: str, *args: Any) -> Any:
        try:
            fn = getattr(self._backend(name), method)
            async with asyncio.timeout(self.timeout_s):
                return await fn(*args)
        except Refusal as exc:
            if exc.status in TRANSIENT_STATUS:
                raise Unavailable(f"{name}: {exc.status} {exc.code}: {exc.message}") from None
            raise
        except Exception as exc:
            kind = type(unwrap(exc)).__name__
            if name in HOSTILE and (isinstance(exc, TimeoutError) or kind in CRASHED):
                # the caller's file under a parser: a replica that died (or hung) on it dies again on a fresh
                # one, so the job fails once, as the online routes refuse it (`http.py`, hostile=True)
                log.warning("the %s service's replica died under a job's file (%s): not retried", name, kind)
                raise Refusal(
                    422,
                    "parser_limits_exceeded",
                    f"the {name} service's replica died or hung while processing this file ({kind}): this "
                    "file made the parser exceed its limits; it is not retried. Send a smaller or simpler file",
                ) from None
            if isinstance(exc, TimeoutError) or kind in UNAVAILABLE:
                if name not in self._given and kind != "TimeoutError":
                    self._backends.pop(name, None)  # a fresh handle next time
                raise Unavailable(f"the {name} service did not answer ({kind})") from None
            raise


def _piece_key(job_id: str, i: int, piece: str) -> str:
    """The graph's key for a job's piece: the same on every run of the job over the same text, another for other
    text at that place (the piece size changed between deploys), so the graph counts exactly what it was sent."""
    return f"ingest:{job_id}:{i}:{hashlib.sha256(piece.encode()).hexdigest()[:16]}"


async def _cut_pages(data: bytes, numbers: list[int]) -> dict[int, bytes]:
    """The given pages cut out of the PDF, each a one-page PDF (`documents.cut_pdf_pages`), in this replica's
    sandbox: PDFium reading the caller's bytes in the runner's own process could take the runner (and the Batch
    API it serves) down with it. A file that cannot be cut gives {}: its pages go to OCR whole, as before, and
    the OCR service refuses them if they are damaged. Any error does (the sandbox away, a bug): cutting only
    saves bytes, so it never fails the job; a cancelled task still stops."""
    try:
        return await sandbox.shared().arun("PDF cutter", cut_pdf_pages, data, numbers)
    except Refusal as exc:
        log.warning("a job's PDF could not be cut into pages (%s): its whole file goes to OCR", exc.code)
    except Exception:
        log.exception("a job's PDF could not be cut into pages: its whole file goes to OCR")
    return {}


class IngestJobs:
    """The jobs' half of `Batches` (it gives `settings`, `db`, `blobs`, `_open()`, `worker_name`)."""

    settings: Any
    db: Any
    blobs: Any
    worker_name: str
    _ingest_task: Any = None
    _ingest_runner: asyncio.Task[None] | None = None
    pipeline: Any = None
    _open: Callable[[], Awaitable[Any]]  # Batches' (the procrastinate app, opened once)
    _ingest_forget_at = 0.0  # monotonic time of the next clean-up (the first sweep does one)

    # -- the routes' half -------------------------------------------------------------------------------
    async def ingest_create(
        self,
        owner: str,
        data: bytes | None,
        filename: str | None,
        content_type: str | None,
        upload_id: str | None,
        options: dict[str, Any],
        idempotency_key: str | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """(202, the new job) or, for an Idempotency-Key seen with the same request, (200, that job)."""
        created, job = await asyncio.to_thread(
            self._ingest_create, owner, data, filename, content_type, upload_id, options, idempotency_key
        )
        if created:
            await self._ingest_defer(job["id"])
        return (202 if created else 200), job

    def _ingest_create(
        self,
        owner: str,
        data: bytes | None,
        filename: str | None,
        content_type: str | None,
        upload_id: str | None,
        options: dict[str, Any],
        key: str | None,
    ) -> tuple[bool, dict[str, Any]]:
        s = self.settings
        if (data is None) == (upload_id is None):
            raise Refusal(
                422,
                "invalid_body",
                'send the document once: a multipart file, or JSON {"upload_id": ...} of an upload',
            )
        opts = check_options(options)
        kind = sha = None
        if data is not None:
            if len(data) > s.upload_max_bytes:
                raise Refusal(
                    413,
                    "file_too_large",
                    f"the file is {len(data):,} bytes; the limit is {s.upload_max_bytes:,}",
                )
            kind = detect(data, filename, content_type)  # 4xx for a type we cannot read
            sha = hashlib.sha256(data).hexdigest()
        elif not UPLOAD_ID.match(str(upload_id)):
            raise Refusal(404, "not_found", f"no upload with id {upload_id!r} (ids are 32 hex characters)")
        digest = request_hash(sha, None if data is not None else str(upload_id), opts)
        for _ in range(2):  # a second time when a concurrent request with the same key won the insert
            try:
                return self._ingest_insert(owner, data, filename, kind, upload_id, opts, key, digest)
            except IntegrityError:
                if key is None:
                    raise
        raise AssertionError("unreachable")

    def _ingest_insert(
        self,
        owner: str,
        data: bytes | None,
        filename: str | None,
        kind: str | None,
        upload_id: str | None,
        opts: Options,
        key: str | None,
        digest: str,
    ) -> tuple[bool, dict[str, Any]]:
        s = self.settings
        with self.db.sessions().begin() as db:
            if key is not None:
                seen = db.scalar(
                    select(IngestJob).where(IngestJob.owner == owner, IngestJob.idempotency_key == key)
                )
                if seen is not None:
                    if seen.request_hash != digest:
                        raise Refusal(
                            409,
                            "idempotency_key_reused",
                            f"Idempotency-Key {key!r} was used for job {seen.id} with a different document "
                            "or options: send that request again unchanged, or use a new key",
                        )
                    return False, job_dict(seen)
            # one create per owner at a time past this point: concurrent creates count each other's jobs
            db.execute(select(func.pg_advisory_xact_lock(OWNER_LOCK, func.hashtext(owner))))
            unfinished = db.scalar(
                select(func.count())
                .select_from(IngestJob)
                .where(IngestJob.owner == owner, IngestJob.state.in_((QUEUED, RUNNING)))
            )
            if unfinished >= s.ingest_max_unfinished:
                raise Refusal(
                    429,
                    "too_many_jobs",
                    f"this key has {unfinished} ingest jobs queued or running; the limit is "
                    f"{s.ingest_max_unfinished}: wait for one to finish or cancel one",
                    retry_after_s=30,
                )
            if data is not None:
                up = Upload(
                    sha256=put_locked(db, self.blobs, data),
                    owner=owner,
                    filename=(filename or None) and filename[:500],
                    content_type=kind,
                    size=len(data),
                )
                db.add(up)
                db.flush()
            else:
                up = db.get(Upload, str(upload_id))
                if up is None or up.owner != owner:
                    raise Refusal(
                        404,
                        "not_found",
                        f"no upload with id {upload_id}: upload the file with POST /api/uploads first, "
                        "or send it here as a multipart file",
                    )
            row = IngestJob(
                owner=owner,
                idempotency_key=key,
                request_hash=digest,
                upload_id=up.id,
                filename=up.filename,
                content_type=up.content_type,
                options=opts.model_dump(mode="json"),
                state=QUEUED,
                steps=initial_steps(opts),
                result={},
                attempts=0,
                cancel_requested=False,
                revision=0,
            )
            db.add(row)
            db.flush()
            return True, job_dict(row)

    def _ingest_row(self, db: Any, job_id: str, owner: str) -> IngestJob:
        row: IngestJob | None = db.get(IngestJob, str(job_id)[:40])
        if row is None or row.owner != owner:
            raise not_found("job", job_id)
        return row

    def ingest_get(self, job_id: str, owner: str) -> dict[str, Any]:
        with self.db.sessions()() as db:
            return job_dict(self._ingest_row(db, job_id, owner))

    def ingest_list(self, owner: str, limit: int = 20, after: str | None = None) -> dict[str, Any]:
        """The owner's jobs, newest first, `limit` (1-100) a page; the next page after the last one's id."""
        if not 1 <= limit <= 100:
            raise Refusal(400, "invalid_request", "limit must be between 1 and 100", param="limit")
        with self.db.sessions()() as db:
            q = select(IngestJob).where(IngestJob.owner == owner)
            if after:
                cursor = self._ingest_row(db, after, owner)
                q = q.where(
                    (IngestJob.created_at < cursor.created_at)
                    | ((IngestJob.created_at == cursor.created_at) & (IngestJob.id < cursor.id))
                )
            q = q.order_by(IngestJob.created_at.desc(), IngestJob.id.desc()).limit(limit + 1)
            rows = list(db.scalars(q))
            page = [job_dict(r) for r in rows[:limit]]
            return {
                "object": "list",
                "data": page,
                "has_more": len(rows) > limit,
                "last_id": page[-1]["id"] if page else None,
            }

    def ingest_text(self, job_id: str, owner: str) -> str:
        """The document's text as far as the job has read it (pages after parsing, OCR'd pages as read)."""
        with self.db.sessions()() as db:
            row = self._ingest_row(db, job_id, owner)
            if _step(row, "parse")["state"] != DONE:
                raise Refusal(
                    409,
                    "not_parsed_yet",
                    f"job {row.id} has not parsed the document yet: wait for its events",
                )
            return self._text(db, row.id)

    @staticmethod
    def _text(db: Any, job_id: str) -> str:
        texts = db.scalars(
            select(IngestPage.text).where(IngestPage.job_id == job_id).order_by(IngestPage.number)
        )
        return "\n\n".join(t for t in texts if t)

    def ingest_cancel(self, job_id: str, owner: str) -> dict[str, Any]:
        """A queued job is cancelled now; a running one at its next step boundary; a finished one is left as
        it is (its state is the answer)."""
        with self.db.sessions().begin() as db:
            row = self._ingest_row(db, job_id, owner)
            db.refresh(row, with_for_update=True)
            if row.state == QUEUED:
                self._finish(row, CANCELLED)
            elif row.state == RUNNING and not row.cancel_requested:
                row.cancel_requested = True
                row.revision += 1
            return job_dict(row)

    def ingest_withdraw(self, job_id: str, owner: str, code: str) -> None:
        """A job created but refused after (its upload past the day's quota): cancelled before it ran, its
        Idempotency-Key freed so that the same request can be sent again later."""
        with self.db.sessions().begin() as db:
            row = self._ingest_row(db, job_id, owner)
            db.refresh(row, with_for_update=True)
            if row.state == QUEUED:
                row.idempotency_key = None
                self._finish(row, CANCELLED, {"step": None, "code": code, "message": "refused when created"})

    @staticmethod
    def _finish(row: IngestJob, state: str, error: dict[str, Any] | None = None) -> None:
        row.state, row.finished_at = state, _now()
        end = {CANCELLED: "cancelled", FAILED: "failed"}.get(state)
        if end:
            row.steps = [
                {**s, "state": end if s["state"] in (PENDING, "running") else s["state"]} for s in row.steps
            ]
        if error is not None:
            row.error = error
            _merge_result(row, errors=[*(row.result or {}).get("errors", []), error])
        row.revision += 1

    # -- the runner's half ------------------------------------------------------------------------------
    def _register_ingest(self, app: Any) -> None:
        import procrastinate

        self._ingest_task = app.task(
            name=TASK,
            queue=QUEUE,
            retry=procrastinate.RetryStrategy(
                max_attempts=self.settings.ingest_max_attempts + 1, wait=5, retry_exceptions={Unavailable}
            ),
        )(self.run_ingest)

    async def _ingest_defer(self, job_id: str) -> None:
        """One procrastinate job per ingest job: the queueing lock makes a second defer of a job still waiting
        a no-op, the lock keeps two runs of one job from overlapping."""
        from procrastinate.exceptions import AlreadyEnqueued

        await self._open()
        try:
            await self._ingest_task.configure(lock=job_id, queueing_lock=job_id).defer_async(job_id=job_id)
        except AlreadyEnqueued:
            pass

    def _ensure_ingest_runner(self, app: Any) -> None:
        if self._ingest_runner is not None and not self._ingest_runner.done():
            return
        s = self.settings
        self._ingest_runner = asyncio.get_running_loop().create_task(
            app.run_worker_async(
                queues=[QUEUE],
                name=f"{self.worker_name}-ingest",
                concurrency=s.ingest_concurrency,
                install_signal_handlers=False,
                update_heartbeat_interval=max(1.0, s.batch_stalled_s / 5),
                stalled_worker_timeout=s.batch_stalled_s,
                delete_jobs="successful",
                shutdown_graceful_timeout=5,
            )
        )
        # its end is read at once (one log line): an exception left unread is logged, traceback and all, when
        # the task is garbage-collected, which can land inside another `ast.parse` and break it on CPython 3.11
        # ("AST constructor recursion depth mismatch": Python's traceback formatting parses source too)
        self._ingest_runner.add_done_callback(self._ingest_runner_ended)

    def _ingest_runner_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("the ingest runner stopped: %r (restarted at the next health check)", task.exception())

    async def _ingest_sweep(self, app: Any) -> None:
        """Jobs of dead runners back in the queue (they resume at their step); jobs whose row was written but
        whose queue entry was lost (their creator died in between, or their runner died while the database
        was away and left the row `running`) queued again. One job's error never stops the rest."""
        for job in await app.job_manager.get_stalled_jobs(
            queue=QUEUE, seconds_since_heartbeat=self.settings.batch_stalled_s
        ):
            try:
                if job.lock and await self._ingest_active(app, job.lock, "todo"):
                    continue  # already waiting again: a second entry would break the queueing lock
                log.warning("ingest job %s stalled (its runner stopped beating): run again", job.id)
                await app.job_manager.retry_job(job)
            except Exception as exc:
                log.warning("ingest task %s not retried: %s: %s", job.id, type(exc).__name__, exc)
        for job_id, state in await asyncio.to_thread(self._ingest_waiting):
            try:
                if await self._ingest_active(app, job_id, "todo", "doing"):
                    continue
                if state == RUNNING:
                    log.warning("ingest job %s left running with no task: queued again", job_id)
                    await asyncio.to_thread(self._ingest_requeue, job_id)
                await self._ingest_defer(job_id)
            except Exception as exc:
                log.warning("ingest job %s not re-queued: %s: %s", job_id, type(exc).__name__, exc)
        if time.monotonic() >= self._ingest_forget_at:  # the clean-up: every 10 minutes is plenty
            self._ingest_forget_at = time.monotonic() + FORGET_EVERY_S
            forgotten = await asyncio.to_thread(self.ingest_forget)
            if forgotten:
                log.info(
                    "%d ingest jobs finished over %d days ago deleted",
                    forgotten,
                    self.settings.ingest_keep_days,
                )
            await app.job_manager.delete_old_jobs(
                nb_hours=24 * self.settings.ingest_keep_days,
                queue=QUEUE,
                include_failed=True,
                include_cancelled=True,
                include_aborted=True,
            )

    def ingest_queue_figures(self, now: datetime | None = None) -> dict[str, Any]:
        """The jobs' queue for the registry page (in the batches replica's report): jobs waiting and running,
        the oldest waiting one's age, and the jobs (and their pages) finished in the last 10 minutes. Reads
        the unfinished jobs and those finished lately only (the (state, finished_at) index)."""
        now = now or _now()
        since = now - timedelta(minutes=10)
        with self.db.sessions()() as db:
            queued, running, oldest = db.execute(
                select(
                    func.count().filter(IngestJob.state == QUEUED),
                    func.count().filter(IngestJob.state == RUNNING),
                    func.min(IngestJob.created_at).filter(IngestJob.state == QUEUED),
                ).where(IngestJob.state.in_((QUEUED, RUNNING)))
            ).one()
            ended = db.execute(
                select(IngestJob.state, IngestJob.result).where(
                    IngestJob.state.in_((SUCCEEDED, FAILED)), IngestJob.finished_at >= since
                )
            ).all()
        done = [r for st, r in ended if st == SUCCEEDED]
        return {
            "queued": queued,
            "running": running,
            "oldest_queued_s": None if oldest is None else max(0.0, (now - oldest).total_seconds()),
            "succeeded_10min": len(done),
            "failed_10min": len(ended) - len(done),
            "pages_10min": sum(int((r or {}).get("pages") or 0) for r in done),
        }

    def ingest_forget(self, now: datetime | None = None) -> int:
        """Finished jobs that ended over `ingest_keep_days` ago deleted with their page texts (at most
        `FORGET_BATCH` per call; the next sweep takes the rest); what they indexed and extracted stays.
        Their Idempotency-Keys go with them."""
        cutoff = (now or _now()) - timedelta(days=self.settings.ingest_keep_days)
        with self.db.sessions().begin() as db:
            ids = list(
                db.scalars(
                    select(IngestJob.id)
                    .where(
                        IngestJob.state.in_((SUCCEEDED, FAILED, CANCELLED)), IngestJob.finished_at < cutoff
                    )
                    .limit(FORGET_BATCH)
                )
            )
            if ids:
                db.execute(delete(IngestPage).where(IngestPage.job_id.in_(ids)))
                db.execute(delete(IngestJob).where(IngestJob.id.in_(ids)))
        return len(ids)

    @staticmethod
    async def _ingest_active(app: Any, lock: str, *statuses: str) -> bool:
        """Whether a procrastinate task holding the job's lock is in one of `statuses`."""
        for status in statuses:
            if list(await app.job_manager.list_jobs_async(queue=QUEUE, lock=lock, status=status)):
                return True
        return False

    def _ingest_waiting(self) -> list[tuple[str, str]]:
        """Queued rows untouched for a minute, and running rows untouched for twice the stalled time."""
        now = _now()
        old, stale = now - timedelta(seconds=60), now - timedelta(seconds=2 * self.settings.batch_stalled_s)
        with self.db.sessions()() as db:
            rows = db.execute(
                select(IngestJob.id, IngestJob.state)
                .where(
                    ((IngestJob.state == QUEUED) & (IngestJob.updated_at < old))
                    | ((IngestJob.state == RUNNING) & (IngestJob.updated_at < stale))
                )
                .limit(100)
            )
            return [(str(i), str(st)) for i, st in rows]

    def _pipeline(self) -> Any:
        if self.pipeline is None:
            self.pipeline = ServePipeline(self.settings.request_timeout_s)
        return self.pipeline

    def ingest_claim(self, job_id: str) -> dict[str, Any] | None:
        """The job's context for this run, or None (finished, cancelled, or out of attempts: then failed)."""
        s = self.settings
        with self.db.sessions().begin() as db:
            row = db.get(IngestJob, job_id, with_for_update=True)
            if row is None or row.state in FINAL:
                return None
            if row.cancel_requested:
                self._finish(row, CANCELLED)
                return None
            row.attempts += 1
            if row.attempts > s.ingest_max_attempts:
                step = next((x["name"] for x in row.steps if x["state"] in (PENDING, "running")), "parse")
                self._finish(
                    row,
                    FAILED,
                    {
                        "step": step,
                        "code": "attempts_exhausted",
                        "message": f"the job was started {row.attempts - 1} times and stopped each time "
                        f"(in step {step}): its runner died or a service was away",
                    },
                )
                return None
            row.state = RUNNING
            row.started_at = row.started_at or _now()
            row.revision += 1
            up = db.get(Upload, row.upload_id)
            return {
                "owner": row.owner,
                "sha256": up.sha256 if up is not None else None,
                "filename": row.filename,
                "content_type": row.content_type,
                "options": Options.model_validate(row.options),
                "upload_id": row.upload_id,
                "attempt": row.attempts,
            }

    def ingest_next_step(self, job_id: str) -> str | None:
        """At a step boundary: the step to run now (marked running), or None when the job is over (all steps
        done: succeeded; a cancel asked for: cancelled)."""
        with self.db.sessions().begin() as db:
            row = db.get(IngestJob, job_id, with_for_update=True)
            if row is None or row.state != RUNNING:
                return None
            if row.cancel_requested:
                self._finish(row, CANCELLED)
                return None
            for st in row.steps:
                if st["state"] in (PENDING, "running"):
                    if st["state"] == PENDING:
                        _set_step(row, st["name"], state="running")
                    return str(st["name"])
            _merge_result(row, characters=len(self._text(db, job_id)))
            self._finish(row, SUCCEEDED)
            return None

    def _ingest_fail(self, job_id: str, step: str | None, code: str, message: str) -> None:
        with self.db.sessions().begin() as db:
            row = db.get(IngestJob, job_id, with_for_update=True)
            if row is not None and row.state not in FINAL:
                self._finish(row, FAILED, {"step": step, "code": code, "message": message[:1000]})

    def _ingest_requeue(self, job_id: str) -> None:
        with self.db.sessions().begin() as db:
            row = db.get(IngestJob, job_id, with_for_update=True)
            if row is not None and row.state == RUNNING:
                row.state = QUEUED
                row.revision += 1

    async def run_ingest(self, job_id: str) -> None:
        """procrastinate's task: the job from the step it is at to its end (or to the next transient error,
        after which procrastinate runs it again)."""
        ctx = await asyncio.to_thread(self.ingest_claim, job_id)
        if ctx is None:
            return
        step: str | None = None
        try:
            if ctx["sha256"] is None:
                raise Refusal(410, "upload_gone", f"upload {ctx['upload_id']} no longer exists")
            try:
                data = await asyncio.to_thread(self.blobs.read, ctx["sha256"])
            except FileNotFoundError:
                raise Refusal(410, "upload_gone", "the file's bytes are no longer on the volume") from None
            try:
                while (step := await asyncio.to_thread(self.ingest_next_step, job_id)) is not None:
                    await getattr(self, f"_step_{step}")(job_id, ctx, data)
            except _db_errors() as exc:
                raise Unavailable(f"the database did not answer ({type(exc).__name__})") from exc
        except Unavailable as exc:
            if ctx["attempt"] < self.settings.ingest_max_attempts:
                log.warning("ingest job %s: %s; tried again", job_id, exc)
                try:
                    await asyncio.to_thread(self._ingest_requeue, job_id)
                except _db_errors():  # still away: the sweep re-queues the row once it is back
                    log.warning("ingest job %s: not marked queued (the database is away)", job_id)
                raise
            await asyncio.to_thread(self._ingest_fail, job_id, step, "service_unavailable", str(exc))
        except Refusal as exc:
            await asyncio.to_thread(self._ingest_fail, job_id, step, exc.code, exc.message)
        except Exception:  # a bug or an unforeseen error: the job still ends; its details only in the logs
            log.exception("ingest job %s: step %s failed", job_id, step)
            await asyncio.to_thread(
                self._ingest_fail,
                job_id,
                step,
                "internal_error",
                f"internal error; the operator's logs have the details under job {job_id}",
            )

    # -- the steps (each ends with its checkpoint) --------------------------------------------------------
    async def _step_parse(self, job_id: str, ctx: dict[str, Any], data: bytes) -> None:
        opts: Options = ctx["options"]
        kind = ctx["content_type"]
        if kind in IMAGES:
            if opts.ocr == "never":
                raise Refusal(
                    422, "needs_ocr", 'the file is an image: it has no text without OCR (ocr "auto")'
                )
            pages: list[dict[str, Any]] = [{"number": 1, "text": ""}]
            meta: dict[str, Any] = {}
            needs = [1]
        else:
            parsed = await self._pipeline().call("documents", "parse", data, ctx["filename"], kind, "never")
            pages, meta = parsed["pages"], parsed.get("metadata") or {}
            needs = [
                p["number"]
                for p in pages
                if kind == PDF and (opts.ocr == "always" or (opts.ocr == "auto" and not p["text"].strip()))
            ]
        check_text_size(sum(len(p["text"]) for p in pages if p["number"] not in needs))
        if len(needs) > self.settings.ingest_max_ocr_pages:
            raise Refusal(
                413,
                "too_many_scanned_pages",
                f"{len(needs)} pages need OCR; a job reads at most {self.settings.ingest_max_ocr_pages}: "
                'send fewer pages, or ocr "never"',
            )
        await asyncio.to_thread(self._parse_checkpoint, job_id, pages, needs, meta)

    def _parse_checkpoint(
        self, job_id: str, pages: list[dict[str, Any]], needs: list[int], meta: dict[str, Any]
    ) -> None:
        with self.db.sessions().begin() as db:
            row = db.get(IngestJob, job_id, with_for_update=True)
            db.execute(delete(IngestPage).where(IngestPage.job_id == job_id))  # a re-run writes them anew
            db.add_all(
                IngestPage(
                    job_id=job_id,
                    number=p["number"],
                    text="" if p["number"] in needs else p["text"],
                    ocr=False,
                    needs_ocr=p["number"] in needs,
                )
                for p in pages
            )
            _set_step(row, "parse", state=DONE, done=1, total=1)
            _set_step(row, "ocr", state=PENDING if needs else SKIPPED, done=0, total=len(needs))
            metadata = {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool))}
            _merge_result(row, pages=len(pages), ocr_pages=0, metadata=metadata)

    def _ocr_todo(self, job_id: str) -> list[int]:
        with self.db.sessions()() as db:
            return list(
                db.scalars(
                    select(IngestPage.number)
                    .where(IngestPage.job_id == job_id, IngestPage.needs_ocr, ~IngestPage.ocr)
                    .order_by(IngestPage.number)
                )
            )

    async def _step_ocr(self, job_id: str, ctx: dict[str, Any], data: bytes) -> None:
        todo = await asyncio.to_thread(self._ocr_todo, job_id)
        image = ctx["content_type"] in IMAGES
        for first in range(0, len(todo), CUT_PAGES):
            group = todo[first : first + CUT_PAGES]
            if await asyncio.to_thread(self._cancel_requested, job_id):
                return  # a cancel asked for since the last checkpoint: no cut for a job that stops here
            cut = {} if image else await _cut_pages(data, group)
            for number in group:  # one page at a time, each checkpointed: a resumed job reads only the rest
                if image:
                    out = await self._pipeline().call("ocr", "image", data)
                else:
                    out = await self._ocr_page(data, number, cut.get(number))
                if await asyncio.to_thread(self._ocr_checkpoint, job_id, number, out["text"]):
                    return  # a cancel asked for: the boundary, ingest_next_step cancels
        await asyncio.to_thread(self._ocr_done, job_id)

    async def _ocr_page(self, data: bytes, number: int, page: bytes | None) -> dict[str, Any]:
        """OCR of the job's page `number`: from its own one-page PDF when it was cut (its page 1), else from the
        whole file. A cut page OCR refuses (4xx) is sent again whole: the refusal then names the job's page
        (`page 37`, not the cut's `page 1`), and a page the cut spoiled is still read. A service error (5xx,
        away) is not the cut's fault: it goes up as from any call."""
        if page is not None:
            try:
                (out,) = await self._pipeline().call("ocr", "pdf_pages", page, [1])
                return dict(out)
            except Refusal as exc:
                if exc.status >= 500:
                    raise
                log.warning("OCR refused page %d cut out of a job's PDF (%s): sent whole", number, exc.code)
        (out,) = await self._pipeline().call("ocr", "pdf_pages", data, [number])
        return dict(out)

    def _cancel_requested(self, job_id: str) -> bool:
        """Whether a cancel was asked for (as `_ocr_checkpoint` reports it), between checkpoints."""
        with self.db.sessions()() as db:
            row = db.get(IngestJob, job_id)
            return row is not None and bool(row.cancel_requested)

    def _ocr_checkpoint(self, job_id: str, number: int, text: str) -> bool:
        """The page's text saved; whether a cancel was asked for."""
        with self.db.sessions().begin() as db:
            row = db.get(IngestJob, job_id, with_for_update=True)
            db.execute(
                update(IngestPage)
                .where(IngestPage.job_id == job_id, IngestPage.number == number)
                .values(text=text, ocr=True)
            )
            check_text_size(
                db.scalar(
                    select(func.coalesce(func.sum(func.length(IngestPage.text)), 0)).where(
                        IngestPage.job_id == job_id
                    )
                )
            )
            st = _step(row, "ocr")
            _set_step(row, "ocr", done=min(st["total"], st["done"] + 1))
            _merge_result(row, ocr_pages=(row.result or {}).get("ocr_pages", 0) + 1)
            return bool(row.cancel_requested)

    def _ocr_done(self, job_id: str) -> None:
        with self.db.sessions().begin() as db:
            row = db.get(IngestJob, job_id, with_for_update=True)
            st = _step(row, "ocr")
            _set_step(row, "ocr", state=DONE, done=st["total"])

    def _text_and_mark(self, job_id: str) -> str:
        with self.db.sessions()() as db:
            return self._text(db, job_id)

    async def _step_index(self, job_id: str, ctx: dict[str, Any], data: bytes) -> None:
        opts: Options = ctx["options"]
        text = await asyncio.to_thread(self._text_and_mark, job_id)
        own = opts.rag == "client"
        collection = (
            collection_name("client", ctx["owner"]) if own else collection_name("pub", opts.rag.collection)  # type: ignore[union-attr]
        )
        chunks = 0
        errors: list[dict[str, Any]] = []
        if text.strip():
            doc = {
                "text": text,
                "source": f"upload:{ctx['upload_id']}",  # the chunks' ids follow from it: a re-run replaces them
                "metadata": {
                    "upload_id": ctx["upload_id"],
                    "filename": ctx["filename"] or "",
                    "job_id": job_id,
                    "content_type": ctx["content_type"],
                },
            }
            out = await self._pipeline().call("client_rag" if own else "rag", "ingest", collection, [doc])
            chunks = int(out["chunks"])
        else:
            errors.append(
                {"step": "index", "code": "no_text", "message": "the document has no text to index"}
            )
        await asyncio.to_thread(self._index_checkpoint, job_id, chunks, collection, errors)

    def _index_checkpoint(
        self, job_id: str, chunks: int, collection: str, errors: list[dict[str, Any]]
    ) -> None:
        with self.db.sessions().begin() as db:
            row = db.get(IngestJob, job_id, with_for_update=True)
            _set_step(row, "index", state=DONE, done=1, total=1)
            _merge_result(
                row,
                chunks=chunks,
                collection=collection,
                errors=[*(row.result or {}).get("errors", []), *errors],
            )

    async def _step_entities(self, job_id: str, ctx: dict[str, Any], data: bytes) -> None:
        text = await asyncio.to_thread(self._text_and_mark, job_id)
        pieces = chunk_text(text, GRAPH_PIECE, 0) if text.strip() else []
        start = await asyncio.to_thread(self._entities_start, job_id, len(pieces))
        source = f"upload:{ctx['upload_id']}"
        for i in range(start, len(pieces)):
            key = _piece_key(job_id, i, pieces[i])
            out = await self._pipeline().call("graph", "extract", ctx["owner"], pieces[i], source, True, key)
            await asyncio.to_thread(self._entities_checkpoint, job_id, i, out)
        await asyncio.to_thread(self._entities_done, job_id, len(pieces))

    def _entities_start(self, job_id: str, n: int) -> int:
        """The piece to start at: a resumed job goes on after its last checkpointed piece."""
        with self.db.sessions().begin() as db:
            row = db.get(IngestJob, job_id, with_for_update=True)
            start = int(_step(row, "entities")["done"]) if _step(row, "entities")["total"] == n else 0
            _set_step(row, "entities", total=n, done=start)
            if not start:  # every piece again: none of the counts kept so far stands
                _merge_result(row, _relations={})
            return start

    def _entities_checkpoint(self, job_id: str, i: int, out: dict[str, Any]) -> None:
        """Piece `i`'s entities and relations into the result, in the transaction that marks it done. A piece
        is sent again when its runner died between its graph write and this checkpoint: the graph does not
        count it again (`already_written`) but answers the same entities and relations, so the result is what
        one run makes; the entities are a set and the relations are kept per piece (`_relations`), so a piece's
        count is set, never added twice."""
        with self.db.sessions().begin() as db:
            row = db.get(IngestJob, job_id, with_for_update=True)
            seen = {(e["name"], e["label"]) for e in (row.result or {}).get("_entities", [])}
            capped = len(seen) >= MAX_ENTITIES or bool((row.result or {}).get("entities_capped"))
            for e in out["entities"]:  # bounded: past MAX_ENTITIES new ones are not kept here
                if (e["name"], e["label"]) in seen:
                    continue
                if len(seen) >= MAX_ENTITIES:
                    capped = True
                    break
                seen.add((e["name"], e["label"]))
            found = [{"name": n, "label": lb} for n, lb in sorted(seen)]
            # no `_relations`: the job's first pieces ran before it was kept; their sum stands for them
            earlier = (row.result or {}).get(
                "_relations", {"earlier": (row.result or {}).get("relations", 0)}
            )
            per_piece = {**earlier, str(i): len(out["relations"])}
            _set_step(row, "entities", done=i + 1)
            _merge_result(
                row,
                _entities=found,
                entities=len(found),
                entities_capped=capped,
                entity_sample=found[:50],
                _relations=per_piece,
                relations=sum(per_piece.values()),
            )

    def _entities_done(self, job_id: str, n: int) -> None:
        with self.db.sessions().begin() as db:
            row = db.get(IngestJob, job_id, with_for_update=True)
            _set_step(row, "entities", state=DONE, done=n)
            if not n:
                _merge_result(row, entities=0, relations=0)
