"""Document parsing: what a file is (from its bytes, checked against what the caller declared), and its text,
pages and metadata with the format's own parser (pypdf, python-docx, BeautifulSoup, markdown-it). PDF pages
without a text layer and images fall through to OCR.

Every parser runs in a limited child process (`sandbox`); what can be checked from a file's own declarations
is checked before a parser opens it: a PDF page's size before it is rendered (the scale is chosen to stay
under the pixel limit, and a page too large even at the smallest useful scale is refused), a ZIP's members
(count, total size, compression ratio) before python-docx unzips them.

The functions here are plain Python (unit-tested without Ray); `Documents` is the Serve deployment's class."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from deployments.gateway.refusal import Refusal
from deployments.services import sandbox

log = logging.getLogger("rma.services.documents")

PDF = "application/pdf"
DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
HTML = "text/html"
MARKDOWN = "text/markdown"
TEXT = "text/plain"
IMAGES = {"image/png", "image/jpeg", "image/tiff", "image/webp", "image/bmp", "image/gif"}
DOCUMENTS = {PDF, DOCX, HTML, MARKDOWN, TEXT}
SUPPORTED = DOCUMENTS | IMAGES
GENERIC = {"", "application/octet-stream", "binary/octet-stream", "application/x-www-form-urlencoded"}
# what browsers and curl send for these formats, as aliases of the types above
ALIASES = {
    "text/x-markdown": MARKDOWN,
    "application/xhtml+xml": HTML,
    "image/jpg": "image/jpeg",
    "image/x-ms-bmp": "image/bmp",
    "application/x-pdf": PDF,
}
EXTENSIONS = {
    ".pdf": PDF,
    ".docx": DOCX,
    ".html": HTML,
    ".htm": HTML,
    ".md": MARKDOWN,
    ".markdown": MARKDOWN,
    ".txt": TEXT,
    ".text": TEXT,
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
    ".webp": "image/webp",
    ".bmp": "image/bmp",
    ".gif": "image/gif",
}
MAX_PAGES = 2000
MAX_OCR_PAGES = 50
RENDER_SCALE = 2.0  # 144 dpi: what OCR reads best at for ordinary print
MIN_RENDER_SCALE = 1.0  # 72 dpi: below it ordinary print is too small for OCR to read, so a page is refused
# a DOCX is a ZIP: these are checked from its directory before anything is unzipped
MAX_ZIP_MEMBERS = 1000
MAX_ZIP_BYTES = 200 * 2**20  # all members, uncompressed (embedded pictures included)
MAX_XML_BYTES = 16 * 2**20  # the XML parts, uncompressed: python-docx builds a tree of every element in them
CUT_BUDGET = 32 * 2**20  # a job's pages cut out of a PDF in one call, at least: their bytes all sit in memory
MAX_ZIP_RATIO = 100  # uncompressed/compressed of a member over 1 MiB; real XML compresses 5-20x, a bomb 1000x


def _declared(content_type: str | None) -> str:
    ct = (content_type or "").split(";", 1)[0].strip().lower()
    return ALIASES.get(ct, ct)


def _looks_like_html(text: str) -> bool:
    head = text[:512].lstrip().lower()
    return head.startswith(("<!doctype html", "<html")) or ("<body" in head and "</" in text)


def detect(data: bytes, filename: str | None = None, content_type: str | None = None) -> str:
    """The file's media type from its bytes; a declared type that the bytes contradict is refused (415)."""
    import filetype

    if not data:
        raise Refusal(400, "empty_file", "the file is empty")
    declared = _declared(content_type)
    by_name = EXTENSIONS.get(PurePosixPath(filename or "").suffix.lower(), "")
    guess = filetype.guess(data[:8192])
    if guess is not None:
        sniffed = ALIASES.get(guess.mime, guess.mime)
        if sniffed not in SUPPORTED:
            raise Refusal(
                415,
                "unsupported_type",
                f"{sniffed} files are not supported; send one of: PDF, DOCX, HTML, TXT, MD, "
                f"PNG, JPEG, TIFF, WEBP, BMP, GIF",
            )
        if declared and declared not in GENERIC and declared != sniffed:
            raise Refusal(
                415,
                "type_mismatch",
                f"the file was declared {declared} but its bytes are {sniffed}; send the right "
                f"Content-Type (or application/octet-stream to let the server tell)",
            )
        return sniffed
    # no magic number: text of some kind, or something we do not read
    if b"\x00" in data[:8192]:
        raise Refusal(415, "unsupported_type", "the file is binary data of a type that is not supported")
    try:
        text = data[:8192].decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if exc.start < 8188:  # not just a multi-byte character cut at the sniffing window
            raise Refusal(415, "not_utf8", "text files must be UTF-8 encoded") from None
        text = data[: exc.start].decode("utf-8-sig", "ignore")
    claimed = declared if declared in SUPPORTED else by_name
    if claimed and claimed not in (HTML, MARKDOWN, TEXT):
        raise Refusal(415, "type_mismatch", f"the file was declared {claimed} but its bytes are text")
    if (
        declared
        and declared not in GENERIC
        and declared not in SUPPORTED
        and not declared.startswith("text/")
    ):
        raise Refusal(415, "unsupported_type", f"{declared} is not a supported type")
    if claimed in (HTML, MARKDOWN, TEXT):
        return claimed
    return HTML if _looks_like_html(text) else TEXT


