"""What the pages say against what the code is, without a pool (a few seconds): every page parses, every
link resolves, every `rma` command shown (run or skipped, in a block or inline) names a real subcommand and real
options, the client guide lists exactly the routes the code serves, and the README keeps its two set-up
commands. The last tests show that these checks can fail."""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import typer.main

from tests.docs.mdblocks import Block, DocError, command_lines, inline_code, parse
from tests.docs.pages import ROOT, all_blocks, all_pages
from tests.support import parse_python

PAGE_IDS = [str(p.relative_to(ROOT)) for p in all_pages()]


@pytest.mark.parametrize("page", all_pages(), ids=PAGE_IDS)
def test_page_parses(page: Path) -> None:
    try:
        parse(page, ROOT)
    except DocError as exc:
        pytest.fail(str(exc))


def test_every_page_exists_and_has_commands_or_says_none() -> None:
    for rel in (
        "README.md",
        "SECURITY.md",
        "docs/donor.md",
        "docs/admin.md",
        "docs/client.md",
        "docs/architecture.md",
    ):
        assert (ROOT / rel).is_file(), f"{rel} is missing"
    assert (ROOT / "docs" / "architecture.svg").is_file()


def test_skips_that_name_an_app_name_the_test_that_covers_it() -> None:
    for b in all_blocks():
        reason = b.options.get("reason", "").lower()
        if b.skip and ("llm app" in reason or "services app" in reason):
            assert b.options.get("covered-by"), f"{b.id}: skipped for an app but names no covering test"


_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|<img[^>]+src=\"([^\"]+)\"")


@pytest.mark.parametrize("page", all_pages(), ids=PAGE_IDS)
def test_relative_links_resolve(page: Path) -> None:
    text = page.read_text()
    broken = []
    for m in _LINK.finditer(text):
        target = (m[1] or m[2]).split("#")[0]
        if not target or re.match(r"^[a-z]+:", target):
            continue
        if not (page.parent / target).exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} links to missing files: {broken}"


def _rma_argv(command: str) -> list[str] | None:
    """The arguments after `rma` in a shell command (after env assignments, sudo, exec), or None."""
    try:
        tokens = shlex.split(command)
    except ValueError:
        return None
    env_or_wrapper = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=|^(sudo|exec|-E)$")
    while tokens and env_or_wrapper.match(tokens[0]):
        tokens.pop(0)
    if not tokens or not (tokens[0] == "rma" or tokens[0].endswith("/rma")):
        return None
    return tokens[1:]


def check_rma(argv: list[str]) -> str | None:
    """Why `rma <argv>` is not a real command line of our CLI, or None."""
    from rma_ray.cli import app

    cmd = typer.main.get_command(app)  # typer vendors its own click: groups are told by their `commands`
    path = ["rma"]
    args = list(argv)
    while hasattr(cmd, "commands") and args and not args[0].startswith("-"):
        sub = cmd.commands.get(args[0])
        if sub is None:
            has = ", ".join(sorted(cmd.commands))
            return f"`{' '.join(path)}` has no subcommand {args[0]!r} (it has: {has})"
        path.append(args.pop(0))
        cmd = sub
    known = {"--help"} | {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}
    for a in args:
        if a.startswith("-") and a not in ("-", "--") and not re.match(r"^-\d", a):
            name = a.split("=", 1)[0]
            if name not in known:
                return f"`{' '.join(path)}` has no option {name} (it has: {', '.join(sorted(known))})"
    return None


def _shown_rma_commands() -> list[tuple[str, str]]:
    out = []
    for b in all_blocks():
        if b.lang in ("sh", "bash"):
            out += [(b.id, c) for c in command_lines(b)]
    for page in all_pages():
        rel = page.relative_to(ROOT)
        for line, span in inline_code(page):
            if span.startswith("rma ") or span == "rma":
                out.append((f"{rel}:{line}", span.replace("…", "").replace("...", "")))
    return out


