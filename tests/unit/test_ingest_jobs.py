"""Document-ingest jobs without Ray (`deployments.services.ingest`, in the Batch API's store and runner): a real
PostgreSQL (the session's private server, a database per test), procrastinate's real worker, the real parser
and OCR in this process; the RAG service is the real `Rag` over an in-memory collection (its chunking and
chunk ids are what is tested), the graph a recorder (its MERGE writes are tested in integration)."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient

from deployments.gateway.refusal import Refusal
from deployments.services import ingest
from deployments.services.documents import Documents
from deployments.services.ocr import Ocr
from deployments.services.rag import Rag
from tests import services_samples as samples
from tests.support import Postgres

PAGES = ["Ana Lima signed the lease in Lisbon.", "Bruno Costa paid the deposit."]
SCANNED = "Signed lease 2026"


def mixed_pdf() -> bytes:
    """Two pages with a text layer, then a scanned page (an image of text, no text layer)."""
    from pypdf import PdfReader, PdfWriter

    w = PdfWriter()
    for part in (samples.pdf(PAGES), samples.scanned_pdf([SCANNED])):
        for page in PdfReader(io.BytesIO(part)).pages:
            w.add_page(page)
    buf = io.BytesIO()
    w.write(buf)
    return buf.getvalue()


@dataclass
class Endpoint:
    host: str
    port: int
    user: str = "rma"
    password: str = ""
    database: str = "postgres"


class MemoryCollection:
    def __init__(self) -> None:
        self.rows: dict[str, tuple[str, dict[str, Any]]] = {}

    def delete(self, where: dict[str, Any]) -> None:
        src = where["source"]
        names = set(src["$in"]) if isinstance(src, dict) else {src}
        self.rows = {k: v for k, v in self.rows.items() if v[1]["source"] not in names}

    def add(self, ids: list[str], documents: list[str], embeddings: Any, metadatas: list[Any]) -> None:
        for i, d, m in zip(ids, documents, metadatas, strict=True):
            assert i not in self.rows, f"chunk id {i} added twice"
            self.rows[i] = (d, m)


class MemoryRag(Rag):
    """The real `Rag.ingest` (chunking, ids from the source, replace-then-add) over in-memory collections."""

    def __init__(self) -> None:
        super().__init__({}, endpoint=lambda _s: None, embedder=lambda texts: [[0.0] * 3 for _ in texts])
        self.collections: dict[str, MemoryCollection] = {}

    def _collection(self, name: str, create: bool) -> Any:
        return self.collections.setdefault(name, MemoryCollection())


class RecordingGraph:
    """Records calls and counts as the graph store does: a write adds its mentions and relations to the owner's
    counts once per piece key (`graph.py`'s markers; the store's own behaviour is tested in
    tests/integration/test_graph_owners.py). `gate` (set by a test) holds a call until it is opened."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.keys: list[str | None] = []
        self.gate: threading.Event | None = None
        self.marks: set[tuple[str, str]] = set()
        self.mentions: dict[tuple[str, str], int] = {}
        self.relations: dict[str, int] = {}

    def extract(
        self, owner: str, text: str, source: str | None, write: bool, piece: str | None = None
    ) -> dict[str, Any]:
        self.calls.append((owner, text))
        self.keys.append(piece)
        if self.gate is not None:
            assert self.gate.wait(30), "the test never opened the gate"  # before the pipeline's 60 s
        names = [n for n in ("Ana Lima", "Bruno Costa", "Lisbon") if n in text]
        out: dict[str, Any] = {
            "entities": [
                {"name": n, "label": "GPE" if n == "Lisbon" else "PERSON", "mentions": 1} for n in names
            ],
            "relations": [{"source": "Ana Lima", "target": "Lisbon", "type": "CO_OCCURS", "count": 1}],
            "written": bool(write and names),
        }
        seen = piece is not None and (owner, piece) in self.marks
        if out["written"] and not seen:
            if piece is not None:
                self.marks.add((owner, piece))
            for n in names:
                self.mentions[(owner, n)] = self.mentions.get((owner, n), 0) + 1
            self.relations[owner] = self.relations.get(owner, 0) + len(out["relations"])
        if piece is not None:
            out["already_written"] = seen and out["written"]
            out["written"] = out["written"] and not seen
        return out


class CountingDocuments(Documents):
    def __init__(self, ocr: Any) -> None:
        super().__init__(ocr)
        self.calls = 0

    async def parse(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.calls += 1
        return await super().parse(*args, **kwargs)


@pytest.fixture(scope="module")
def ocr() -> Ocr:
    return Ocr()


def make_store(postgres: Postgres, tmp_path: Any, ocr: Ocr, **settings: Any) -> Any:
    from deployments.services.batches import Batches

    rag, graph, docs = MemoryRag(), RecordingGraph(), CountingDocuments(ocr)
    pipeline = ingest.ServePipeline(60, documents=docs, ocr=ocr, rag=rag, client_rag=rag, graph=graph)
    s = {"database": f"t_{uuid.uuid4().hex[:12]}", "uploads_dir": str(tmp_path / "blobs"), **settings}
    store = Batches(
        s,
        endpoint=lambda _s: Endpoint(postgres.host, postgres.port),
        models=object(),
        reporter=None,
        pipeline=pipeline,
    )
    store.rag, store.graph, store.docs = rag, graph, docs  # for the tests' eyes
    return store


async def until(predicate: Any, what: str, timeout: float = 60) -> Any:
    try:
        async with asyncio.timeout(timeout):
            while not (out := await asyncio.to_thread(predicate)):
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"waited {timeout} s for {what}") from None
    return out


OPTS = {"ocr": "auto", "rag": {"collection": "handbook"}, "graph": True}