@dataclass
class Page:
    number: int
    text: str
    ocr: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"number": self.number, "text": self.text, "ocr": self.ocr}


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise Refusal(415, "not_utf8", "text files must be UTF-8 encoded") from None


def parse_pdf_text(data: bytes) -> tuple[list[Page], dict[str, Any]]:
    """The text layer of every page (empty for scanned pages) and the document's metadata."""
    from pypdf import PdfReader
    from pypdf.errors import FileNotDecryptedError, PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise Refusal(422, "encrypted_pdf", "the PDF is password-protected; send it without a password")
        n = len(reader.pages)
        if n > MAX_PAGES:
            raise Refusal(413, "too_many_pages", f"the PDF has {n} pages; the limit is {MAX_PAGES}")
        pages = [Page(i + 1, (p.extract_text() or "").strip()) for i, p in enumerate(reader.pages)]
        info = reader.metadata or {}
    except FileNotDecryptedError:
        raise Refusal(
            422, "encrypted_pdf", "the PDF is password-protected; send it without a password"
        ) from None
    except (PdfReadError, ValueError, KeyError, TypeError) as exc:
        raise Refusal(422, "unreadable_pdf", f"the PDF could not be read: {exc}") from None
    meta = {"pages": len(pages)}
    for key, name in (
        ("/Title", "title"),
        ("/Author", "author"),
        ("/Subject", "subject"),
        ("/Producer", "producer"),
    ):
        value = info.get(key)
        if value:
            meta[name] = str(value)
    return pages, meta


def render_scale(width_pt: float, height_pt: float, number: int) -> float:
    """The scale to render a page of this size at: RENDER_SCALE, less where that would pass the OCR pixel
    limit or side; a page that would pass them even at MIN_RENDER_SCALE is refused (413) before anything is
    rendered."""
    from deployments.services.ocr import MAX_PIXELS, MAX_SIDE

    if not (width_pt > 0 and height_pt > 0):
        raise Refusal(422, "unreadable_pdf", f"page {number} has no size; the PDF is damaged")
    fit = min(MAX_SIDE / max(width_pt, height_pt), (MAX_PIXELS / (width_pt * height_pt)) ** 0.5)
    scale = min(RENDER_SCALE, fit)
    if scale < MIN_RENDER_SCALE:
        pixels = round(width_pt * MIN_RENDER_SCALE) * round(height_pt * MIN_RENDER_SCALE)
        raise Refusal(
            413,
            "page_too_large",
            f"page {number} is {width_pt:.0f}x{height_pt:.0f} pt: at the smallest "
            f"resolution OCR can read ({72 * MIN_RENDER_SCALE:.0f} dpi) it is {pixels:,} "
            f"pixels; the limit is {MAX_SIDE} pixels a side and {MAX_PIXELS:,} pixels a page",
        )
    return scale


def _pdfium(data: bytes) -> Any:
    import pypdfium2 as pdfium

    try:
        return pdfium.PdfDocument(data)
    except pdfium.PdfiumError as exc:
        raise Refusal(422, "unreadable_pdf", f"the PDF could not be read: {exc}") from None


def plan_pdf_render(data: bytes, numbers: list[int]) -> list[float]:
    """The render scale of each given 1-based page, from the page sizes alone (nothing is rendered)."""
    pdf = _pdfium(data)
    try:
        out = []
        for n in numbers:
            if not 1 <= n <= len(pdf):
                raise Refusal(422, "unreadable_pdf", f"the PDF has no page {n}")
            width, height = pdf[n - 1].get_size()
            out.append(render_scale(width, height, n))
        return out
    finally:
        pdf.close()


def render_pdf_page(data: bytes, number: int, scale: float) -> Any:
    """One 1-based page as an RGB numpy array (pypdfium2: PDFium, no system poppler needed), for OCR. The
    scale comes from `plan_pdf_render`; the size is checked again here, where the page is rendered."""
    import numpy as np

    pdf = _pdfium(data)
    try:
        page = pdf[number - 1]
        width, height = page.get_size()
        scale = min(scale, render_scale(width, height, number))
        return np.asarray(page.render(scale=scale).to_pil().convert("RGB"))
    finally:
        pdf.close()


