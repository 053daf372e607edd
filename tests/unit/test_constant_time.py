"""Secrets are compared in constant time (SECURITY.md, "Credentials"): a timing test cannot show it on a shared
box, so this reads the code. Every credential check goes through `credentials.matches` (or the gateway's own
`hmac.compare_digest`), `matches` compares with `hmac.compare_digest`, and no module of the product compares a
secret, a token or a stored hash with `==`, `!=` or `in`. No Ray."""

from __future__ import annotations

import ast
import hmac
import re
from pathlib import Path

import pytest

from rma_ray import credentials
from rma_ray.credentials import Kind

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("admission", "rma_ray", "deployments")
# a name that holds a secret or its hash: `secret`, `token_hash`, `key_hash`, `stored_hash`, `parsed.secret`, ...
SECRETISH = re.compile(r"(^|_)(secret|hash|token|password|cookie)s?($|_)", re.IGNORECASE)
# names that match the pattern but hold nothing secret (a file's or a wheel's checksum, a token's kind or id)
# (a checksum, LLM token counts, a request's idempotency digest)
PUBLIC = {"sha256", "kind", "id", "token_id", "token_file", "TOKENS", "request_hash"}
# comparisons that read a secret on purpose, each with why its timing tells nothing
ALLOWED = {
    # a configured secret against a short list of public well-known defaults (refused at start-up)
    "rma_ray/settings.py WEAK_SECRETS",
    # the graph store's once-only marker for a piece: a uuid this transaction made, no caller's secret
    "deployments/services/graph.py token",
}


def _head(node: ast.AST) -> str | None:
    """What an operand is, by its outermost name: `row.key_hash` -> key_hash, `hash_secret(x)` -> hash_secret,
    `token.kind` -> kind, `parts[2]` -> parts."""
    while isinstance(node, (ast.Subscript, ast.Starred)):
        node = node.value
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    return None


def _secret_operand(node: ast.AST) -> str | None:
    name = _head(node)
    return name if name and name not in PUBLIC and SECRETISH.search(name) else None


def secret_comparisons(source: str, filename: str) -> list[str]:
    """`file:line name` of every ==, !=, in or not in one of whose operands is a secret, a token or a hash (by
    its name), unless the other side is a constant (`token is None`, `secret == ""` say nothing of its value)."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        for op, left, right in zip(node.ops, operands[:-1], operands[1:], strict=True):
            if not isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)):
                continue
            if isinstance(left, ast.Constant) or isinstance(right, ast.Constant):
                continue
            name = _secret_operand(left) or _secret_operand(right)
            if name:
                found.append(f"{filename}:{node.lineno} {name}")
    return found


def test_no_module_compares_a_secret_with_eq() -> None:
    files = [p for d in PRODUCT for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 50  # the walk reaches the product
    found = [f for p in files for f in secret_comparisons(p.read_text(), str(p.relative_to(ROOT)))]
    unexplained = [f for f in found if re.sub(r":\d+ ", " ", f) not in ALLOWED]
    assert unexplained == [], "compare secrets with hmac.compare_digest (credentials.matches), not =="
    assert {re.sub(r":\d+ ", " ", f) for f in found} == ALLOWED  # an exception no longer needed goes


def test_the_reader_catches_an_eq_comparison_of_secrets() -> None:
    bad = "def ok(parsed, row):\n    return hash_secret(parsed.secret) == row.key_hash\n"
    assert secret_comparisons(bad, "bad.py") == ["bad.py:2 hash_secret"]
    fine = (
        "def ok(parsed, row, kind):\n"
        "    return hmac.compare_digest(hash_secret(parsed.secret), row.key_hash) and row.kind == kind"
        " and parsed.secret != ''\n"
    )
    assert secret_comparisons(fine, "fine.py") == []


def test_matches_compares_with_hmac_compare_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    minted = credentials.mint(Kind.NODE)
    seen: list[tuple[object, object]] = []
    real = hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(credentials.hmac, "compare_digest", spy)
    assert credentials.matches(credentials.parse(minted.token, Kind.NODE), minted.hash)
    assert not credentials.matches(
        credentials.parse(credentials.mint(Kind.NODE).token, Kind.NODE), minted.hash
    )
    assert seen and all(b == minted.hash for _, b in seen)
