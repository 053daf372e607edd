"""Files built to exhaust a parser (issue 16, findings 1 and 2), without Ray: a PDF page that would render to
gigapixels, DOCX decompression bombs and a DOCX text node past lxml's limit are refused with a 4xx, the
parsing process stays small, and parsing answers again afterwards; what a child process cannot survive
(memory, CPU, a kill) is a 422 naming the file as the cause, and the pool replaces the child."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
import zipfile
from typing import Any

import psutil
import pytest

from deployments.gateway.refusal import Refusal
from deployments.services import documents as d
from deployments.services import sandbox
from deployments.services.ocr import MAX_PIXELS, MAX_SIDE, Ocr, OcrEngine
from tests import services_samples as samples


def blank_pdf(width_pt: float, height_pt: float) -> bytes:
    from reportlab.pdfgen import canvas

    buf = io.BytesIO()
    c = canvas.Canvas(buf, pagesize=(width_pt, height_pt))
    c.showPage()
    c.save()
    return buf.getvalue()


def docx_with(document_xml: bytes) -> bytes:
    """A real DOCX (python-docx's own template) whose word/document.xml is replaced."""
    src = zipfile.ZipFile(io.BytesIO(samples.docx(["x"])))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for item in src.infolist():
            data = document_xml if item.filename == "word/document.xml" else src.read(item)
            zf.writestr(item.filename, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    return out.getvalue()


def document_xml(body: bytes) -> bytes:
    return (
        b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
        b'<w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"><w:body>'
        + body
        + b"</w:body></w:document>"
    )


def tree_rss() -> int:
    """RSS of this process and its children (the sandbox's workers), in bytes."""
    me = psutil.Process()
    return sum(p.memory_info().rss for p in [me, *me.children(recursive=True)] if p.is_running())


@pytest.fixture(scope="module")
def ocr() -> Ocr:
    """The OCR deployment's class with its engine loaded lazily: a refused page never reaches the engine, so
    these tests do not pay the seconds that loading RapidOCR costs."""
    o = Ocr.__new__(Ocr)
    o.engine = OcrEngine()
    return o


def parse(data: bytes, ocr: Ocr, mode: str = "auto") -> dict[str, Any]:
    async def image(b: bytes) -> dict[str, Any]:
        return await asyncio.to_thread(ocr.image, b)

    async def pages(b: bytes, numbers: list[int]) -> list[dict[str, Any]]:
        return await asyncio.to_thread(ocr.pdf_pages, b, numbers)

    return asyncio.run(d.parse_document(data, None, None, image, pages, mode))


def refused(fn: Any, *args: Any) -> Refusal:
    with pytest.raises(Refusal) as info:
        fn(*args)
    assert 400 <= info.value.status < 500
    return info.value


def test_the_render_scale_keeps_a_page_under_the_pixel_limit() -> None:
    assert d.render_scale(612, 792, 1) == d.RENDER_SCALE  # US letter: 144 dpi
    for w, h in [(2384, 3370), (4000, 1000), (4096, 4096)]:  # A0, a banner, the largest square
        scale = d.render_scale(w, h, 1)
        assert d.MIN_RENDER_SCALE <= scale < d.RENDER_SCALE
        assert w * scale * h * scale <= MAX_PIXELS and max(w, h) * scale <= MAX_SIDE + 1
    err = refused(d.render_scale, 14400, 14400, 3)
    assert err.status == 413 and err.code == "page_too_large"
    assert "page 3" in err.message and f"{MAX_PIXELS:,}" in err.message


def test_a_pdf_pixel_bomb_is_refused_before_rendering_and_parsing_goes_on(ocr: Ocr) -> None:
    bomb = blank_pdf(14400, 14400)  # ~1 KB; at 144 dpi one page is 28800x28800 pixels (3.3 GB as RGBA)
    assert len(bomb) < 4096
    before = tree_rss()
    calls = (
        lambda: parse(bomb, ocr),
        lambda: ocr.pdf_pages(bomb, [1]),
        lambda: ocr.document(bomb, None, None),
    )
    for call in calls:
        err = refused(call)
        assert err.status == 413 and err.code == "page_too_large", err
    assert tree_rss() - before < 300 * 2**20  # nothing was rendered: not the GiBs the page would take
    out = parse(samples.pdf(["still answering"]), ocr)
    assert out["text"] == "still answering" and not out["ocr"]


def test_a_large_page_is_rendered_at_a_smaller_scale_in_the_child() -> None:
    data = blank_pdf(3000, 3000)  # at 144 dpi 6000x6000: past the side limit, rendered at 4096x4096 instead
    (scale,) = sandbox.shared().run("PDF renderer", d.plan_pdf_render, data, [1])
    image = sandbox.shared().run("PDF renderer", d.render_pdf_page, data, 1, scale)
    assert max(image.shape[:2]) <= MAX_SIDE and image.shape[0] * image.shape[1] <= MAX_PIXELS


@pytest.mark.parametrize(
    "mib,code",
    [
        (40, "unpacked_too_large"),  # 40 MiB of empty paragraphs in ~40 KB
        (8, "compression_bomb"),  # under the XML limit, but ~1000x compressed
    ],
)
def test_docx_decompression_bombs_are_refused_before_unzipping(ocr: Ocr, mib: int, code: str) -> None:
    bomb = docx_with(document_xml(b"<w:p/>" * (mib * 2**20 // 6)))
    assert len(bomb) < 200 * 1024
    before = tree_rss()
    err = refused(parse, bomb, ocr)
    assert err.status == 413 and err.code == code and "limit" in err.message, err
    assert tree_rss() - before < 300 * 2**20
    assert parse(samples.docx(["after the bomb"]), ocr)["text"] == "after the bomb"


def test_a_docx_text_node_past_lxmls_limit_is_a_422_not_a_500(ocr: Ocr) -> None:
    text = base64.b64encode(os.urandom(8 * 2**20))  # 10.7 MB in one text node; random: compresses ~1.3x
    err = refused(parse, docx_with(document_xml(b"<w:p><w:r><w:t>" + text + b"</w:t></w:r></w:p>")), ocr)
    assert err.status == 422 and err.code == "unreadable_docx", err


def test_a_damaged_zip_and_too_many_parts_are_clear_4xx(ocr: Ocr, monkeypatch: pytest.MonkeyPatch) -> None:
    good = samples.docx(["x"])
    assert refused(d.check_zip, good[: len(good) // 2], "DOCX").code == "unreadable_docx"
    monkeypatch.setattr(d, "MAX_ZIP_MEMBERS", 3)
    err = refused(d.check_zip, good, "DOCX")
    assert err.status == 413 and err.code == "too_many_parts"


def hog(n: int) -> int:
    return len(bytearray(n))


def spin() -> None:
    while True:
        pass


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's OOM killer does


def broken() -> None:
    raise IndexError("list index out of range")


def test_a_child_past_its_limits_is_a_422_and_the_pool_goes_on() -> None:
    box = sandbox.Sandbox(workers=1, memory_mb=512, cpu_s=1)
    try:
        assert box.run("parser", hog, 1024) == 1024
        cases = [(hog, (2**30,), "out of memory"), (spin, (), "CPU time"), (die, (), "killed")]
        for fn, args, detail in cases:
            err = refused(box.run, "test parser", fn, *args)
            assert err.status == 422 and err.code == sandbox.LIMITS_CODE and detail in err.message, err
            assert "512 MiB" in err.message and box.run("parser", hog, 10) == 10  # the next file is served
        err = refused(box.run, "test parser", broken)  # a parser's own bug on a bad file: a 4xx that says so
        assert err.status == 422 and "IndexError" in err.message
        assert asyncio.run(box.arun("parser", hog, 7)) == 7
    finally:
        box.close()


class DyingParser:
    """Stands in for the documents and OCR deployments when a file kills the replica that parses it (Ray's own
    ActorDiedError reaches the gateway)."""

    def __init__(self) -> None:
        self.calls = 0

    def _die(self) -> None:
        from ray.exceptions import ActorDiedError

        self.calls += 1
        raise ActorDiedError()

    def parse(self, *args: Any) -> dict[str, Any]:
        self._die()
        return {}

    def document(self, *args: Any) -> dict[str, Any]:
        self._die()
        return {}


def test_a_file_that_killed_its_replica_is_a_422_and_is_not_retried() -> None:
    from fastapi.testclient import TestClient

    from deployments.gateway.auth import set_verifier
    from deployments.gateway.keys import ClientKeyVerifier
    from deployments.services.api import Backends, create_api
    from rma_ray import credentials

    key = credentials.mint(credentials.Kind.CLIENT)
    ring = {"keys": [{"id": key.id, "hash": key.hash, "name": "a"}]}
    verifier = ClientKeyVerifier(lambda: ring, refresh_s=3600)
    verifier.refresh()
    set_verifier(verifier)
    dying = DyingParser()
    app = create_api(Backends(dying, dying, None, None, None, None))
    try:
        with TestClient(app, raise_server_exceptions=False) as c:
            for path in ("/documents/parse", "/ocr"):
                r = c.post(
                    path,
                    files={"file": ("bomb.pdf", blank_pdf(100, 100), "application/pdf")},
                    headers={"Authorization": f"Bearer {key.token}"},
                )
                assert r.status_code == 422 and r.json()["error"]["code"] == sandbox.LIMITS_CODE, r.text
                assert "not retried" in r.json()["error"]["message"]
    finally:
        set_verifier(None)
    assert dying.calls == 2  # once per request: no second replica was given the file
