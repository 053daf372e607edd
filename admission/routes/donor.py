"""What a donor installs from (admission/services/donor_kit.py): the install script, the pool's wheel, the
constraints and the head's versions. Public on purpose: none of it is secret (SECURITY.md), and a donor has no
credential before it joins."""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, PlainTextResponse

from admission import security
from admission.deps import State
from admission.errors import ApiError
from admission.services import donor_kit
from rma_ray.wire import DonorVersions

router = APIRouter(prefix="/donor", tags=["donor"])

# what may stand for the coordinator's URL inside a shell script (it is quoted there too)
_URL = re.compile(
    r"https?://[A-Za-z0-9.\-]+(:\d{1,5})?(/[A-Za-z0-9._~\-/]*)?|https?://\[[0-9A-Fa-f:.]+\](:\d{1,5})?"
)
_SH = "text/x-shellscript; charset=utf-8"
_UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    404: {
        "description": "not served by this coordinator (only `rma up`'s own serves the kit), or no such file"
    },
    503: {"description": "the pool's wheel cannot be built here (the message says why)"},
}


async def _kit(state: State) -> donor_kit.Kit:
    return await run_in_threadpool(donor_kit.get, state)


@router.get(
    "/install.sh",
    response_class=PlainTextResponse,
    openapi_extra=security.PUBLIC,
)
async def install_script(request: Request, state: State) -> PlainTextResponse:
    """`curl -fsSL <coordinator>/donor/install.sh | sh`: installs `rma` for this head's code, Ray and Python.
    Where it cannot (no kit here, a URL that cannot go into a script), a script that prints why and exits 1."""
    try:
        url = (state.settings.public_url or str(request.base_url)).rstrip("/")
        if not _URL.fullmatch(url):
            raise ApiError(
                400,
                "bad_coordinator_url",
                f"this coordinator's URL as requested ({url[:100]!r}) cannot go into the script: "
                "ask for it by host name or address, or set RMA_PUBLIC_URL on the coordinator",
            )
        kit = await _kit(state)
    except ApiError as exc:
        # `curl -fsSL ... | sh` would drop an error body: a script that says it and fails is seen instead
        return PlainTextResponse(donor_kit.error_script(exc.message), media_type=_SH)
    body = donor_kit.script(kit, url, state.settings.overlay_enabled)
    return PlainTextResponse(body, media_type=_SH)


@router.get(
    "/constraints.txt",
    response_class=PlainTextResponse,
    openapi_extra=security.PUBLIC,
    responses=_UNAVAILABLE,
)
async def constraints(state: State) -> PlainTextResponse:
    """pip constraints: every distribution a donor installs, pinned to the head's version."""
    return PlainTextResponse((await _kit(state)).constraints)


@router.get(
    "/versions.json", response_model=DonorVersions, openapi_extra=security.PUBLIC, responses=_UNAVAILABLE
)
async def versions(state: State) -> DonorVersions:
    """The head's Python, Ray and pool versions and code fingerprint (`rma version --check` compares them)."""
    return (await _kit(state)).versions


@router.get(
    "/{filename}",
    response_class=FileResponse,
    openapi_extra=security.PUBLIC,
    responses=_UNAVAILABLE,
)
async def wheel(filename: str, state: State) -> FileResponse:
    """The pool's wheel (its name is in versions.json and install.sh)."""
    kit = await _kit(state)
    if filename != kit.wheel.name:
        raise ApiError(404, "not_found", f"no {filename[:100]!r} here; this head serves {kit.wheel.name}")
    return FileResponse(kit.wheel, media_type="application/octet-stream", filename=kit.wheel.name)
