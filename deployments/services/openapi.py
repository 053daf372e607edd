"""The services' published OpenAPI (GET /api/openapi.json, with a client key) and its Markdown reference,
docs/api.md, generated from it:

    python -m deployments.services.openapi            # print docs/api.md
    python -m deployments.services.openapi --write    # rewrite docs/api.md
    python -m deployments.services.openapi --check    # exit 1 when docs/api.md differs from the code

FastAPI's schema knows the routes, parameters and the bodies it parses itself. What it cannot see is added
here, per route (`ROUTES`): the bodies the routes read by hand (JSON or multipart), an example request, and
the error codes the route answers besides the ones every route shares (`COMMON_ERRORS`). A route missing from
`ROUTES` fails the unit test that compares the two."""

from __future__ import annotations

import argparse
import copy
import difflib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "api.md"
REGENERATE = "python -m deployments.services.openapi --write"
PREFIX = "/api"

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string", "description": "stable, for programs"},
                "message": {"type": "string", "description": "what was wrong and what to do, for people"},
                "request_id": {"type": "string", "description": "also in the X-Request-ID header"},
            },
        }
    },
}

# status -> (codes, when): every route can answer these
COMMON_ERRORS: dict[int, tuple[list[str], str]] = {
    401: (["missing_api_key", "invalid_api_key"], "no key, a wrong key or a revoked key"),
    429: (
        ["rate_limited", "token_quota_exceeded"],
        "this key is over its quota (requests per minute, LLM tokens per day); Retry-After and "
        "X-RateLimit-Limit/-Remaining/-Reset say when to retry (GET /api/usage shows the quota)",
    ),
    503: (
        ["service_unavailable", "overloaded", "keyring_unavailable"],
        "the backend is starting, gone or at capacity; Retry-After says when to retry",
    ),
    504: (["timeout"], "the backend did not answer within the gateway's limit"),
}
BODY_ERRORS: dict[int, tuple[list[str], str]] = {
    413: (["body_too_large"], "the body is over the upload limit (25 MiB by default)"),
    422: (["invalid_request", "invalid_body"], "a field is missing or wrong; the message names it"),
}
_FILE = {
    "type": "object",
    "required": ["file"],
    "properties": {"file": {"type": "string", "format": "binary", "description": "the document"}},
}
_UPLOAD_ID = {
    "type": "object",
    "required": ["upload_id"],
    "properties": {"upload_id": {"type": "string", "description": "the id POST /api/uploads gave"}},
}


@dataclass(frozen=True)
class RouteDoc:
    example: Any = None  # a JSON request body; None: no body
    body_model: str | None = None  # a wire model of deployments.services.schemas, for bodies read by hand
    multipart: bool = False  # also takes a multipart `file`
    upload_id: bool = False  # also takes {"upload_id"} as JSON
    errors: dict[int, list[str]] = field(default_factory=dict)


