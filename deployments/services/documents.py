"""Document parsing: what a file is (from its bytes, checked against what the caller declared), and its text,
pages and metadata with the format's own parser (pypdf, python-docx, BeautifulSoup, markdown-it). PDF pages
without a text layer and images fall through to OCR.

The functions here are plain Python (unit-tested without Ray); `Documents` is the Serve deployment's class."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from deployments.services.errors import ServiceError

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
ALIASES = {"text/x-markdown": MARKDOWN, "application/xhtml+xml": HTML, "image/jpg": "image/jpeg",
           "image/x-ms-bmp": "image/bmp", "application/x-pdf": PDF}
EXTENSIONS = {".pdf": PDF, ".docx": DOCX, ".html": HTML, ".htm": HTML, ".md": MARKDOWN, ".markdown": MARKDOWN,
              ".txt": TEXT, ".text": TEXT, ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
              ".tif": "image/tiff", ".tiff": "image/tiff", ".webp": "image/webp", ".bmp": "image/bmp",
              ".gif": "image/gif"}
MAX_PAGES = 2000
MAX_OCR_PAGES = 50


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
        raise ServiceError(400, "empty_file", "the file is empty")
    declared = _declared(content_type)
    by_name = EXTENSIONS.get(PurePosixPath(filename or "").suffix.lower(), "")
    guess = filetype.guess(data[:8192])
    if guess is not None:
        sniffed = ALIASES.get(guess.mime, guess.mime)
        if sniffed not in SUPPORTED:
            raise ServiceError(415, "unsupported_type",
                               f"{sniffed} files are not supported; send one of: PDF, DOCX, HTML, TXT, MD, "
                               f"PNG, JPEG, TIFF, WEBP, BMP, GIF")
        if declared and declared not in GENERIC and declared != sniffed:
            raise ServiceError(415, "type_mismatch",
                               f"the file was declared {declared} but its bytes are {sniffed}; send the right "
                               f"Content-Type (or application/octet-stream to let the server tell)")
        return sniffed
    # no magic number: text of some kind, or something we do not read
    if b"\x00" in data[:8192]:
        raise ServiceError(415, "unsupported_type", "the file is binary data of a type that is not supported")
    try:
        text = data[:8192].decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if exc.start < 8188:  # not just a multi-byte character cut at the sniffing window
            raise ServiceError(415, "not_utf8", "text files must be UTF-8 encoded") from None
        text = data[:exc.start].decode("utf-8-sig", "ignore")
    claimed = declared if declared in SUPPORTED else by_name
    if claimed and claimed not in (HTML, MARKDOWN, TEXT):
        raise ServiceError(415, "type_mismatch", f"the file was declared {claimed} but its bytes are text")
    if declared and declared not in GENERIC and declared not in SUPPORTED and not declared.startswith("text/"):
        raise ServiceError(415, "unsupported_type", f"{declared} is not a supported type")
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
        raise ServiceError(415, "not_utf8", "text files must be UTF-8 encoded") from None


def parse_pdf_text(data: bytes) -> tuple[list[Page], dict[str, Any]]:
    """The text layer of every page (empty for scanned pages) and the document's metadata."""
    from pypdf import PdfReader
    from pypdf.errors import FileNotDecryptedError, PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise ServiceError(422, "encrypted_pdf", "the PDF is password-protected; send it without a password")
        n = len(reader.pages)
        if n > MAX_PAGES:
            raise ServiceError(413, "too_many_pages", f"the PDF has {n} pages; the limit is {MAX_PAGES}")
        pages = [Page(i + 1, (p.extract_text() or "").strip()) for i, p in enumerate(reader.pages)]
        info = reader.metadata or {}
    except FileNotDecryptedError:
        raise ServiceError(422, "encrypted_pdf", "the PDF is password-protected; send it without a password") from None
    except (PdfReadError, ValueError, KeyError, TypeError) as exc:
        raise ServiceError(422, "unreadable_pdf", f"the PDF could not be read: {exc}") from None
    meta = {"pages": len(pages)}
    for key, name in (("/Title", "title"), ("/Author", "author"), ("/Subject", "subject"), ("/Producer", "producer")):
        value = info.get(key)
        if value:
            meta[name] = str(value)
    return pages, meta


