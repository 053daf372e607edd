"""The pages the doc tests read, in the order their blocks run (the admin guide last: it ends with
`rma down`)."""

from __future__ import annotations

from pathlib import Path

from tests.docs.mdblocks import Block, parse

ROOT = Path(__file__).resolve().parents[2]
PAGES = [
    "README.md",
    "docs/donor.md",
    "docs/client.md",
    "docs/architecture.md",
    "SECURITY.md",
    "docs/admin.md",
]


def all_pages() -> list[Path]:
    """PAGES, and any other page under docs/ (a new page is read even before someone adds it to PAGES)."""
    listed = [ROOT / p for p in PAGES]
    extra = sorted(p for p in (ROOT / "docs").glob("*.md") if p not in listed)
    return [p for p in listed if p.exists()] + extra


def all_blocks() -> list[Block]:
    return [b for page in all_pages() for b in parse(page, ROOT)]
