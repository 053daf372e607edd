"""Small real documents made on the spot for the services' tests: a PDF with a text layer (reportlab), a scanned
PDF (an image inside a PDF, no text layer), a DOCX (python-docx) and images with rendered text (Pillow)."""

from __future__ import annotations

import io


def pdf(pages: list[str], title: str = "Quarterly report") -> bytes:
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfgen import canvas

    buf = io.BytesIO()
    c = canvas.Canvas(buf, pagesize=A4)
    c.setTitle(title)
    c.setAuthor("RMA tests")
    for text in pages:
        y = 800
        for line in text.splitlines():
            c.drawString(72, y, line)
            y -= 16
        c.showPage()
    c.save()
    return buf.getvalue()


def docx(paragraphs: list[str], table: list[list[str]] | None = None, title: str = "Meeting notes") -> bytes:
    import docx as python_docx

    d = python_docx.Document()
    d.core_properties.title = title
    for p in paragraphs:
        d.add_paragraph(p)
    if table:
        t = d.add_table(rows=len(table), cols=len(table[0]))
        for r, row in enumerate(table):
            for c, cell in enumerate(row):
                t.cell(r, c).text = cell
    buf = io.BytesIO()
    d.save(buf)
    return buf.getvalue()


def text_image(lines: list[str], fmt: str = "PNG", size: int = 48) -> bytes:
    """Black text on white, large enough for OCR to read exactly."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=size)
    width = max(int(font.getlength(line)) for line in lines) + 120
    img = Image.new("RGB", (width, 60 + len(lines) * int(size * 1.8)), "white")
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        draw.text((60, 30 + i * int(size * 1.8)), line, fill="black", font=font)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def scanned_pdf(lines: list[str]) -> bytes:
    """A PDF whose only page is an image of text (what a scanner produces): no text layer at all."""
    from PIL import Image

    img = Image.open(io.BytesIO(text_image(lines)))
    buf = io.BytesIO()
    img.save(buf, format="PDF", resolution=100.0)
    return buf.getvalue()


DOCX_TYPE = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