def test_every_rma_command_shown_exists() -> None:
    bad = []
    for where, command in _shown_rma_commands():
        argv = _rma_argv(command)
        if argv is None:
            continue
        argv = [a for a in argv if not (a.startswith("[") or a.endswith("]") or a in ("|",))]
        why = check_rma(argv)
        if why:
            bad.append(f"{where}: {command!r}: {why}")
    assert not bad, "\n".join(bad)


def test_python_modules_and_make_targets_shown_exist() -> None:
    import importlib.util

    targets = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.M))
    bad = []
    for b in all_blocks():
        if b.lang not in ("sh", "bash"):
            continue
        for c in command_lines(b):
            tokens = shlex.split(c)
            if len(tokens) >= 3 and tokens[0].split("/")[-1].startswith("python") and tokens[1] == "-m":
                mod = tokens[2]
                if (
                    mod.split(".")[0] in ("bench", "deployments", "rma_ray", "admission")
                    and importlib.util.find_spec(mod) is None
                ):
                    bad.append(f"{b.id}: no module {mod}")
            if tokens and tokens[0] == "make":
                bad += [
                    f"{b.id}: no make target {t}"
                    for t in tokens[1:]
                    if not t.startswith("-") and "=" not in t and t not in targets
                ]
    assert not bad, "\n".join(bad)


def _route_sources() -> dict[str, dict[str, str]]:
    """File -> {name of a FastAPI app in it: the route prefix Serve mounts it at}, for the apps whose modules
    import ray.serve.llm (importing it loads vLLM: 18 s here), read from their source instead."""
    from deployments.embeddings import config as embeddings
    from deployments.llm import config as llm
    from deployments.services import batch_api
    from deployments.vision import config as vision

    return {
        "deployments/llm/openai.py": {"app": llm.LLM_ROUTE_PREFIX},
        "deployments/llm/inference.py": {"_inference_app": llm.INFERENCE_ROUTE_PREFIX},
        "deployments/vision/app.py": {"_app": vision.VISION_ROUTE_PREFIX},
        "deployments/embeddings/app.py": {"_app": embeddings.EMBEDDINGS_ROUTE_PREFIX},
        "deployments/services/batch_api.py": {
            "files": batch_api.FILES_PREFIX,
            "batches": batch_api.BATCHES_PREFIX,
        },
    }


def _decorated_routes(file: Path) -> list[tuple[str, str, str]]:
    """(app name, METHOD, path) of every `<app>.get/post/...("/path")` call in a module."""
    out = []
    for node in ast.walk(parse_python(file.read_text())):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("get", "post", "put", "delete", "patch")
            and isinstance(node.func.value, ast.Name)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and node.args[0].value.startswith("/")
        ):
            out.append((node.func.value.id, node.func.attr.upper(), node.args[0].value))
    return out


def code_routes() -> set[str]:
    """`METHOD /path` of every client route: the services app (FastAPI, at /api), the LLM and vision apps."""
    from deployments.services.api import Backends, create_api, public_routes

    services = create_api(Backends(None, None, None, None, None, None))
    routes = {f"{m} /api{p}" for m, p in public_routes(services) if m != "HEAD" and p != "/openapi.json"}
    for rel, prefixes in _route_sources().items():
        for app, method, path in _decorated_routes(ROOT / rel):
            assert app in prefixes, f"{rel}: routes on {app!r}, whose prefix the doc test does not know"
            full = (prefixes[app] + re.sub(r"\{(\w+):\w+\}", r"{\1}", path)).rstrip("/")
            routes.add(f"{method} {full}")
    return routes


def test_no_serve_app_with_routes_is_left_out_of_the_route_check() -> None:
    known = set(_route_sources())
    for file in sorted((ROOT / "deployments").rglob("*.py")):
        rel = str(file.relative_to(ROOT))
        if rel.startswith("deployments/services/routes/"):  # the services app's routers: in code_routes()
            continue
        if rel not in known and any(p.startswith("/") for _, _, p in _decorated_routes(file)):
            pytest.fail(f"{rel} serves routes: add it to _route_sources() and its routes to docs/client.md")


