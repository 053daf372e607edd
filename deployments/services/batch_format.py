"""The OpenAI Batch API's wire shapes and rules, with no Ray and no database: the checks of an input file
(JSONL), the batch's statuses and the moves between them, and the file, batch and output-line objects exactly
as OpenAI writes them (`deployments.services.batches` stores and runs them)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from deployments.gateway.refusal import Refusal

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
COMPLETION_WINDOWS = {"24h": 24 * 3600}
PURPOSES = ("batch", "batch_output")
FILES_MAX_LIMIT = 10_000  # OpenAI's bounds (and default) for GET /v1/files' `limit`
FILES_PAGE = 1000  # the most files one list answer holds: a larger `limit` gets has_more and `after`

# OpenAI's batch statuses; the last four are final
VALIDATING, IN_PROGRESS, FINALIZING = "validating", "in_progress", "finalizing"
COMPLETED, FAILED, CANCELLING, CANCELLED, EXPIRED = (
    "completed",
    "failed",
    "cancelling",
    "cancelled",
    "expired",
)
FINAL = frozenset({COMPLETED, FAILED, CANCELLED, EXPIRED})
# event -> {from status: to status}; anything else is a refusal (or, for the runner, nothing to do)
MOVES: dict[str, dict[str, str]] = {
    "start": {VALIDATING: IN_PROGRESS},
    "invalid": {VALIDATING: FAILED},
    "cancel": {VALIDATING: CANCELLING, IN_PROGRESS: CANCELLING},
    "drained": {IN_PROGRESS: FINALIZING, CANCELLING: FINALIZING},
    "expire": {VALIDATING: EXPIRED, IN_PROGRESS: EXPIRED},
}

# the per-item states of the runner's rows; done and failed items have their output line
PENDING, RUNNING, DONE, ITEM_FAILED, SKIPPED = "pending", "running", "done", "failed", "skipped"
ITEM_FINAL = frozenset({DONE, ITEM_FAILED, SKIPPED})


def move(status: str, event: str) -> str:
    """The status after `event`; Refusal(409) when the batch cannot take it in `status`."""
    to = MOVES[event].get(status)
    if to is None:
        verb = {"cancel": "cancelled"}.get(event, f"moved by {event!r}")
        raise Refusal(409, "invalid_batch_state", f"a batch that is {status} cannot be {verb}")
    return to


def finished_status(cancelled: bool) -> str:
    """The final status of a batch whose items are all done (finalizing -> completed, or cancelled)."""
    return CANCELLED if cancelled else COMPLETED


@dataclass(frozen=True)
class Item:
    line: int  # 1-based line of the input file
    custom_id: str
    body: dict[str, Any]


def _bad(line: int, what: str) -> Refusal:
    return Refusal(400, "invalid_batch_file", f"line {line}: {what}", param="file")


def check_jsonl(data: bytes, max_lines: int, max_custom_id: int = 512) -> tuple[str, list[Item]]:
    """The endpoint (the same `url` on every line) and the items of an input file, or a 400 that names the
    first bad line and what to fix. Each line: {"custom_id": unique str, "method": "POST", "url": one of
    ENDPOINTS, "body": object}. Blank lines are skipped (as OpenAI does)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Refusal(400, "invalid_batch_file", f"the file is not UTF-8 text (byte {exc.start})") from None
    items: list[Item] = []
    seen: dict[str, int] = {}
    endpoint: str | None = None
    # "\n" only: U+2028, U+0085 and the like are legal inside a JSON string, not line ends
    for n, raw in enumerate(text.split("\n"), start=1):
        raw = raw.removesuffix("\r")
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise _bad(
                n, f"not valid JSON ({exc.msg} at column {exc.colno}); each line is one JSON object"
            ) from None
        if not isinstance(obj, dict):
            raise _bad(n, "a line must be a JSON object with custom_id, method, url and body")
        extra = sorted(set(obj) - {"custom_id", "method", "url", "body"})
        if extra:
            raise _bad(n, f"unknown field {extra[0]!r}; a line has custom_id, method, url and body only")
        cid = obj.get("custom_id")
        if not isinstance(cid, str) or not cid or len(cid) > max_custom_id:
            raise _bad(n, f"custom_id must be a non-empty string of at most {max_custom_id} characters")
        if "\0" in cid:
            raise _bad(n, "custom_id must not contain a NUL character (\\u0000)")
        if cid in seen:
            raise _bad(n, f"custom_id {cid!r} is also on line {seen[cid]}; each custom_id must be unique")
        if obj.get("method") != "POST":
            raise _bad(n, f'method must be "POST" (got {obj.get("method")!r})')
        url = obj.get("url")
        if url not in ENDPOINTS:
            raise _bad(n, f"url must be one of {', '.join(ENDPOINTS)} (got {url!r})")
        if endpoint is None:
            endpoint = url
        elif url != endpoint:
            raise _bad(n, f"url {url!r} differs from the first line's {endpoint!r}; one endpoint per file")
        body = obj.get("body")
        if not isinstance(body, dict):
            raise _bad(n, "body must be a JSON object (the request body of the url)")
        if body.get("stream"):
            raise _bad(n, "body.stream must be false or absent: batch requests are not streamed")
        seen[cid] = n
        items.append(Item(n, cid, body))
        if len(items) > max_lines:
            raise _bad(n, f"the file has more than {max_lines:,} requests; split it into several batches")
    if endpoint is None:
        raise Refusal(
            400, "invalid_batch_file", "the file has no requests (one JSON object per line)", "file"
        )
    return endpoint, items


def ts(when: datetime | None) -> int | None:
    return None if when is None else int(when.timestamp())


def file_object(
    file_id: str, size: int, created_at: datetime, filename: str | None, purpose: str
) -> dict[str, Any]:
    return {
        "id": file_id,
        "object": "file",
        "bytes": size,
        "created_at": ts(created_at),
        "filename": filename or "",
        "purpose": purpose,
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


def file_deleted(file_id: str) -> dict[str, Any]:
    return {"id": file_id, "object": "file", "deleted": True}


def request_counts(total: int, item_states: dict[str, int]) -> dict[str, int]:
    """OpenAI's request_counts: completed = answered with a 2xx (output file), failed = in the error file
    (an expired batch's unfinished items too: each has a `batch_expired` line there); the items a cancelled
    batch never started are neither."""
    return {"total": total, "completed": item_states.get(DONE, 0), "failed": item_states.get(ITEM_FAILED, 0)}


def output_line(
    item_id: str, custom_id: str, status_code: int | None, body: Any, request_id: str, error: Any = None
) -> dict[str, Any]:
    """One line of an output or error file: a response (any status code) or, when no request was made, an
    error {code, message} and a null response."""
    response = (
        None if status_code is None else {"status_code": status_code, "request_id": request_id, "body": body}
    )
    return {"id": item_id, "custom_id": custom_id, "response": response, "error": error}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line, separators=(",", ":")).encode() + b"\n" for line in lines)


def list_page(objects: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": objects,
        "first_id": objects[0]["id"] if objects else None,
        "last_id": objects[-1]["id"] if objects else None,
        "has_more": has_more,
    }