def _merge(*groups: dict[int, list[str]]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for g in groups:
        for status, codes in g.items():
            out[status] = [*out.get(status, []), *[c for c in codes if c not in out.get(status, [])]]
    return out


FILE_ERRORS = {
    400: ["bad_multipart", "missing_file", "empty_file"],
    413: ["file_too_large"],
    415: ["multipart_required"],
}
UPLOAD_READ = {400: ["bad_json"], 404: ["not_found"], 410: ["upload_gone"]}
PARSE_ERRORS = {
    400: ["bad_ocr_mode"],
    413: ["too_many_pages", "too_many_scanned_pages"],
    415: ["unsupported_type", "type_mismatch", "not_utf8"],
    422: ["encrypted_pdf", "unreadable_pdf", "unreadable_docx", "needs_ocr"],
}
OCR_ERRORS = {
    413: ["image_too_large", "too_many_pages"],
    415: ["unreadable_image", "not_an_image"],
    422: ["unreadable_image"],
}
LLM_ERRORS = {422: ["llm_refused"], 503: ["llm_not_running", "llm_failed"], 504: ["llm_timeout"]}
RAG_ERRORS = {400: ["bad_json", "bad_collection"], 503: ["store_unavailable"]}
STORE = {503: ["store_unavailable"]}

ROUTES: dict[tuple[str, str], RouteDoc] = {
    ("GET", "/whoami"): RouteDoc(),
    ("GET", "/usage"): RouteDoc(),
    ("POST", "/documents/parse"): RouteDoc(
        example={"upload_id": "3f2a9c0e"},
        multipart=True,
        upload_id=True,
        errors=_merge(FILE_ERRORS, UPLOAD_READ, PARSE_ERRORS),
    ),
    ("POST", "/ocr"): RouteDoc(
        example={"upload_id": "3f2a9c0e"},
        multipart=True,
        upload_id=True,
        errors=_merge(FILE_ERRORS, UPLOAD_READ, OCR_ERRORS),
    ),
    ("POST", "/uploads"): RouteDoc(
        multipart=True, errors=_merge(FILE_ERRORS, STORE, {429: ["upload_quota_exceeded"]})
    ),
    ("GET", "/uploads/{upload_id}"): RouteDoc(errors={404: ["not_found"]}),
    ("GET", "/uploads/{upload_id}/content"): RouteDoc(errors={404: ["not_found"], 410: ["upload_gone"]}),
    ("POST", "/rag/ingest"): RouteDoc(
        example={"collection": "handbook", "text": "Refunds take 5 working days.", "source": "faq.md"},
        body_model="IngestBody",
        multipart=True,
        errors=_merge(RAG_ERRORS, FILE_ERRORS, UPLOAD_READ, PARSE_ERRORS, {422: ["no_text"]}),
    ),
    ("POST", "/rag/query"): RouteDoc(
        example={"collection": "handbook", "query": "How long do refunds take?", "top_k": 3, "answer": True},
        body_model="QueryBody",
        errors=_merge(RAG_ERRORS, {404: ["no_collection"]}, LLM_ERRORS),
    ),
    ("POST", "/clients/{client_id}/rag/ingest"): RouteDoc(
        example={"text": "Call Ana back on Monday.", "source": "notes/2026-03-02"},
        body_model="ClientIngestBody",
        multipart=True,
        errors=_merge(
            RAG_ERRORS, {403: ["not_your_client"]}, FILE_ERRORS, UPLOAD_READ, PARSE_ERRORS, {422: ["no_text"]}
        ),
    ),
    ("POST", "/clients/{client_id}/rag/query"): RouteDoc(
        example={"query": "When do I call Ana?", "top_k": 3},
        body_model="ClientQueryBody",
        errors=_merge(RAG_ERRORS, {403: ["not_your_client"]}, LLM_ERRORS),
    ),
    ("POST", "/notes"): RouteDoc(
        example={"title": "Call Ana", "body": "Monday, about the invoice.", "tags": ["calls"]}, errors=STORE
    ),
    ("GET", "/notes"): RouteDoc(errors=STORE),
    ("GET", "/notes/{note_id}"): RouteDoc(errors={404: ["not_found"], **STORE}),
    ("PUT", "/notes/{note_id}"): RouteDoc(
        example={"tags": ["calls", "done"]}, errors={404: ["not_found"], **STORE}
    ),
    ("DELETE", "/notes/{note_id}"): RouteDoc(errors={404: ["not_found"], **STORE}),
    ("POST", "/notes/{note_id}/summarize"): RouteDoc(
        example={"max_words": 40}, errors=_merge({404: ["not_found"]}, STORE, LLM_ERRORS)
    ),
    ("POST", "/graph/extract"): RouteDoc(
        example={"text": "Ana Lima met Bruno Costa in Lisbon.", "source": "notes/7"},
        errors={400: ["empty_text"], 413: ["text_too_long"], **STORE},
    ),
    ("POST", "/graph/query"): RouteDoc(
        example={"entity": "Ana Lima", "limit": 10},
        errors={400: ["empty_entity"], 404: ["unknown_entity"], **STORE},
    ),
    # document-ingest jobs (deployments/services/ingest.py): options beside the file or the upload's id
    ("POST", "/jobs/ingest"): RouteDoc(
        example={"upload_id": "3f2a9c0e", "ocr": "auto", "rag": {"collection": "handbook"}, "graph": True},
        multipart=True,
        upload_id=True,
        errors=_merge(
            FILE_ERRORS,
            {
                400: ["bad_json", "bad_idempotency_key", "bad_collection"],
                404: ["not_found"],
                409: ["idempotency_key_reused"],
                415: ["unsupported_type", "type_mismatch", "not_utf8", "unsupported_media_type"],
                422: ["invalid_options"],
                429: ["too_many_jobs", "upload_quota_exceeded"],
            },
            STORE,
        ),
    ),
    ("GET", "/jobs"): RouteDoc(errors={404: ["not_found"], **STORE}),
    ("GET", "/jobs/{job_id}"): RouteDoc(errors={404: ["not_found"], **STORE}),
    ("GET", "/jobs/{job_id}/events"): RouteDoc(errors={404: ["not_found"], **STORE}),
    ("GET", "/jobs/{job_id}/text"): RouteDoc(errors={404: ["not_found"], 409: ["not_parsed_yet"], **STORE}),
    ("POST", "/jobs/{job_id}/cancel"): RouteDoc(errors={404: ["not_found"], **STORE}),
}

STATUS_WHEN = {
    400: "the request cannot be served as sent",
    403: "the key may not use this resource",
    404: "no such resource (or not yours)",
    409: "the request conflicts with an earlier one or with the resource's state",
    410: "the upload's bytes are gone",
    413: "too large",
    415: "a type the route does not read",
    422: "the content cannot be used",
    503: "not available right now",
    504: "no answer in time",
}


def _error_response(codes: list[str], when: str) -> dict[str, Any]:
    return {
        "description": f"{when} (`code`: {', '.join(f'`{c}`' for c in codes)})",
        "content": {
            "application/json": {
                "schema": {"$ref": "#/components/schemas/Error"},
                "example": {"error": {"code": codes[0], "message": when, "request_id": "7b1e0c5d"}},
            }
        },
    }


def published(app: Any) -> dict[str, Any]:
    """FastAPI's schema of `app` (the services' FastAPI app) with what it leaves out: the bearer key, the
    bodies read by hand, an example per body, and every error each route answers. Raises KeyError for a route
    that
    `ROUTES` does not describe."""
    from deployments.services import schemas as api

    schema = copy.deepcopy(app.openapi())
    comps = schema.setdefault("components", {})
    comps.setdefault("securitySchemes", {})["clientKey"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "a client key (`rma_client_...`) from the pool's admin",
    }
    schemas = comps.setdefault("schemas", {})
    schemas["Error"] = ERROR_SCHEMA
    schema["security"] = [{"clientKey": []}]
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            doc = ROUTES[(method.upper(), path)]
            if doc.body_model and "requestBody" not in op:
                model = getattr(api, doc.body_model)
                model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                for name, sub in model_schema.pop("$defs", {}).items():
                    schemas.setdefault(name, sub)
                schemas.setdefault(doc.body_model, model_schema)
                op["requestBody"] = {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": f"#/components/schemas/{doc.body_model}"}}
                    },
                }
            elif doc.upload_id and "requestBody" not in op:
                op["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": _UPLOAD_ID}},
                }
            if doc.multipart:
                body = op.setdefault("requestBody", {"required": True, "content": {}})
                body["content"]["multipart/form-data"] = {"schema": _FILE}
            if doc.example is not None:
                op["requestBody"]["content"]["application/json"]["example"] = doc.example
            responses = op.setdefault("responses", {})
            errors = {**COMMON_ERRORS}
            if "requestBody" in op or op.get("parameters"):
                errors.update(BODY_ERRORS if "requestBody" in op else {422: BODY_ERRORS[422]})
            for status, codes in doc.errors.items():
                have = errors.get(status, ([], ""))
                errors[status] = (
                    [*codes, *[c for c in have[0] if c not in codes]],
                    have[1] or STATUS_WHEN.get(status, "refused"),
                )
            for status in sorted(errors):
                responses[str(status)] = _error_response(*errors[status])
    schema["paths"] = {PREFIX + p: ops for p, ops in schema["paths"].items()}
    schema["servers"] = [{"url": "/", "description": "the pool's Serve port, e.g. http://HEAD:8000"}]
    return schema