def render_pdf_pages(data: bytes, numbers: list[int], scale: float = 2.0) -> list[bytes]:
    """PNG images of the given 1-based pages (pypdfium2: PDFium, no system poppler needed), for OCR."""
    import pypdfium2 as pdfium

    pdf = pdfium.PdfDocument(data)
    try:
        out = []
        for n in numbers:
            image = pdf[n - 1].render(scale=scale).to_pil()
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            out.append(buf.getvalue())
        return out
    finally:
        pdf.close()


def parse_docx(data: bytes) -> tuple[list[Page], dict[str, Any]]:
    import docx
    from docx.opc.exceptions import PackageNotFoundError

    try:
        doc = docx.Document(io.BytesIO(data))
    except (PackageNotFoundError, KeyError, ValueError) as exc:
        raise ServiceError(422, "unreadable_docx", f"the DOCX could not be read: {exc}") from None
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


BLOCK_TAGS = ["p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "li", "tr", "td", "th", "title", "pre", "blockquote",
              "section", "article", "header", "footer", "table", "ul", "ol", "dt", "dd", "figcaption", "hr"]


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
    headings = [t.content for i, t in enumerate(tokens)
                if t.type == "inline" and i > 0 and tokens[i - 1].type == "heading_open"]
    text, _ = _html_text(md.render(source))
    meta: dict[str, Any] = {"headings": headings}
    if headings:
        meta["title"] = headings[0]
    return [Page(1, text)], meta


def parse_text(data: bytes) -> tuple[list[Page], dict[str, Any]]:
    text = _text(data).replace("\r\n", "\n")
    return [Page(1, text.strip())], {"lines": text.count("\n") + 1}


PARSERS: dict[str, Callable[[bytes], tuple[list[Page], dict[str, Any]]]] = {
    DOCX: parse_docx, HTML: parse_html, MARKDOWN: parse_markdown, TEXT: parse_text}

OcrFn = Callable[[bytes], Awaitable[dict[str, Any]]]


async def parse_document(data: bytes, filename: str | None, content_type: str | None,
                         ocr_image: OcrFn, ocr_pdf_pages: Callable[[bytes, list[int]], Awaitable[list[dict[str, Any]]]],
                         ocr: str = "auto") -> dict[str, Any]:
    """Text, pages and metadata. `ocr`: "auto" (pages without text and images), "never", or "always"."""
    if ocr not in ("auto", "never", "always"):
        raise ServiceError(400, "bad_ocr_mode", "ocr must be one of: auto, never, always")
    kind = await asyncio.to_thread(detect, data, filename, content_type)
    meta: dict[str, Any]
    if kind in IMAGES:
        if ocr == "never":
            raise ServiceError(422, "needs_ocr", "the file is an image: it has no text without OCR (ocr=auto)")
        result = await ocr_image(data)
        pages, meta = [Page(1, result["text"], ocr=True)], {"width": result.get("width"),
                                                           "height": result.get("height")}
    elif kind == PDF:
        pages, meta = await asyncio.to_thread(parse_pdf_text, data)
        wanted = [p.number for p in pages if ocr == "always" or (ocr == "auto" and not p.text)]
        if len(wanted) > MAX_OCR_PAGES:
            raise ServiceError(413, "too_many_scanned_pages",
                               f"{len(wanted)} pages need OCR; the limit is {MAX_OCR_PAGES} per request")
        if wanted:
            for page, result in zip(wanted, await ocr_pdf_pages(data, wanted), strict=True):
                pages[page - 1] = Page(page, result["text"], ocr=True)
    else:
        pages, meta = await asyncio.to_thread(PARSERS[kind], data)
    text = "\n\n".join(p.text for p in pages if p.text)
    return {"filename": filename, "content_type": kind, "size": len(data), "text": text,
            "pages": [p.as_dict() for p in pages], "page_count": len(pages), "metadata": meta,
            "ocr": any(p.ocr for p in pages), "characters": len(text)}


class Documents:
    """The Serve deployment's class: parsing here, OCR through the OCR deployment (or any object with the same
    async `image` and `pdf_pages` methods)."""

    def __init__(self, ocr: Any) -> None:
        from deployments.services.backends import as_backend

        self.ocr = as_backend(ocr)

    async def parse(self, data: bytes, filename: str | None, content_type: str | None,
                    ocr: str = "auto") -> dict[str, Any]:
        return await parse_document(data, filename, content_type, self.ocr.image, self.ocr.pdf_pages, ocr)

    async def check_health(self) -> None:
        return None
