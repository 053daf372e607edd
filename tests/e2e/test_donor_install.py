"""The one install line for donors, run for real: `curl -fsSL <coordinator>/donor/install.sh | sh`, fetched
from a real coordinator, inside a network namespace that reaches nothing but that coordinator, as an unprivileged
user (nobody) with an empty HOME, no PYTHONPATH and nothing of this checkout on the PATH (only a `python3.11`
and the system's tools).

No index is reachable there, so pip installs from a wheelhouse packed from this test environment's own
installed distributions (rma_ray.dists.repack): the very versions the head's constraints pin. It is kept in
/var/cache/rma/venv-wheels between runs (~10 s to make, ~0 s after). The install itself ~30 s; the rerun that
checks idempotence and a version mismatch ~5 s; the same line where uv is on the PATH (the `uv` test extra)
~5 s, then a pip run (--no-uv) over uv's pip-less venv (ensurepip) ~30 s. Not covered here:
--overlay-packages (apt-get from inside the namespace cannot reach a mirror) and uv fetching a Python of its own
(nothing to fetch it from)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from importlib import metadata as md
from pathlib import Path
from typing import Any

import pytest
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import Version

from admission.main import build_state, create_app, prepare_database
from admission.services import donor_kit
from admission.state import AppState
from rma_ray import dists
from tests.e2e.netns import Host, TestBed, available
from tests.integration.conftest import make_settings
from tests.support import ServerThread

pytestmark = pytest.mark.e2e

WHEELHOUSE = Path(os.environ.get("RMA_TEST_WHEELHOUSE", "/var/cache/rma/venv-wheels"))
NOBODY = 65534
RAY = md.version("ray")


@dataclasses.dataclass
class Installer:
    host: Host
    url: str
    state: AppState
    home: Path
    env: dict[str, str]

    def run(self, argv: list[str], timeout: float = 300) -> Any:
        as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        return self.host.run([*as_nobody, *argv], check=False, timeout=timeout, env=self.env, cwd=self.home)

    def install(self, *args: str) -> Any:
        return self.run(["sh", "-c", f"curl -fsSL {self.url}/donor/install.sh | sh -s -- {' '.join(args)}"])

    @property
    def rma(self) -> str:
        return str(self.home / ".local" / "bin" / "rma")

    def installed(self) -> None:
        """Installs first where this test runs alone (the venv is missing)."""
        if not Path(self.rma).exists():
            res = self.install()
            assert res.returncode == 0, res.stdout + res.stderr


def _wheelhouse() -> Path:
    """Wheels of everything `rma-pool` needs, packed from this environment (only those not packed yet)."""
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    have: dict[str, list[tuple[Version, Path]]] = {}
    for p in WHEELHOUSE.glob("*.whl"):
        try:
            wname, wversion, _, _ = parse_wheel_filename(p.name)
        except InvalidWheelFilename:
            p.unlink(missing_ok=True)
            continue
        have.setdefault(wname, []).append((wversion, p))
        if p.stat().st_mode & 0o444 != 0o444:  # an older packer made 0600: the donor (nobody) must read it
            p.chmod(0o644)
    for key, (name, version) in dists.closure().items():
        found = have.get(canonicalize_name(key), [])
        if any(v == Version(version) for v, _ in found):
            continue
        dists.repack(name, WHEELHOUSE, compression=zipfile.ZIP_STORED)  # stored: no time spent deflating
        for _, old in found:  # another version of it: pip would be free to pick either
            old.unlink(missing_ok=True)
    return WHEELHOUSE


@pytest.fixture(scope="module")
def installer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installer]:
    """A one-host bed (~1 s), a coordinator served in this process on the bed's head address, the wheelhouse,
    and a clean environment for the donor's shell."""
    why = available()
    if why:
        pytest.skip(why)
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) not found: the install runs as an unprivileged user")
    wheels = _wheelhouse()
    # under /tmp, not pytest's 0700 tmp_path: the donor's user must reach its HOME and the interpreter
    tmp = Path(tempfile.mkdtemp(prefix="rma-donor-install-"))
    pybin = tmp / "python-only"
    pybin.mkdir()
    (pybin / "python3.11").symlink_to(sys._base_executable)  # this interpreter's own Python, not the venv
    home = tmp / "home"
    home.mkdir()
    for p in (tmp, home):
        os.chown(p, NOBODY, NOBODY)
    env = {
        "HOME": str(home),
        "PATH": f"{pybin}:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "TMPDIR": str(tmp),
        "PIP_CONFIG_FILE": os.devnull,  # no machine-wide pip settings: only these
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(wheels),
        "PIP_NO_COMPILE": "1",
    }
    head_dir = tmp_path_factory.mktemp("donor-install-head")
    # donor_kit: as `rma up` sets it (this coordinator runs beside this environment's Ray)
    settings = make_settings(f"sqlite:///{head_dir / 'coordinator.db'}", head_dir / "data", donor_kit=True)
    state = build_state(settings)
    prepare_database(state)
    try:
        with TestBed(1, prefix="rmainst") as bed:
            with ServerThread(create_app(state=state), host=bed.head_ip) as server:
                yield Installer(bed.hosts[0], server.url, state, home, env)
    finally:
        state.engine.dispose()
        shutil.rmtree(tmp, ignore_errors=True)


