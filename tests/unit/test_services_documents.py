"""Parsing and OCR of real documents made by the test (no Ray): type detection from bytes, each parser, scanned
pages falling through to OCR, and clear refusals for what cannot be read."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from deployments.gateway.refusal import Refusal
from deployments.services import documents as d
from deployments.services.ocr import Ocr
from tests import services_samples as samples


@pytest.fixture(scope="module")
def ocr() -> Ocr:
    """RapidOCR with the models from its wheel (~3-6 s to load); module-scoped."""
    return Ocr()


def parse(
    data: bytes, filename: str | None, content_type: str | None, ocr: Ocr | None = None, mode: str = "auto"
) -> dict[str, Any]:
    async def image(b: bytes) -> dict[str, Any]:
        assert ocr is not None, "this document should not need OCR"
        return await asyncio.to_thread(ocr.image, b)

    async def pages(b: bytes, numbers: list[int]) -> list[dict[str, Any]]:
        assert ocr is not None, "this document should not need OCR"
        return await asyncio.to_thread(ocr.pdf_pages, b, numbers)

    return asyncio.run(d.parse_document(data, filename, content_type, image, pages, mode))


def test_pdf_pages_text_and_metadata() -> None:
    data = samples.pdf(["Alpha page one", "Beta page two\nsecond line"], title="Report 7")
    out = parse(data, "r.pdf", "application/pdf")
    assert out["content_type"] == d.PDF and out["page_count"] == 2 and not out["ocr"]
    assert [p["text"] for p in out["pages"]] == ["Alpha page one", "Beta page two\nsecond line"]
    assert out["metadata"]["title"] == "Report 7" and out["metadata"]["pages"] == 2
    assert "Alpha page one" in out["text"] and "second line" in out["text"]


def test_docx_paragraphs_tables_and_title() -> None:
    data = samples.docx(
        ["First paragraph.", "Second paragraph."],
        table=[["Name", "Role"], ["Ada", "Engineer"]],
        title="Minutes",
    )
    out = parse(data, "m.docx", None)  # no declared type: told from the bytes
    assert out["content_type"] == d.DOCX
    assert out["text"].splitlines() == [
        "First paragraph.",
        "Second paragraph.",
        "Name | Role",
        "Ada | Engineer",
    ]
    assert out["metadata"]["title"] == "Minutes" and out["metadata"]["tables"] == 1


def test_html_drops_scripts_and_keeps_title() -> None:
    html = (
        b"<!doctype html><html><head><title>Plan</title><script>var x=1;</script><style>p{}</style></head>"
        b"<body><h1>Roadmap</h1><p>Ship &amp; test.</p></body></html>"
    )
    out = parse(html, "plan.html", "text/html; charset=utf-8")
    assert out["content_type"] == d.HTML and out["metadata"]["title"] == "Plan"
    assert out["text"].splitlines() == ["Plan", "Roadmap", "Ship & test."]
    assert "var x" not in out["text"]


def test_markdown_to_plain_text_with_headings() -> None:
    out = parse(b"# Title\n\nSome *emphasis* and a [link](http://x).\n\n## Part two\n- item\n", "n.md", None)
    assert out["content_type"] == d.MARKDOWN
    assert out["metadata"]["headings"] == ["Title", "Part two"]
    assert "Some emphasis and a link." in out["text"].replace("\n", " ") and "*" not in out["text"]


def test_text_utf8_with_bom() -> None:
    out = parse("\ufeffGrüße\r\nzweite Zeile".encode(), "g.txt", "text/plain")
    assert out["content_type"] == d.TEXT and out["text"] == "Grüße\nzweite Zeile"


def test_image_is_read_exactly_with_boxes_and_confidences(ocr: Ocr) -> None:
    out = ocr.image(samples.text_image(["Invoice 4711 paid"]))
    assert out["text"] == "Invoice 4711 paid"
    assert " ".join(ln["text"] for ln in out["lines"]) == "Invoice 4711 paid"
    for line in out["lines"]:
        assert line["confidence"] > 0.8 and len(line["box"]) == 4 and all(len(p) == 2 for p in line["box"])
        assert all(0 <= x <= out["width"] and 0 <= y <= out["height"] for x, y in line["box"])


def test_scanned_pdf_falls_through_to_ocr(ocr: Ocr) -> None:
    data = samples.scanned_pdf(["Scanned contract 2026"])
    out = parse(data, "scan.pdf", "application/pdf", ocr)
    assert out["ocr"] and out["pages"][0]["ocr"]
    assert out["text"] == "Scanned contract 2026"
    with pytest.raises(Refusal) as exc:
        parse(samples.text_image(["x"]), "a.png", "image/png", ocr, mode="never")
    assert exc.value.status == 422


def test_ocr_document_reads_every_pdf_page(ocr: Ocr) -> None:
    out = ocr.document(samples.scanned_pdf(["Page of a scan"]), "s.pdf", "application/pdf")
    assert out["text"] == "Page of a scan" and out["pages"][0]["number"] == 1 and out["pages"][0]["lines"]
    with pytest.raises(Refusal) as exc:
        ocr.document(b"just text", "t.txt", "text/plain")
    assert exc.value.status == 415 and "documents/parse" in exc.value.message


@pytest.mark.parametrize(
    ("data", "filename", "ctype", "status", "code"),
    [
        (b"", "e.txt", "text/plain", 400, "empty_file"),
        (b"%PDF-1.4 not really a pdf", "x.pdf", "application/pdf", 422, "unreadable_pdf"),
        (b"plain words", "x.pdf", "application/pdf", 415, "type_mismatch"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 32, "x.txt", "text/plain", 415, "type_mismatch"),
        (b"PK\x03\x04" + b"\x00" * 40, "x.zip", "application/zip", 415, "unsupported_type"),
        (b"\xff\xfe\x00\x01binary\x00", "x.bin", None, 415, "unsupported_type"),
        (b"caf\xe9 latin-1", "x.txt", "text/plain", 415, "not_utf8"),
        (b"hello", "x.txt", "application/json", 415, "unsupported_type"),
    ],
)
def test_bad_input_is_a_clear_4xx(
    data: bytes, filename: str, ctype: str | None, status: int, code: str
) -> None:
    with pytest.raises(Refusal) as exc:
        parse(data, filename, ctype)
    assert (exc.value.status, exc.value.code) == (status, code)
    assert exc.value.message


def test_unreadable_image_is_refused(ocr: Ocr) -> None:
    with pytest.raises(Refusal) as exc:
        ocr.image(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    assert exc.value.status in (415, 422)


def test_declared_generic_type_is_told_from_bytes() -> None:
    assert d.detect(samples.pdf(["x"]), "upload.bin", "application/octet-stream") == d.PDF
    assert d.detect(b"<html><body>hi</body></html>", None, None) == d.HTML
    assert d.detect(b"# heading", "readme.md", "application/octet-stream") == d.MARKDOWN
