"""The fenced code blocks of the docs, and the `doctest` directives that say how each is run.

Every block in a runnable language (sh, bash, python) is a test. A directive is an HTML comment on the line
right before the block's opening fence (invisible when rendered, plain in the source):

    <!-- doctest: as=donor stdin=JOIN_TOKEN expect="healthy" -->
    <!-- doctest: background ready="in the pool" -->
    <!-- doctest: skip reason="needs an NVIDIA GPU" -->
    <!-- doctest: skip reason="needs the LLM app" covered-by="tests/integration/test_llm.py::test_x" -->

and `<!-- doctest-page: as=head -->` once per page sets the machine its blocks run on (head, donor or client;
default head). Keys:

- `as`: the machine (role) the block runs on: its own HOME, working directory and exported variables;
- `stdin`: a secret fed on standard input (JOIN_TOKEN, ADMIN_KEY, CLIENT_KEY), as a person pastes it;
- `expect`: text the output must contain; `exit`: the exit status expected (default 0); `timeout`: seconds;
- `background` + `ready`: a command that runs until stopped (`rma join`): started, and the next block runs
  once its output shows `ready`;
- `skip` + `reason` (required): not run, reported as a skip with that reason; `covered-by` names the test that
  makes the same call (checked to exist).

Blocks in any other language must be labelled (`text`, `json`, `yaml`, ...): an unlabelled fence is an
error, so that no command hides in an unlabelled block.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

RUNNABLE = {"sh", "bash", "python"}
INERT = {"text", "json", "yaml", "toml", "ini", "mermaid", "http", "dockerfile", "svg", "html"}
ROLES = ("head", "donor", "client")
KEYS = {"skip", "reason", "covered-by", "as", "background", "ready", "stdin", "exit", "expect", "timeout"}
FLAGS = {"skip", "background"}
STDIN = {"JOIN_TOKEN", "ADMIN_KEY", "CLIENT_KEY"}

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_DIRECTIVE = re.compile(r"^\s*<!--\s*doctest(?P<page>-page)?:(?P<body>.*?)-->\s*$")


class DocError(Exception):
    """A page the harness cannot read as intended: the message names the file and line."""


@dataclass
class Block:
    path: str  # relative to the repository root
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    role: str = "head"
    options: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def runnable(self) -> bool:
        return self.lang in RUNNABLE

    @property
    def skip(self) -> bool:
        return "skip" in self.options


def _parse_directive(body: str, where: str, page: bool) -> dict[str, str]:
    try:
        tokens = shlex.split(body)
    except ValueError as exc:
        raise DocError(f"{where}: cannot read the doctest directive: {exc}") from None
    out: dict[str, str] = {}
    for tok in tokens:
        key, eq, value = tok.partition("=")
        allowed = {"as"} if page else KEYS
        if key not in allowed:
            raise DocError(f"{where}: unknown doctest key {key!r} (known: {', '.join(sorted(allowed))})")
        if (key in FLAGS) == bool(eq):
            raise DocError(f"{where}: {key!r} " + ("takes no value" if key in FLAGS else "needs a value"))
        out[key] = value if eq else ""
    if out.get("as", "head") not in ROLES:
        raise DocError(f"{where}: as={out['as']!r}: use one of {', '.join(ROLES)}")
    if "skip" in out and not out.get("reason"):
        raise DocError(f'{where}: a skipped block needs reason="..." saying why it cannot run in a test')
    if ("reason" in out or "covered-by" in out) and "skip" not in out:
        raise DocError(f"{where}: reason/covered-by only go with skip")
    if "background" in out and not out.get("ready"):
        raise DocError(f'{where}: a background block needs ready="..." (what its output shows once up)')
    if "stdin" in out and out["stdin"] not in STDIN:
        raise DocError(f"{where}: stdin={out['stdin']!r}: use one of {', '.join(sorted(STDIN))}")
    for key in ("exit", "timeout"):
        if key in out and not out[key].isdigit():
            raise DocError(f"{where}: {key}={out[key]!r} is not a number")
    return out


def parse(path: Path, root: Path) -> list[Block]:
    """Every fenced block of one page, in order, with its directive."""
    rel = str(path.relative_to(root))
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    role = "head"
    pending: tuple[int, dict[str, str]] | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        d = _DIRECTIVE.match(line)
        if d:
            opts = _parse_directive(d["body"], f"{rel}:{i + 1}", bool(d["page"]))
            if d["page"]:
                role = opts.get("as", role)
            else:
                if pending is not None:
                    raise DocError(f"{rel}:{pending[0]}: doctest directive not followed by a code block")
                pending = (i + 1, opts)
            i += 1
            continue
        m = _FENCE.match(line)
        if not m:
            if pending is not None and line.strip():
                raise DocError(f"{rel}:{pending[0]}: doctest directive not followed by a code block")
            i += 1
            continue
        fence, lang = m["fence"], m["info"].strip().split(" ")[0].lower()
        start = i + 1
        body: list[str] = []
        i += 1
        while i < len(lines) and not (
            lines[i].strip().startswith(fence[0] * len(fence)) and not lines[i].strip().strip(fence[0])
        ):
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise DocError(f"{rel}:{start}: code block never closed")
        i += 1
        if not lang:
            raise DocError(f"{rel}:{start}: unlabelled code block: label it (sh, python, text, json, ...)")
        if lang not in RUNNABLE | INERT:
            raise DocError(
                f"{rel}:{start}: unknown language {lang!r}: the harness runs {sorted(RUNNABLE)} "
                f"and ignores {sorted(INERT)}"
            )
        opts = pending[1] if pending else {}
        if opts and lang not in RUNNABLE:
            raise DocError(f"{rel}:{start}: doctest directive on a {lang!r} block (only sh/bash/python run)")
        blocks.append(Block(rel, start, lang, "\n".join(body) + "\n", opts.get("as", role), opts))
        pending = None
    if pending is not None:
        raise DocError(f"{rel}:{pending[0]}: doctest directive not followed by a code block")
    return blocks


_INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")


def inline_code(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every inline code span outside fenced blocks."""
    out: list[tuple[int, str]] = []
    in_fence: str | None = None
    for n, line in enumerate(path.read_text().splitlines(), 1):
        m = _FENCE.match(line)
        if m:
            if in_fence is None:
                in_fence = m["fence"][0]
            elif line.strip().startswith(in_fence * 3):
                in_fence = None
            continue
        if in_fence is None:
            out.extend((n, s) for s in _INLINE.findall(line))
    return out


def command_lines(block: Block) -> list[str]:
    """The shell commands of a sh block, continuation lines joined, comments dropped (for the CLI check)."""
    joined: list[str] = []
    buf = ""
    for raw in block.text.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        joined.append(buf)
        buf = ""
    out = []
    for cmd in joined:
        try:
            lex = shlex.shlex(cmd, posix=True, punctuation_chars=";&|()<>")
            lex.whitespace_split = True
            lex.commenters = "#"
            tokens = list(lex)
        except ValueError:
            continue
        current: list[str] = []
        for tok in tokens + [";"]:
            if tok and set(tok) <= set(";&|()<>"):
                if current:
                    out.append(shlex.join(current))
                current = []
            else:
                current.append(tok)
    return out
