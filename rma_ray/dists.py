"""What a donor's Python environment must share with the head's, read from installed metadata
(importlib.metadata): the distributions `rma-pool[extras]` needs, pinned to the versions installed here; the
fingerprint of the pool's own code; and this machine's versions. The coordinator serves them
(`/donor/constraints.txt`, `/donor/versions.json`: admission/services/donor_kit.py), `rma version --check`
compares this machine's with the head's, and images/node/constraints.py pins the donor image with the same
closure."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata as md
import importlib.util
import json
import os
import platform
import stat
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from rma_ray.wire import DonorVersions

ROOT = "rma-pool"
# The code a donor runs (the agent, the CLI and the Serve apps' modules Ray imports on its node); the coordinator
# (`admission`) never runs there, so the donor's wheel leaves it out and the fingerprint ignores it.
DONOR_PACKAGES = ("rma_ray", "deployments")


class ClosureError(Exception):
    """A requirement of the closure is not installed here, or installed at a version that does not satisfy it."""


def closure(
    extras: Iterable[str] = (),
    root: str = ROOT,
    python: str | None = None,
    pinned: Mapping[str, str] | None = None,
) -> dict[str, tuple[str, str]]:
    """{canonical name: (name, version)} of `root[extras]` and everything it requires, root excluded, each at
    the version installed in this environment. Markers are evaluated for `python` (a full version; default this
    interpreter's); `pinned` gives versions for what that Python needs and this one has not installed."""
    env: dict[str, str] = {k: str(v) for k, v in default_environment().items()}
    if python:
        env.update(python_full_version=python, python_version=".".join(python.split(".")[:2]))
    fixed = {canonicalize_name(k): v for k, v in (pinned or {}).items()}
    found: dict[str, tuple[str, str]] = {}
    visited: dict[str, set[str]] = {}

    def visit(name: str, want: set[str], req: Requirement | None) -> None:
        key = canonicalize_name(name)
        if key in fixed:
            if req is not None and not req.specifier.contains(fixed[key], prereleases=True):
                raise ClosureError(f"{name}=={fixed[key]} is pinned, but something requires {req}")
            found[key] = (name, fixed[key])
            return
        done = visited.setdefault(key, set())
        if key in found and want <= done:
            return
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            raise ClosureError(f"{name} is required but not installed here") from None
        if req is not None and not req.specifier.contains(dist.version, prereleases=True):
            raise ClosureError(f"{name} {dist.version} is installed, but something requires {req}")
        found[key] = (dist.metadata["Name"], dist.version)
        done |= want
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({**env, "extra": e}) for e in (want | {""})):
                visit(sub.name, set(sub.extras), sub)

    visit(root, set(extras), None)
    found.pop(canonicalize_name(root))
    return found


def public_version(version: str) -> str:
    """A pin a donor can meet from PyPI: the local label goes (torch `2.13.0+cpu` -> `2.13.0`, which `==`
    still matches on the head's own build)."""
    return Version(version).public


def counts_for_revision(path: str) -> bool:
    """The files the code fingerprint covers: the Python modules of the donor's packages."""
    return path.endswith(".py") and path.split("/", 1)[0] in DONOR_PACKAGES


def code_revision(files: Iterable[tuple[str, bytes]]) -> str:
    """A fingerprint of the pool's code from (path, content) pairs, paths relative to site-packages: the same
    on the head (read from the wheel it serves) and on a donor (read from what that wheel installed)."""
    digest = hashlib.sha256()
    for path, data in sorted((p, d) for p, d in files if counts_for_revision(p)):
        digest.update(f"{path}\0{hashlib.sha256(data).hexdigest()}\n".encode())
    return digest.hexdigest()[:16]


def _installed_files() -> Iterable[tuple[str, bytes]]:
    if editable_source() is None:  # installed from a wheel: what its RECORD lists
        listed = [f for f in md.distribution(ROOT).files or [] if counts_for_revision(f.as_posix())]
        return ((f.as_posix(), Path(str(f.locate())).read_bytes()) for f in listed)
    found: list[tuple[str, bytes]] = []  # an editable install (a checkout): the packages' own directories
    for package in DONOR_PACKAGES:
        spec = importlib.util.find_spec(package)
        for where in (spec.submodule_search_locations or []) if spec else []:
            base = Path(where).parent
            found += [(p.relative_to(base).as_posix(), p.read_bytes()) for p in Path(where).rglob("*.py")]
    return found


def local_versions() -> DonorVersions:
    """This machine's Python, Ray and pool versions, and the fingerprint of the pool's code installed here."""
    try:
        pool = md.version(ROOT)
        revision: str | None = code_revision(_installed_files())
    except md.PackageNotFoundError:
        pool, revision = "not installed", None
    try:
        ray = md.version("ray")
    except md.PackageNotFoundError:
        ray = "not installed"
    return DonorVersions(pool=pool, revision=revision, ray=ray, python=platform.python_version())