def cut_pdf_pages(data: bytes, numbers: list[int]) -> dict[int, bytes]:
    """Each given 1-based page as a PDF of its own (PDFium copies the page with the resources it uses), so a
    job sends OCR a page's bytes, not the whole file's, per scanned page. A page left out goes whole (its
    caller sends the whole file for it): one that cannot be cut (no such page, a damaged page tree); one whose
    cut is no smaller than the file (it saves nothing); and every page once the kept pages would pass
    max(len(data), `CUT_BUDGET`) bytes: pages sharing resources (20 pages drawing one large image) each carry
    them all, so their cuts could add up to many times the file."""
    import pypdfium2 as pdfium

    src = _pdfium(data)
    out = {}
    budget, total = max(len(data), CUT_BUDGET), 0
    try:
        for n in numbers:
            if not 1 <= n <= len(src):
                continue
            one = pdfium.PdfDocument.new()
            try:
                one.import_pages(src, [n - 1])
                buf = io.BytesIO()
                one.save(buf)
                page = buf.getvalue()
                if len(page) >= len(data):
                    continue
                if total + len(page) > budget:
                    break  # the rest go whole, as the file always did
                out[n] = page
                total += len(page)
            except pdfium.PdfiumError:
                log.warning("page %d of a PDF could not be cut out: its whole file goes to OCR", n)
            finally:
                one.close()
        return out
    finally:
        src.close()


def check_zip(data: bytes, what: str) -> None:
    """Refuse (413) a ZIP-based file (DOCX, XLSX) whose directory declares too many members, too many bytes,
    or a bomb's compression ratio, before any member is unzipped. Members cannot unzip to more than they
    declare: zipfile stops at the declared size and checks the CRC."""
    import zipfile

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            members = zf.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise Refusal(422, f"unreadable_{what.lower()}", f"the {what} could not be read: {exc}") from None
    if len(members) > MAX_ZIP_MEMBERS:
        raise Refusal(
            413, "too_many_parts", f"the {what} has {len(members):,} parts; the limit is {MAX_ZIP_MEMBERS:,}"
        )
    total = sum(m.file_size for m in members)
    if total > MAX_ZIP_BYTES:
        raise Refusal(
            413,
            "unpacked_too_large",
            f"the {what} unpacks to {total:,} bytes; the limit is {MAX_ZIP_BYTES:,}",
        )
    xml = sum(m.file_size for m in members if m.filename.endswith((".xml", ".rels")))
    if xml > MAX_XML_BYTES:
        raise Refusal(
            413,
            "unpacked_too_large",
            f"the {what}'s XML unpacks to {xml:,} bytes; the limit is {MAX_XML_BYTES:,}",
        )
    for m in members:
        if m.file_size > 2**20 and m.file_size > MAX_ZIP_RATIO * max(m.compress_size, 1):
            ratio = m.file_size // max(m.compress_size, 1)
            raise Refusal(
                413,
                "compression_bomb",
                f"the {what}'s part {m.filename} unpacks {ratio:,} "
                f"times larger than it is stored; the limit is "
                f"{MAX_ZIP_RATIO}x",
            )


def parse_docx(data: bytes) -> tuple[list[Page], dict[str, Any]]:
    import zipfile

    import docx
    from docx.opc.exceptions import PackageNotFoundError
    from lxml.etree import LxmlError

    check_zip(data, "DOCX")
    try:
        doc = docx.Document(io.BytesIO(data))
    except (PackageNotFoundError, KeyError, ValueError, LxmlError, zipfile.BadZipFile, EOFError) as exc:
        # LxmlError: XMLSyntaxError among others (a text node over lxml's 10 MB limit is one)
        raise Refusal(422, "unreadable_docx", f"the DOCX could not be read: {str(exc)[:300]}") from None
    parts = [p.text for p in doc.paragraphs if p.text.strip()]
    for table in doc.tables:
        for row in table.rows:
            cells = [c.text.strip() for c in row.cells if c.text.strip()]
            if cells:
                parts.append(" | ".join(cells))
    props = doc.core_properties
    meta: dict[str, Any] = {"paragraphs": len(doc.paragraphs), "tables": len(doc.tables)}
    for name in ("title", "author", "subject"):
        value = getattr(props, name, None)
        if value:
            meta[name] = value
    return [Page(1, "\n".join(parts))], meta


BLOCK_TAGS = [
    "p",
    "div",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "li",
    "tr",
    "td",
    "th",
    "title",
    "pre",
    "blockquote",
    "section",
    "article",
    "header",
    "footer",
    "table",
    "ul",
    "ol",
    "dt",
    "dd",
    "figcaption",
    "hr",
]


