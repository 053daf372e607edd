"""The vision route's request: an image and a prompt, as multipart form data or JSON with a base64 image,
checked before anything reaches a model. Pure (Pillow, pydantic and the kit's `Refusal`; no Ray), so unit
tests and the GPU check use it.

Limits: the body (`max_image_bytes` of image, plus the base64 and form overhead) is refused early from its
Content-Length; the image must be a JPEG, PNG or WebP that Pillow can read, of at most `max_pixels` pixels (a small
file can decode to a huge bitmap); the prompt is text of at most `max_prompt_chars`.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deployments.gateway.refusal import Refusal, validation_message

FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
FORM_FIELDS = {"image", "prompt", "model", "system", "max_tokens", "temperature"}


class Limits(BaseModel):
    model_config = ConfigDict(frozen=True)

    max_image_bytes: int = Field(default=10 * 2**20, ge=1024)
    max_pixels: int = Field(
        default=7680 * 4320, ge=64
    )  # 8K UHD: larger images are downscaled by the models anyway
    max_prompt_chars: int = Field(default=8000, ge=1)
    max_tokens: int = Field(default=2048, ge=1)

    def max_body_bytes(self) -> int:
        """The largest body worth reading: the image in base64 (4/3) plus the prompt and form/JSON framing."""
        return self.max_image_bytes * 4 // 3 + 4 * self.max_prompt_chars + 64 * 1024


class _Fields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    model: str | None = Field(default=None, min_length=1, max_length=200)
    system: str | None = Field(default=None, max_length=20_000)
    max_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.2, ge=0, le=2)


class JsonBody(_Fields):
    image: str = Field(min_length=1, description="base64, or a data: URL (data:image/png;base64,...)")


@dataclass(frozen=True)
class VisionInput:
    image: bytes
    mime: str
    width: int
    height: int
    prompt: str
    model: str | None = None
    system: str | None = None
    max_tokens: int = 256
    temperature: float = 0.2

    def payload(self) -> dict[str, Any]:
        """Plain values for a Serve handle call to a backend."""
        return {
            "image": self.image,
            "mime": self.mime,
            "width": self.width,
            "height": self.height,
            "prompt": self.prompt,
            "model": self.model,
            "system": self.system,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }

    @classmethod
    def from_payload(cls, p: dict[str, Any]) -> VisionInput:
        return cls(**p)


def _first_error(exc: ValidationError) -> Refusal:
    first = dict(exc.errors()[0])
    if first["type"] == "extra_forbidden":
        optional = ", ".join(sorted(FORM_FIELDS - {"image", "prompt"}))
        first["msg"] = f"unknown field; send image, prompt and optionally {optional}"
    return Refusal(422, "invalid_request", validation_message([first], most=1))


def decode_base64(value: str) -> bytes:
    """Raw base64 or a data: URL -> bytes; 400 with what to fix otherwise."""
    text = value.strip()
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or not head.endswith(";base64"):
            raise Refusal(
                400, "invalid_image", "image: a data: URL must be base64 (data:image/png;base64,...)"
            )
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise Refusal(
            400,
            "invalid_image",
            "image: not valid base64; send the file's bytes base64-encoded, "
            "or use multipart/form-data with an `image` file",
        ) from None


def inspect_image(data: bytes, limits: Limits) -> tuple[str, int, int]:
    """(mime type, width, height) of an acceptable image, else a Refusal saying what is wrong."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise Refusal(400, "invalid_image", "image: the file is empty")
    if len(data) > limits.max_image_bytes:
        raise Refusal(
            413,
            "image_too_large",
            f"image: {len(data)} bytes; the limit is "
            f"{limits.max_image_bytes} bytes ({limits.max_image_bytes / 2**20:g} MiB)",
        )
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            fmt, (width, height) = img.format or "", img.size
            if fmt not in FORMATS:
                raise Refusal(
                    415,
                    "unsupported_image_type",
                    f"image: {fmt or 'this'} format is not accepted; send JPEG, PNG or WebP",
                )
            if width * height > limits.max_pixels:
                raise Refusal(
                    413,
                    "image_too_large",
                    f"image: {width}x{height} pixels; the limit is "
                    f"{limits.max_pixels} pixels (e.g. 7680x4320)",
                )
            img.verify()  # the whole file decodes: a truncated upload is refused here, not inside the model
    except Refusal:
        raise
    except UnidentifiedImageError:
        raise Refusal(
            415, "unsupported_image_type", "image: not an image file; send JPEG, PNG or WebP"
        ) from None
    except Exception as exc:  # truncated or corrupt data, decompression-bomb guard
        raise Refusal(400, "invalid_image", f"image: cannot be read ({str(exc)[:200]})") from None
    return FORMATS[fmt], width, height


def _checked(fields: _Fields, image: bytes, limits: Limits) -> VisionInput:
    if len(fields.prompt) > limits.max_prompt_chars:
        raise Refusal(
            422,
            "invalid_request",
            f"prompt: {len(fields.prompt)} characters; the limit is {limits.max_prompt_chars}",
        )
    if fields.max_tokens > limits.max_tokens:
        raise Refusal(422, "invalid_request", f"max_tokens: at most {limits.max_tokens}")
    mime, width, height = inspect_image(image, limits)
    return VisionInput(
        image=image,
        mime=mime,
        width=width,
        height=height,
        prompt=fields.prompt,
        model=fields.model,
        system=fields.system,
        max_tokens=fields.max_tokens,
        temperature=fields.temperature,
    )


def from_json(body: bytes, limits: Limits) -> VisionInput:
    try:
        data = json.loads(body)
    except ValueError:
        raise Refusal(400, "invalid_json", "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise Refusal(422, "invalid_request", "the body must be a JSON object with `image` and `prompt`")
    try:
        parsed = JsonBody.model_validate(data)
    except ValidationError as exc:
        raise _first_error(exc) from None
    return _checked(parsed, decode_base64(parsed.image), limits)


def from_form(fields: dict[str, Any], image: bytes | None, limits: Limits) -> VisionInput:
    """`fields`: the form's text fields; `image`: the bytes of its `image` file part (None when absent)."""
    if image is None:
        if isinstance(fields.get("image"), str):  # a base64 text field instead of a file part: accepted
            image = decode_base64(fields.pop("image"))
        else:
            raise Refusal(
                422, "invalid_request", "image: missing; add the picture as a file part named `image`"
            )
    fields.pop("image", None)
    try:
        parsed = _Fields.model_validate(fields)
    except ValidationError as exc:
        raise _first_error(exc) from None
    return _checked(parsed, image, limits)