def mismatch(here: DonorVersions, head: DonorVersions) -> str | None:
    """What differs between this machine and the head, in one line; None when they match (Python by minor
    version: the pool starts Ray with RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL=minor)."""
    problems = []
    if here.python_minor != head.python_minor:
        problems.append(f"Python {here.python_minor} here, {head.python_minor} on the head")
    if here.ray != head.ray:
        problems.append(f"Ray {here.ray} here, Ray {head.ray} on the head")
    if here.pool != head.pool:
        problems.append(f"rma-pool {here.pool} here, {head.pool} on the head")
    elif head.revision and here.revision != head.revision:
        problems.append(
            f"the pool's code differs (revision {here.revision} here, {head.revision} on the head)"
        )
    return "; ".join(problems) or None


def editable_source(name: str = ROOT) -> Path | None:
    """The checkout an editable install of `name` points to (PEP 610's direct_url.json), or None. Every
    distribution of that name is asked: a checkout's own `*.egg-info` on sys.path (`python -m` from the
    checkout) shadows the installed one, and has no direct_url.json."""
    for dist in md.distributions(name=name):
        raw = dist.read_text("direct_url.json")
        info = json.loads(raw) if raw else {}
        url = info.get("url", "")
        if (info.get("dir_info") or {}).get("editable") and url.startswith("file://"):
            return Path(url2pathname(urlparse(url).path))
    return None


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def repack(
    name: str, dest: Path, exclude: Iterable[str] = (), compression: int = zipfile.ZIP_DEFLATED
) -> Path:
    """Pack an installed distribution back into a wheel in `dest` (PEP 427), from the files its RECORD lists:
    for a distribution with no source at hand (the head installed from a wheel; a test's wheelhouse made of its
    own environment, so that an install needs no index). Bytecode, the installer's own files and generated
    console scripts are left out; other scripts go back under .data/scripts with their `#!python` line; top-level
    packages in `exclude` are left out. Returns the wheel's path."""
    dist = md.distribution(name)
    info = next((Path(str(f.locate())).parent for f in dist.files or [] if f.name == "METADATA"), None)
    if info is None or not (info / "WHEEL").is_file():
        raise ClosureError(f"{name}: no .dist-info with a WHEEL file to pack from")
    stem = info.name.removesuffix(".dist-info")  # name-version, already escaped by the installer
    tags = [
        ln.split(":", 1)[1].strip()
        for ln in (info / "WHEEL").read_text().splitlines()
        if ln.startswith("Tag:")
    ]
    data_dir = f"{stem}.data"
    site = info.parent
    prefix = Path(sys.prefix)
    generated = {ep.name for ep in dist.entry_points if ep.group in ("console_scripts", "gui_scripts")}
    skip_info = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}
    entries: list[tuple[str, bytes]] = []
    for f in dist.files or []:
        path = Path(str(f.locate())).resolve()
        if not path.is_file() or path.suffix == ".pyc" or "__pycache__" in path.parts:
            continue
        if path.is_relative_to(site.resolve()):
            rel = path.relative_to(site.resolve()).as_posix()
            top = rel.split("/", 1)[0]
            if top in exclude or (top == info.name and rel.split("/")[-1] in skip_info):
                continue
            entries.append((rel, path.read_bytes()))
        elif path.is_relative_to(prefix.resolve()):
            rel = path.relative_to(prefix.resolve()).as_posix()
            data = path.read_bytes()
            if rel.startswith("bin/"):
                if path.name in generated:
                    continue
                if data.startswith(b"#!") and b"python" in data.split(b"\n", 1)[0]:
                    data = b"#!python\n" + data.split(b"\n", 1)[1]
                entries.append((f"{data_dir}/scripts/{path.name}", data))
            else:
                entries.append((f"{data_dir}/data/{rel}", data))
    dest.mkdir(parents=True, exist_ok=True)
    # the compressed tag set of the file name (PEP 425): `Tag: py2-none-any` + `Tag: py3-none-any` -> py2.py3-none-any
    parts = [".".join(dict.fromkeys(t.split("-")[i] for t in tags)) for i in range(3)]
    wheel = dest / f"{stem}-{'-'.join(parts)}.whl"
    record = f"{info.name}/RECORD"
    # a temp file of its own (two packers of one wheel never write the same file), renamed into place whole
    with tempfile.NamedTemporaryFile(dir=dest, prefix=f".{stem}-", suffix=".tmp", delete=False) as fh:
        tmp = Path(fh.name)
    try:
        _write_wheel(tmp, entries, info.name, record, compression)
        # a wheel is for anyone to read (mkstemp made it 0600): a donor's pip runs as its own user
        os.chmod(tmp, 0o644)
        os.replace(tmp, wheel)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return wheel


def _write_wheel(
    tmp: Path, entries: list[tuple[str, bytes]], info_name: str, record: str, compression: int
) -> None:
    with zipfile.ZipFile(tmp, "w", compression=compression) as zf:
        lines = []
        # the .dist-info last, as the spec recommends
        for rel, data in sorted(entries, key=lambda e: (e[0].startswith(info_name + "/"), e[0])):
            zinfo = zipfile.ZipInfo(rel, date_time=(1980, 1, 1, 0, 0, 0))
            zinfo.external_attr = (stat.S_IFREG | (0o755 if "/scripts/" in rel else 0o644)) << 16
            zinfo.compress_type = compression
            zf.writestr(zinfo, data)
            lines.append(f"{rel},{_record_hash(data)},{len(data)}")
        lines.append(f"{record},,")
        zf.writestr(zipfile.ZipInfo(record, date_time=(1980, 1, 1, 0, 0, 0)), "\n".join(lines) + "\n")