def test_a_job_runs_every_step_on_the_runner_and_a_key_makes_one_job(
    postgres: Postgres, tmp_path: Any, ocr: Ocr
) -> None:
    store = make_store(postgres, tmp_path, ocr)
    pdf = mixed_pdf()

    async def scenario() -> None:
        status, job = await store.ingest_create(
            "alice", pdf, "lease.pdf", "application/pdf", None, OPTS, "k-1"
        )
        assert status == 202 and job["state"] == ingest.QUEUED and job["object"] == "ingest.job"
        assert [s["name"] for s in job["steps"]] == list(ingest.STEPS)
        # the same key and request: the same job, no second one; the key with another request: a 409
        again, same = await store.ingest_create("alice", pdf, "lease.pdf", None, None, OPTS, "k-1")
        assert again == 200 and same["id"] == job["id"]
        with pytest.raises(Refusal) as exc:
            await store.ingest_create("alice", pdf, "lease.pdf", None, None, {**OPTS, "graph": False}, "k-1")
        assert exc.value.status == 409 and "different document or options" in exc.value.message
        # the key is per client: bob's "k-1" is his own job
        _, bobs = await store.ingest_create("bob", pdf, "lease.pdf", None, None, {}, "k-1")
        assert bobs["id"] != job["id"]
        await store.ensure_runner()
        final = await until(
            lambda: (j := store.ingest_get(job["id"], "alice"))["state"] in ingest.FINAL and j, "the job"
        )
        assert final["state"] == ingest.SUCCEEDED, final
        assert [(s["name"], s["state"], s["done"], s["total"]) for s in final["steps"]] == [
            ("parse", "done", 1, 1),
            ("ocr", "done", 1, 1),  # only the scanned page
            ("index", "done", 1, 1),
            ("entities", "done", 1, 1),
        ]
        r = final["result"]
        assert r["pages"] == 3 and r["ocr_pages"] == 1 and r["errors"] == []
        assert r["collection"] == "pub-handbook" and r["chunks"] >= 1
        assert r["entities"] == 3 and {"name": "Lisbon", "label": "GPE"} in r["entity_sample"]
        text = store.ingest_text(job["id"], "alice")
        assert text.split("\n\n") == [*PAGES, SCANNED] and r["characters"] == len(text)
        indexed = " ".join(d for d, _ in store.rag.collections["pub-handbook"].rows.values())
        assert SCANNED in indexed and PAGES[1] in indexed
        assert store.graph.calls == [("alice", text)]
        # another client's job: absent everywhere
        for call in (store.ingest_get, store.ingest_cancel, store.ingest_text):
            with pytest.raises(Refusal) as exc:
                call(job["id"], "bob")
            assert exc.value.status == 404
        assert [j["id"] for j in store.ingest_list("alice")["data"]] == [job["id"]]
        assert [j["id"] for j in store.ingest_list("bob")["data"]] == [bobs["id"]]

    asyncio.run(scenario())


def test_a_job_whose_runner_died_resumes_at_its_step_without_duplicating_chunks(
    postgres: Postgres, tmp_path: Any, ocr: Ocr
) -> None:
    """A runner killed inside the OCR step: the sweep puts the job back, the next run parses nothing again,
    reads the scanned page, indexes; indexing run twice leaves one set of chunks."""
    import psycopg

    store = make_store(postgres, tmp_path, ocr, batch_runner=False, ingest_max_attempts=3)

    async def scenario() -> None:
        _, job = await store.ingest_create("alice", mixed_pdf(), "lease.pdf", None, None, {"rag": "client"})
        jid = job["id"]
        # the first runner: parsed, started OCR, died (its procrastinate job 'doing', its worker silent)
        ctx = store.ingest_claim(jid)
        assert store.ingest_next_step(jid) == "parse"
        await store._step_parse(jid, ctx, mixed_pdf())
        assert store.ingest_next_step(jid) == "ocr"
        mid = store.ingest_get(jid, "alice")
        assert mid["state"] == ingest.RUNNING and mid["steps"][1] == {
            "name": "ocr",
            "state": "running",
            "done": 0,
            "total": 1,
        }
        conninfo = f"host={postgres.host} port={postgres.port} user=rma dbname={store.settings.database}"
        with psycopg.connect(conninfo, autocommit=True) as c:
            c.execute("SET search_path TO procrastinate")
            wid = c.execute(
                "INSERT INTO procrastinate_workers (last_heartbeat) VALUES (now() - interval '1 hour') RETURNING id"
            ).fetchone()[0]
            c.execute("UPDATE procrastinate_jobs SET status = 'doing', worker_id = %s", (wid,))
        await store.sweep()  # the stalled job back in the queue
        with psycopg.connect(conninfo, autocommit=True) as c:
            c.execute("SET search_path TO procrastinate")
            assert c.execute("SELECT status FROM procrastinate_jobs").fetchall() == [("todo",)]
        store.settings.batch_runner = True
        await store.ensure_runner()
        final = await until(
            lambda: (j := store.ingest_get(jid, "alice"))["state"] in ingest.FINAL and j, "the resumed job"
        )
        assert final["state"] == ingest.SUCCEEDED and final["attempts"] == 2, final
        assert store.docs.calls == 1  # parse was checkpointed: not run again
        col = store.rag.collections["client-alice"]
        assert len(col.rows) == final["result"]["chunks"] >= 1
        # the index step again (as a runner dying after Chroma's write, before the checkpoint, makes it)
        await store._step_index(jid, ctx, b"")
        assert len(col.rows) == final["result"]["chunks"]

    asyncio.run(scenario())


class RecordingOcr:
    """The real OCR, with each `pdf_pages` call's bytes and page numbers recorded."""

    def __init__(self, ocr: Ocr) -> None:
        self.ocr = ocr
        self.calls: list[tuple[bytes, list[int]]] = []

    def image(self, data: bytes) -> dict[str, Any]:
        return self.ocr.image(data)

    def pdf_pages(self, data: bytes, numbers: list[int]) -> list[dict[str, Any]]:
        self.calls.append((data, numbers))
        return self.ocr.pdf_pages(data, numbers)


def two_scans_pdf() -> tuple[bytes, list[str]]:
    """Text, scanned, text, scanned pages; and the text each page has."""
    from pypdf import PdfReader, PdfWriter

    texts = [PAGES[0], SCANNED, PAGES[1], "Scanned contract 2026"]
    w = PdfWriter()
    for part in (
        samples.pdf([texts[0]]),
        samples.scanned_pdf([texts[1]]),
        samples.pdf([texts[2]]),
        samples.scanned_pdf([texts[3]]),
    ):
        w.add_page(PdfReader(io.BytesIO(part)).pages[0])
    buf = io.BytesIO()
    w.write(buf)
    return buf.getvalue(), texts


def page_images(data: bytes) -> list[list[bytes]]:
    from pypdf import PdfReader

    return [[im.data for im in page.images] for page in PdfReader(io.BytesIO(data)).pages]