def _html_text(html: str) -> tuple[str, str | None]:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "lxml")
    for tag in soup(["script", "style", "noscript", "template"]):
        tag.decompose()
    title = soup.title.get_text(strip=True) if soup.title else None
    # block elements end a line; inline ones (em, a, span) stay inside theirs
    for tag in soup.find_all(BLOCK_TAGS):
        tag.insert_after("\n")
    for br in soup.find_all("br"):
        br.replace_with("\n")
    lines = (" ".join(line.split()) for line in soup.get_text("").splitlines())
    return "\n".join(line for line in lines if line), title


def parse_html(data: bytes) -> tuple[list[Page], dict[str, Any]]:
    text, title = _html_text(_text(data))
    return [Page(1, text)], ({"title": title} if title else {})


def parse_markdown(data: bytes) -> tuple[list[Page], dict[str, Any]]:
    from markdown_it import MarkdownIt

    source = _text(data)
    md = MarkdownIt("commonmark")
    tokens = md.parse(source)
    headings = [
        t.content
        for i, t in enumerate(tokens)
        if t.type == "inline" and i > 0 and tokens[i - 1].type == "heading_open"
    ]
    text, _ = _html_text(md.render(source))
    meta: dict[str, Any] = {"headings": headings}
    if headings:
        meta["title"] = headings[0]
    return [Page(1, text)], meta


def parse_text(data: bytes) -> tuple[list[Page], dict[str, Any]]:
    text = _text(data).replace("\r\n", "\n")
    return [Page(1, text.strip())], {"lines": text.count("\n") + 1}


PARSERS: dict[str, Callable[[bytes], tuple[list[Page], dict[str, Any]]]] = {
    DOCX: parse_docx,
    HTML: parse_html,
    MARKDOWN: parse_markdown,
    TEXT: parse_text,
}

FORMAT_NAMES = {PDF: "PDF", DOCX: "DOCX", HTML: "HTML", MARKDOWN: "Markdown", TEXT: "text"}
OcrFn = Callable[[bytes], Awaitable[dict[str, Any]]]


async def parse_document(
    data: bytes,
    filename: str | None,
    content_type: str | None,
    ocr_image: OcrFn,
    ocr_pdf_pages: Callable[[bytes, list[int]], Awaitable[list[dict[str, Any]]]],
    ocr: str = "auto",
) -> dict[str, Any]:
    """Text, pages and metadata. `ocr`: "auto" (pages without text and images), "never", or "always"."""
    if ocr not in ("auto", "never", "always"):
        raise Refusal(400, "bad_ocr_mode", "ocr must be one of: auto, never, always")
    kind = await asyncio.to_thread(detect, data, filename, content_type)
    meta: dict[str, Any]
    if kind in IMAGES:
        if ocr == "never":
            raise Refusal(422, "needs_ocr", "the file is an image: it has no text without OCR (ocr=auto)")
        result = await ocr_image(data)
        pages, meta = (
            [Page(1, result["text"], ocr=True)],
            {"width": result.get("width"), "height": result.get("height")},
        )
    elif kind == PDF:
        pages, meta = await sandbox.shared().arun("PDF parser", parse_pdf_text, data)
        wanted = [p.number for p in pages if ocr == "always" or (ocr == "auto" and not p.text)]
        if len(wanted) > MAX_OCR_PAGES:
            raise Refusal(
                413,
                "too_many_scanned_pages",
                f"{len(wanted)} pages need OCR; the limit is {MAX_OCR_PAGES} per request",
            )
        if wanted:
            for page, result in zip(wanted, await ocr_pdf_pages(data, wanted), strict=True):
                pages[page - 1] = Page(page, result["text"], ocr=True)
    else:
        pages, meta = await sandbox.shared().arun(f"{FORMAT_NAMES[kind]} parser", PARSERS[kind], data)
    text = "\n\n".join(p.text for p in pages if p.text)
    return {
        "filename": filename,
        "content_type": kind,
        "size": len(data),
        "text": text,
        "pages": [p.as_dict() for p in pages],
        "page_count": len(pages),
        "metadata": meta,
        "ocr": any(p.ocr for p in pages),
        "characters": len(text),
    }


class Documents:
    """The Serve deployment's class: parsing here, OCR through the OCR deployment (or any object with the same
    async `image` and `pdf_pages` methods)."""

    def __init__(self, ocr: Any) -> None:
        from deployments.services.backends import as_backend

        self.ocr = as_backend(ocr)

    async def parse(
        self, data: bytes, filename: str | None, content_type: str | None, ocr: str = "auto"
    ) -> dict[str, Any]:
        return await parse_document(data, filename, content_type, self.ocr.image, self.ocr.pdf_pages, ocr)

    async def check_health(self) -> None:
        return None