def _ref(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = schema["components"]["schemas"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def _type(schema: dict[str, Any], node: dict[str, Any]) -> str:
    if "$ref" in node:
        return node["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in node:
        return " or ".join(_type(schema, n) for n in node["anyOf"])
    if node.get("type") == "array":
        return f"list of {_type(schema, node.get('items', {}))}"
    if "enum" in node:
        return " or ".join(f"`{v}`" for v in node["enum"])
    if "const" in node:
        return f"`{node['const']}`"
    return str(node.get("type", "any"))


def _limits(node: dict[str, Any]) -> str:
    keys = {
        "minLength": "min length",
        "maxLength": "max length",
        "minimum": "≥",
        "maximum": "≤",
        "exclusiveMinimum": ">",
        "minItems": "min items",
        "maxItems": "max items",
    }
    for sub in node.get("anyOf", []):
        node = {**sub, **node}
    parts = [f"{label} {node[k]}" for k, label in keys.items() if k in node]
    if "default" in node:
        parts.append(f"default `{json.dumps(node['default'])}`")
    return ", ".join(parts)


def _fields(schema: dict[str, Any], node: dict[str, Any]) -> list[str]:
    node = _ref(schema, node)
    props = node.get("properties", {})
    if not props:
        return []
    required = set(node.get("required", []))
    rows = ["| field | type | required | limits |", "| --- | --- | --- | --- |"]
    for name, sub in props.items():
        rows.append(
            f"| `{name}` | {_type(schema, sub)} | {'yes' if name in required else 'no'} | {_limits(sub)} |"
        )
    return rows


def render(schema: dict[str, Any]) -> str:
    out = [
        "<!-- Generated by `python -m deployments.services.openapi --write` from deployments/services/. "
        "Do not edit by hand. -->",
        "",
        "# The RMA services API (`/api`)",
        "",
        "Every route needs a client key: `Authorization: Bearer rma_client_...` "
        "(see [client.md](client.md)). "
        "This page is generated from the same OpenAPI document the pool serves at `GET /api/openapi.json` "
        "(with a key), so a client generator can read that instead. Refusals are "
        '`{"error": {"code", "message", "request_id"}}`; every response carries `X-Request-ID`.',
        "",
        "The OpenAI-compatible routes under `/v1` (chat, completions, embeddings, models) follow "
        "OpenAI's own "
        "API reference; [client.md](client.md) lists them.",
        "",
        "## Errors every route can answer",
        "",
        "| status | code | when |",
        "| --- | --- | --- |",
    ]
    for status, (codes, when) in {**COMMON_ERRORS, **BODY_ERRORS}.items():
        out.append(f"| {status} | {', '.join(f'`{c}`' for c in codes)} | {when} |")
    out += ["", "413 and 422 only where the route takes a body or parameters.", ""]
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            out += [f"## `{method.upper()} {path}`", ""]
            if op.get("description"):
                out += [op["description"].strip().splitlines()[0], ""]
            params = op.get("parameters", [])
            if params:
                out += ["| parameter | in | type | required | limits |", "| --- | --- | --- | --- | --- |"]
                for p in params:
                    out.append(
                        f"| `{p['name']}` | {p['in']} | {_type(schema, p.get('schema', {}))} | "
                        f"{'yes' if p.get('required') else 'no'} | {_limits(p.get('schema', {}))} |"
                    )
                out.append("")
            body = op.get("requestBody", {}).get("content", {})
            example = body.get("application/json", {}).get("example")
            if body:
                out += [f"Body: {', '.join(f'`{c}`' for c in body)}.", ""]
                rows = _fields(schema, body.get("application/json", {}).get("schema", {}))
                if rows:
                    out += [*rows, ""]
                if "multipart/form-data" in body:
                    out += ["Multipart: the document as the `file` part.", ""]
            url = (
                path.replace("{client_id}", "my-app")
                .replace("{upload_id}", "3f2a9c0e")
                .replace("{note_id}", "7")
            )
            query = "?limit=20&tag=calls" if method == "get" and path.endswith("/notes") else ""
            out += [
                "Example:",
                "",
                "```http",
                f"{method.upper()} {url}{query} HTTP/1.1",
                "Host: HEAD:8000",
                "Authorization: Bearer rma_client_...",
            ]
            if example is not None:
                out += ["Content-Type: application/json", "", json.dumps(example, indent=2)]
            elif "multipart/form-data" in body:
                out += [
                    "Content-Type: multipart/form-data; boundary=x",
                    "",
                    "--x",
                    'Content-Disposition: form-data; name="file"; filename="report.pdf"',
                    "Content-Type: application/pdf",
                    "",
                    "<the file's bytes>",
                    "--x--",
                ]
            out += ["```", "", "| status | meaning |", "| --- | --- |"]
            for status, resp in sorted(op.get("responses", {}).items()):
                out.append(f"| {status} | {resp.get('description', '').replace('|', '/')} |")
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def generate() -> str:
    from deployments.services.api import Backends, create_api

    return render(published(create_api(Backends(None, None, None, None, None, None))))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m deployments.services.openapi", description="docs/api.md from the services' OpenAPI"
    )
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite docs/api.md")
    mode.add_argument("--check", action="store_true", help="exit 1 (with a diff) when docs/api.md is stale")
    args = ap.parse_args(argv)
    text = generate()
    if args.write:
        DOC.write_text(text)
        print(f"wrote {DOC.relative_to(ROOT)}")
    elif args.check:
        have = DOC.read_text() if DOC.exists() else ""
        if have != text:
            sys.stdout.writelines(
                difflib.unified_diff(
                    have.splitlines(keepends=True),
                    text.splitlines(keepends=True),
                    "docs/api.md (committed)",
                    "docs/api.md (from code)",
                )
            )
            print(f"\ndocs/api.md is out of date with the code; run `{REGENERATE}`", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