def test_ocr_is_sent_each_scanned_page_alone_and_its_text_is_kept_for_that_page(
    postgres: Postgres, tmp_path: Any, ocr: Ocr
) -> None:
    """The OCR service gets a one-page PDF per scanned page (the page's own image, not the whole file), and
    what it reads is stored as the job's page of that number."""
    store = make_store(postgres, tmp_path, ocr, batch_runner=False)
    recorder = RecordingOcr(ocr)
    store.pipeline = ingest.ServePipeline(60, documents=store.docs, ocr=recorder)
    pdf, texts = two_scans_pdf()

    async def scenario() -> None:
        _, job = await store.ingest_create("alice", pdf, "lease.pdf", None, None, {})
        await store.run_ingest(job["id"])
        out = store.ingest_get(job["id"], "alice")
        assert out["state"] == ingest.SUCCEEDED and out["result"]["ocr_pages"] == 2, out
        whole = page_images(pdf)
        assert [numbers for _, numbers in recorder.calls] == [[1], [1]]
        for (sent, _), number in zip(recorder.calls, (2, 4), strict=True):
            assert len(sent) < len(pdf)
            assert page_images(sent) == [whole[number - 1]]  # one page: the job's page `number`
        assert store.ingest_text(job["id"], "alice").split("\n\n") == texts

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "error",
    [
        Refusal(422, "unreadable_pdf", "the PDF could not be read"),  # a damaged file
        RuntimeError("the sandbox's pool is broken"),  # anything else: cutting only saves bytes
    ],
)
def test_a_page_that_cannot_be_cut_goes_to_ocr_with_the_whole_file(
    postgres: Postgres, tmp_path: Any, ocr: Ocr, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    from deployments.services.documents import cut_pdf_pages

    pdf, texts = two_scans_pdf()
    assert sorted(cut_pdf_pages(pdf, [2, 9])) == [2]  # no page 9: left out, not an error

    real = ingest.sandbox.shared()

    class Broken:
        """The sandbox, whose PDF cutter fails with `error` (the parser and OCR use it too)."""

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        async def arun(self, what: str, *args: Any) -> Any:
            if what == "PDF cutter":
                raise error
            return await real.arun(what, *args)

    monkeypatch.setattr(ingest.sandbox, "shared", lambda: Broken())
    store = make_store(postgres, tmp_path, ocr, batch_runner=False)
    recorder = RecordingOcr(ocr)
    store.pipeline = ingest.ServePipeline(60, documents=store.docs, ocr=recorder)

    async def scenario() -> None:
        _, job = await store.ingest_create("alice", pdf, "lease.pdf", None, None, {})
        await store.run_ingest(job["id"])
        assert store.ingest_get(job["id"], "alice")["state"] == ingest.SUCCEEDED
        assert recorder.calls == [(pdf, [2]), (pdf, [4])]
        assert store.ingest_text(job["id"], "alice").split("\n\n") == texts

    asyncio.run(scenario())

    class Stopped:
        async def arun(self, what: str, *args: Any) -> Any:
            raise asyncio.CancelledError

    monkeypatch.setattr(ingest.sandbox, "shared", lambda: Stopped())
    with pytest.raises(asyncio.CancelledError):  # a cancelled task is not taken for a file that cannot be cut
        asyncio.run(ingest._cut_pages(pdf, [2]))


def shared_image_pdf(pages: int) -> bytes:
    """`pages` pages that all draw one image of noise (it does not compress): the file holds it once, and
    each page cut out of it carries it whole."""
    import random

    from PIL import Image
    from pypdf import PdfReader, PdfWriter

    noise = random.Random(7).randbytes(300 * 300)
    buf = io.BytesIO()
    Image.frombytes("L", (300, 300), noise).save(buf, format="PDF", resolution=100.0)
    page = PdfReader(io.BytesIO(buf.getvalue())).pages[0]
    w = PdfWriter()
    for _ in range(pages):
        w.add_page(page)
    out = io.BytesIO()
    w.write(out)
    return out.getvalue()


def test_cut_pages_that_save_nothing_or_pass_the_budget_are_left_to_go_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """20 pages sharing one image: each cut is nearly the whole file, so all 20 would be 20x the file in
    memory; the cuts stop at max(file, `CUT_BUDGET`) and the rest go whole. A cut no smaller than the file
    (a one-page file: the same page plus PDFium's own framing) is left out too."""
    from deployments.services import documents

    pdf = shared_image_pdf(20)
    numbers = list(range(1, 21))
    cut = documents.cut_pdf_pages(pdf, numbers)
    assert sorted(cut) == numbers  # under the 32 MiB floor: all cut, each smaller than the file
    assert all(len(page) < len(pdf) for page in cut.values())
    monkeypatch.setattr(documents, "CUT_BUDGET", 0)  # a file past the floor: the budget is the file's size
    cut = documents.cut_pdf_pages(pdf, numbers)
    assert sorted(cut) == [1] and sum(map(len, cut.values())) <= len(pdf)
    one = samples.scanned_pdf([SCANNED])
    assert documents.cut_pdf_pages(one, [1]) == {}


class RefusingOcr(RecordingOcr):
    """The real OCR, but a cut page (any bytes but `whole`) is refused with `status`."""

    def __init__(self, ocr: Ocr, whole: bytes, status: int) -> None:
        super().__init__(ocr)
        self.whole, self.status = whole, status

    def pdf_pages(self, data: bytes, numbers: list[int]) -> list[dict[str, Any]]:
        if data != self.whole:
            self.calls.append((data, numbers))
            raise Refusal(self.status, "ocr_refused", f"page {numbers[0]} refused")
        return super().pdf_pages(data, numbers)


@pytest.mark.parametrize("status", [422, 503])
def test_a_cut_page_ocr_refuses_is_sent_whole_and_a_service_error_is_not(
    postgres: Postgres, tmp_path: Any, ocr: Ocr, status: int
) -> None:
    """A 4xx on a cut page: the page is sent again in the whole file, and read; a 5xx is the service's, not
    the cut's: it goes up as before, the whole file not sent."""
    store = make_store(postgres, tmp_path, ocr, batch_runner=False, ingest_max_attempts=1)
    pdf, texts = two_scans_pdf()
    recorder = RefusingOcr(ocr, pdf, status)
    store.pipeline = ingest.ServePipeline(60, documents=store.docs, ocr=recorder)

    async def scenario() -> None:
        _, job = await store.ingest_create("alice", pdf, "lease.pdf", None, None, {})
        await store.run_ingest(job["id"])
        out = store.ingest_get(job["id"], "alice")
        sent = [(data == pdf, numbers) for data, numbers in recorder.calls]
        if status < 500:
            assert out["state"] == ingest.SUCCEEDED, out
            assert sent == [(False, [1]), (True, [2]), (False, [1]), (True, [4])]
            assert store.ingest_text(job["id"], "alice").split("\n\n") == texts
        else:
            # a transient error, as ever: the job is started again; with one attempt, it fails with it
            assert out["state"] == ingest.FAILED and out["error"]["code"] == "service_unavailable", out
            assert sent == [(False, [1])]

    asyncio.run(scenario())


def test_a_page_too_large_for_ocr_is_named_by_its_number_in_the_job(
    postgres: Postgres, tmp_path: Any, ocr: Ocr
) -> None:
    """The real OCR refuses a page past its pixel limit; cut out, the page is its file's page 1, so it is
    sent again whole and the job's error names page 4, the page the caller can find."""
    from pypdf import PdfReader, PdfWriter
    from pypdf.generic import RectangleObject

    pdf, _ = two_scans_pdf()
    w = PdfWriter()
    for n, page in enumerate(PdfReader(io.BytesIO(pdf)).pages, 1):
        if n == 4:  # 5000 pt a side: past the OCR's 4096-pixel side even at 72 dpi
            page.mediabox = page.cropbox = RectangleObject([0, 0, 5000, 5000])
        w.add_page(page)
    buf = io.BytesIO()
    w.write(buf)
    pdf = buf.getvalue()
    store = make_store(postgres, tmp_path, ocr, batch_runner=False)
    recorder = RecordingOcr(ocr)
    store.pipeline = ingest.ServePipeline(60, documents=store.docs, ocr=recorder)

    async def scenario() -> None:
        _, job = await store.ingest_create("alice", pdf, "big.pdf", None, None, {})
        await store.run_ingest(job["id"])
        out = store.ingest_get(job["id"], "alice")
        assert out["state"] == ingest.FAILED and out["error"]["code"] == "page_too_large", out
        assert out["error"]["message"].startswith("page 4 is 5000x5000 pt"), out["error"]
        assert [(data == pdf, numbers) for data, numbers in recorder.calls] == [
            (False, [1]),
            (False, [1]),
            (True, [4]),
        ]

    asyncio.run(scenario())


def test_ocr_groups_are_cut_one_at_a_time_and_a_cancel_between_groups_stops_before_the_next_cut(
    postgres: Postgres, tmp_path: Any, ocr: Ocr, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ingest, "CUT_PAGES", 1)  # a group a scanned page
    cuts: list[list[int]] = []
    real_cut = ingest._cut_pages

    async def recording_cut(data: bytes, numbers: list[int]) -> dict[int, bytes]:
        cuts.append(numbers)
        return await real_cut(data, numbers)

    monkeypatch.setattr(ingest, "_cut_pages", recording_cut)
    store = make_store(postgres, tmp_path, ocr, batch_runner=False)
    recorder = RecordingOcr(ocr)
    store.pipeline = ingest.ServePipeline(60, documents=store.docs, ocr=recorder)
    pdf, texts = two_scans_pdf()

    async def scenario() -> None:
        _, job = await store.ingest_create("alice", pdf, "a.pdf", None, None, {})
        await store.run_ingest(job["id"])
        out = store.ingest_get(job["id"], "alice")
        assert out["state"] == ingest.SUCCEEDED and out["result"]["ocr_pages"] == 2, out
        assert cuts == [[2], [4]] and [n for _, n in recorder.calls] == [[1], [1]]
        assert store.ingest_text(job["id"], "alice").split("\n\n") == texts

        # a cancel asked for just after page 2's checkpoint (which reported none): page 4 is neither cut nor read
        cuts.clear()
        recorder.calls.clear()
        _, job = await store.ingest_create("alice", pdf, "b.pdf", None, None, {})
        real_checkpoint = store._ocr_checkpoint

        def checkpoint_then_cancel(job_id: str, number: int, text: str) -> bool:
            asked = real_checkpoint(job_id, number, text)
            store.ingest_cancel(job_id, "alice")
            return asked

        store._ocr_checkpoint = checkpoint_then_cancel
        await store.run_ingest(job["id"])
        out = store.ingest_get(job["id"], "alice")
        assert out["state"] == ingest.CANCELLED, out
        assert cuts == [[2]] and len(recorder.calls) == 1 and out["result"]["ocr_pages"] == 1

    asyncio.run(scenario())


def test_attempts_are_bounded_and_a_refused_file_fails_the_job_with_the_error(
    postgres: Postgres, tmp_path: Any, ocr: Ocr
) -> None:
    store = make_store(postgres, tmp_path, ocr, batch_runner=False, ingest_max_attempts=2)

    async def scenario() -> None:
        _, job = await store.ingest_create("alice", samples.pdf(["x"]), "a.pdf", None, None, {})
        for _ in range(2):  # two runners died in it
            assert store.ingest_claim(job["id"]) is not None
        await store.run_ingest(job["id"])  # the third start: failed, nothing run
        out = store.ingest_get(job["id"], "alice")
        assert out["state"] == ingest.FAILED and out["error"]["code"] == "attempts_exhausted"
        assert out["result"]["errors"] == [out["error"]] and store.docs.calls == 0
        # a file the parser refuses: failed at once, the step and the parser's message kept
        broken = b"%PDF-1.4\n" + b"\x00garbage" * 50
        _, bad = await store.ingest_create("alice", broken, "b.pdf", "application/pdf", None, {})
        await store.run_ingest(bad["id"])
        out = store.ingest_get(bad["id"], "alice")
        assert out["state"] == ingest.FAILED and out["error"]["step"] == "parse", out
        assert out["error"]["code"] == "unreadable_pdf" and out["steps"][0]["state"] == "failed"

    asyncio.run(scenario())


def test_cancel_queued_running_and_finished_jobs_and_the_unfinished_limit(
    postgres: Postgres, tmp_path: Any, ocr: Ocr
) -> None:
    store = make_store(postgres, tmp_path, ocr, batch_runner=False, ingest_max_unfinished=2)
    doc = samples.pdf(["Ana Lima"])

    async def scenario() -> None:
        _, queued = await store.ingest_create("alice", doc, "a.pdf", None, None, {})
        _, running = await store.ingest_create("alice", doc, "b.pdf", None, None, {"graph": True})
        with pytest.raises(Refusal) as exc:
            await store.ingest_create("alice", doc, "c.pdf", None, None, {})
        assert exc.value.status == 429 and exc.value.retry_after_s and "limit is 2" in exc.value.message
        out = store.ingest_cancel(queued["id"], "alice")
        assert out["state"] == ingest.CANCELLED and out["finished_at"]
        await store.run_ingest(queued["id"])  # its queue entry runs later: nothing happens
        assert store.docs.calls == 0
        # running: stops at the next step boundary
        ctx = store.ingest_claim(running["id"])
        assert store.ingest_next_step(running["id"]) == "parse"
        await store._step_parse(running["id"], ctx, doc)
        out = store.ingest_cancel(running["id"], "alice")
        assert out["state"] == ingest.RUNNING and out["cancel_requested"]
        assert store.ingest_next_step(running["id"]) is None
        out = store.ingest_get(running["id"], "alice")
        assert out["state"] == ingest.CANCELLED and store.graph.calls == []
        assert [s["state"] for s in out["steps"]] == ["done", "skipped", "skipped", "cancelled"]
        # a finished job's cancel answers its state unchanged
        assert store.ingest_cancel(running["id"], "alice") == out
        assert (await store.ingest_create("alice", doc, "c.pdf", None, None, {}))[0] == 202
        # creates at once: the limit holds (each counts the others' jobs under the owner's lock)
        outs = await asyncio.gather(
            *(store.ingest_create("carol", doc, f"{i}.pdf", None, None, {}) for i in range(6)),
            return_exceptions=True,
        )
        statuses = sorted(o[0] if isinstance(o, tuple) else o.status for o in outs)
        assert statuses == [202, 202, 429, 429, 429, 429], outs

    asyncio.run(scenario())


def test_the_jobs_queue_figures_count_by_state_age_the_oldest_and_sum_recent_pages(
    postgres: Postgres, tmp_path: Any, ocr: Ocr
) -> None:
    """The registry page's figures for the jobs (in the batches replica's report), from the real table."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import update

    from deployments.services.db import IngestJob
    from rma_ray.wire import BatchQueueReport

    store = make_store(postgres, tmp_path, ocr, batch_runner=False)
    doc = samples.pdf(["Ana Lima"])
    now = datetime.now(UTC)

    async def scenario() -> None:
        ids = [
            (await store.ingest_create("alice", doc, f"{i}.pdf", None, None, {}))[1]["id"] for i in range(6)
        ]
        rows = [  # (state, created, finished, pages)
            (ingest.QUEUED, now - timedelta(minutes=4), None, None),
            (ingest.QUEUED, now - timedelta(minutes=1), None, None),
            (ingest.RUNNING, now - timedelta(minutes=9), None, None),
            (ingest.SUCCEEDED, now - timedelta(minutes=8), now - timedelta(minutes=2), 7),
            (ingest.FAILED, now - timedelta(minutes=8), now - timedelta(minutes=3), None),
            (ingest.SUCCEEDED, now - timedelta(hours=2), now - timedelta(hours=1), 50),  # long ago: left out
        ]
        with store.db.sessions().begin() as db:
            for job_id, (state, created, finished, pages) in zip(ids, rows, strict=True):
                db.execute(
                    update(IngestJob)
                    .where(IngestJob.id == job_id)
                    .values(state=state, created_at=created, finished_at=finished, result={"pages": pages})
                )
        got = store.ingest_queue_figures(now)
        assert got.pop("oldest_queued_s") == pytest.approx(240, abs=1)
        assert got == {"queued": 2, "running": 1, "succeeded_10min": 1, "failed_10min": 1, "pages_10min": 7}
        report = BatchQueueReport(
            replica="r", **store.queue_figures(now)
        )  # the wire takes the figures as they are
        assert report.jobs is not None and report.jobs.queued == 2

    asyncio.run(scenario())


def test_finished_jobs_past_the_keep_days_are_deleted_with_their_texts_and_nothing_else(
    postgres: Postgres, tmp_path: Any, ocr: Ocr, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep's clean-up: a job that ended over `ingest_keep_days` ago goes (its row, page texts and
    Idempotency-Key: the key makes a new job); a recent finished job and an old unfinished one stay; procrastinate's
    own old entries are deleted in the same sweep."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import func, select, update

    from deployments.services.db import IngestJob, IngestPage

    store = make_store(postgres, tmp_path, ocr, batch_runner=False, ingest_keep_days=7)
    doc = samples.pdf(["Ana Lima"])

    async def scenario() -> None:
        _, old = await store.ingest_create("alice", doc, "old.pdf", None, None, {}, "key-old")
        _, recent = await store.ingest_create("alice", doc, "recent.pdf", None, None, {})
        _, waiting = await store.ingest_create("alice", doc, "waiting.pdf", None, None, {})
        for job in (old, recent):
            store.ingest_cancel(job["id"], "alice")
        long_ago = datetime.now(UTC) - timedelta(days=8)
        with store.db.sessions().begin() as db:
            db.execute(update(IngestJob).where(IngestJob.id == old["id"]).values(finished_at=long_ago))
            db.execute(update(IngestJob).where(IngestJob.id == waiting["id"]).values(created_at=long_ago))
            db.add_all(IngestPage(job_id=j["id"], number=1, text="page text") for j in (old, recent))
        store._ingest_forget_at = 0.0
        await store._ingest_sweep(await store._open())
        with pytest.raises(Refusal) as exc:
            store.ingest_get(old["id"], "alice")
        assert exc.value.status == 404
        assert store.ingest_get(recent["id"], "alice")["state"] == ingest.CANCELLED
        assert store.ingest_get(waiting["id"], "alice")["state"] == ingest.QUEUED
        with store.db.sessions()() as db:
            pages = db.scalars(select(IngestPage.job_id)).all()
            assert pages == [recent["id"]]
        assert store.ingest_forget() == 0  # nothing more to delete
        # its Idempotency-Key went with it: the same key makes a new job
        status, again = await store.ingest_create("alice", doc, "old.pdf", None, None, {}, "key-old")
        assert status == 202 and again["id"] != old["id"]
        # a clean-up deletes at most FORGET_BATCH jobs; the rest at the next one
        with store.db.sessions().begin() as db:
            db.execute(update(IngestJob).values(state=ingest.SUCCEEDED, finished_at=long_ago))
            assert db.scalar(select(func.count()).select_from(IngestJob)) == 3
        monkeypatch.setattr(ingest, "FORGET_BATCH", 2)
        assert [store.ingest_forget(), store.ingest_forget(), store.ingest_forget()] == [2, 1, 0]

    asyncio.run(scenario())


def test_a_database_outage_retries_the_job_and_the_sweep_requeues_a_running_row_with_no_task(
    postgres: Postgres, tmp_path: Any, ocr: Ocr
) -> None:
    import psycopg
    from sqlalchemy.exc import OperationalError

    store = make_store(postgres, tmp_path, ocr, batch_runner=False, ingest_max_attempts=3)
    conninfo = f"host={postgres.host} port={postgres.port} user=rma dbname={store.settings.database}"
    real, calls = store.ingest_next_step, []

    def flaky(job_id: str) -> str | None:  # the checkpoint after parsing: the database away once
        calls.append(job_id)
        if len(calls) == 2:
            raise OperationalError("UPDATE ingest_jobs", {}, Exception("server closed the connection"))
        return real(job_id)

    store.ingest_next_step = flaky

    async def scenario() -> None:
        _, job = await store.ingest_create("alice", samples.pdf(["Ana Lima"]), "a.pdf", None, None, {})
        with pytest.raises(ingest.Unavailable):
            await store.run_ingest(job["id"])  # procrastinate retries it
        assert store.ingest_get(job["id"], "alice")["state"] == ingest.QUEUED
        await store.run_ingest(job["id"])
        out = store.ingest_get(job["id"], "alice")
        assert out["state"] == ingest.SUCCEEDED and out["attempts"] == 2, out
        # a runner that died while the database was away: its row `running`, untouched, no task left
        _, other = await store.ingest_create("alice", samples.pdf(["Bruno"]), "b.pdf", None, None, {})
        assert store.ingest_claim(other["id"]) is not None
        with psycopg.connect(conninfo, autocommit=True) as c:
            c.execute("UPDATE public.ingest_jobs SET updated_at = now() - interval '1 hour'")
            c.execute("SET search_path TO procrastinate")
            c.execute("DELETE FROM procrastinate_jobs")
        await store.sweep()
        assert store.ingest_get(other["id"], "alice")["state"] == ingest.QUEUED
        with psycopg.connect(conninfo, autocommit=True) as c:
            rows = c.execute("SELECT lock, status FROM procrastinate.procrastinate_jobs").fetchall()
        assert rows == [(other["id"], "todo")]
        await store.sweep()  # its task is waiting: not queued twice, the sweep does not fail
        # a bug under a step: the job fails with a message naming it, the details only in the logs
        store.ingest_next_step = lambda _id: (_ for _ in ()).throw(KeyError("secret internals"))
        await store.run_ingest(other["id"])
        err = store.ingest_get(other["id"], "alice")["error"]
        assert err["code"] == "internal_error" and "secret" not in json.dumps(err)
        assert (
            err["message"] == f"internal error; the operator's logs have the details under job {other['id']}"
        )
        with psycopg.connect(conninfo, autocommit=True) as c:
            assert c.execute("SELECT count(*) FROM procrastinate.procrastinate_jobs").fetchone() == (1,)

    asyncio.run(scenario())


def test_a_file_that_crashes_the_parser_fails_the_job_once_and_backpressure_is_retried() -> None:
    class ActorDiedError(Exception):
        pass

    class BackPressureError(Exception):
        pass

    class Dying:
        def __init__(self, error: type[Exception]) -> None:
            self.error, self.calls = error, 0

        async def parse(self, *args: Any) -> Any:
            self.calls += 1
            raise self.error("the replica died")

        async def pdf_pages(self, *args: Any) -> Any:
            await asyncio.sleep(5)

    async def scenario() -> None:
        died, full = Dying(ActorDiedError), Dying(BackPressureError)
        for pipe, name, method in (
            (ingest.ServePipeline(5, documents=died), "documents", "parse"),
            (ingest.ServePipeline(0.05, ocr=Dying(ActorDiedError)), "ocr", "pdf_pages"),  # hung: a timeout
        ):
            with pytest.raises(Refusal) as exc:
                await pipe.call(name, method, b"%PDF", [1])
            assert exc.value.status == 422 and exc.value.code == "parser_limits_exceeded", exc.value.message
        with pytest.raises(ingest.Unavailable):
            await ingest.ServePipeline(5, documents=full).call("documents", "parse", b"%PDF")
        with pytest.raises(ingest.Unavailable):  # a service that does not read the file: tried again
            await ingest.ServePipeline(5, graph=Dying(ActorDiedError)).call("graph", "parse", b"x")

    asyncio.run(scenario())


@pytest.mark.parametrize("first_piece_by_earlier_code", [False, True])
def test_a_graph_piece_written_but_not_checkpointed_is_counted_once_after_the_resume(
    postgres: Postgres,
    tmp_path: Any,
    ocr: Ocr,
    monkeypatch: pytest.MonkeyPatch,
    first_piece_by_earlier_code: bool,
) -> None:
    """The runner killed between piece 1's graph write and its checkpoint: the resumed job sends piece 1
    again under the same key, the graph does not count it again, and the job's result counts its entities and
    relations once; also for a job whose first piece was checkpointed by the code before the per-piece counts
    (a deploy's restart)."""
    from deployments.services.db import IngestJob
    from deployments.services.rag import chunk_text

    monkeypatch.setattr(ingest, "GRAPH_PIECE", 40)  # a piece a page
    store = make_store(postgres, tmp_path, ocr, batch_runner=False, ingest_max_attempts=3)
    doc = samples.pdf([*PAGES, "Lisbon in the spring."])

    class Killed(BaseException):
        """The runner's process ending: nothing after it runs, no handler sees it."""

    real = store._entities_checkpoint

    def dies_after_the_write(job_id: str, i: int, out: dict[str, Any]) -> None:
        if i == 1:
            raise Killed
        real(job_id, i, out)

    async def scenario() -> None:
        _, job = await store.ingest_create("alice", doc, "a.pdf", None, None, {"graph": True})
        jid = job["id"]
        ctx = store.ingest_claim(jid)
        assert store.ingest_next_step(jid) == "parse"
        await store._step_parse(jid, ctx, doc)
        assert store.ingest_next_step(jid) == "entities"  # no OCR, no index asked for
        store._entities_checkpoint = dies_after_the_write
        with pytest.raises(Killed):
            await store._step_entities(jid, ctx, doc)
        pieces = chunk_text(store.ingest_text(jid, "alice"), ingest.GRAPH_PIECE, 0)
        assert len(pieces) == 3 and [t for _, t in store.graph.calls] == pieces[:2]
        assert store.ingest_get(jid, "alice")["steps"][3]["done"] == 1
        if first_piece_by_earlier_code:
            with store.db.sessions().begin() as db:
                row = db.get(IngestJob, jid)
                row.result = {k: v for k, v in row.result.items() if k != "_relations"}
        store._entities_checkpoint = real
        await store.run_ingest(jid)  # the next runner: from piece 1
        out = store.ingest_get(jid, "alice")
        assert out["state"] == ingest.SUCCEEDED and out["attempts"] == 2, out
        assert [t for _, t in store.graph.calls] == [pieces[0], pieces[1], pieces[1], pieces[2]]
        keys = store.graph.keys
        assert keys[1] == keys[2] and len({keys[0], keys[1], keys[3]}) == 3 and all(keys), keys
        # the graph's own counts: piece 1 (Bruno Costa's) once, though it was sent twice
        assert store.graph.mentions == {
            ("alice", "Ana Lima"): 1,
            ("alice", "Bruno Costa"): 1,
            ("alice", "Lisbon"): 2,
        }
        assert store.graph.relations == {"alice": 3}
        # RecordingGraph answers one relation a piece: three pieces, three relations, not four
        assert out["result"]["relations"] == 3 and out["result"]["entities"] == 3, out["result"]
        assert "_relations" not in out["result"]

    asyncio.run(scenario())


def test_a_text_past_the_online_limit_fails_the_job_and_the_kept_entities_are_bounded(
    postgres: Postgres, tmp_path: Any, ocr: Ocr, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store(postgres, tmp_path, ocr, batch_runner=False)
    monkeypatch.setattr(ingest, "MAX_ENTITIES", 2)

    class Huge:
        async def parse(self, *args: Any) -> dict[str, Any]:
            return {"pages": [{"number": 1, "text": "a" * (ingest.MAX_TEXT + 1)}]}

    async def scenario() -> None:
        doc = samples.pdf(["Ana Lima and Bruno Costa in Lisbon."])
        _, many = await store.ingest_create("alice", doc, "a.pdf", None, None, {"graph": True})
        await store.run_ingest(many["id"])
        out = store.ingest_get(many["id"], "alice")
        assert out["state"] == ingest.SUCCEEDED, out
        assert out["result"]["entities"] == 2 and out["result"]["entities_capped"] is True
        _, big = await store.ingest_create("alice", doc, "b.pdf", None, None, {})
        store.pipeline = ingest.ServePipeline(60, documents=Huge())
        await store.run_ingest(big["id"])
        out = store.ingest_get(big["id"], "alice")
        assert out["state"] == ingest.FAILED and out["error"]["code"] == "text_too_large", out
        assert "at most 5,000,000" in out["error"]["message"]

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("data", "upload_id", "options", "status", "says"),
    [
        (None, None, {}, 422, "send the document once"),
        (b"hello", "0" * 32, {}, 422, "send the document once"),
        (None, "0" * 32, {}, 404, "upload the file with POST /api/uploads first"),
        (None, "nope", {}, 404, "ids are 32 hex characters"),
        (b"hello", None, {"ocr": "maybe"}, 422, "ocr"),
        (b"hello", None, {"rag": "everyone"}, 422, 'rag {"collection": NAME} or "client"'),
        (b"hello", None, {"rag": {"collection": "no spaces"}}, 400, "must be 1-60 letters"),
        (b"hello", None, {"pages": 3}, 422, "pages"),
        (b"x" * 5000, None, {}, 413, "the limit is 4,096"),
        (b"\x00\x01binary", None, {}, 415, "not supported"),
    ],
)
def test_bad_input_is_a_4xx_saying_what_to_fix_and_writes_nothing(
    postgres: Postgres,
    tmp_path: Any,
    ocr: Ocr,
    data: bytes | None,
    upload_id: str | None,
    options: dict[str, Any],
    status: int,
    says: str,
) -> None:
    store = make_store(postgres, tmp_path, ocr, batch_runner=False, upload_max_bytes=4096)
    with pytest.raises(Refusal) as exc:
        store._ingest_create("alice", data, "a.txt", None, upload_id, options, None)
    assert exc.value.status == status and says in exc.value.message, exc.value.message
    with store.db.sessions()() as db:
        from sqlalchemy import func, select

        from deployments.services.db import IngestJob, Upload

        assert db.scalar(select(func.count()).select_from(IngestJob)) == 0
        assert db.scalar(select(func.count()).select_from(Upload)) == 0


# -- over HTTP: the gateway's routes with the store in this process ------------------------------------------


@pytest.fixture
def http(postgres: Postgres, tmp_path: Any, ocr: Ocr) -> Iterator[tuple[TestClient, Any]]:
    from deployments.gateway.auth import set_verifier
    from deployments.gateway.keys import ClientKeyVerifier
    from deployments.services.api import Backends, create_api
    from deployments.services.settings import ServicesSettings

    ring = {
        "keys": [
            {"id": ALICE.id, "hash": ALICE.hash, "name": "alice"},
            {"id": BOB.id, "hash": BOB.hash, "name": "bob"},
        ]
    }
    verifier = ClientKeyVerifier(lambda: ring, refresh_s=3600)
    verifier.refresh()
    set_verifier(verifier)
    store = make_store(postgres, tmp_path, ocr, batch_runner=False, ingest_max_attempts=1)
    app = create_api(Backends(None, None, None, None, None, None), ServicesSettings(), jobs=store)
    try:
        with TestClient(app, raise_server_exceptions=False) as c:
            try:
                yield c, store
            finally:  # the queue's connection pool lives on the client's loop: closed on it
                if store._app is not None:
                    c.portal.call(store._app.close_async)  # type: ignore[union-attr]
    finally:
        set_verifier(None)


def _keys() -> tuple[Any, Any]:
    from rma_ray import credentials

    return credentials.mint(credentials.Kind.CLIENT), credentials.mint(credentials.Kind.CLIENT)


ALICE, BOB = _keys()


def auth(key: Any = ALICE, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key.token}", **extra}


def test_the_routes_create_idempotently_stream_events_to_the_final_state_and_refuse_bad_requests(
    http: tuple[TestClient, Any],
) -> None:
    c, store = http
    files = {"file": ("a.pdf", samples.pdf(["Ana Lima met Bruno Costa."]), "application/pdf")}
    form = {"graph": "true", "rag": '{"collection": "handbook"}'}
    r = c.post("/jobs/ingest", headers=auth(**{"Idempotency-Key": "abc"}), files=files, data=form)
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/api/jobs/{job['id']}" and job["options"]["graph"] is True
    r = c.post("/jobs/ingest", headers=auth(**{"Idempotency-Key": "abc"}), files=files, data=form)
    assert r.status_code == 200 and r.json()["id"] == job["id"]
    r = c.post("/jobs/ingest", headers=auth(**{"Idempotency-Key": "abc"}), files=files, data={})
    assert r.status_code == 409 and r.json()["error"]["code"] == "idempotency_key_reused"
    # the job held in its last step (the graph's gate): the stream shows it running, then its end
    store.graph.gate = threading.Event()
    c.portal.start_task_soon(store.run_ingest, job["id"])  # type: ignore[union-attr]
    try:
        with c.stream("GET", f"/jobs/{job['id']}/events", headers=auth()) as s:
            assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
            events: list[tuple[str, dict[str, Any]]] = []
            name = ""
            deadline = time.monotonic() + 120  # pings every 15 s: the loop never waits past it unseen
            for line in s.iter_lines():
                assert time.monotonic() < deadline, f"the stream did not end; events so far: {events}"
                if line.startswith("event: "):
                    name = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    events.append((name, json.loads(line.removeprefix("data: "))))
                    if events[-1][1]["steps"][3]["state"] == "running":
                        store.graph.gate.set()
    finally:
        store.graph.gate.set()
    names = [n for n, _ in events]
    assert names[-1] == "succeeded" and set(names[:-1]) == {"progress"}, names
    assert events[-1][1]["state"] == "succeeded" and events[-1][1]["result"]["entities"] == 2
    revisions = [e["revision"] for _, e in events]
    assert revisions == sorted(set(revisions))  # one event per change, in order
    with c.stream("GET", f"/jobs/{job['id']}/events", headers=auth()) as s:
        finished = [ln.removeprefix("event: ") for ln in s.iter_lines() if ln.startswith("event: ")]
    assert finished == ["succeeded"]  # a finished job's stream: its final state, then the end
    assert c.get(f"/jobs/{job['id']}", headers=auth()).json()["state"] == "succeeded"
    assert c.get(f"/jobs/{job['id']}/text", headers=auth()).text == "Ana Lima met Bruno Costa."
    assert c.post(f"/jobs/{job['id']}/cancel", headers=auth()).json()["state"] == "succeeded"
    assert [j["id"] for j in c.get("/jobs", headers=auth()).json()["data"]] == [job["id"]]
    for method, path in (
        ("GET", f"/jobs/{job['id']}"),
        ("GET", f"/jobs/{job['id']}/events"),
        ("GET", f"/jobs/{job['id']}/text"),
        ("POST", f"/jobs/{job['id']}/cancel"),
    ):
        r = c.request(method, path, headers=auth(BOB))
        assert r.status_code == 404, (method, path, r.text)
    assert c.get("/jobs", headers=auth(BOB)).json()["data"] == []
    for kwargs, status, says in (
        ({}, 422, 'a multipart file (field "file") or JSON {"upload_id"'),
        ({"json": {"ocr": "auto"}}, 422, "upload_id: a string is required"),
        ({"json": [1]}, 422, "a JSON object"),
        ({"content": b"{no", "headers": {"Content-Type": "application/json"}}, 400, "not valid JSON"),
        ({"content": b"[" * 100000, "headers": {"Content-Type": "application/json"}}, 400, "not valid JSON"),
        ({"files": files, "data": {"rag": "{" + "[" * 100000}}, 422, 'rag must be "client"'),
        ({"files": files, "data": {"upload_id": "0" * 32}}, 422, "either a file or upload_id"),
        ({"files": files, "data": {"colour": "red"}}, 422, "unknown form field(s) colour"),
        ({"files": files, "data": {"rag": "{bad"}}, 422, 'rag must be "client"'),
        (
            {"json": {"upload_id": "0" * 32}, "headers": {"Idempotency-Key": "two words"}},
            400,
            "Idempotency-Key",
        ),
    ):
        headers = {**auth(), **kwargs.pop("headers", {})}  # type: ignore[arg-type]
        r = c.post("/jobs/ingest", headers=headers, **kwargs)  # type: ignore[arg-type]
        assert r.status_code == status and says in r.json()["error"]["message"], (kwargs, r.text)
    assert json.loads(c.get("/jobs", headers=auth()).text)["has_more"] is False


def test_an_events_stream_ends_itself_with_a_retry_hint_and_resumes_after_last_event_id(
    http: tuple[TestClient, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from deployments.services.routes import jobs as routes

    monkeypatch.setattr(routes, "EVENTS_MAX_S", 0.0)  # Serve's 180 s limit, shortened
    c, store = http
    r = c.post("/jobs/ingest", headers=auth(), files={"file": ("a.txt", b"Ana Lima", "text/plain")})
    job = r.json()

    def read(**headers: str) -> list[str]:
        with c.stream("GET", f"/jobs/{job['id']}/events", headers=auth(**headers)) as s:
            assert s.status_code == 200, s.read()
            return [ln for ln in s.iter_lines() if ln]

    lines = read()  # the queued job (no runner): its state, then the end with a retry hint
    assert lines[:2] == [f"id: {job['revision']}", "event: progress"], lines
    assert lines[-2:] == [": stream time limit: reconnect with Last-Event-ID", "retry: 1000"], lines
    # reconnecting after that event: nothing new yet, only the hint
    assert not [ln for ln in read(**{"Last-Event-ID": str(job["revision"])}) if ln.startswith("event: ")]
    store.ingest_cancel(job["id"], "alice")  # a change: the next stream sends it
    lines = read(**{"Last-Event-ID": str(job["revision"])})
    assert [ln for ln in lines if ln.startswith("event: ")] == ["event: cancelled"], lines
    r = c.get(f"/jobs/{job['id']}/events", headers=auth(**{"Last-Event-ID": "latest"}))
    assert r.status_code == 400 and "Last-Event-ID" in r.json()["error"]["message"]


def test_the_upload_quota_is_charged_once_per_new_job_never_for_a_replay_or_a_refusal(
    http: tuple[TestClient, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from deployments.gateway import quota

    charged: list[int] = []
    refuse = False

    real = quota.meter()

    class Meter:
        def __getattr__(self, name: str) -> Any:  # the rest of the gateway's metering: the real one
            return getattr(real, name)

        async def charge_upload(self, key_id: str, q: Any, size: int) -> None:
            if refuse:
                raise Refusal(429, "upload_quota_exceeded", "the day's upload quota is spent")
            charged.append(size)

    monkeypatch.setattr(quota, "meter", lambda: Meter())
    c, store = http
    doc = samples.pdf(["Ana Lima"])
    files = {"file": ("a.pdf", doc, "application/pdf")}
    for status in (202, 200):  # the same key twice: one job, charged once
        r = c.post("/jobs/ingest", headers=auth(**{"Idempotency-Key": "q-1"}), files=files)
        assert r.status_code == status, r.text
    r = c.post(
        "/jobs/ingest", headers=auth(**{"Idempotency-Key": "q-1"}), files=files, data={"graph": "true"}
    )
    assert r.status_code == 409
    r = c.post(
        "/jobs/ingest", headers=auth(), files={"file": ("b.bin", b"\x00\x01", "application/octet-stream")}
    )
    assert r.status_code == 415
    assert charged == [len(doc)]
    refuse = True  # past the quota: refused, the new job withdrawn, its key free again
    r = c.post("/jobs/ingest", headers=auth(**{"Idempotency-Key": "q-2"}), files=files)
    assert r.status_code == 429 and r.json()["error"]["code"] == "upload_quota_exceeded"
    withdrawn = c.get("/jobs", headers=auth()).json()["data"][0]
    assert withdrawn["state"] == "cancelled" and withdrawn["error"]["code"] == "upload_quota_exceeded"
    refuse = False
    r = c.post("/jobs/ingest", headers=auth(**{"Idempotency-Key": "q-2"}), files=files)
    assert r.status_code == 202 and r.json()["id"] != withdrawn["id"]