def doc_routes() -> set[str]:
    text = (ROOT / "docs" / "client.md").read_text()
    found = re.findall(r"`(GET|POST|PUT|DELETE|PATCH) (/[^`\s]*)`", text)
    return {m + " " + re.sub(r"\{(\w+):\w+\}", r"{\1}", p) for m, p in found}


def test_client_guide_lists_exactly_the_routes_the_code_serves() -> None:
    code, docs = code_routes(), doc_routes()
    assert not code - docs, f"routes the code serves that docs/client.md does not list: {sorted(code - docs)}"
    assert not docs - code, f"routes docs/client.md lists that the code does not serve: {sorted(docs - code)}"


def test_readme_has_exactly_two_setup_commands_and_make_knows_them() -> None:
    blocks: list[Block] = [b for b in parse(ROOT / "README.md", ROOT) if b.runnable]
    assert [b.text.strip() for b in blocks] == ["make up", "make test"]
    for target in ("up", "test"):
        r = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr


def test_the_picture_is_well_formed_svg() -> None:
    import xml.etree.ElementTree as ET

    root = ET.parse(ROOT / "docs" / "architecture.svg").getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"


def test_the_cli_check_refuses_what_the_cli_lacks() -> None:
    assert check_rma(["join", "http://x", "--cpus", "2", "--memory=8GB"]) is None
    assert "no option --cpu" in (check_rma(["join", "http://x", "--cpu", "2"]) or "")
    assert "no subcommand 'donor'" in (check_rma(["donor", "list"]) or "")
    assert "no option --ttl" in (check_rma(["donors", "list", "--ttl", "1h"]) or "")


@pytest.mark.parametrize(
    "text, error",
    [
        ("```\nrma probe\n```\n", "unlabelled code block"),
        ("```shell-session\nrma probe\n```\n", "unknown language"),
        ("<!-- doctest: skip -->\n```sh\nrma probe\n```\n", "needs reason"),
        ("<!-- doctest: expect=x -->\nsome prose\n```sh\nrma probe\n```\n", "not followed by a code block"),
        ("<!-- doctest: colour=red -->\n```sh\nrma probe\n```\n", "unknown doctest key"),
        ("<!-- doctest: background -->\n```sh\nrma join x\n```\n", "needs ready="),
        ("<!-- doctest: stdin=PASSWORD -->\n```sh\nread -rs X\n```\n", "stdin='PASSWORD'"),
        ("```sh\nrma probe\n", "never closed"),
    ],
)
def test_the_parser_refuses_pages_it_cannot_read_as_meant(tmp_path: Path, text: str, error: str) -> None:
    page = tmp_path / "page.md"
    page.write_text(text)
    with pytest.raises(DocError, match=re.escape(error)):
        parse(page, tmp_path)


def test_the_parser_reads_directives_roles_and_inert_blocks(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        '<!-- doctest-page: as=donor -->\n# t\n\n<!-- doctest: expect="a b" exit=1 -->\n\n```sh\n'
        "rma status\n```\n\n```text\nout\n```\n\n"
        '<!-- doctest: as=head skip reason="why not" -->\n'
        "````python\nprint(1)\n```\n````\n"
    )
    first, inert, last = parse(page, tmp_path)
    assert (first.role, first.options, first.text, first.line) == (
        "donor",
        {"expect": "a b", "exit": "1"},
        "rma status\n",
        6,
    )
    assert not inert.runnable and inert.text == "out\n"
    assert last.role == "head" and last.skip and last.options["reason"] == "why not"
    assert last.text == "print(1)\n```\n"


def test_command_lines_split_on_operators_and_join_continuations() -> None:

    text = "cd a && rma invite create \\\n  --ttl 2h   # a comment\nexport X=1; rma status | cat\n"
    b = Block("x.md", 1, "sh", text)
    assert command_lines(b) == ["cd a", "rma invite create --ttl 2h", "export X=1", "rma status", "cat"]
