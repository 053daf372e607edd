"""The vision route's request checks: multipart and JSON bodies, image type/size/pixel limits, clear 4xx bodies.
The route's parser runs in a plain FastAPI app here (no Ray, no Serve); the Serve front uses the same function."""

from __future__ import annotations

import base64
import io
from typing import Any

import pytest
from fastapi import Request
from fastapi.testclient import TestClient
from PIL import Image

from deployments.gateway.refusal import Refusal
from deployments.vision.app import parse_request, vision_fastapi_app
from deployments.vision.request import Limits, decode_base64, inspect_image

LIMITS = Limits(max_image_bytes=200_000, max_pixels=1_000_000, max_prompt_chars=100, max_tokens=512)


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = vision_fastapi_app(LIMITS.max_body_bytes())

    @app.post("/")
    async def route(request: Request) -> dict[str, Any]:
        inp = await parse_request(request, LIMITS)
        return {
            "mime": inp.mime,
            "width": inp.width,
            "height": inp.height,
            "prompt": inp.prompt,
            "model": inp.model,
            "max_tokens": inp.max_tokens,
            "size": len(inp.image),
        }

    return TestClient(app)


def error(r: Any, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert body["code"] == code and body["message"]
    return str(body["message"])


@pytest.mark.parametrize("fmt,mime", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
def test_multipart_with_each_accepted_format(client: TestClient, fmt: str, mime: str) -> None:
    data = image_bytes(fmt)
    r = client.post(
        "/",
        files={"image": (f"x.{fmt.lower()}", data, mime)},
        data={"prompt": "What is in the picture?", "max_tokens": "64", "model": "llava:7b"},
    )
    assert r.status_code == 200, r.text
    assert r.json() == {
        "mime": mime,
        "width": 64,
        "height": 48,
        "prompt": "What is in the picture?",
        "model": "llava:7b",
        "max_tokens": 64,
        "size": len(data),
    }


def test_json_with_base64_and_with_a_data_url(client: TestClient) -> None:
    data = image_bytes()
    b64 = base64.b64encode(data).decode()
    for image in (b64, f"data:image/png;base64,{b64}"):
        r = client.post("/", json={"image": image, "prompt": "Describe it."})
        assert r.status_code == 200, r.text
        assert r.json()["size"] == len(data) and r.json()["model"] is None and r.json()["max_tokens"] == 256


def test_multipart_may_carry_the_image_as_base64_text(client: TestClient) -> None:
    b64 = base64.b64encode(image_bytes()).decode()
    r = client.post("/", files={"prompt": (None, "hi"), "image": (None, b64)})
    assert r.status_code == 200, r.text
    # a urlencoded form is neither JSON nor multipart
    error(client.post("/", data={"image": b64, "prompt": "hi"}), 415, "unsupported_media_type")


def test_missing_or_bad_fields_are_422_naming_the_field(client: TestClient) -> None:
    png = image_bytes()
    assert "image" in error(client.post("/", files={"prompt": (None, "hi")}), 422, "invalid_request")
    assert "prompt" in error(
        client.post("/", files={"image": ("a.png", png, "image/png")}), 422, "invalid_request"
    )
    assert "prompt" in error(
        client.post("/", json={"image": base64.b64encode(png).decode()}), 422, "invalid_request"
    )
    assert "max_tokens" in error(
        client.post("/", json={"image": base64.b64encode(png).decode(), "prompt": "x", "max_tokens": 10_000}),
        422,
        "invalid_request",
    )
    assert "temperature" in error(
        client.post("/", json={"image": base64.b64encode(png).decode(), "prompt": "x", "temperature": 5}),
        422,
        "invalid_request",
    )
    assert "prompt" in error(
        client.post("/", json={"image": base64.b64encode(png).decode(), "prompt": "x" * 101}),
        422,
        "invalid_request",
    )
    assert "unknown field" in error(
        client.post("/", json={"image": "aGk=", "prompt": "x", "colour": "red"}), 422, "invalid_request"
    )
    error(
        client.post(
            "/",
            files={
                "image": ("a.png", png, "image/png"),
                "prompt": (None, "x"),
                "other": ("b.png", png, "image/png"),
            },
        ),
        400,
        "invalid_form",
    )  # a second file


def test_bad_json_and_bad_base64_are_400(client: TestClient) -> None:
    error(
        client.post("/", content=b"{not json", headers={"content-type": "application/json"}),
        400,
        "invalid_json",
    )
    error(client.post("/", json=["image", "prompt"]), 422, "invalid_request")
    assert "base64" in error(
        client.post("/", json={"image": "not base64 !!", "prompt": "x"}), 400, "invalid_image"
    )
    assert "data: URL" in error(
        client.post("/", json={"image": "data:image/png,rawbytes", "prompt": "x"}), 400, "invalid_image"
    )


def test_wrong_type_and_corrupt_images(client: TestClient) -> None:
    gif = image_bytes("GIF")
    assert "GIF" in error(
        client.post("/", files={"image": ("a.gif", gif, "image/gif"), "prompt": (None, "x")}),
        415,
        "unsupported_image_type",
    )
    pdf = b"%PDF-1.4\n" + b"0" * 100
    error(
        client.post("/", files={"image": ("a.pdf", pdf, "application/pdf"), "prompt": (None, "x")}),
        415,
        "unsupported_image_type",
    )
    truncated = image_bytes("PNG", (300, 300))[:200]
    error(
        client.post("/", files={"image": ("t.png", truncated, "image/png"), "prompt": (None, "x")}),
        400,
        "invalid_image",
    )
    error(
        client.post("/", files={"image": ("e.png", b"", "image/png"), "prompt": (None, "x")}),
        400,
        "invalid_image",
    )


def test_size_and_pixel_limits_are_413(client: TestClient) -> None:
    big = image_bytes("PNG", (1200, 1000))  # 1.2 MP > 1 MP, small file (one colour)
    assert len(big) < LIMITS.max_image_bytes
    assert "1200x1000" in error(
        client.post("/", files={"image": ("b.png", big, "image/png"), "prompt": (None, "x")}),
        413,
        "image_too_large",
    )
    noisy = Image.frombytes("RGB", (300, 300), bytes(range(256)) * 1055)  # ~270 KB as PNG
    buf = io.BytesIO()
    noisy.save(buf, format="PNG", compress_level=0)
    assert LIMITS.max_image_bytes < len(buf.getvalue()) < LIMITS.max_body_bytes()
    assert "limit is 200000 bytes" in error(
        client.post("/", files={"image": ("n.png", buf.getvalue(), "image/png"), "prompt": (None, "x")}),
        413,
        "image_too_large",
    )
    huge = b"0" * (LIMITS.max_body_bytes() + 1)
    error(
        client.post("/", content=huge, headers={"content-type": "application/json"}), 413, "request_too_large"
    )


def test_other_content_types_are_415(client: TestClient) -> None:
    error(
        client.post("/", content=image_bytes(), headers={"content-type": "image/png"}),
        415,
        "unsupported_media_type",
    )


def test_helpers_directly() -> None:
    data = image_bytes("JPEG", (10, 20))
    assert inspect_image(data, LIMITS) == ("image/jpeg", 10, 20)
    assert decode_base64("  " + base64.b64encode(data).decode() + "\n") == data
    with pytest.raises(Refusal) as exc:
        inspect_image(b"\x89PNG\r\n\x1a\n" + b"\0" * 30, LIMITS)
    assert exc.value.status in (400, 415)
