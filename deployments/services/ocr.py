"""OCR with RapidOCR (ONNX Runtime; its detection, orientation and recognition models ship inside the wheel, so
nothing is downloaded): text lines with their boxes and confidences, for images and for scanned PDF pages."""

from __future__ import annotations

import io
import logging
import threading
from typing import Any

from deployments.gateway.refusal import Refusal
from deployments.services import sandbox

log = logging.getLogger("rma.services.ocr")

MAX_PIXELS = 40_000_000  # a 40-megapixel scan; past that an image is a decompression bomb or a mistake
MAX_SIDE = 4096  # larger images are scaled down first: recognition does not gain from more


def load_image(data: bytes) -> Any:
    """The image as an RGB numpy array (Pillow reads PNG, JPEG, TIFF, WEBP, BMP, GIF)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_PIXELS:
                raise Refusal(
                    413,
                    "image_too_large",
                    f"the image is {im.width}x{im.height}; the limit is {MAX_PIXELS:,} pixels",
                )
            im.seek(0)
            rgb = im.convert("RGB")
    except UnidentifiedImageError:
        raise Refusal(415, "unreadable_image", "the bytes are not an image Pillow can read") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise Refusal(422, "unreadable_image", f"the image could not be decoded: {exc}") from None
    if max(rgb.size) > MAX_SIDE:
        rgb.thumbnail((MAX_SIDE, MAX_SIDE))
    return np.asarray(rgb)


def rows(lines: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Detected boxes in reading order: boxes whose vertical middles fall within one row's band form that row
    (RapidOCR may cut one printed line into several boxes), rows top to bottom, boxes left to right."""

    def span(ln: dict[str, Any]) -> tuple[float, float, float]:
        ys, xs = [p[1] for p in ln["box"]], [p[0] for p in ln["box"]]
        return min(ys), max(ys), min(xs)

    out: list[tuple[float, float, list[dict[str, Any]]]] = []
    for ln in sorted(lines, key=lambda ln: span(ln)[0]):
        top, bottom, _ = span(ln)
        middle = (top + bottom) / 2
        for i, (rtop, rbottom, members) in enumerate(out):
            if rtop <= middle <= rbottom:
                members.append(ln)
                out[i] = (min(rtop, top), max(rbottom, bottom), members)
                break
        else:
            out.append((top, bottom, [ln]))
    return [sorted(members, key=lambda ln: span(ln)[2]) for _, _, members in out]


class OcrEngine:
    """One RapidOCR engine per process (loading it takes seconds; it is safe to share between threads only
    one call at a time, so calls are serialised: the deployment scales by replicas, not threads)."""

    def __init__(self) -> None:
        self._engine: Any = None
        self._lock = threading.Lock()

    def _get(self) -> Any:
        if self._engine is None:
            from rapidocr import RapidOCR

            logging.getLogger("RapidOCR").setLevel(logging.WARNING)
            self._engine = RapidOCR()
        return self._engine

    def warm(self) -> None:
        with self._lock:
            self._get()

    def read(self, image: Any) -> dict[str, Any]:
        with self._lock:
            result = self._get()(image)
        lines = []
        if result.txts:
            for text, score, box in zip(result.txts, result.scores, result.boxes, strict=True):
                lines.append(
                    {
                        "text": text,
                        "confidence": round(float(score), 4),
                        "box": [[round(float(x), 1), round(float(y), 1)] for x, y in box],
                    }
                )
        h, w = image.shape[:2]
        return {
            "text": "\n".join(" ".join(ln["text"] for ln in row) for row in rows(lines)),
            "lines": lines,
            "width": int(w),
            "height": int(h),
        }


class Ocr:
    """The Serve deployment's class. What decodes the caller's bytes (Pillow, PDFium) runs in the limited
    child processes of `sandbox`; the OCR engine reads only the bounded pixel arrays they hand back."""

    def __init__(self) -> None:
        self.engine = OcrEngine()
        self.engine.warm()

    def image(self, data: bytes) -> dict[str, Any]:
        if not data:
            raise Refusal(400, "empty_file", "the file is empty")
        return self.engine.read(sandbox.shared().run("image decoder", load_image, data))

    def pdf_pages(self, data: bytes, numbers: list[int]) -> list[dict[str, Any]]:
        from deployments.services.documents import plan_pdf_render, render_pdf_page

        box = sandbox.shared()
        # every page's size is checked before the first is rendered: a refusal costs no rendering
        scales = box.run("PDF renderer", plan_pdf_render, data, numbers)
        results = []
        for number, scale in zip(numbers, scales, strict=True):  # one page at a time: memory stays one page's
            result = self.engine.read(box.run("PDF renderer", render_pdf_page, data, number, scale))
            result["page"] = number
            results.append(result)
        return results

    def document(self, data: bytes, filename: str | None, content_type: str | None) -> dict[str, Any]:
        """`POST /api/ocr`: an image, or a PDF whose every page is read by OCR."""
        from deployments.services.documents import IMAGES, PDF, detect, parse_pdf_text

        kind = detect(data, filename, content_type)
        if kind in IMAGES:
            result = self.image(data)
            return {"content_type": kind, "text": result["text"], "pages": [{"number": 1, **result}]}
        if kind == PDF:
            pages, _ = sandbox.shared().run("PDF parser", parse_pdf_text, data)
            from deployments.services.documents import MAX_OCR_PAGES

            if len(pages) > MAX_OCR_PAGES:
                raise Refusal(
                    413,
                    "too_many_pages",
                    f"the PDF has {len(pages)} pages; OCR takes at most {MAX_OCR_PAGES} per request",
                )
            results = self.pdf_pages(data, [p.number for p in pages])
            return {
                "content_type": kind,
                "text": "\n\n".join(r["text"] for r in results if r["text"]),
                "pages": [{"number": r.pop("page"), **r} for r in results],
            }
        raise Refusal(
            415,
            "not_an_image",
            f"OCR reads images and PDFs; this file is {kind} (use /api/documents/parse for it)",
        )

    def check_health(self) -> None:
        return None
