"""The claims of SECURITY.md, docs/architecture.md and the README, each with the tests that prove it
(tests/claims.toml), and the report of a run: which claims its tests proved.

`python -m tests.support.claims JUNIT...` reads the JUnit XML of a run (`make test` passes the unit run's and the
rest's), prints per doc how many claims there are and how many the run proved, lists the claims whose tests
failed, did not run or only skipped, and the untested ones with their reasons, and writes the same to
claims.json beside the last JUnit file. It exits 1 when a named test failed, or is missing from a run that ran
its module (renamed or deleted without updating the map); a module the run did not reach, or a skip, is
reported, not failed: whether a skip may pass is the capability plugin's call (tests/support/capabilities.py).

tests/docs/test_claims.py keeps the map honest without a run: every excerpt is in its doc, every named test
exists, every section of the docs has a claim or says why it has none.
"""

from __future__ import annotations

import json
import re
import sys
import tomllib
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CLAIMS = ROOT / "tests" / "claims.toml"
DOCS = ("SECURITY.md", "docs/architecture.md", "README.md")


@dataclass(frozen=True)
class Claim:
    doc: str
    says: str
    tests: tuple[str, ...]
    untested: str = ""


@dataclass(frozen=True)
class NoClaims:
    """A section that states no behaviour to prove, and why."""

    doc: str
    section: str
    why: str


@dataclass
class ClaimsMap:
    claims: list[Claim]
    no_claims: list[NoClaims]


def normalise(text: str) -> str:
    """Whitespace runs (line breaks included) as one space: an excerpt matches however the doc is wrapped."""
    return re.sub(r"\s+", " ", text).strip()


def load(path: Path = CLAIMS) -> ClaimsMap:
    data = tomllib.loads(path.read_text())
    claims = [
        Claim(c["doc"], c["says"], tuple(c.get("tests", ())), c.get("untested", ""))
        for c in data.get("claim", [])
    ]
    none = [NoClaims(n["doc"], n["section"], n["why"]) for n in data.get("no_claims", [])]
    return ClaimsMap(claims, none)


def _lines(text: str) -> list[str]:
    return [n for line in text.splitlines() if (n := normalise(line))]


def sections(text: str) -> list[tuple[int, str]]:
    """(offset in the normalised text, title) of each `##`/`###` heading, in order; fenced code is skipped."""
    out: list[tuple[int, str]] = []
    fenced = False
    offset = 0
    for line in _lines(text):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{2,3} (.+)", line)):
            out.append((offset, m.group(1)))
        offset += len(line) + 1
    return out


def section_of(text: str, says: str) -> str | None:
    """The `##`/`###` section whose text holds the excerpt ("" before the first heading); None when absent."""
    at = " ".join(_lines(text)).find(normalise(says))
    if at < 0:
        return None
    title = ""
    for offset, name in sections(text):
        if offset <= at:
            title = name
    return title


def node_parts(node_id: str) -> tuple[str, str]:
    """`tests/unit/test_x.py::test_y` -> (JUnit classname `tests.unit.test_x`, function `test_y`)."""
    path, _, func = node_id.partition("::")
    return path.removesuffix(".py").replace("/", "."), func


@dataclass
class Run:
    """What the JUnit files say about each test function: its outcomes (a parametrized one has several)."""

    outcomes: dict[tuple[str, str], list[str]] = field(default_factory=lambda: defaultdict(list))
    modules: set[str] = field(default_factory=set)

    @classmethod
    def read(cls, paths: list[Path]) -> Run:
        run = cls()
        for path in paths:
            for case in ET.parse(path).getroot().iter("testcase"):
                module, name = case.get("classname", ""), case.get("name", "")
                run.modules.add(module)
                if case.find("failure") is not None or case.find("error") is not None:
                    outcome = "failed"
                elif case.find("skipped") is not None:
                    outcome = "skipped"
                else:
                    outcome = "passed"
                run.outcomes[(module, name.partition("[")[0])].append(outcome)
        return run

    def status(self, node_id: str) -> str:
        """passed, failed, skipped (every case skipped), missing (its module ran, it did not) or not run."""
        module, func = node_parts(node_id)
        seen = self.outcomes.get((module, func))
        if not seen:
            return "missing" if module in self.modules else "not run"
        if "failed" in seen:
            return "failed"
        return "passed" if "passed" in seen else "skipped"


def report(claims: list[Claim], run: Run) -> dict[str, Any]:
    """Per doc: how many claims, how many proved (every named test passed), and the rest with their tests' status."""
    docs: dict[str, dict[str, Any]] = {}
    for doc in dict.fromkeys([*DOCS, *(c.doc for c in claims)]):
        mine = [c for c in claims if c.doc == doc]
        proved = 0
        unproved: list[dict[str, Any]] = []
        untested: list[dict[str, str]] = []
        for c in mine:
            if not c.tests:
                untested.append({"says": c.says, "why": c.untested})
                continue
            tests = {t: run.status(t) for t in c.tests}
            if all(s == "passed" for s in tests.values()):
                proved += 1
            else:
                unproved.append({"says": c.says, "tests": tests})
        docs[doc] = {"claims": len(mine), "proved": proved, "unproved": unproved, "untested": untested}
    return {"docs": docs}


def broken(result: dict[str, Any]) -> list[str]:
    """The named tests that failed, or that are missing from a run of their module."""
    out: list[str] = []
    for doc in result["docs"].values():
        for c in doc["unproved"]:
            out += [t for t, s in c["tests"].items() if s in ("failed", "missing")]
    return sorted(set(out))


def render(result: dict[str, Any]) -> str:
    lines = ["claims proved by this run (tests/claims.toml):"]
    for name, doc in result["docs"].items():
        lines.append(
            f"  {name}: {doc['claims']} claims, {doc['proved']} proved, "
            f"{len(doc['unproved'])} not proved, {len(doc['untested'])} untested"
        )
    for name, doc in result["docs"].items():
        for c in doc["unproved"]:
            tests = ", ".join(f"{t} ({s})" for t, s in c["tests"].items() if s != "passed")
            lines.append(f"  NOT PROVED {name}: {c['says']!r}: {tests}")
        for c in doc["untested"]:
            lines.append(f"  untested {name}: {c['says']!r}: {c['why']}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m tests.support.claims JUNIT_XML...", file=sys.stderr)
        return 2
    paths = [Path(a) for a in argv]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        print(
            f"claims: no JUnit file {', '.join(missing)}; run the tests with --junitxml first",
            file=sys.stderr,
        )
        return 2
    result = report(load().claims, Run.read(paths))
    bad = broken(result)
    result["broken"] = bad
    (paths[-1].parent / "claims.json").write_text(json.dumps(result, indent=2) + "\n")
    print(render(result))
    for t in bad:
        print(f"  FAILED claim test: {t}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
