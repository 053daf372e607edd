"""The donor kit: what `curl -fsSL <coordinator>/donor/install.sh | sh` installs on a donor, for this head's
exact code, Ray and Python: the pool's wheel, a constraints file and the install script (routes/donor.py).

Why it is built this way:
- The wheel holds what a donor runs (`rma_ray`, `deployments`), as the donor images do: the coordinator
  (`admission`) never runs on a donor. Its entry point group still names `admission`; `rma` skips a room an
  install leaves out.
- From a checkout (an editable install, `make up`): `pip wheel --no-deps --no-build-isolation --no-index` of a
  staged copy of pyproject.toml, README.md and those packages, so setuptools' in-tree build leaves the checkout
  clean and needs no index. Installed from a wheel (an image): the installed files packed back into a wheel
  (rma_ray.dists.repack), the coordinator left out.
- Built on the first request under /donor/, not at start: most coordinators (and every test that starts one)
  never serve a donor, and a build costs seconds of CPU. Cached in `<data_dir>/donor-kit/<source hash>/`: a
  restart reuses it, a changed checkout builds anew, and the wheel's bytes (so its sha256, which the script
  checks) stay the same for one revision.
- Constraints pin every distribution `rma-pool` needs for a donor's extras (none, `overlay`, `services`) to the
  version installed on the head (local labels dropped: `torch==2.13.0` is met by PyPI's build and the head's
  `+cpu` one alike). pip cannot constrain the interpreter: the script finds the head's Python minor version.
- Nothing in the kit is secret (code, versions, the coordinator's own URL), so /donor/ needs no credential
  (SECURITY.md); joining still needs an invite.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from importlib import metadata as md
from pathlib import Path

from admission.errors import ApiError
from admission.state import AppState
from rma_ray import dists
from rma_ray.wire import DonorVersions

log = logging.getLogger("rma.admission.donor_kit")

DONOR_EXTRAS = (
    "overlay",
    "services",
)  # what `install.sh --extras` may ask for; the head's own extras are not
SCRIPT = Path(__file__).resolve().parent.parent / "templates" / "donor-install.sh"
_STAGED = ("pyproject.toml", "README.md", *dists.DONOR_PACKAGES)
REPRODUCIBLE_EPOCH = "315532800"  # 1980-01-01, the earliest time a zip entry holds
_lock = threading.Lock()
_LOCK_WAIT_S = (
    0.5  # a request during a build waits this long, then gets 503 + Retry-After (no queued threads)
)
_FAILURE_TTL_S = 60.0  # a failed build is answered from memory this long (503 at once, with its reason)


@dataclass(frozen=True)
class Kit:
    wheel: Path
    sha256: str
    versions: DonorVersions
    constraints: str


def get(state: AppState) -> Kit:
    """This head's kit, built (or found in the cache) once per process; 503 when it cannot be built or while
    another request builds it. Served only by `rma up`'s own coordinator (settings.donor_kit): the kit
    describes this machine's Python and Ray, which are the head's only there."""
    if not state.settings.donor_kit:
        raise ApiError(  # not served here at all (not a passing failure): 404
            404,
            "donor_kit_not_served",
            "the install line is served by `rma up` coordinators only (this one's Ray head runs elsewhere): "
            "install rma-pool of the head's version on the donor by hand (docs/donor.md)",
        )
    kit = state.donor_kit
    if isinstance(kit, Kit) and kit.wheel.is_file():
        return kit
    if not _lock.acquire(timeout=_LOCK_WAIT_S):
        raise ApiError(
            503, "donor_kit_building", "building the donor kit, retry in a moment", {"Retry-After": "5"}
        )
    try:
        kit = state.donor_kit
        if isinstance(kit, Kit) and kit.wheel.is_file():
            return kit
        failed = state.donor_kit_failure
        if failed is not None and time.monotonic() - failed[0] < _FAILURE_TTL_S:
            raise ApiError(503, "donor_kit_unavailable", failed[1])
        try:
            kit = _build(state.settings.data_dir / "donor-kit")
        except ApiError as exc:
            state.donor_kit_failure = (time.monotonic(), exc.message)
            raise
        except Exception as exc:  # ClosureError, OSError, a bad wheel: a refusal with the reason, never a 500
            log.exception("donor kit: build failed")
            reason = f"this coordinator cannot build the donor kit ({type(exc).__name__}: {exc}); see its log"
            state.donor_kit_failure = (time.monotonic(), reason)
            raise ApiError(503, "donor_kit_unavailable", reason) from None
        state.donor_kit, state.donor_kit_failure = kit, None
        return kit
    finally:
        _lock.release()


def _source_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for top in _STAGED:
        paths = [root / top] if (root / top).is_file() else sorted((root / top).rglob("*"))
        for p in paths:
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc":
                digest.update(f"{p.relative_to(root).as_posix()}\0".encode() + p.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _installed_hash() -> str:
    dist = md.distribution(dists.ROOT)
    return hashlib.sha256((dist.read_text("RECORD") or dist.version).encode()).hexdigest()[:16]


def _build(cache: Path) -> Kit:
    source = dists.editable_source()
    key = _source_hash(source) if source else _installed_hash()
    final = cache / key
    if not any(final.glob("*.whl")):
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache, prefix=".build-") as tmp:
            out = Path(tmp) / "out"
            if source:
                _pip_wheel(source, Path(tmp) / "src", out)
            else:
                dists.repack(dists.ROOT, out, exclude=("admission",))
            shutil.rmtree(final, ignore_errors=True)
            out.replace(final)
        log.info("donor kit: built %s in %s", next(final.glob("*.whl")).name, final)
    wheel = next(final.glob("*.whl"))
    data = wheel.read_bytes()
    with zipfile.ZipFile(wheel) as zf:
        revision = dists.code_revision((n, zf.read(n)) for n in zf.namelist() if dists.counts_for_revision(n))
    versions = DonorVersions(
        pool=wheel.name.split("-")[1],
        revision=revision,
        ray=md.version("ray"),
        python=platform.python_version(),
        wheel=wheel.name,
    )
    return Kit(wheel, hashlib.sha256(data).hexdigest(), versions, _constraints(versions))


def _pip_wheel(source: Path, staged: Path, out: Path) -> None:
    staged.mkdir()
    for top in _STAGED:
        if (source / top).is_dir():
            shutil.copytree(source / top, staged / top, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif (source / top).is_file():
            shutil.copy2(source / top, staged / top)
    argv = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    # the same source gives the same bytes (zip times from SOURCE_DATE_EPOCH, not the build's clock): two
    # coordinators, or one rebuilding its cache, serve one sha256 for one revision
    env = {**os.environ, "SOURCE_DATE_EPOCH": REPRODUCIBLE_EPOCH}
    try:
        res = subprocess.run(
            [*argv, "-w", str(out), str(staged)], capture_output=True, text=True, timeout=300, env=env
        )
    except subprocess.TimeoutExpired:
        raise ApiError(503, "donor_kit_unavailable", "building the pool's wheel took over 300 s") from None
    if res.returncode != 0:
        log.error("donor kit: pip wheel failed:\n%s%s", res.stdout, res.stderr)
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise ApiError(
            503,
            "donor_kit_unavailable",
            f"this coordinator cannot build the pool's wheel ({last}); its log has pip's output",
        )


def _constraints(versions: DonorVersions) -> str:
    pins: dict[str, tuple[str, str]] = dists.closure()
    left_out = []
    for extra in DONOR_EXTRAS:
        try:
            pins.update(dists.closure({extra}))
        except dists.ClosureError as exc:  # the head has not installed that extra: nothing to pin it to
            left_out.append(f"# {extra}: not pinned ({exc})")
    lines = [
        f"# rma-pool {versions.pool} (revision {versions.revision}): pins from the head's own environment",
        f"# Python {versions.python_minor} (the head runs {versions.python}); pip cannot constrain the "
        "interpreter, install.sh checks it",
        *left_out,
        *(f"{name}=={dists.public_version(v)}" for _, (name, v) in sorted(pins.items())),
    ]
    return "\n".join(lines) + "\n"


def script(kit: Kit, coordinator_url: str, overlay: bool) -> str:
    """install.sh for this head: the fixed body (templates/donor-install.sh) after the head's values."""
    v = kit.versions
    values = {
        "RMA_POOL_URL": coordinator_url,
        "RMA_PYTHON": v.python_minor,
        "RMA_RAY": v.ray,
        "RMA_POOL_VERSION": v.pool,
        "RMA_REVISION": v.revision or "",
        "RMA_WHEEL": kit.wheel.name,
        "RMA_WHEEL_SHA256": kit.sha256,
        "RMA_POOL_OVERLAY": "yes" if overlay else "no",
        "RMA_DONOR_EXTRAS": ",".join(DONOR_EXTRAS),
    }
    header = "\n".join(f"{k}={shlex.quote(val)}" for k, val in values.items())
    return SCRIPT.read_text().replace("# @HEAD_VALUES@", header, 1)


def error_script(message: str) -> str:
    """What /donor/install.sh serves when it cannot serve the installer: prints the reason, exits 1."""
    line = " ".join(message.split())
    return f"#!/bin/sh\nprintf 'rma install: error: %s\\n' {shlex.quote(line)} >&2\nexit 1\n"