def test_the_install_line_installs_rma_for_the_heads_versions_in_a_clean_namespace(
    installer: Installer,
) -> None:
    res = installer.install()
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"rma join {installer.url} --token-file ~/.config/rma/join-token" in res.stdout
    assert "Traceback" not in res.stdout + res.stderr

    res = installer.run([installer.rma, "--help"])
    assert res.returncode == 0 and "join" in res.stdout, res.stdout + res.stderr
    res = installer.run([installer.rma, "version", "--check", installer.url])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "matches the head" in res.stdout

    venv = installer.home / ".local" / "share" / "rma" / "venv"
    probe = "import ray, rma_ray; print(rma_ray.__file__, ray.__version__); import admission"
    res = installer.run([str(venv / "bin" / "python"), "-c", probe])
    # the donor's own copy of the pool's code, not this checkout; and no coordinator in it
    assert res.stdout.startswith(str(venv)), res.stdout + res.stderr
    assert RAY in res.stdout
    assert "No module named 'admission'" in res.stderr


def test_a_second_run_upgrades_in_place_and_a_version_mismatch_fails_clearly(installer: Installer) -> None:
    installer.installed()
    kit = donor_kit.get(installer.state)
    try:
        installer.state.donor_kit = dataclasses.replace(
            kit, versions=kit.versions.model_copy(update={"ray": "2.99.0"})
        )
        res = installer.run([installer.rma, "version", "--check", installer.url])
        assert res.returncode == 1
        assert f"Ray {RAY} here, Ray 2.99.0 on the head" in res.stderr
        assert "Traceback" not in res.stdout + res.stderr

        res = installer.install()  # the same venv, upgraded in place; the check before joining refuses
        assert res.returncode == 1, res.stdout + res.stderr
        assert "with pip" in res.stdout and "replacing" not in res.stdout
        assert "does not match the pool's head" in res.stderr and "Traceback" not in res.stderr

        installer.state.donor_kit = dataclasses.replace(
            kit, versions=kit.versions.model_copy(update={"python": "3.99.1"})
        )
        res = installer.install()
        assert res.returncode == 1
        assert "runs Python 3.99" in res.stderr and "python3.99" in res.stderr
    finally:
        installer.state.donor_kit = kit


def test_where_uv_is_on_the_path_the_same_line_installs_with_uv(installer: Installer) -> None:
    uv = shutil.which("uv") or str(Path(sys.executable).parent / "uv")
    if not os.access(uv, os.X_OK):
        pytest.skip("uv is not installed (the `test` extra installs it)")
    home = installer.home.parent / "home-uv"
    empty_index = (
        installer.home.parent / "empty-index"
    )  # uv has no --no-index variable: an index with nothing
    tools = installer.home.parent / "python-and-uv"  # its own: the other tests' PATH stays without uv
    for d in (home, empty_index, tools):
        d.mkdir()
        os.chown(d, NOBODY, NOBODY)
    (tools / "uv").symlink_to(uv)
    (tools / "python3.11").symlink_to(sys._base_executable)
    uv_env = {
        **installer.env,
        "PATH": f"{tools}:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(home),
        "UV_DEFAULT_INDEX": empty_index.as_uri(),
        "UV_FIND_LINKS": installer.env["PIP_FIND_LINKS"],
        "UV_PYTHON_DOWNLOADS": "never",
        "UV_NO_CONFIG": "1",
    }
    uv_installer = dataclasses.replace(installer, home=home, env=uv_env)
    res = uv_installer.install()
    assert res.returncode == 0, res.stdout + res.stderr
    assert "with uv" in res.stdout and "matches the head" in res.stdout
    res = uv_installer.run([uv_installer.rma, "version", "--check", installer.url])
    assert res.returncode == 0 and "matches the head" in res.stdout, res.stdout + res.stderr

    # the same venv on a pip run (--no-uv): uv made it without pip, the script adds pip (ensurepip) first
    res = uv_installer.install("--no-uv")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "with pip" in res.stdout and "matches the head" in res.stdout
